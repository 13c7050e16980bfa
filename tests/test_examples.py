"""The scripts in examples/ run as a user would run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_plain_loop_example_runs() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "plain_loop.py")], capture_output=True,
                       text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "OK: accumulation-safe" in p.stdout and "train accuracy" in p.stdout


def test_contrastive_example_trains_exactly_with_in_batch_negatives() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "contrastive.py")], capture_output=True,
                       text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0] == "non-additive-loss -> use step_cached"
    recall = [float(line.split("recall@1 ")[1].split()[0]) for line in lines if "recall@1" in line]
    assert recall[-1] > 20 * max(recall[0], 1 / 512)  # from chance among 512 to far above it


@pytest.mark.slow
def test_finetune_example_runs(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "finetune_llama.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_eval_loss"] < 1.0  # it learned the colours
    assert (tmp_path / "run" / "model" / "config.json").is_file()
