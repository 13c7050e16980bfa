"""gradaccum train/plan/check/compare/bench --packing on a user's model directory.

The numerics are in test_packing.py (float64, 1e-10); here the CLI runs in float32, so a
packed run is held to the padded one at float32 rounding: a few 1e-7 per step over 4 steps
of AdamW on a tiny model, bound 1e-5 (the same bar as the micro-batch tests of the CLI).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import hf_fixtures as hx
import pytest
from test_cli_bad_input import tree_digest

from gradaccum.cli import main


def _pc(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(hx.WORDS) for _ in range(k))  # noqa: E731
    return [{"prompt": words(rng.randint(1, 8)), "completion": " " + words(rng.randint(1, 20))}
            for _ in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pack")
    return {"llama": hx.make_llama_dir(d / "llama"), "pc": hx.write_jsonl(d / "pc.jsonl", _pc(64, 1)),
            "eval": hx.write_jsonl(d / "eval.jsonl", _pc(10, 2))}


def _train(files: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["train", "--model", str(files["llama"]), "--data", str(files["pc"]), "--steps", "4",
                 "--effective-batch", "16", "--out", str(out), "--no-noise-scale", *extra])


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_packed_runs_follow_the_padded_run(files: dict[str, Path], tmp_path: Path) -> None:
    assert _train(files, tmp_path / "pad", "--micro-batch", "4") == 0
    want = [r["loss"] for r in _rows(tmp_path / "pad")]
    for name, extra in (("count", ["--micro-batch", "4"]), ("tokens", ["--micro-batch-tokens", "40"])):
        out = tmp_path / name
        assert _train(files, out, "--packing", *extra) == 0
        rows = _rows(out)
        assert [r["loss"] for r in rows] == pytest.approx(want, rel=1e-5)
        assert [r["num_items"] for r in rows] == [r["num_items"] for r in _rows(tmp_path / "pad")]
    steps = {r["accum_steps"] for r in _rows(tmp_path / "tokens")}
    assert min(steps) > 1  # a 40-token budget splits every window of 16 examples
    summary = json.loads((tmp_path / "tokens" / "summary.json").read_text())
    assert summary["micro_batch_tokens"] == 40
    assert summary["accum_steps"] == _rows(tmp_path / "tokens")[-1]["accum_steps"]


def test_sequence_normaliser_is_another_objective(files: dict[str, Path], tmp_path: Path) -> None:
    assert _train(files, tmp_path / "tok", "--packing") == 0
    assert _train(files, tmp_path / "seq", "--packing", "--loss-per", "sequence") == 0
    tok, seq = _rows(tmp_path / "tok"), _rows(tmp_path / "seq")
    assert all(r["num_items"] <= 16 for r in seq)  # sequences, not tokens
    assert tok[0]["loss"] != pytest.approx(seq[0]["loss"], rel=1e-3)
    # the normaliser defines the run: resuming with the other one is refused
    assert _train(files, tmp_path / "seq", "--packing", "--resume", "--steps", "5") == 2


def test_packing_changes_only_rounding_so_resume_may_switch_it(files: dict[str, Path],
                                                               tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(files, out, "--micro-batch", "4") == 0
    assert main(["train", "--model", str(files["llama"]), "--data", str(files["pc"]), "--steps", "5",
                 "--effective-batch", "16", "--out", str(out), "--no-noise-scale", "--resume",
                 "--packing", "--micro-batch-tokens", "64"]) == 0
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("case", ["tokens-alone", "both", "too-small", "with-budget", "with-auto"])
def test_bad_packing_flags_exit_2_and_touch_nothing(files: dict[str, Path], tmp_path: Path, capsys: Any,
                                                    case: str) -> None:
    out = tmp_path / "run"
    assert _train(files, out, "--micro-batch", "4", "--steps", "1") == 0
    before = tree_digest(out)
    capsys.readouterr()
    extra = {"tokens-alone": ["--micro-batch-tokens", "64"],
             "both": ["--packing", "--micro-batch-tokens", "64", "--micro-batch", "4"],
             "too-small": ["--packing", "--micro-batch-tokens", "5"],
             "with-budget": ["--packing", "--micro-batch-tokens", "64", "--memory-budget", "1GiB"],
             "with-auto": ["--packing", "--micro-batch-tokens", "64", "--effective-batch", "auto"]}[case]
    argv = ["train", "--model", str(files["llama"]), "--data", str(files["pc"]), "--out", str(out),
            "--overwrite", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--micro-batch-tokens" in err and "Traceback" not in err, err
    assert tree_digest(out) == before


def test_plan_check_compare_bench_take_packing(files: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    common = ["--model", str(files["llama"]), "--data", str(files["pc"]), "--packing"]
    capsys.readouterr()
    assert main(["plan", *common, "--effective-batch", "16", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    tokens, micro = plan["micro_batch_tokens"], plan["micro_batch"]
    assert tokens % micro == 0 and tokens > micro
    assert main(["check", *common]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["compare", *common, "--effective-batch", "16", "--micro-batch", "4", "--steps", "2",
                 "--out", str(tmp_path / "cmp"), "--json"]) == 0
    got = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert "accumulated" in json.dumps(got)
    assert main(["bench", *common, "--effective-batch", "16", "--repeats", "1", "--out", str(tmp_path / "b"),
                 "--json"]) == 0


def test_auto_micro_batch_with_packing_plans_a_token_budget(files: dict[str, Path], tmp_path: Path,
                                                           capsys: Any) -> None:
    assert _train(files, tmp_path / "auto", "--packing", "--micro-batch", "auto", "--steps", "1") == 0
    assert "micro-batches of at most" in capsys.readouterr().out


def test_the_demo_packs_too(tmp_path: Path) -> None:
    runs = {"pad": [], "packed": ["--packing"], "tokens": ["--packing", "--micro-batch-tokens", "120"]}
    curves = {}
    for name, extra in runs.items():
        out = tmp_path / name
        assert main(["train", "--steps", "2", "--effective-batch", "16", "--out", str(out),
                     "--no-noise-scale", "--eval-every", "0", *extra]) == 0
        curves[name] = [r["loss"] for r in _rows(out)]
    assert curves["packed"] == pytest.approx(curves["pad"], rel=1e-5)
    assert curves["tokens"] == pytest.approx(curves["pad"], rel=1e-5)
