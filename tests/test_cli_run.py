"""A run a user can trust: --overwrite, the lock, SIGTERM/SIGINT, a full disk, a damaged
log, resume messages, --version and --help."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradaccum import checkpoint, outdir
from gradaccum.cli import main

TINY = ["--steps", "3", "--effective-batch", "16", "--micro-batch", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_overwrite_replaces_the_previous_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    assert main(["train", "--steps", "2", *TINY[2:], "--seed", "5", "--out", str(out), "--overwrite"]) == 0
    assert [r["step"] for r in _rows(out)] == [1, 2]
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and ck["run"]["--seed"] == 5 and ck["run"]["--steps"] == 2
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert not (out / outdir.LOCK).exists()


def test_second_run_on_a_locked_out_dir_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with outdir.RunLock(out):
        assert main(["train", *TINY, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert str(out) in err and "in use by another gradaccum run" in err and f"pid {os.getpid()}" in err
        assert sorted(p.name for p in out.iterdir()) == [outdir.LOCK]


def test_two_concurrent_runs_one_wins(tmp_path):
    """Two processes started together on one --out: exactly one trains, the other exits 2."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "gradaccum", "train", "--steps", "30", *TINY[2:], "--out", str(out)]
    procs = [subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2).strip()
    assert len(loser.splitlines()) == 1 and "Traceback" not in loser
    assert "in use by another gradaccum run" in loser or "already holds a run" in loser, loser
    assert [r["step"] for r in _rows(out)] == list(range(1, 31))


def _wait_rows(proc: subprocess.Popen, out: Path, n: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.01)
    raise AssertionError("no progress")


@pytest.mark.slow  # ~20 s; test_trainer.py has the fast in-process version
def test_sigterm_and_sigint_save_a_checkpoint_and_resume_bitwise(tmp_path, capsys):
    args = ["train", "--steps", "20", *TINY[2:], "--checkpoint-every", "50"]
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    stops = []
    for sig, after in ((signal.SIGTERM, 2), (signal.SIGINT, 8)):
        flags = ["--resume"] if (out / "checkpoint.pt").exists() else []
        proc = subprocess.Popen([sys.executable, "-m", "gradaccum", *args, "--out", str(out), *flags],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _wait_rows(proc, out, after)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
        err = proc.stderr.read().strip()
        assert rc == 128 + sig, (rc, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
        assert f"stopped by {sig.name} after step {step} of 20" in err, err
        assert "checkpoint saved" in err and "--resume" in err and str(out) in err
        assert [r["step"] for r in _rows(out)] == list(range(1, step + 1))  # nothing lost
        assert not (out / outdir.LOCK).exists()
        stops.append(step)
    assert 2 <= stops[0] < stops[1] < 20
    r = subprocess.run([sys.executable, "-m", "gradaccum", *args, "--out", str(out), "--resume"],
                       env=ENV, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {stops[1]} of 20" in r.stdout
    _assert_same_weights(ref, out)
    assert [x["loss"] for x in _rows(out)] == [x["loss"] for x in _rows(ref)]


def test_disk_full_during_a_save_is_one_line_with_the_last_good_step(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = checkpoint.save
    calls = {"n": 0}

    def filling_save(obj, path):
        calls["n"] += 1
        if calls["n"] == 3:
            def write(f):
                f.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")

            return checkpoint.atomic_write_bytes(path, write)
        return real_save(obj, path)

    monkeypatch.setattr(checkpoint, "save", filling_save)
    assert main(["train", "--steps", "5", *TINY[2:], "--checkpoint-every", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(out / "checkpoint.pt") in err and "disk is full" in err
    assert "last good checkpoint is step 2" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2  # the previous one survives
    assert not list(out.glob(".*.tmp"))


def test_disk_full_on_a_real_small_file_system(tmp_path):
    if not (sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("mount")):
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = small / "run"  # one 4 MB checkpoint fits, a second copy beside it does not
        r = subprocess.run([sys.executable, "-m", "gradaccum", "train", "--steps", "5", *TINY[2:],
                            "--checkpoint-every", "1", "--out", str(out)],
                           env=ENV, capture_output=True, text=True, timeout=180)
        err = r.stderr.strip()
        assert r.returncode == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert "disk is full" in err and "checkpoint.pt" in err and "last good checkpoint is step 1" in err
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


@pytest.mark.parametrize("damage",
                         ["garbage", "non-utf8", "string-steps", "truncated", "missing", "extra-rows"])
def test_damaged_metrics_are_rebuilt_from_the_checkpoint(tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    good = (out / "metrics.jsonl").read_bytes()
    m = out / "metrics.jsonl"
    if damage == "garbage":
        m.write_bytes(good[:40] + b"\n}{ not json\n" + good[40:])
    elif damage == "non-utf8":
        m.write_bytes(b"\xff\xfe\xfd\n" + good)
    elif damage == "string-steps":
        m.write_text(good.decode().replace('"step": 2', '"step": "2"'))
    elif damage == "truncated":
        m.write_bytes(good[: len(good) // 2])
    elif damage == "missing":
        m.unlink()
    else:
        m.write_bytes(good + good.splitlines(keepends=True)[-1].replace(b'"step": 3', b'"step": 4'))
    assert main(["train", *TINY, "--out", str(out), "--resume"]) == 0
    assert "resuming from step 3 of 3" in capsys.readouterr().out
    assert m.read_bytes() == good


def test_resume_prints_where_it_stands(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "4", *TINY[2:], "--checkpoint-every", "2", "--out", str(out)]) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["run"] == {"--steps": 4, "--lr": 3e-3, "--effective-batch": 16, "--seed": 0,
                         "--model": "demo", "--data": "demo", "--precision": "fp32", "--max-length": 24}
    assert len(ck["metrics"]["columns"]["step"]) == 4
    capsys.readouterr()
    assert main(["train", "--steps", "4", *TINY[2:], "--out", str(out), "--resume"]) == 0
    assert "gradaccum: resuming from step 4 of 4" in capsys.readouterr().out


def test_version_and_help_show_every_default(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    from gradaccum import __version__

    assert capsys.readouterr().out.strip() == f"gradaccum {__version__}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for want in ("--steps N optimizer steps in the whole run (default: 600)", "(default: 0.003)",
                 "(default: 50)", "(default: 128)", "(default: 0)", "(default: runs/gradaccum)",
                 "half of the available RAM", "--overwrite", "--resume"):
        assert want in text, want
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 3)" in text and "(default: runs/bench)" in text


def test_train_logs_tokens_and_bench_examples(tmp_path, capsys):
    assert main(["train", *TINY, "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "items/s" not in out
    row = _rows(tmp_path / "t")[0]
    assert row["tokens_per_s"] > 0 and "items_per_s" not in row
    assert main(["bench", "--effective-batch", "4", "--repeats", "1", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "examples/s" in out and "items/s" not in out


# ----------------------------------------------------------------------------- torchrun
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(argv: list[str], world: int = 2) -> list[subprocess.Popen]:
    port = str(_free_port())
    procs = []
    for r in range(world):
        env = {**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "GRADACCUM_TIMEOUT_S": "60"}
        procs.append(subprocess.Popen([sys.executable, "-m", "gradaccum", *argv], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, capsys):
    args = ["train", "--steps", "40", *TINY[2:], "--checkpoint-every", "50"]
    out = tmp_path / "run"
    procs = _ranks([*args, "--out", str(out)])
    try:
        _wait_rows(procs[0], out, 3)
        procs[1].send_signal(signal.SIGTERM)  # only rank 1 hears it
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    errs = [p.stderr.read() for p in procs]
    assert codes == [143, 143], (codes, errs)
    assert all("Traceback" not in e for e in errs), errs
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 3 <= step < 40
    assert f"stopped by SIGTERM after step {step} of 40" in errs[0]
    assert "same torchrun command with --resume" in errs[0]
    assert [r["step"] for r in _rows(out)] == list(range(1, step + 1))
    resumed = _ranks([*args, "--out", str(out), "--resume"])
    codes = [p.wait(timeout=180) for p in resumed]
    assert codes == [0, 0], [p.stderr.read() for p in resumed]
    assert [r["step"] for r in _rows(out)] == list(range(1, 41))


def test_resume_with_more_steps_extends_a_finished_run(tmp_path, capsys):
    """--steps may grow on --resume (extending a run): one line says so, the schedule spans the new
    total from the current step, summary.json records it; fewer steps stay refused."""
    import json
    import math

    out = tmp_path / "run"
    assert main(["train", "--steps", "3", *TINY[2:], "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--steps", "5", *TINY[2:], "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "--steps 5 extends the run from 3 steps" in err and "from step 3" in err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["extended_from_steps"] == 3 and summary["steps"] == 5
    # the warm-up + cosine schedule now spans 5 steps: step 4 runs at its factor for step index 3
    warm = 1  # max(1, min(20, 5 // 10))
    factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (3 - warm) / (5 - warm)))
    assert rows[3]["lr"] == pytest.approx(3e-3 * factor, rel=1e-12)
    assert main(["train", "--steps", "4", *TINY[2:], "--out", str(out), "--resume"]) == 2


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_follow_the_umask(tmp_path, mask):
    """OUT/model and every file in it (and the other outputs) get the modes the umask asks for."""
    import os
    import stat

    old = os.umask(mask)
    try:
        assert main(["train", "--steps", "1", *TINY[2:], "--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "run"
    assert stat.S_IMODE((out / "model").stat().st_mode) == 0o777 & ~mask
    for p in [*(out / "model").iterdir(), out / "checkpoint.pt", out / "metrics.jsonl", out / "summary.json"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p


@pytest.mark.parametrize(("argv", "code"), [
    (["train", "--help"], 0),
    (["train", "--data", "{tmp}/missing.txt"], 2),
    (["train", "--model", "{tmp}/no-such-model", "--data", "{tmp}/missing.txt"], 2),
    (["plan", "--data", "{tmp}"], 2),
    (["train", "--steps", "0"], 2),
])
def test_help_and_input_checks_answer_before_torch_is_imported(tmp_path, argv, code):
    """--help and bad flags or files are answered without importing torch (seconds of imports):
    a stand-in torch that refuses to import proves it."""
    import subprocess
    import sys

    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(fake), *sys.path])
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    p = subprocess.run([sys.executable, "-m", "gradaccum", *args], capture_output=True, text=True, env=env,
                       timeout=60, cwd=tmp_path)
    assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr and "torch was imported" not in p.stderr
    assert code == 0 or len(p.stderr.strip().splitlines()) == 1
