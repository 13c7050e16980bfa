"""--effective-batch auto: the growth rule and the learning-rate factor."""

from __future__ import annotations

import math

import pytest
import torch

from gradaccum.adaptive import AdaptiveBatch, lr_rule_for


def test_grows_in_powers_of_two_one_at_a_time_never_shrinks_and_stops_at_the_cap() -> None:
    a = AdaptiveBatch(micro_batch=4, world_size=2, max_effective_batch=64, min_windows=3)
    assert a.effective_batch == 16 and a.accum_steps == 2
    assert not a.update(1000.0, measured_windows=2)  # too early
    assert not a.update(None, measured_windows=10)
    assert not a.update(31.9, measured_windows=10)  # below twice the batch: stay
    assert a.update(300.0, measured_windows=10) and a.effective_batch == 32  # one doubling only
    assert not a.update(300.0, measured_windows=12)  # waits min_windows after a change
    assert not a.update(5.0, measured_windows=13) and a.effective_batch == 32  # never shrinks
    assert a.update(300.0, measured_windows=13) and a.effective_batch == 64
    assert not a.update(1e9, measured_windows=30) and a.accum_steps == 8  # the cap
    assert a.effective_batch == a.micro_batch * a.accum_steps * a.world_size


@pytest.mark.parametrize(("rule", "want"), [("sqrt", 2.0), ("linear", 4.0), ("none", 1.0)])
def test_learning_rate_factor(rule: str, want: float) -> None:
    a = AdaptiveBatch(micro_batch=8, lr_rule=rule, min_windows=0)
    assert a.lr_factor() == 1.0
    a.update(64.0, measured_windows=1)
    a.update(64.0, measured_windows=2)
    assert a.effective_batch == 64 and a.lr_factor() == pytest.approx(want)


def test_rule_follows_the_optimizer() -> None:
    p = [torch.nn.Parameter(torch.zeros(1))]
    assert lr_rule_for(torch.optim.SGD(p, lr=0.1)) == "linear"
    assert lr_rule_for(torch.optim.AdamW(p)) == "sqrt" and lr_rule_for(torch.optim.Adam(p)) == "sqrt"


def test_state_round_trip_and_mismatch() -> None:
    a = AdaptiveBatch(micro_batch=2, min_windows=0)
    a.update(100.0, measured_windows=1)
    a.update(100.0, measured_windows=2)
    b = AdaptiveBatch(micro_batch=2)
    b.load_state_dict(a.state_dict())
    assert b.accum_steps == a.accum_steps == 8 and b.lr_factor() == a.lr_factor()
    assert b.last_change == 2
    with pytest.raises(ValueError, match="max_effective_batch"):
        AdaptiveBatch(micro_batch=2, max_effective_batch=64).load_state_dict(a.state_dict())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="below the starting effective batch"):
        AdaptiveBatch(micro_batch=16, max_effective_batch=16)
    with pytest.raises(ValueError, match="lr_rule"):
        AdaptiveBatch(micro_batch=1, lr_rule="cubic")
    with pytest.raises(ValueError, match="micro_batch"):
        AdaptiveBatch(micro_batch=0)
    assert not AdaptiveBatch(micro_batch=1, min_windows=0).update(math.nan, measured_windows=5)
