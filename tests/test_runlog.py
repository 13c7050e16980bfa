"""runlog: the output-directory guard and lock, the metrics history, tolerant reading, the plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from gradaccum import runlog
from gradaccum.runlog import MetricsHistory, OutDirError, RunLock


def test_history_round_trips_rows_exactly_with_absent_keys_and_none():
    rows = [
        {"step": 1, "loss": 2.5, "lr": 1e-3, "skipped": False, "noise_scale": None},
        {"step": 2, "loss": float("nan"), "lr": 1e-3, "skipped": True, "noise_scale": None, "eval_loss": 2.0},
        {"step": 3, "loss": 2.25, "lr": 9e-4, "skipped": False, "noise_scale": 123.5},
    ]
    h = MetricsHistory()
    for r in rows:
        h.append(r)
    back = MetricsHistory.from_state(h.state_dict())
    got = back.rows()
    assert [sorted(r) for r in got] == [sorted(r) for r in rows]  # eval_loss only where it was
    assert json.dumps(got[0], sort_keys=True) == json.dumps(rows[0], sort_keys=True)
    assert math.isnan(got[1]["loss"]) and got[1]["eval_loss"] == 2.0
    assert back.column("step") == [1, 2, 3]
    back.truncate(1)
    assert back.rows() == [rows[0]] and len(back) == 1


@pytest.mark.parametrize("state", [
    None, [], {"length": -1, "columns": {}}, {"length": 2, "columns": {"step": [1]}},
    {"length": 1, "columns": {"step": [[1]]}},
    {"length": 1, "columns": {"step": [1]}, "absent": {"step": [5]}},
    {"length": "1", "columns": {}},
])
def test_history_from_malformed_state_is_a_value_error(state):
    with pytest.raises(ValueError):
        MetricsHistory.from_state(state)


def test_read_metrics_skips_damage(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_bytes(
        b'{"step": 1, "loss": 1.0}\n'
        b"\xff\xfe not utf-8\n"
        b"garbage\n"
        b'{"step": "2", "loss": 1.0}\n'
        b'[1, 2]\n'
        b'{"step": true}\n'
        b'{"step": 3, "loss": 0.5}\n'
        b'{"step": 4, "lo'  # torn last line
    )
    assert [r["step"] for r in runlog.read_metrics(p)] == [1, 3]
    assert runlog.read_metrics(tmp_path / "missing.jsonl") == []
    assert [r["step"] for r in runlog.legacy_rows_upto(p, 2)] == [1]


def test_lock_is_exclusive_names_its_holder_and_is_removed(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / runlog.LOCK).exists()
        holder = runlog.lock_holder(tmp_path)
        assert holder is not None and f"pid {os.getpid()}" in holder
        with pytest.raises(OutDirError, match=rf"in use by another gradaccum run \(pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
        with pytest.raises(OutDirError, match="in use"):
            runlog.guard(tmp_path, resume=False, overwrite=False)
    assert not (tmp_path / runlog.LOCK).exists()
    assert runlog.lock_holder(tmp_path) is None
    RunLock(tmp_path).acquire().release()  # free again


def test_a_killed_holders_lock_is_free(tmp_path):
    code = ("import sys, os; from gradaccum.runlog import RunLock; from pathlib import Path; "
            "RunLock(Path(sys.argv[1])).acquire(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
    assert (tmp_path / runlog.LOCK).exists()  # left behind, but nobody holds it
    assert runlog.lock_holder(tmp_path) is None
    RunLock(tmp_path).acquire().release()


def test_guard(tmp_path):
    runlog.guard(tmp_path / "new", resume=False, overwrite=False)
    assert not (tmp_path / "new").exists()  # the guard creates nothing
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(OutDirError, match="already holds a run"):
        runlog.guard(run, resume=False, overwrite=False)
    runlog.guard(run, resume=False, overwrite=True)
    with pytest.raises(OutDirError, match="no checkpoint"):
        runlog.guard(run, resume=True, overwrite=False)
    with pytest.raises(OutDirError, match="contradict"):
        runlog.guard(run, resume=True, overwrite=True)
    (run / "summary.json").mkdir()
    with pytest.raises(OutDirError, match="summary.json is a directory"):
        runlog.guard(run, resume=False, overwrite=True)
    with pytest.raises(OutDirError, match="empty"):
        runlog.guard("", resume=False, overwrite=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutDirError, match="is a file"):
        runlog.guard(tmp_path / "f" / "sub", resume=False, overwrite=False)
    with pytest.raises(OutDirError, match="not a directory"):
        runlog.guard(tmp_path / "f", resume=False, overwrite=False)


def test_plot_panels_show_lr_and_grad_norm_and_grow_with_new_metrics(tmp_path):
    import matplotlib.image

    assert [s.key for s in runlog.PANELS[1].series] == ["lr", "grad_norm"]
    rows = [{"step": s, "loss": 3.0 / s, "lr": 1e-3 * s, "grad_norm": 1.0 / s, "effective_batch": 8}
            for s in range(1, 6)]
    runlog.plot_losses(rows, tmp_path / "two.png")
    runlog.plot_losses([dict(r, critical_batch=10.0 * r["step"]) for r in rows], tmp_path / "three.png")
    runlog.plot_losses([], tmp_path / "empty.png")
    two = matplotlib.image.imread(tmp_path / "two.png")
    three = matplotlib.image.imread(tmp_path / "three.png")
    assert two.shape[1] == 1000 and three.shape[1] == 1500  # a third panel: critical vs effective batch
