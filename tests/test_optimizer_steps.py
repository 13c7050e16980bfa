"""``Accumulator.optimizer_steps``: the public, read-only step counter (issue 20, item 8).

``acc.step`` is the method that runs a window, so ``while acc.step < steps`` was a
TypeError; ``optimizer_steps`` is the number ``StepResult.step`` reports.
"""

from __future__ import annotations

import pytest
import torch
from conftest import lm_loss_fn, make_lm, random_micro_batches, token_batch

from gradaccum import Accumulator


def _acc(accum_steps: int = 2) -> Accumulator:
    model = make_lm()
    return Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=accum_steps)


def test_a_while_loop_on_optimizer_steps_runs_that_many_steps(gen: torch.Generator) -> None:
    acc = _acc()
    assert acc.optimizer_steps == 0
    results = []
    while acc.optimizer_steps < 3:  # the loop of the issue, now legal
        results.append(acc.step(random_micro_batches(gen, [2, 3]), lm_loss_fn))
    assert acc.optimizer_steps == 3 == results[-1].step
    assert [r.step for r in results] == [1, 2, 3]


def test_it_counts_shape_a_windows_and_flush_as_step_result_does(gen: torch.Generator) -> None:
    acc = _acc(accum_steps=2)
    seen = []
    for mb in random_micro_batches(gen, [2, 1, 3, 2, 1]):  # two full windows and a partial one
        with acc.micro_step():
            res = acc.backward(*lm_loss_fn(acc.model, mb))
        if res is not None:
            seen.append((res.step, acc.optimizer_steps))
    assert acc.optimizer_steps == 2  # the open partial window is not a step yet
    res = acc.flush()
    assert res is not None and res.step == acc.optimizer_steps == 3
    assert seen == [(1, 1), (2, 2)]


def test_skipped_windows_are_not_counted(gen: torch.Generator) -> None:
    acc = _acc()
    acc.step(random_micro_batches(gen, [2]), lm_loss_fn)
    res = acc.step([token_batch(gen, [0, 0])], lm_loss_fn)  # no items: skipped
    assert res.skipped and res.step == acc.optimizer_steps == 1
    assert acc.skipped_steps == 1


def test_it_is_read_only_and_the_old_names_still_work(gen: torch.Generator) -> None:
    acc = _acc()
    acc.step(random_micro_batches(gen, [2, 2]), lm_loss_fn)
    with pytest.raises(AttributeError):
        acc.optimizer_steps = 5  # type: ignore[misc]
    assert acc.optimizer_steps == acc.step_count == 1  # step_count: kept (add, never rename)
    assert callable(acc.step)


def test_state_dict_round_trip_restores_it(gen: torch.Generator) -> None:
    acc = _acc()
    for _ in range(2):
        acc.step(random_micro_batches(gen, [1, 2]), lm_loss_fn)
    fresh = _acc()
    fresh.load_state_dict(acc.state_dict())
    assert fresh.optimizer_steps == 2
    assert fresh.step(random_micro_batches(gen, [2]), lm_loss_fn).step == fresh.optimizer_steps == 3
