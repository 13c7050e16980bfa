"""runlog: the output-directory guard and lock, the metrics history, tolerant reading, the plot."""

from __future__ import annotations

import json
import math

import pytest

from gradaccum import runlog
from gradaccum.runlog import MetricsHistory


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
