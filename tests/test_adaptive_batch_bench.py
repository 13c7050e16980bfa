"""benchmarks/adaptive_batch.py: its smoke run end to end (the full run is not for CI)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))


@pytest.mark.slow
def test_adaptive_batch_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every arm trains on the standard library's bytes; the table and the verdict are printed."""
    import adaptive_batch

    assert adaptive_batch.main(["--smoke", "--workers", "1", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| fixed 8 |" in out and "| auto |" in out and "| warm-up |" in out and "the goal" in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert {r["arm"] for r in res["results"]} == {"fixed 8", "fixed 32", "fixed 128", "auto", "warm-up"}
    fixed8 = next(r for r in res["results"] if r["arm"] == "fixed 8")
    assert fixed8["reached"] and fixed8["final_loss"] <= 2.9  # the smoke target is reached
