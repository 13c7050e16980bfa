"""Accumulator: equivalence with a plain full-batch loop, StepResult, misuse, state_dict.

The reference in every test is ``conftest.reference_step``: the window's micro-batches
concatenated, a MEAN loss, one backward, ``clip_grad_norm_``, one AdamW step, one
scheduler step.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import (
    IGNORE,
    Batch,
    lm_loss_fn,
    make_lm,
    params_of,
    random_micro_batches,
    reference_step,
    token_batch,
    twin,
)
from torch import nn

import gradaccum as ga
from gradaccum import Accumulator, AccumulatorStateError, StepResult

# Unequal micro-batch sizes (samples); each sample has 1..SEQ_LEN counted tokens.
SIZES = [3, 1, 4, 2, 5, 1, 2, 3, 2, 4, 1]
ACCUM = 3  # shape (a): three full windows and a partial one of two micro-batches
WINDOW_LENS = [3, 1, 4, 2, 1]  # shape (b): whatever iterable step() gets is one window
MAX_NORM = 0.4

# Measured worst cases: fp64 2e-16 (params) / 5e-16 (loss); fp32 6e-8 / 1.3e-7.
TOL = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-14},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
}


def _optim(model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    # The lr changes every step, so a scheduler stepped at the wrong time shows up.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1.0 + e))
    return opt, sched


def _windows(micro: list[Batch], lens: list[int]) -> list[list[Batch]]:
    out, i = [], 0
    for n in lens:
        out.append(micro[i : i + n])
        i += n
    assert i == len(micro)
    return out


def _run_shape_a(acc: Accumulator, micro: list[Batch]) -> list[StepResult]:
    results = []
    for i, mb in enumerate(micro):
        with acc.micro_step():
            loss_sum, n = lm_loss_fn(acc.model, mb)
            res = acc.backward(loss_sum, num_items=n)
        closes_window = (i + 1) % acc.accum_steps == 0
        assert (res is not None) == closes_window
        if res is not None:
            results.append(res)
    tail = acc.flush()
    if tail is not None:
        results.append(tail)
    assert acc.flush() is None  # nothing left: flushing twice is harmless
    return results


def _assert_result(res: StepResult, ref: dict[str, float], step: int, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    assert not res.skipped
    assert res.step == step
    assert res.num_items == ref["num_items"] and isinstance(res.num_items, int)
    assert res.lr == pytest.approx(ref["lr"], rel=1e-15)
    assert res.loss == pytest.approx(ref["loss"], rel=tol["rtol"], abs=0)
    assert res.grad_norm == pytest.approx(ref["grad_norm"], rel=tol["rtol"], abs=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", ["micro_step", "step"])
def test_matches_full_batch_reference(dtype: torch.dtype, shape: str, gen: torch.Generator) -> None:
    micro = random_micro_batches(gen, SIZES)
    model = make_lm(dtype)
    ref_model = twin(model)
    opt, sched = _optim(model)
    ref_opt, ref_sched = _optim(ref_model)
    acc = Accumulator(model, opt, accum_steps=ACCUM, scheduler=sched, max_grad_norm=MAX_NORM)

    if shape == "micro_step":
        windows = _windows(micro, [ACCUM] * 3 + [len(SIZES) - 3 * ACCUM])
        results = _run_shape_a(acc, micro)
    else:
        windows = _windows(micro, WINDOW_LENS)
        results = [acc.step(iter(w), lm_loss_fn) for w in windows]  # any iterable, even a one-shot one

    assert len(results) == len(windows)
    refs = []
    for i, (window, res) in enumerate(zip(windows, results, strict=True)):
        ref = reference_step(ref_model, ref_opt, window, ref_sched, MAX_NORM)
        refs.append(ref)
        _assert_result(res, ref, step=i + 1, dtype=dtype)
    for got, want in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(got, want, **TOL[dtype])
    # The test only means something if clipping really happened in some windows and not others.
    assert any(r["grad_norm"] > MAX_NORM for r in refs) and any(r["grad_norm"] < MAX_NORM for r in refs)
    assert sched.last_epoch == len(windows)
    assert all(p.grad is None for p in model.parameters())  # the window is closed and cleared


def test_stepresult_loss_is_exact_window_mean(gen: torch.Generator) -> None:
    """StepResult.loss is Σ loss_sum / Σ num_items over the window, not a mean of means."""
    micro = [token_batch(gen, [1]), token_batch(gen, [6, 6, 5])]
    model = make_lm()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0))
    sums, counts = zip(*(lm_loss_fn(model, mb) for mb in micro), strict=True)
    res = acc.step(micro, lm_loss_fn)
    assert res.num_items == 18
    assert res.loss == pytest.approx(float(sum(sums).detach()) / 18, rel=1e-14)
    mean_of_means = float(sum(s.detach() / c for s, c in zip(sums, counts, strict=True))) / 2
    assert res.loss != pytest.approx(mean_of_means)


def test_step_reads_the_iterable_lazily(gen: torch.Generator) -> None:
    """step() looks one micro-batch ahead and no further (streaming data works)."""
    micro = random_micro_batches(gen, [2, 2, 2, 2])
    produced: list[int] = []

    def stream() -> Iterator[Batch]:
        for i, mb in enumerate(micro):
            produced.append(i)
            yield mb

    calls: list[int] = []

    def loss_fn(model: nn.Module, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(len(produced))
        return lm_loss_fn(model, mb)

    model = make_lm()
    Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1)).step(stream(), loss_fn)
    assert calls == [2, 3, 4, 4]


def test_mixed_int_and_tensor_counts(gen: torch.Generator) -> None:
    micro = random_micro_batches(gen, [2, 3, 1])
    model, ref_model = make_lm(), make_lm()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.3), accum_steps=3)
    ref = reference_step(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.3), micro)
    for i, mb in enumerate(micro):
        with acc.micro_step():
            loss_sum, n = lm_loss_fn(model, mb)
            res = acc.backward(loss_sum, int(n) if i % 2 else n.float())
    assert res is not None and res.num_items == ref["num_items"]
    assert res.loss == pytest.approx(ref["loss"], rel=1e-12)
    for got, want in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_window_without_items_is_skipped(gen: torch.Generator) -> None:
    model = make_lm()
    opt, sched = _optim(model)
    acc = Accumulator(model, opt, scheduler=sched)
    before = params_of(model)
    empty = token_batch(gen, [0, 0])  # every label is IGNORE
    res = acc.step([empty], lm_loss_fn)
    assert res.skipped and res.num_items == 0 and math.isnan(res.loss) and res.step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert sched.last_epoch == 0 and acc.skipped_steps == 1 and acc.step_count == 0
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- misuse


def _snapshot(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return [
        (p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
        for p in model.parameters()
    ]


def _assert_unchanged(model: nn.Module, snap: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    for p, (w, g) in zip(model.parameters(), snap, strict=True):
        assert torch.equal(p.detach(), w)
        if g is None:
            assert p.grad is None
        else:
            assert p.grad is not None and torch.equal(p.grad, g)


@pytest.fixture
def setup(gen: torch.Generator) -> tuple[nn.Module, Accumulator, list[Batch]]:
    model = make_lm()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.5), accum_steps=3)
    return model, acc, random_micro_batches(gen, [2, 3, 1, 2])


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"accum_steps": 0}, ValueError),
        ({"accum_steps": -2}, ValueError),
        ({"accum_steps": 2.0}, TypeError),
        ({"accum_steps": True}, TypeError),
        ({"accum_steps": "4"}, TypeError),
        ({"max_grad_norm": 0.0}, ValueError),
        ({"max_grad_norm": -1.0}, ValueError),
        ({"grad_dtype": torch.int32}, TypeError),
        ({"grad_dtype": "float32"}, TypeError),
    ],
)
def test_bad_constructor_arguments(kwargs: dict[str, Any], exc: type[Exception]) -> None:
    model = make_lm()
    with pytest.raises(exc):
        Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_constructor_rejects_non_model_and_non_optimizer() -> None:
    model = make_lm()
    with pytest.raises(TypeError, match="Module"):
        Accumulator(lambda x: x, torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Optimizer"):
        Accumulator(model, object())  # type: ignore[arg-type]


def _bad_calls(model: nn.Module, mb: Batch) -> dict[str, tuple[Any, Any, type[Exception]]]:
    loss_sum, n = lm_loss_fn(model, mb)
    with torch.no_grad():
        detached, _ = lm_loss_fn(model, mb)
    logits = model(mb["ids"])
    return {
        "non-scalar loss": (logits.sum(-1), n, ValueError),
        "non-tensor loss": (loss_sum.detach().item(), n, TypeError),
        "loss without grad": (detached, n, ValueError),
        "negative int count": (loss_sum, -1, ValueError),
        "negative tensor count": (loss_sum, torch.tensor(-3), ValueError),
        "nan count": (loss_sum, float("nan"), ValueError),
        "bool count": (loss_sum, True, TypeError),
        "string count": (loss_sum, "5", TypeError),
        "vector count": (loss_sum, torch.tensor([1, 2]), ValueError),
    }


BAD_CALLS = [
    "non-scalar loss", "non-tensor loss", "loss without grad", "negative int count",
    "negative tensor count", "nan count", "bool count", "string count", "vector count",
]


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_backward_arguments_change_nothing(
    case: str, setup: tuple[nn.Module, Accumulator, list[Batch]]
) -> None:
    """Mid-window, a rejected backward leaves params, grads and the window as they were."""
    model, acc, micro = setup
    ref_model = twin(model)
    with acc.micro_step():  # one good micro-batch first, so there are gradients to protect
        acc.backward(*lm_loss_fn(model, micro[0]))
    snap = _snapshot(model)
    loss, n, exc = _bad_calls(model, micro[1])[case]
    with pytest.raises(exc), acc.micro_step():
        acc.backward(loss, n)
    _assert_unchanged(model, snap)
    # The window carries on as if the bad call never happened.
    for mb in micro[1:3]:
        with acc.micro_step():
            res = acc.backward(*lm_loss_fn(model, mb))
    assert res is not None and res.step == 1
    reference_step(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.5), micro[:3])
    for got, want in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_state_error_is_both_runtime_and_value_error() -> None:
    assert issubclass(AccumulatorStateError, RuntimeError)
    assert issubclass(AccumulatorStateError, ValueError)
    assert ga.AccumulatorStateError is AccumulatorStateError


def test_backward_outside_micro_step(setup: tuple[nn.Module, Accumulator, list[Batch]]) -> None:
    model, acc, micro = setup
    snap = _snapshot(model)
    with pytest.raises(AccumulatorStateError, match="micro_step"):
        acc.backward(*lm_loss_fn(model, micro[0]))
    _assert_unchanged(model, snap)
    assert acc.micro_steps == 0 and acc.step_count == 0


def test_backward_twice_in_one_micro_step(setup: tuple[nn.Module, Accumulator, list[Batch]]) -> None:
    model, acc, micro = setup
    ref_model = twin(model)
    with pytest.raises(AccumulatorStateError, match="twice"), acc.micro_step():
        acc.backward(*lm_loss_fn(model, micro[0]))
        snap = _snapshot(model)
        acc.backward(*lm_loss_fn(model, micro[1]))
    _assert_unchanged(model, snap)
    # Only the first backward counted: the window (accum_steps=3) needs two more micro-batches.
    for mb in micro[1:3]:
        with acc.micro_step():
            res = acc.backward(*lm_loss_fn(model, mb))
    ref = reference_step(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.5), micro[:3])
    assert res is not None and res.num_items == ref["num_items"]
    assert res.loss == pytest.approx(ref["loss"], rel=1e-12)


def test_nested_micro_step(setup: tuple[nn.Module, Accumulator, list[Batch]]) -> None:
    model, acc, micro = setup
    snap = _snapshot(model)
    with pytest.raises(AccumulatorStateError, match="nested"), acc.micro_step(), acc.micro_step():
        pass
    _assert_unchanged(model, snap)
    with acc.micro_step():  # still usable
        acc.backward(*lm_loss_fn(model, micro[0]))


def test_step_while_micro_step_window_is_open(
    setup: tuple[nn.Module, Accumulator, list[Batch]]
) -> None:
    model, acc, micro = setup
    ref_model = twin(model)
    with acc.micro_step():
        acc.backward(*lm_loss_fn(model, micro[0]))
    snap = _snapshot(model)
    with pytest.raises(AccumulatorStateError, match="flush"):
        acc.step(micro[1:3], lm_loss_fn)
    _assert_unchanged(model, snap)
    res = acc.flush()  # the open window is intact: it holds exactly micro[0]
    ref = reference_step(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.5), micro[:1])
    assert res is not None and res.num_items == ref["num_items"]
    assert res.loss == pytest.approx(ref["loss"], rel=1e-12)


def test_step_inside_micro_step(setup: tuple[nn.Module, Accumulator, list[Batch]]) -> None:
    model, acc, micro = setup
    snap = _snapshot(model)
    with pytest.raises(AccumulatorStateError), acc.micro_step():
        acc.step(micro[:2], lm_loss_fn)
    _assert_unchanged(model, snap)


def test_backward_inside_step_loss_fn(setup: tuple[nn.Module, Accumulator, list[Batch]]) -> None:
    model, acc, micro = setup
    snap = _snapshot(model)

    def loss_fn(m: nn.Module, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum, n = lm_loss_fn(m, mb)
        acc.backward(loss_sum, n)  # mixing the shapes: step() runs backward itself
        return loss_sum, n

    with pytest.raises(AccumulatorStateError, match="step"):
        acc.step(micro, loss_fn)
    _assert_unchanged(model, snap)
    assert acc.step_count == 0 and acc.micro_steps == 0
    assert not acc.step(micro[:2], lm_loss_fn).skipped  # and it recovers


def test_micro_step_inside_step_loss_fn(setup: tuple[nn.Module, Accumulator, list[Batch]]) -> None:
    model, acc, micro = setup
    snap = _snapshot(model)

    def loss_fn(m: nn.Module, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with acc.micro_step():
            return lm_loss_fn(m, mb)

    with pytest.raises(AccumulatorStateError):
        acc.step(micro, loss_fn)
    _assert_unchanged(model, snap)


def test_flush_inside_micro_step(setup: tuple[nn.Module, Accumulator, list[Batch]]) -> None:
    model, acc, micro = setup
    with pytest.raises(AccumulatorStateError), acc.micro_step():
        acc.backward(*lm_loss_fn(model, micro[0]))
        snap = _snapshot(model)
        acc.flush()
    _assert_unchanged(model, snap)
    assert acc.step_count == 0


def test_step_with_empty_iterable(setup: tuple[nn.Module, Accumulator, list[Batch]]) -> None:
    model, acc, _ = setup
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="no micro-batches"):
        acc.step([], lm_loss_fn)
    with pytest.raises(ValueError, match="no micro-batches"):
        acc.step(iter(()), lm_loss_fn)
    _assert_unchanged(model, snap)
    assert acc.step_count == 0


@pytest.mark.parametrize(
    "bad_return",
    [
        lambda loss, n: loss,  # only the loss
        lambda loss, n: (loss, n, 1),  # three things
        lambda loss, n: (loss.detach().item(), n),  # not a tensor
        lambda loss, n: (loss, "many"),  # not a count
        lambda loss, n: None,
    ],
    ids=["loss-only", "triple", "float-loss", "str-count", "none"],
)
def test_loss_fn_returning_the_wrong_thing(
    bad_return: Any, setup: tuple[nn.Module, Accumulator, list[Batch]]
) -> None:
    model, acc, micro = setup
    snap = _snapshot(model)
    calls = []

    def loss_fn(m: nn.Module, mb: Batch) -> Any:
        calls.append(1)
        loss_sum, n = lm_loss_fn(m, mb)
        # The first micro-batch is fine, so a half-built window has to be thrown away.
        return (loss_sum, n) if len(calls) == 1 else bad_return(loss_sum, n)

    with pytest.raises(TypeError):
        acc.step(micro, loss_fn)
    _assert_unchanged(model, snap)
    assert acc.step_count == 0 and acc.micro_steps == 0
    with pytest.raises(TypeError, match="callable"):
        acc.step(micro, "not a function")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- state_dict


def _train(acc: Accumulator, micro: list[Batch], poison: int | None = None) -> list[StepResult]:
    """Shape (a) over ``micro``; micro-batch number ``poison`` gets a NaN loss."""
    out = []
    for i, mb in enumerate(micro):
        with acc.micro_step():
            loss_sum, n = lm_loss_fn(acc.model, mb)
            if i == poison:
                loss_sum = loss_sum * float("nan")
            res = acc.backward(loss_sum, n)
        if res is not None:
            out.append(res)
    return out


def test_state_dict_round_trip(gen: torch.Generator) -> None:
    first, second = random_micro_batches(gen, [2, 1, 3, 2, 2, 1]), random_micro_batches(gen, [1, 3, 2, 2])

    def build(model: nn.Module) -> tuple[Accumulator, torch.optim.Optimizer, Any]:
        opt, sched = _optim(model)
        return Accumulator(model, opt, accum_steps=2, scheduler=sched, max_grad_norm=MAX_NORM), opt, sched

    model = make_lm()
    acc, opt, sched = build(model)
    done = _train(acc, first, poison=3)  # the second window is skipped
    assert [r.skipped for r in done] == [False, True, False]
    state = acc.state_dict()
    assert state["step"] == 2 and state["skipped_steps"] == 1
    assert state["micro_steps"] >= 4 and state["items_seen"] > 0

    # A fresh process: new objects, every state restored from a serialised checkpoint
    # (serialised so the two optimizers cannot share state tensors).
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "acc": state}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = make_lm(seed=99)
    model2.load_state_dict(ckpt["model"])
    acc2, opt2, sched2 = build(model2)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    acc2.load_state_dict(ckpt["acc"])
    assert acc2.state_dict() == state

    a, b = _train(acc, second), _train(acc2, second)
    assert a == b  # StepResult is a frozen dataclass: every field, step counter included
    assert [r.step for r in b] == [3, 4]
    assert acc.state_dict() == acc2.state_dict()
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_inside_open_window_raises(gen: torch.Generator) -> None:
    model = make_lm()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=2)
    state = acc.state_dict()
    with acc.micro_step():
        acc.backward(*lm_loss_fn(model, token_batch(gen, [3])))
    with pytest.raises(AccumulatorStateError, match="flush"):
        acc.state_dict()
    with pytest.raises(AccumulatorStateError):
        acc.load_state_dict(state)
    assert acc.flush() is not None
    assert acc.state_dict()["step"] == 1


def test_load_state_dict_missing_keys() -> None:
    model = make_lm()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="missing"):
        acc.load_state_dict({"step": 3})


def test_ignore_index_is_excluded_from_counts(gen: torch.Generator) -> None:
    mb = token_batch(gen, [2, 0, 5])
    assert int((mb["labels"] != IGNORE).sum()) == 7
    model = make_lm()
    res = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1)).step([mb], lm_loss_fn)
    assert res.num_items == 7


# --------------------------------------------------------------------------- grad_dtype lifetime


def _bf16_linear_window(gen: torch.Generator) -> tuple[nn.Module, list[torch.Tensor], Any]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2).to(torch.bfloat16)
    micro = [torch.randn(3, 4, generator=gen).to(torch.bfloat16) for _ in range(2)]

    def loss_fn(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return m(x).float().pow(2).sum(), x.shape[0]

    return model, micro, loss_fn


def test_a_second_accumulator_on_the_same_model_still_trains(gen: torch.Generator) -> None:
    model, micro, loss_fn = _bf16_linear_window(gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    Accumulator(model, opt, grad_dtype=torch.float32).step(micro, loss_fn)
    # Rebuilt, e.g. after a resume or for a different window length.
    before = params_of(model)
    res = Accumulator(model, opt).step(micro, loss_fn)
    assert res.grad_norm > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_nonfinite_window_leaves_no_residue_in_grad_dtype_buffers(gen: torch.Generator) -> None:
    model, micro, loss_fn = _bf16_linear_window(gen)
    fresh = twin(model)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), grad_dtype=torch.float32)
    bad = micro[0].clone()
    bad[0, 0] = float("nan")
    assert acc.step([micro[1], bad], loss_fn).skipped
    assert all(p.grad is None for p in model.parameters())
    res = acc.step(micro, loss_fn)
    want = Accumulator(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), grad_dtype=torch.float32).step(
        micro, loss_fn
    )
    assert res.grad_norm == want.grad_norm and res.loss == want.loss
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters(), strict=True))
