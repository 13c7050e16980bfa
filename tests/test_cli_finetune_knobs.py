"""Issue 20, item 4: the fine-tuning knobs every peer has, and --model DIR's own defaults."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import hf_fixtures as hx
import pytest
import torch

from gradaccum.cli import main
from gradaccum.commands.defaults import DEFAULT_LR, DEFAULT_LR_FULL, DEFAULT_LR_LORA

LINES = "hello world\nthe quick brown fox\nsphinx of black quartz\njudge my vow\n" * 8  # 32 examples
TINY = ["--effective-batch", "16", "--micro-batch", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("knobs") / "lines.txt"
    path.write_text(LINES)
    return path


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _ck(out: Path) -> dict[str, Any]:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def test_epochs_set_the_steps_and_start_up_says_what_they_cover(data: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(data), "--epochs", "1.5", "--out", str(out)]) == 0
    assert len(_rows(out)) == math.ceil(1.5 * 32 / 16) == 3
    text = capsys.readouterr().out
    assert "data: 32 examples; an epoch is 2 steps of 16 examples; 3 steps cover 1.5 epochs" in text


@pytest.mark.parametrize(("kind", "factor"), [
    ("linear", lambda s, w, n: (s + 1) / w if s < w else 1 - (s - w) / (n - w)),
    ("constant", lambda s, w, n: (s + 1) / w if s < w else 1.0),
    ("cosine", lambda s, w, n: (s + 1) / w if s < w
     else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - w) / (n - w)))),
])
def test_schedules_and_warm_up(data: Path, tmp_path: Path, kind: str, factor: Any) -> None:
    out = tmp_path / kind
    assert main(["train", *TINY, "--data", str(data), "--steps", "6", "--lr-scheduler", kind,
                 "--warmup-steps", "2", "--out", str(out)]) == 0
    lrs = [r["lr"] for r in _rows(out)]
    assert lrs == pytest.approx([DEFAULT_LR * factor(s, 2, 6) for s in range(6)], rel=1e-12)


def test_warmup_ratio_is_a_fraction_of_the_steps(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(data), "--steps", "10", "--warmup-ratio", "0.3",
                 "--lr-scheduler", "constant", "--out", str(out)]) == 0
    assert [r["lr"] for r in _rows(out)][:4] == pytest.approx([DEFAULT_LR * k / 3 for k in (1, 2, 3, 3)])


def test_weight_decay_and_clipping_off(data: Path, tmp_path: Path) -> None:
    """--max-grad-norm 0 turns clipping off: the same weights as a bound no gradient reaches."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["train", *TINY, "--data", str(data), "--steps", "2", "--weight-decay", "0.3"]
    assert main([*common, "--max-grad-norm", "0", "--out", str(a)]) == 0
    assert main([*common, "--max-grad-norm", "1e6", "--out", str(b)]) == 0
    assert all(g["weight_decay"] == 0.3 for g in _ck(a)["optimizer"]["param_groups"])
    assert max(r["grad_norm"] for r in _rows(a)) > 1.0  # the default bound (1.0) would have clipped
    for k, v in _ck(a)["model"].items():
        assert torch.equal(v, _ck(b)["model"][k]), k


@pytest.mark.parametrize(("args", "flag"), [
    (["--steps", "3", "--epochs", "1"], "--epochs"),
    (["--warmup-steps", "2", "--warmup-ratio", "0.1"], "--warmup-ratio"),
    (["--steps", "3", "--warmup-steps", "5"], "--warmup-steps"),
    (["--weight-decay", "2"], "--weight-decay"),
    (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--lr-scheduler", "step"], "--lr-scheduler"),
])
def test_bad_knobs_are_refused(data: Path, tmp_path: Path, args: list[str], flag: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(["train", *TINY, "--data", str(data), *args, "--out", str(tmp_path / "run")])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and flag in err, err
    assert not (tmp_path / "run").exists()


def test_resume_refuses_changed_knobs(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(data), "--steps", "2", "--out", str(out)]) == 0
    for changed, flag in ((["--weight-decay", "0.2"], "--weight-decay"), (["--lr-scheduler", "linear"],
                                                                         "--lr-scheduler")):
        capsys.readouterr()
        assert main(["train", *TINY, "--data", str(data), "--steps", "2", *changed, "--resume",
                     "--out", str(out)]) == 2
        assert flag in capsys.readouterr().err


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    model = hx.make_llama_dir(root / "llama")
    texts = [{"text": t} for t in hx.corpus(32)]
    return {"model": model, "data": hx.write_jsonl(root / "data.jsonl", texts)}


@pytest.mark.parametrize(("extra", "lr"), [([], DEFAULT_LR_FULL), (["--lora-r", "2"], DEFAULT_LR_LORA)])
def test_model_dir_gets_its_own_lr_default(llama: dict[str, Path], tmp_path: Path, extra: list[str],
                                           lr: float) -> None:
    out = tmp_path / "run"
    assert main(["train", "--model", str(llama["model"]), "--data", str(llama["data"]), *TINY, "--steps", "1",
                 *extra, "--out", str(out)]) == 0
    assert _ck(out)["run"]["--lr"] == lr and _rows(out)[0]["lr"] == pytest.approx(lr)


def test_bf16_on_a_cpu_says_it_is_slow(data: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *TINY, "--data", str(data), "--steps", "1", "--precision", "bf16",
                 "--out", str(tmp_path / "run")]) == 0
    assert "--precision bf16 on a CPU" in capsys.readouterr().err


def test_lora_dropout_and_target_modules(llama: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--model", str(llama["model"]), "--data", str(llama["data"]), *TINY, "--steps", "1",
                 "--lora-r", "2", "--lora-dropout", "0.1", "--lora-target-modules", "q_proj,v_proj",
                 "--out", str(out)]) == 0
    cfg = json.loads((out / "model" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "v_proj"} and cfg["lora_dropout"] == 0.1
    trained = [k for k in _ck(out)["model"] if "lora_A" in k]
    assert trained and all(".q_proj." in k or ".v_proj." in k for k in trained)
    assert _ck(out)["run"]["--lora-target-modules"] == "q_proj,v_proj"


@pytest.mark.parametrize(("args", "flag"), [
    (["--lora-dropout", "0.1"], "--lora-dropout"),
    (["--lora-target-modules", "q_proj"], "--lora-target-modules"),
    (["--lora-r", "2", "--lora-dropout", "1"], "--lora-dropout"),
    (["--lora-r", "2", "--lora-target-modules", "nope_proj"], "--lora-target-modules"),
])
def test_bad_lora_knobs(llama: dict[str, Path], tmp_path: Path, args: list[str], flag: str,
                        capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(["train", "--model", str(llama["model"]), "--data", str(llama["data"]), *TINY,
                     "--steps", "1", *args, "--out", str(tmp_path / "run")])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and flag in err, err
    assert not (tmp_path / "run").exists()
