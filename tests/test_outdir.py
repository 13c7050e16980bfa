"""The --out claim: the guard and the lock."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gradaccum import outdir
from gradaccum.outdir import OutDirError, RunLock


def test_lock_is_exclusive_names_its_holder_and_is_removed(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / outdir.LOCK).exists()
        holder = outdir.lock_holder(tmp_path)
        assert holder is not None and f"pid {os.getpid()}" in holder
        with pytest.raises(OutDirError, match=rf"in use by another gradaccum run \(pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
        with pytest.raises(OutDirError, match="in use"):
            outdir.guard(tmp_path, resume=False, overwrite=False)
    assert not (tmp_path / outdir.LOCK).exists()
    assert outdir.lock_holder(tmp_path) is None
    RunLock(tmp_path).acquire().release()  # free again


def test_a_killed_holders_lock_is_free(tmp_path):
    code = ("import sys, os; from gradaccum.outdir import RunLock; from pathlib import Path; "
            "RunLock(Path(sys.argv[1])).acquire(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
    assert (tmp_path / outdir.LOCK).exists()  # left behind, but nobody holds it
    assert outdir.lock_holder(tmp_path) is None
    RunLock(tmp_path).acquire().release()


def test_guard(tmp_path):
    outdir.guard(tmp_path / "new", resume=False, overwrite=False)
    assert not (tmp_path / "new").exists()  # the guard creates nothing
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(OutDirError, match="already holds a run"):
        outdir.guard(run, resume=False, overwrite=False)
    outdir.guard(run, resume=False, overwrite=True)
    with pytest.raises(OutDirError, match="no checkpoint"):
        outdir.guard(run, resume=True, overwrite=False)
    with pytest.raises(OutDirError, match="contradict"):
        outdir.guard(run, resume=True, overwrite=True)
    (run / "summary.json").mkdir()
    with pytest.raises(OutDirError, match="summary.json is a directory"):
        outdir.guard(run, resume=False, overwrite=True)
    with pytest.raises(OutDirError, match="empty"):
        outdir.guard("", resume=False, overwrite=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutDirError, match="is a file"):
        outdir.guard(tmp_path / "f" / "sub", resume=False, overwrite=False)
    with pytest.raises(OutDirError, match="not a directory"):
        outdir.guard(tmp_path / "f", resume=False, overwrite=False)
