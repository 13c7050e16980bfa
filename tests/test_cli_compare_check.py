"""gradaccum compare and gradaccum check, driven as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gradaccum.cli import main

TINY = ["--effective-batch", "16", "--micro-batch", "4", "--steps", "4"]


def test_compare_writes_its_files_and_table(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("full", "accumulated", "mean-of-means", "small"):
        assert name in text
    result = json.loads((out / "compare.json").read_text())
    assert result["reference"] == "full"
    c = result["contenders"]
    assert c["accumulated"]["max_rel_deviation"] < 1e-5
    assert c["mean-of-means"]["max_rel_deviation"] > 1e-3
    assert c["small"]["optimizer_steps"] == 4 * c["full"]["optimizer_steps"]
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_without_room_for_the_full_batch(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--memory-budget", "12MiB", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["reference"] == "accumulated"
    assert result["contenders"]["full"]["ran"] is False
    assert result["contenders"]["full"]["reason"].startswith("does not fit (predicted")


@pytest.mark.parametrize("argv", [["--effective-batch", "10", "--micro-batch", "4"], ["--out", ""],
                                  ["--model", "/nonexistent"]])
def test_compare_bad_input(tmp_path: Path, capsys: Any, argv: list[str]) -> None:
    argv = ["compare", "--steps", "1", *argv] + ([] if "--out" in argv else ["--out", str(tmp_path / "x")])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


USER_CODE = '''
import torch
import torch.nn.functional as F

def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)

def good():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    return model, lambda m, b: (F.cross_entropy(m(b[0]), b[1], reduction="sum"), b[1].shape[0]), _data()

def mean():
    model, _, batch = good()
    return model, lambda m, b: (F.cross_entropy(m(b[0]), b[1]), b[1].shape[0]), batch

def broken():
    raise RuntimeError("cannot build it")

def wrong_shape():
    return 1, 2
'''


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "train_code.py"
    path.write_text(textwrap.dedent(USER_CODE))
    return path


def test_check_a_users_function(user_file: Path, capsys: Any) -> None:
    assert main(["check", f"{user_file}:good"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("OK")
    assert main(["check", f"{user_file}:mean"]) == 1
    out = capsys.readouterr().out
    assert "error: mean-reduced-loss" in out and out.strip().splitlines()[-1].startswith("NOT OK")


@pytest.mark.parametrize("target", ["{f}:broken", "{f}:wrong_shape", "{f}:missing", "nowhere.py:f", "nocolon",
                                    "no_such_module_xyz:f"])
def test_check_bad_targets_exit_2(user_file: Path, capsys: Any, target: str) -> None:
    assert main(["check", target.format(f=user_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_check_the_demo_workload_and_a_module_target(capsys: Any) -> None:
    assert main(["check"]) == 0  # the built-in demo's loss is a sum: accumulation-safe
    assert "OK" in capsys.readouterr().out
    # module:function through a subprocess, as `python -m gradaccum check` is run
    code = subprocess.run([sys.executable, "-m", "gradaccum", "check", "json:loads"], capture_output=True,
                          text=True, timeout=120)
    assert code.returncode == 2 and "Traceback" not in code.stderr
