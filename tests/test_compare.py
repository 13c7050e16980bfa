"""compare: full vs accumulated vs mean-of-means vs small on the same weights and data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gradaccum import compare, demo

E, MICRO, STEPS = 16, 4, 6


@pytest.fixture(scope="module")
def workload() -> tuple[Any, list[Any]]:
    model = demo.build_model(demo.TASK_TOKENIZER.vocab_size, demo.TASK_MAX_LEN, seed=0, n_layer=1, n_embd=32)
    return model, demo.make_examples(400, seed=0)


@pytest.fixture(scope="module")
def result(workload: tuple[Any, list[Any]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model, examples = workload
    res = compare.run(model, examples, demo.loss_fn, demo.collate, E, MICRO, STEPS, lr=3e-3)
    out = tmp_path_factory.mktemp("compare")
    compare.write(res, out)
    res["_out"] = out
    return res


def test_files_are_written(result: dict[str, Any]) -> None:
    out: Path = result["_out"]
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    saved = json.loads((out / "compare.json").read_text())
    assert saved["reference"] == "full" and list(saved["contenders"]) == list(compare.CONTENDERS)
    for c in saved["contenders"].values():
        for key in ("loss", "examples_seen", "final_loss", "seconds", "peak_bytes", "param_rel_diff_vs_full"):
            assert key in c


def test_accumulated_equals_full_and_mean_of_means_does_not(result: dict[str, Any]) -> None:
    c = result["contenders"]
    assert c["accumulated"]["max_rel_deviation"] < 1e-5
    assert c["accumulated"]["param_rel_diff_vs_full"] < 1e-3
    # The demo's answers have 1-9 tokens, so micro-batch means weight tokens unequally.
    assert c["mean-of-means"]["max_rel_deviation"] > 1e-3
    assert c["mean-of-means"]["param_rel_diff_vs_full"] > 10 * c["accumulated"]["param_rel_diff_vs_full"]


def test_every_contender_sees_the_same_examples(result: dict[str, Any]) -> None:
    c = result["contenders"]
    k = E // MICRO
    assert c["small"]["optimizer_steps"] == k * STEPS
    for name in ("full", "accumulated", "mean-of-means"):
        assert c[name]["optimizer_steps"] == STEPS
        assert c[name]["examples_seen"][-1] == c["small"]["examples_seen"][-1] == E * STEPS
    # Same weights and data before the first update: the first logged losses agree.
    first = [c[n]["window_loss"][0] for n in ("full", "accumulated", "mean-of-means")]
    assert max(first) - min(first) < 1e-6
    assert c["full"]["peak_bytes"] > c["accumulated"]["peak_bytes"] > 0


def test_without_full_accumulated_is_the_reference(workload: tuple[Any, list[Any]]) -> None:
    model, examples = workload
    res = compare.run(model, examples, demo.loss_fn, demo.collate, E, MICRO, 2, lr=3e-3,
                      full_fits=False, full_note="does not fit (predicted 9 GiB of 1 GiB)")
    assert res["reference"] == "accumulated"
    assert res["contenders"]["full"] == {"ran": False, "reason": "does not fit (predicted 9 GiB of 1 GiB)"}
    assert "param_rel_diff_vs_accumulated" in res["contenders"]["small"]
    assert "does not fit (predicted 9 GiB of 1 GiB)" in compare.table(res)


def test_full_batch_fits_asks_the_planner(workload: tuple[Any, list[Any]]) -> None:
    model, examples = workload
    args = (model, examples, demo.loss_fn, demo.collate)
    fits, note = compare.full_batch_fits(*args, E, budget_bytes=2**34)
    assert fits and note.startswith("fits (predicted")
    fits, note = compare.full_batch_fits(*args, 4096, budget_bytes=2**20)
    assert not fits and note.startswith("does not fit")


def test_data_order_matches_the_trainer() -> None:
    from gradaccum.trainer import Trainer

    t = Trainer(model=torch.nn.Linear(1, 1), dataset=list(range(50)), loss_fn=lambda m, b: None,
                effective_batch=16, micro_batch=4, seed=3)
    for step in range(7):  # across epoch boundaries
        assert compare.data_order(50, 3, step * 16, 16) == t.step_indices(step)
