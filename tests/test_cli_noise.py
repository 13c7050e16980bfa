"""gradaccum train measures the gradient noise scale, and --effective-batch auto follows it."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

import gradaccum.demo
from gradaccum.cli import main

AUTO = ["--effective-batch", "auto", "--micro-batch", "1", "--steps", "60", "--lr", "5e-3",
        "--eval-every", "0", "--checkpoint-every", "0"]
VOLATILE = ("elapsed_s", "tokens_per_s", "examples_per_s")


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_noise_scale_and_critical_batch_are_logged(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "run"
    assert main(["train", "--steps", "6", "--effective-batch", "16", "--micro-batch", "4",
                 "--out", str(out)]) == 0
    rows = _rows(out)
    assert rows[0]["noise_scale"] is None and rows[0]["critical_batch"] is None  # two measured windows first
    assert rows[1]["critical_batch_low"] is None  # its interval: about three windows first
    assert all(list(r) == list(rows[0]) for r in rows)  # one schema: every key in every row
    for r in rows[2:]:
        if r["noise_scale"] is not None:  # None while the measured |G|^2 is not yet positive
            # critical batch (examples) = noise scale (tokens) / tokens per example so far
            assert r["critical_batch"] == pytest.approx(r["noise_scale"] / (r["num_items"] / 16), rel=0.5)
    summary = json.loads((out / "summary.json").read_text())
    assert "critical_batch" in summary
    text = capsys.readouterr().out
    for r in rows:  # the point estimate lies inside its interval (high null: unbounded)
        if r["critical_batch_low"] is not None and r["critical_batch"] is not None:
            high = r["critical_batch_high"] or float("inf")
            assert r["critical_batch_low"] <= r["critical_batch"] <= high
    if summary["critical_batch"] is not None:  # 6 steps: too few to read it (issue 20)
        assert "the critical batch has not settled yet" in text and "about" not in text


def test_no_noise_scale_turns_it_off_and_changes_no_weight(tmp_path: Path) -> None:
    args = ["train", "--steps", "4", "--effective-batch", "16", "--micro-batch", "4"]
    assert main([*args, "--out", str(tmp_path / "on")]) == 0
    assert main([*args, "--no-noise-scale", "--out", str(tmp_path / "off")]) == 0
    assert all(r["noise_scale"] is None and r["critical_batch"] is None for r in _rows(tmp_path / "off"))
    on = torch.load(tmp_path / "on" / "checkpoint.pt", weights_only=True)["model"]
    off = torch.load(tmp_path / "off" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(on[k], off[k]) for k in on)


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("auto") / "run"
    assert main(["train", *AUTO, "--out", str(out)]) == 0
    return out


def test_auto_batch_grows_in_powers_of_two_and_never_shrinks(auto_run: Path) -> None:
    rows = _rows(auto_run)
    batches = [r["effective_batch"] for r in rows]
    assert batches[0] == 2 and batches == sorted(batches) and max(batches) > 2  # it grew
    for r in rows:
        assert r["effective_batch"] == r["micro_batch"] * r["accum_steps"] * r["world_size"]
        assert r["effective_batch"] & (r["effective_batch"] - 1) == 0
    # The data position counts examples: every row's examples_seen adds that row's batch.
    seen = 0
    for r in rows:
        seen += r["effective_batch"]
        assert r["examples_seen"] == seen


def test_auto_batch_resumes_bitwise_across_a_batch_change(auto_run: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows(auto_run)
    grown = next(i for i, r in enumerate(rows) if r["effective_batch"] > 2)  # first step at a larger batch
    calls_before = sum(r["accum_steps"] for r in rows[: grown + 1])  # micro-batches through that step
    real, calls = gradaccum.demo.loss_fn, {"n": 0}

    def signalling(model: Any, batch: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == calls_before + 1:  # first micro-batch of the step after the change
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch)

    out = tmp_path / "run"
    monkeypatch.setattr(gradaccum.demo, "loss_fn", signalling)
    assert main(["train", *AUTO, "--out", str(out)]) == 128 + signal.SIGTERM
    monkeypatch.setattr(gradaccum.demo, "loss_fn", real)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == grown + 2
    assert main(["train", *AUTO, "--out", str(out), "--resume"]) == 0
    want = torch.load(auto_run / "checkpoint.pt", weights_only=True)
    got = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(want["model"][k], got["model"][k]) for k in want["model"])
    strip = [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]
    assert [{k: v for k, v in r.items() if k not in VOLATILE} for r in _rows(out)] == strip


def test_auto_batch_bad_flags(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "run"
    for argv in (["--effective-batch", "auto", "--micro-batch", "auto"],
                 ["--effective-batch", "auto", "--micro-batch", "8", "--max-effective-batch", "8"],
                 ["--effective-batch", "auto", "--memory-budget", "1GiB"]):
        assert main(["train", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_lr_batch_rule_is_part_of_the_run_only_when_given(auto_run: Path, tmp_path: Path) -> None:
    assert "--lr-batch-rule" not in json.loads((auto_run / "config.json").read_text()).get("run", {})
    out = tmp_path / "none"
    assert main(["train", *AUTO, "--steps", "2", "--lr-batch-rule", "none", "--out", str(out)]) == 0
    text = (out / "config.json").read_text()
    assert '"--lr-batch-rule": "none"' in text
