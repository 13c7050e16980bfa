"""Property tests: whatever the micro-batch sizes, window lengths and token masks, the
gradient handed to ``optimizer.step()`` is the full-batch mean gradient of the window.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import (
    IGNORE,
    SEQ_LEN,
    Batch,
    grad_capture,
    lm_loss_fn,
    make_lm,
    reference_grads,
    token_batch,
)
from hypothesis import event, given, settings
from hypothesis import strategies as st

import gradaccum as ga
from gradaccum import Accumulator

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)

# A micro-batch is a list of per-sample token masks: True = the label counts. Any pattern
# is allowed (prompt masking, padding, an all-ignored sample, an all-ignored window).
sample_mask = st.lists(st.booleans(), min_size=SEQ_LEN, max_size=SEQ_LEN)
micro_batch = st.lists(sample_mask, min_size=1, max_size=4)
stream = st.lists(micro_batch, min_size=1, max_size=9)


def _build(masks: list[list[list[bool]]], seed: int) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for mb in masks:
        batch = token_batch(gen, [SEQ_LEN] * len(mb))
        batch["labels"] = batch["labels"].masked_fill(~torch.tensor(mb), IGNORE)
        out.append(batch)
    return out


def _items(window: list[Batch]) -> int:
    return sum(int((mb["labels"] != IGNORE).sum()) for mb in window)


def _check_windows(
    model: torch.nn.Module,
    windows: list[list[Batch]],
    results: list[ga.StepResult],
    seen: list[list[torch.Tensor]],
    lr: float,
    max_norm: float | None = None,
) -> None:
    """Replay the windows on a reference copy: each one's gradient, loss and count must match."""
    ref = make_lm()
    assert len(results) == len(windows)
    applied = 0
    for window, res in zip(windows, results, strict=True):
        n = _items(window)
        assert res.num_items == n
        if n == 0:  # nothing to average over: the window must change nothing
            assert res.skipped
            event("window without items")
            continue
        want = reference_grads(ref, window)
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w) for w in want])))
        assert res.grad_norm == pytest.approx(norm, rel=1e-11)
        if max_norm is not None and norm > max_norm:  # torch's clip_grad_norm_ rule
            want = [w * (max_norm / (norm + 1e-6)) for w in want]
            event("window clipped")
        got = seen[applied]
        applied += 1
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-14)
        assert not res.skipped and res.step == applied
        with torch.no_grad():
            for p, w in zip(ref.parameters(), want, strict=True):
                p.sub_(lr * w)
    assert len(seen) == applied
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-13)


@SETTINGS
@given(
    masks=stream,
    accum_steps=st.integers(1, 5),
    max_norm=st.sampled_from([None, 0.2, 100.0]),
    seed=st.integers(0, 2**16),
)
def test_micro_step_gradient_is_full_batch_mean(
    masks: list[list[list[bool]]], accum_steps: int, max_norm: float | None, seed: int
) -> None:
    micro = _build(masks, seed)
    model = make_lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    seen = grad_capture(opt)
    acc = Accumulator(model, opt, accum_steps=accum_steps, max_grad_norm=max_norm)
    results = []
    for mb in micro:
        with acc.micro_step():
            res = acc.backward(*lm_loss_fn(model, mb))
        if res is not None:
            results.append(res)
    tail = acc.flush()
    if tail is not None:
        results.append(tail)
    windows = [micro[i : i + accum_steps] for i in range(0, len(micro), accum_steps)]
    _check_windows(model, windows, results, seen, lr=0.3, max_norm=max_norm)


@SETTINGS
@given(windows=st.lists(stream, min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_step_gradient_is_full_batch_mean(windows: list[list[list[list[bool]]]], seed: int) -> None:
    built = [_build(w, seed + i) for i, w in enumerate(windows)]
    model = make_lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    seen = grad_capture(opt)
    acc = Accumulator(model, opt, accum_steps=2)  # ignored by step(): the iterable is the window
    results = [acc.step(iter(w), lm_loss_fn) for w in built]
    _check_windows(model, built, results, seen, lr=0.3)


@SETTINGS
@given(masks=stream, seed=st.integers(0, 2**16))
def test_logged_loss_is_the_token_mean(masks: list[list[list[bool]]], seed: int) -> None:
    micro = _build(masks, seed)
    n = _items(micro)
    model = make_lm()
    with torch.no_grad():
        total = sum(float(lm_loss_fn(model, mb)[0]) for mb in micro)
    res = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0)).step(micro, lm_loss_fn)
    assert res.num_items == n
    if n:
        assert abs(res.loss - total / n) <= 1e-12 * abs(total / n)


@SETTINGS
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    micro=st.integers(1, 7),
    extra=st.sampled_from([None, "tag", 3]),
)
def test_split_round_trip(sizes: list[int], micro: int, extra: Any) -> None:
    n = sum(sizes)
    batch = {
        "x": torch.arange(n * 2).reshape(n, 2),
        "pair": (torch.arange(n), [torch.ones(n, 3)]),
        "e": extra,
    }
    parts = ga.split(batch, micro)
    assert [p["x"].shape[0] for p in parts[:-1]] == [micro] * (len(parts) - 1)
    assert 1 <= parts[-1]["x"].shape[0] <= micro
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"])
    assert torch.equal(torch.cat([p["pair"][0] for p in parts]), batch["pair"][0])
    assert torch.equal(torch.cat([p["pair"][1][0] for p in parts]), batch["pair"][1][0])
    assert all(p["e"] == extra and isinstance(p["pair"], tuple) for p in parts)
