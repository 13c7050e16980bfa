"""DESIGN.md "What peers get wrong": one test per pitfall.

Each test first shows that the naive implementation really is wrong on the same data
(by a clear margin against the plain full-batch reference), then that gradaccum is
right. The distributed pitfalls (syncing every micro-batch, no_sync around backward
only) live in test_sync.py.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from conftest import (
    cat_batches,
    grad_capture,
    lm_loss_fn,
    make_lm,
    params_of,
    random_micro_batches,
    reference_grads,
    reference_loss,
    reference_step,
    rel_err,
    token_batch,
    twin,
)
from torch import nn

import gradaccum as ga
from gradaccum import Accumulator

Pair = tuple[torch.Tensor, torch.Tensor]


def _sgd_capture(model: nn.Module, **kw: Any) -> tuple[Accumulator, list[list[torch.Tensor]]]:
    """An Accumulator whose optimizer records the gradient it is handed (lr=0 keeps params fixed)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return Accumulator(model, opt, **kw), grad_capture(opt)


def _run_shape_a(acc: Accumulator, micro: list[Any], loss_fn: Any) -> list[ga.StepResult]:
    out = []
    for mb in micro:
        with acc.micro_step():
            res = acc.backward(*loss_fn(acc.model, mb))
        if res is not None:
            out.append(res)
    tail = acc.flush()
    return out + ([tail] if tail is not None else [])


def _naive_mean_of_means(model: nn.Module, micro: list[Any], k: int) -> list[torch.Tensor]:
    """What Accelerate / Lightning / old HF Trainer do: backward(mean_loss_i / k), summed."""
    model.zero_grad(set_to_none=True)
    for mb in micro:
        loss_sum, n = lm_loss_fn(model, mb)
        (loss_sum / n / k).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


# --------------------------------------------------------------------------- mean of means


@pytest.mark.parametrize("shape", ["micro_step", "step"])
def test_mean_of_means_with_variable_lengths(shape: str, gen: torch.Generator) -> None:
    # Short answers in one micro-batch, long ones in the other: the common SFT case.
    micro = [token_batch(gen, [1, 2, 1, 1], seq_len=12), token_batch(gen, [12, 11, 12, 10], seq_len=12)]
    model = make_lm()
    want = reference_grads(model, micro)

    naive = _naive_mean_of_means(model, micro, k=2)
    assert rel_err(naive, want) > 0.5  # the naive gradient is badly off (measured: 141%)

    acc, seen = _sgd_capture(model, accum_steps=2)
    if shape == "micro_step":
        _run_shape_a(acc, micro, lm_loss_fn)
    else:
        acc.step(micro, lm_loss_fn)
    assert len(seen) == 1
    assert rel_err(seen[0], want) < 1e-13


# --------------------------------------------------------------------------- partial window


def test_partial_last_window_uses_its_real_size(gen: torch.Generator) -> None:
    micro = random_micro_batches(gen, [3] * 6)  # accum_steps=4: one full window, then 2 left over
    model = make_lm()
    want_full, want_tail = reference_grads(model, micro[:4]), reference_grads(model, micro[4:])

    # Scaling the leftover window by 1/k treats 2 micro-batches as if they were 4.
    naive_tail = _naive_mean_of_means(model, micro[4:], k=4)
    assert rel_err(naive_tail, want_tail) > 0.3

    acc, seen = _sgd_capture(model, accum_steps=4)
    results = _run_shape_a(acc, micro, lm_loss_fn)
    assert [r.step for r in results] == [1, 2]
    assert results[1].num_items == int(sum((mb["labels"] != -100).sum() for mb in micro[4:]))
    assert rel_err(seen[0], want_full) < 1e-13
    assert rel_err(seen[1], want_tail) < 1e-13
    assert results[1].loss == pytest.approx(reference_loss(model, cat_batches(micro[4:])).item(), rel=1e-13)


# --------------------------------------------------------------------------- scheduler


def _halving(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)


@pytest.mark.parametrize("shape", ["micro_step", "step"])
def test_scheduler_steps_once_per_window(shape: str, gen: torch.Generator) -> None:
    k, windows = 4, 3
    micro = random_micro_batches(gen, [2] * (k * windows))

    # Naive: stepping the scheduler after every micro-batch burns through it k times too fast.
    naive_opt = torch.optim.SGD(make_lm().parameters(), lr=0.1)
    naive = _halving(naive_opt)
    naive_lrs = []
    for i in range(len(micro)):
        if i % k == 0:
            naive_lrs.append(naive_opt.param_groups[0]["lr"])
        naive_opt.step()  # (no gradients: a no-op that keeps torch's order check quiet)
        naive.step()
    assert naive.last_epoch == k * windows and naive_lrs != [0.1, 0.05, 0.025]

    model = make_lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = _halving(opt)
    acc = Accumulator(model, opt, accum_steps=k, scheduler=sched)
    if shape == "micro_step":
        results = _run_shape_a(acc, micro, lm_loss_fn)
    else:
        results = [acc.step(micro[i : i + k], lm_loss_fn) for i in range(0, len(micro), k)]
    assert [r.lr for r in results] == [0.1, 0.05, 0.025]  # the lr each step actually used
    assert sched.last_epoch == windows
    assert opt.param_groups[0]["lr"] == 0.0125


def test_skipped_window_does_not_step_scheduler(gen: torch.Generator) -> None:
    model = make_lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = _halving(opt)
    acc = Accumulator(model, opt, scheduler=sched)

    def poisoned(m: nn.Module, mb: Any) -> Pair:
        loss_sum, n = lm_loss_fn(m, mb)
        return loss_sum * float("inf"), n

    assert acc.step(random_micro_batches(gen, [2, 2]), poisoned).skipped
    assert sched.last_epoch == 0 and opt.param_groups[0]["lr"] == 0.1


# --------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("shape", ["micro_step", "step"])
def test_clipping_applies_to_the_accumulated_gradient(shape: str, gen: torch.Generator) -> None:
    micro = random_micro_batches(gen, [3, 1, 4, 2])
    max_norm = 0.1
    model = make_lm()
    ref = twin(model)
    loss = reference_loss(ref, cat_batches(micro))
    loss.backward()
    full_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm))
    want = [p.grad.clone() for p in ref.parameters()]
    assert full_norm > 2 * max_norm  # clipping is really active

    # Naive: clip each micro-batch's (correctly normalised) contribution, then add them up.
    total = sum(int((mb["labels"] != -100).sum()) for mb in micro)
    naive = [torch.zeros_like(p) for p in model.parameters()]
    for mb in micro:
        model.zero_grad(set_to_none=True)
        (lm_loss_fn(model, mb)[0] / total).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        naive = [a + p.grad for a, p in zip(naive, model.parameters(), strict=True)]
    model.zero_grad(set_to_none=True)
    assert rel_err(naive, want) > 0.5

    acc, seen = _sgd_capture(model, accum_steps=len(micro), max_grad_norm=max_norm)
    res = _run_shape_a(acc, micro, lm_loss_fn)[0] if shape == "micro_step" else acc.step(micro, lm_loss_fn)
    assert rel_err(seen[0], want) < 1e-12
    assert res.grad_norm == pytest.approx(full_norm, rel=1e-12)  # reported before clipping
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in seen[0]]))
    assert float(clipped) == pytest.approx(max_norm, rel=1e-5)


# --------------------------------------------------------------------------- bf16


def _mlp(dtype: torch.dtype, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)


def _mse_loss_fn(model: nn.Module, mb: Pair) -> tuple[torch.Tensor, int]:
    x, y = mb
    out = model(x).float() if x.dtype == torch.bfloat16 else model(x)
    return ((out - y.to(out.dtype)) ** 2).sum(), x.shape[0]


def test_bf16_grads_accumulate_in_grad_dtype(gen: torch.Generator) -> None:
    k = 256  # many micro-batches: summing in bf16 loses a little more at every add
    x = torch.randn(k, 16, generator=gen).to(torch.bfloat16)
    y = (torch.randn(k, 4, generator=gen) + 3).to(torch.bfloat16)  # same-sign residuals
    micro = list(zip(x.split(1), y.split(1), strict=True))

    ref = _mlp(torch.float64)
    ref.load_state_dict({n: v.double() for n, v in _mlp(torch.bfloat16).state_dict().items()})
    loss = ((ref(x.double()) - y.double()) ** 2).sum() / k
    want = torch.autograd.grad(loss, list(ref.parameters()))

    errors = {}
    for name, grad_dtype in [("bf16 sum", None), ("fp32 buffers", torch.float32)]:
        model = _mlp(torch.bfloat16)
        acc, seen = _sgd_capture(model, grad_dtype=grad_dtype)
        res = acc.step(micro, _mse_loss_fn)
        assert not res.skipped and res.num_items == k
        assert all(g.dtype == torch.bfloat16 for g in seen[0])  # the optimizer gets model-dtype grads
        errors[name] = rel_err(seen[0], want)
    # One bf16 rounding of the final gradient is unavoidable (2**-9 relative); more is the sum's fault.
    assert errors["fp32 buffers"] < 2**-8
    assert errors["bf16 sum"] > 4 * errors["fp32 buffers"], errors


def test_grad_dtype_matches_between_shapes_and_steps(gen: torch.Generator) -> None:
    """grad_dtype buffers are per window: a second window starts from zero."""
    x = torch.randn(12, 16, generator=gen).to(torch.bfloat16)
    y = torch.randn(12, 4, generator=gen).to(torch.bfloat16)
    micro = list(zip(x.split(3), y.split(3), strict=True))
    a_model, b_model = _mlp(torch.bfloat16), _mlp(torch.bfloat16)
    a, a_seen = _sgd_capture(a_model, accum_steps=2, grad_dtype=torch.float32)
    b, b_seen = _sgd_capture(b_model, grad_dtype=torch.float32)
    _run_shape_a(a, micro, _mse_loss_fn)
    b.step(micro[:2], _mse_loss_fn)
    b.step(micro[2:], _mse_loss_fn)
    assert len(a_seen) == len(b_seen) == 2
    for ga_, gb in zip(a_seen, b_seen, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(ga_, gb, strict=True))


# --------------------------------------------------------------------------- NaN


def _features(gen: torch.Generator, n: int) -> Pair:
    x = torch.randn(n, 16, generator=gen, dtype=torch.float64)
    return x, torch.randn(n, 4, generator=gen, dtype=torch.float64)


def _adamw(model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1.0 + e))


def _mlp_reference_step(
    model: nn.Module, opt: torch.optim.Optimizer, sched: Any, window: list[Pair]
) -> float:
    x, y = torch.cat([w[0] for w in window]), torch.cat([w[1] for w in window])
    opt.zero_grad(set_to_none=True)
    loss = ((model(x) - y) ** 2).sum() / x.shape[0]
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("shape", ["micro_step", "step"])
def test_nonfinite_micro_batch_changes_nothing(shape: str, bad: float, gen: torch.Generator) -> None:
    k = 3
    good1 = [_features(gen, n) for n in (2, 3, 1)]
    poisoned = [_features(gen, n) for n in (2, 2, 2)]
    poisoned[1][0][1, 5] = bad  # one value in one micro-batch
    good2 = [_features(gen, n) for n in (1, 4, 2)]

    # Naive: a plain step on the poisoned window ruins the weights and the optimizer state.
    naive = _mlp(torch.float64)
    naive_opt, naive_sched = _adamw(naive)
    _mlp_reference_step(naive, naive_opt, naive_sched, poisoned)
    assert not all(bool(torch.isfinite(p).all()) for p in naive.parameters())

    model = _mlp(torch.float64)
    ref = twin(model)
    opt, sched = _adamw(model)
    ref_opt, ref_sched = _adamw(ref)
    acc = Accumulator(model, opt, accum_steps=k, scheduler=sched, skip_nonfinite=True)

    def window(micro: list[Pair]) -> ga.StepResult:
        if shape == "step":
            return acc.step(micro, _mse_loss_fn)
        (res,) = _run_shape_a(acc, micro, _mse_loss_fn)
        return res

    assert not window(good1).skipped
    params, opt_state = params_of(model), copy.deepcopy(opt.state_dict())
    counters = acc.state_dict()

    res = window(poisoned)
    assert res.skipped and res.step == 1
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    after = opt.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    for i, st in opt_state["state"].items():
        assert set(st) == set(after["state"][i]) and {"step", "exp_avg", "exp_avg_sq"} <= set(st)
        assert all(torch.equal(st[name], after["state"][i][name]) for name in st)
    assert sched.last_epoch == 1
    skips = {"skipped_steps": 0, "consecutive_skipped": 0}
    assert {**acc.state_dict(), **skips} == {**counters, **skips}
    assert acc.state_dict()["skipped_steps"] == counters["skipped_steps"] + 1
    assert acc.state_dict()["consecutive_skipped"] == counters["consecutive_skipped"] + 1
    assert all(p.grad is None for p in model.parameters())

    # The next window trains normally: same as a run that never saw the bad window.
    res = window(good2)
    assert not res.skipped and res.step == 2
    _mlp_reference_step(ref, ref_opt, ref_sched, good1)
    want_loss = _mlp_reference_step(ref, ref_opt, ref_sched, good2)
    assert res.loss == pytest.approx(want_loss, rel=1e-12)
    for got, want in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_skip_nonfinite_false_lets_the_step_through(gen: torch.Generator) -> None:
    model = _mlp(torch.float64)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), skip_nonfinite=False)
    x, y = _features(gen, 4)
    x[0, 0] = float("nan")
    res = acc.step([(x, y)], _mse_loss_fn)
    assert not res.skipped and res.step == 1
    assert not all(bool(torch.isfinite(p).all()) for p in model.parameters())


# --------------------------------------------------------------------------- logged loss


def _mean_loss(model: nn.Module, mb: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        loss_sum, n = lm_loss_fn(model, mb)
    return float(loss_sum / n)


def test_logged_loss_does_not_depend_on_k(gen: torch.Generator) -> None:
    batch = token_batch(gen, torch.randint(1, 7, (16,), generator=gen).tolist())
    batch2 = token_batch(gen, torch.randint(1, 7, (16,), generator=gen).tolist())
    ref_model = make_lm()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.5)
    want = [reference_step(ref_model, ref_opt, [b]) for b in (batch, batch2)]

    losses, norms = {}, {}
    for k in (1, 2, 4, 8):
        micro = ga.split(batch, 16 // k) + ga.split(batch2, 16 // k)
        model = make_lm()
        acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.5), accum_steps=k)
        results = _run_shape_a(acc, micro, lm_loss_fn)
        losses[k], norms[k] = [r.loss for r in results], [r.grad_norm for r in results]

        # Naive logging: add up each micro-batch's mean loss over the window -> grows with k.
        naive = sum(_mean_loss(make_lm(), mb) for mb in micro[:k])
        if k > 1:
            assert naive > 0.6 * k * want[0]["loss"]
    for k in (2, 4, 8):
        assert losses[k] == pytest.approx(losses[1], rel=1e-12, abs=0)
        assert norms[k] == pytest.approx(norms[1], rel=1e-12, abs=0)
    assert losses[1] == pytest.approx([w["loss"] for w in want], rel=1e-12)


# --------------------------------------------------------------------------- BatchNorm


def _bn_warnings(model: nn.Module) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=4)
    return [w for w in caught if issubclass(w.category, UserWarning) and "BatchNorm" in str(w.message)]


def test_batchnorm_warns_once() -> None:
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 8), nn.BatchNorm1d(8),
        nn.Unflatten(1, (2, 2, 2)), nn.BatchNorm2d(2),
    )
    caught = _bn_warnings(model)
    assert len(caught) == 1
    assert caught[0].filename == __file__  # points at the line that built the Accumulator
    assert "3" in str(caught[0].message)  # it says how many


def test_no_batchnorm_no_warning() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GroupNorm(2, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=4)
    assert [w for w in caught if issubclass(w.category, UserWarning)] == []
