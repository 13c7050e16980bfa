"""`gradaccum train` end to end: outputs, --data, kill-and-resume, and every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradaccum.cli import main

TINY = ["--steps", "3", "--effective-batch", "16", "--micro-batch", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradaccum", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def test_train_end_to_end_outputs(trained):
    rows = _rows(trained)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("step", "loss", "lr", "grad_norm", "num_items", "micro_batch", "accum_steps",
                    "world_size", "elapsed_s", "tokens_per_s", "examples_per_s"):
            assert key in r, key
        assert r["micro_batch"] * r["accum_steps"] * r["world_size"] == 16
        assert r["examples_seen"] == 16 * r["step"]
    ck = torch.load(trained / "checkpoint.pt", weights_only=True)
    assert "model" in ck and all(isinstance(v, torch.Tensor) for v in ck["model"].values())
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["effective_batch"] == 16
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_dash_m_and_startup_plan(tmp_path):
    r = _run("train", *TINY, "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "effective batch 16 = micro-batch 4 x accum steps 4 x world size 1" in r.stdout
    assert str(tmp_path) in r.stdout


def test_data_file(tmp_path):
    data = tmp_path / "lines.txt"
    data.write_text("hello world\n\nthe quick brown fox\nünïcode ok\n" * 5, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["train", *TINY, "--data", str(data), "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 3 and all(r["num_items"] > 0 for r in rows)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["extra"]["task"] == "text"


def _digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (OUT/model included), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


BAD = [
    (["--effective-batch", "16", "--micro-batch", "5"], "--micro-batch"),
    (["--effective-batch", "16", "--micro-batch", "32"], "--micro-batch"),
    (["--effective-batch", "0"], "--effective-batch"),
    (["--effective-batch", "-4"], "--effective-batch"),
    (["--micro-batch", "0"], "--micro-batch"),
    (["--steps", "0"], "--steps"),
    (["--steps", "ten"], "--steps"),
    (["--lr", "-0.1"], "--lr"),
    (["--lr", "abc"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--memory-budget", "12 parsecs"], "--memory-budget"),
    (["--seed", "x"], "--seed"),
    (["--no-such-flag"], "--no-such-flag"),
]


@pytest.mark.parametrize("args, names", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flags_exit_2_with_one_line(trained, capsys, args, names):
    before = _digest(trained)
    with pytest.raises(SystemExit) as e:
        code = main(["train", *args, "--out", str(trained)])
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and names in err, err
    assert _digest(trained) == before


def test_bad_data_files(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9\n".encode("latin-1"))
    for path, words in ((tmp_path / "missing.txt", "no such file"), (empty, "no non-empty"),
                        (binary, "UTF-8"), (tmp_path, "directory")):
        assert main(["train", *TINY, "--data", str(path), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "--data" in err, err
    assert not (tmp_path / "o").exists()


def test_resume_without_checkpoint(tmp_path, capsys):
    assert main(["train", *TINY, "--resume", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "checkpoint" in err and len(err.strip().splitlines()) == 1


def test_corrupt_foreign_and_malicious_checkpoints_are_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    cases = {
        "corrupt": lambda p: p.write_bytes(b"not a checkpoint at all"),
        "truncated": lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 50),
        "foreign": lambda p: torch.save({"weights": torch.zeros(3)}, p),
        "malicious-torch": lambda p: torch.save({"format": "gradaccum", "x": Evil()}, p),
        "malicious-pickle": lambda p: p.write_bytes(pickle.dumps(Evil())),
    }
    for name, make in cases.items():
        out = tmp_path / name
        out.mkdir()
        make(out / "checkpoint.pt")
        before = _digest(out)
        assert main(["train", *TINY, "--resume", "--out", str(out)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "checkpoint.pt" in err and "Traceback" not in err, err
        assert _digest(out) == before, name
    assert not marker.exists(), "unpickling ran code"


def test_resume_with_other_seed_is_bad_input(trained, capsys):
    before = _digest(trained)
    assert main(["train", *TINY, "--seed", "7", "--resume", "--out", str(trained)]) == 2
    assert "--seed" in capsys.readouterr().err
    assert _digest(trained) == before


def test_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    assert main(["train", *TINY, "--out", str(f)]) == 2
    assert "--out" in capsys.readouterr().err and f.read_text() == "keep me"


def _kill_when(proc: subprocess.Popen, out: Path, min_rows: int, extra_delay: float) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "checkpoint.pt").exists() and (out / "metrics.jsonl").exists():
            if len((out / "metrics.jsonl").read_text().splitlines()) >= min_rows:
                break
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be killed: {proc.stderr.read()}")
        time.sleep(0.05)
    time.sleep(extra_delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_sigkill_and_resume_is_bitwise_equal(tmp_path):
    args = ["train", "--steps", "14", "--effective-batch", "16", "--micro-batch", "4",
            "--checkpoint-every", "1"]
    ref = tmp_path / "ref"
    assert _run(*args, "--out", str(ref)).returncode == 0
    out = tmp_path / "killed"
    # Two kills at different moments (one right after a step is logged, one a bit later,
    # likely inside a window or a checkpoint save), each followed by --resume.
    for min_rows, delay in ((3, 0.0), (7, 0.13)):
        flags = ["--resume"] if (out / "checkpoint.pt").exists() else []
        proc = subprocess.Popen([sys.executable, "-m", "gradaccum", *args, "--out", str(out), *flags],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
        _kill_when(proc, out, min_rows, delay)
    r = _run(*args, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    a = torch.load(ref / "checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 15))
    assert [r["loss"] for r in rows] == [r["loss"] for r in _rows(ref)]
    assert not list(out.glob(".*.tmp")), "a temporary checkpoint was left behind"
