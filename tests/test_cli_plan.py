"""`gradaccum plan`, `gradaccum bench` and `train --micro-batch auto` from the command line."""

from __future__ import annotations

import json

import pytest

from gradaccum.cli import main


def _plan_json(capsys, *args: str) -> dict:
    assert main(["plan", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_schema_and_largest_fit(capsys):
    p = _plan_json(capsys, "--effective-batch", "32", "--memory-budget", "1TiB")
    assert set(p) >= {"micro_batch", "accum_steps", "effective_batch", "predicted_peak_bytes",
                      "budget_bytes", "table"}
    assert p["budget_bytes"] == 2**40 and p["effective_batch"] == 32
    assert [r["micro_batch"] for r in p["table"]] == [1, 2, 4, 8, 16, 32]
    peaks = [r["predicted_peak_bytes"] for r in p["table"]]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)
    assert p["micro_batch"] == 32 and p["accum_steps"] == 1
    # A budget between the predictions of 4 and 8 picks 4.
    budget = (peaks[2] + peaks[3]) // 2
    q = _plan_json(capsys, "--effective-batch", "32", "--memory-budget", str(budget))
    assert q["micro_batch"] == 4 and q["accum_steps"] == 8 and q["budget_bytes"] == budget
    assert q["predicted_peak_bytes"] == peaks[2] <= budget
    assert q["micro_batch"] * q["accum_steps"] == 32


def test_plan_table_is_readable(capsys):
    assert main(["plan", "--effective-batch", "8", "--memory-budget", "4 GiB"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "<- chosen" in out and "micro-batch 8 x accum steps 1" in out


@pytest.mark.parametrize("budget", ["1KiB", "1", "100B"])
def test_budget_too_small_is_bad_input_saying_how_much_is_needed(capsys, budget):
    assert main(["plan", "--memory-budget", budget]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--memory-budget" in err and "needs at least" in err, err


@pytest.mark.parametrize("budget", ["12 parsecs", "-5MiB", "0", "lots", "1.5.2GB"])
def test_bad_budget_strings(capsys, budget):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--memory-budget", budget])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--memory-budget" in err, err


def test_train_micro_batch_auto_uses_the_plan(tmp_path, capsys):
    peaks = _plan_json(capsys, "--effective-batch", "16", "--memory-budget", "1TiB")["table"]
    budget = (peaks[1]["predicted_peak_bytes"] + peaks[2]["predicted_peak_bytes"]) // 2  # fits 2, not 4
    out = tmp_path / "auto"
    assert main(["train", "--steps", "2", "--effective-batch", "16", "--micro-batch", "auto",
                 "--memory-budget", str(budget), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # On a CPU the fastest of those that fit (1 and 2), measured as bench does (issue 20).
    micro = rows[0]["micro_batch"]
    assert micro in (1, 2)
    assert [(r["micro_batch"], r["accum_steps"]) for r in rows] == [(micro, 16 // micro)] * 2
    text = capsys.readouterr().out
    assert f"--micro-batch auto: {micro}, the fastest of those that fit" in text
    assert "largest that fits: 2" in text


def test_bench_json_and_plot(tmp_path, capsys):
    assert main(["bench", "--json", "--effective-batch", "8", "--repeats", "1", "--out", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["micro_batch"] for r in res["rows"]] == [1, 2, 4, 8]
    assert all(r["examples_per_s"] > 0 for r in res["rows"])
    assert res["fastest_micro_batch"] in (1, 2, 4, 8)
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
