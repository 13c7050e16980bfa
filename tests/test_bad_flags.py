"""Issue 19, the flags: bounded values, flags that need another flag, resume naming the flag that
changed, a run that learned nothing, and --overwrite that keeps the old run until the new one
has taken its first step. Bad input: exit 2, one line, nothing on disk changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_cli_bad_input import (
    DATA,
    NEW,
    RESUME,
    TINY,
    Case,
    _prepared,
    assert_refused,
    finished,
    run_in_process,
    tree_digest,
)

import gradaccum.demo
from gradaccum.cli import main
from gradaccum.commands.train import closing_lines

__all__ = ["finished"]  # the fixture: a finished 3-step run on a text file

R = "{tmp}/run"
CASES = [
    Case("lr-1e300", [*TINY, "--lr", "1e300", "--out", NEW], ("--lr", "at most")),
    Case("lr-above-ceiling", [*TINY, "--lr", "5000", "--out", NEW], ("--lr", "at most")),
    Case("lora-alpha-1e308", [*TINY, "--lora-r", "2", "--lora-alpha", "1e308", "--out", NEW],
         ("--lora-alpha", "at most")),
    Case("max-effective-batch-without-auto", [*TINY, "--max-effective-batch", "64", "--out", NEW],
         ("--max-effective-batch", "--effective-batch auto")),
    Case("lr-batch-rule-without-auto", [*TINY, "--lr-batch-rule", "linear", "--out", NEW],
         ("--lr-batch-rule", "--effective-batch auto")),
    Case("eval-every-without-eval-data", [*TINY, "--data", DATA, "--eval-every", "2", "--out", NEW],
         ("--eval-every", "--eval-data")),
    Case("out-empty-overwrite", [*TINY, "--out", "", "--overwrite"], ("--out", "empty")),
    Case("resume-with-lora-on-a-full-run", [*RESUME, "--lora-r", "2"], ("--lora-r", "without it")),
    Case("compare-lr-1e300", ["--steps", "1", "--lr", "1e300", "--out", NEW], ("--lr",), command="compare"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_in_one_line_touching_nothing(tmp_path: Path, finished: Path, case: Case,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    tmp, args = _prepared(tmp_path, finished, case)
    before = tree_digest(tmp)
    assert_refused(run_in_process([case.command, *args], capfd), case.command, case.words)
    assert tree_digest(tmp) == before


def test_eval_every_is_fine_where_there_is_a_held_out_set(tmp_path: Path) -> None:
    """The demo's generated task has its own held-out puzzles: --eval-every alone is meaningful."""
    assert main(["train", *TINY, "--eval-every", "1", "--out", str(tmp_path / "run")]) == 0


def test_overwrite_keeps_the_old_run_until_the_first_step(tmp_path: Path, finished: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A new run that fails before its first step leaves the old run whole, byte for byte."""
    tmp, _ = _prepared(tmp_path, finished, Case("x", [], ()))
    before = tree_digest(tmp)

    def broken(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        raise RuntimeError("the new run's model cannot start")

    monkeypatch.setattr(gradaccum.demo, "loss_fn", broken)
    with pytest.raises(RuntimeError, match="cannot start"):
        main(["train", *TINY, "--out", str(tmp / "run"), "--overwrite"])
    assert tree_digest(tmp) == before
    monkeypatch.undo()
    assert main(["train", *TINY, "--steps", "2", "--out", str(tmp / "run"), "--overwrite"]) == 0
    rows = (tmp / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2  # the old run's 3 rows were replaced at the first step


def test_a_run_that_learned_nothing_says_so_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    """Every window non-finite (e.g. an lr or LoRA scale that overflows): exit 1, one line, no
    traceback, instead of a TypeError in the closing lines."""
    real = gradaccum.demo.loss_fn

    def overflowing(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        loss, n = real(model, batch)
        return loss * float("inf"), n

    monkeypatch.setattr(gradaccum.demo, "loss_fn", overflowing)
    capfd.readouterr()
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 1
    err = capfd.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "all 3 steps were skipped" in err and err.startswith("gradaccum train: error: ")


@pytest.mark.parametrize("critical", [0.0, -1.0, float("nan")])
def test_closing_lines_survive_a_critical_batch_of_zero(critical: float) -> None:
    """All-EOS completions make every gradient alike: the noise scale is 0, not a division by it."""
    lines = closing_lines({"critical_batch": critical, "effective_batch": 8})
    assert lines == ["the measured gradient noise is too small to estimate a critical batch"]


def test_the_critical_batch_speaks_only_when_its_interval_says_so() -> None:
    base = {"critical_batch": 40.0, "effective_batch": 8}
    below = {**base, "critical_batch_low": 25.0, "critical_batch_high": 70.0}
    assert "well below it" in closing_lines(below)[0] and "90% interval 25-70" in closing_lines(below)[0]
    above = {**base, "effective_batch": 200, "critical_batch_low": 25.0, "critical_batch_high": 70.0}
    assert "well above it" in closing_lines(above)[0]
    close = {**base, "effective_batch": 40, "critical_batch_low": 25.0, "critical_batch_high": 70.0}
    assert "close to it" in closing_lines(close)[0]
    # The point is far below the batch, but the interval reaches up to it: no verdict.
    wide = {**base, "effective_batch": 200, "critical_batch_low": 5.0, "critical_batch_high": 150.0}
    assert closing_lines(wide) == ["the critical batch has not settled yet: its 90% interval (5 to 150 "
                                   "examples) is too wide to place your effective batch 200 above or below "
                                   "it; train longer before reading it"]
    unbounded = {**base, "effective_batch": 200, "critical_batch_low": 5.0, "critical_batch_high": None}
    assert "5 to unbounded" in closing_lines(unbounded)[0]
    # A lower end far above the batch is enough to say "below", even with no upper end yet.
    assert "well below it" in closing_lines({**unbounded, "effective_batch": 2})[0]
    assert "not yet measured" in closing_lines(base)[0]  # no interval yet (too few windows)


def test_the_demo_reports_answer_characters_right_with_what_it_means() -> None:
    lines = closing_lines({"accuracy": {"reversal": 0.99, "addition": 0.01},
                           "char_accuracy": {"reversal": 0.998, "addition": 0.62}})
    assert lines[1] == ("answer characters right: reversal 99.8%, addition 62.0% (exact match counts a "
                        "puzzle only when its whole answer is right; the share of characters shows the "
                        "progress before that)")
