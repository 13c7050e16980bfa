"""Engine additions: every parameter the optimizer updates, atomic windows, changing
window lengths, fp16 grad scaling, skip limits, metric schedulers and the optimizer guard.

References are plain loops written here: the window's micro-batches concatenated, a
MEAN loss, one backward, one optimizer step (float64, so only summation order differs).
SGD without momentum is used where a wrongly scaled gradient must show: Adam is nearly
invariant to a constant factor on the gradient and would hide it.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import IGNORE, Batch, cat_batches, lm_loss_fn, make_lm, params_of, random_micro_batches
from torch import nn

from gradaccum import Accumulator, AccumulatorStateError

TIGHT = {"rtol": 1e-12, "atol": 1e-14}


class TemperedLM(nn.Module):
    """A tiny LM whose logits are divided by a temperature that the *model* does not own."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = make_lm()
        # Outside the model (a learnable loss weight): only the optimizer knows it.
        self.temperature = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))

    def sum_loss(self, model: nn.Module, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(mb["ids"]) / self.temperature
        flat = logits.reshape(-1, logits.shape[-1])
        loss = F.cross_entropy(flat, mb["labels"].reshape(-1), ignore_index=IGNORE, reduction="sum")
        return loss, (mb["labels"] != IGNORE).sum()

    def mean_loss(self, model: nn.Module, mb: Batch) -> torch.Tensor:
        loss, n = self.sum_loss(model, mb)
        return loss / n


def _plain_step(opt: torch.optim.Optimizer, loss: torch.Tensor, sched: Any = None) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()


def _shape_a(acc: Accumulator, micro: list[Batch], loss_fn: Any = lm_loss_fn) -> list[Any]:
    out = []
    for mb in micro:
        with acc.micro_step():
            res = acc.backward(*loss_fn(acc.model, mb))
        if res is not None:
            out.append(res)
    return out


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor], **tol: float) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **(tol or TIGHT))


# --------------------------------------------------------------------------- every parameter


def test_parameter_outside_the_model_gets_the_window_mean(gen: torch.Generator) -> None:
    """Defect 1: a learnable loss weight got the raw window SUM (9x too large with 9 items)."""
    micro = random_micro_batches(gen, [2, 3, 1, 2, 2, 3])
    mine, ref = TemperedLM(), TemperedLM()
    opt = torch.optim.SGD([*mine.lm.parameters(), mine.temperature], lr=0.2)
    ref_opt = torch.optim.SGD([*ref.lm.parameters(), ref.temperature], lr=0.2)
    acc = Accumulator(mine.lm, opt, accum_steps=3)
    results = _shape_a(acc, micro, mine.sum_loss)
    for w in range(2):
        _plain_step(ref_opt, ref.mean_loss(ref.lm, cat_batches(micro[3 * w : 3 * w + 3])))
    assert len(results) == 2
    assert mine.temperature.item() != pytest.approx(1.3)  # it did train
    _assert_same([mine.temperature, *mine.lm.parameters()], [ref.temperature, *ref.lm.parameters()])


def test_parameter_unfrozen_later_is_normalised(gen: torch.Generator) -> None:
    """Defect 2: frozen at construction, unfrozen + add_param_group later: was never normalised."""
    micro = random_micro_batches(gen, [3, 1, 2, 2, 4, 1])
    model, ref = make_lm(), make_lm()

    def setup(m: nn.Module) -> torch.optim.Optimizer:
        m.out.requires_grad_(False)
        return torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.3)

    opt, ref_opt = setup(model), setup(ref)
    acc = Accumulator(model, opt, accum_steps=3)
    for w in range(2):
        window = micro[3 * w : 3 * w + 3]
        if w == 1:  # the usual fine-tuning pattern, between windows
            for m, o in ((model, opt), (ref, ref_opt)):
                m.out.requires_grad_(True)
                o.add_param_group({"params": list(m.out.parameters())})
        assert len(_shape_a(acc, window)) == 1
        loss, n = lm_loss_fn(ref, cat_batches(window))
        _plain_step(ref_opt, loss / n)
    assert not torch.equal(model.out.weight, make_lm().out.weight)  # it trained after unfreezing
    _assert_same(params_of(model), params_of(ref))


def test_parameter_frozen_later_is_left_alone(gen: torch.Generator) -> None:
    micro = random_micro_batches(gen, [2, 2, 3, 1])
    model = make_lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    acc = Accumulator(model, opt, accum_steps=2)
    _shape_a(acc, micro[:2])
    model.hidden.requires_grad_(False)
    frozen = params_of(model.hidden)
    _shape_a(acc, micro[2:])
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.hidden.parameters(), strict=True))


# --------------------------------------------------------------------------- atomic windows


class _FailingScheduler(torch.optim.lr_scheduler.LambdaLR):
    def __init__(self, opt: torch.optim.Optimizer, fail_at: int) -> None:
        self.fail_at = fail_at
        super().__init__(opt, lambda e: 1.0)

    def step(self, epoch: Any = None) -> None:
        if self.last_epoch + 1 == self.fail_at:
            self.fail_at = -1
            raise RuntimeError("scheduler broke")
        super().step()


def test_scheduler_raising_applies_the_window_exactly_once(gen: torch.Generator) -> None:
    """Defect 3: a later flush() divided the normalised gradient again and applied it twice."""
    micro = random_micro_batches(gen, [2, 3, 1, 2])
    model, ref = make_lm(), make_lm()
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.3) for m in (model, ref))
    acc = Accumulator(model, opt, accum_steps=2, scheduler=_FailingScheduler(opt, fail_at=1))
    with pytest.raises(RuntimeError, match="scheduler broke"):
        _shape_a(acc, micro[:2])
    assert acc.flush() is None  # the window is closed
    assert all(p.grad is None for p in model.parameters())
    assert acc.step_count == 1  # the optimizer did step once: that step counts
    loss, n = lm_loss_fn(ref, cat_batches(micro[:2]))
    _plain_step(ref_opt, loss / n)
    _assert_same(params_of(model), params_of(ref))
    # Training goes on normally.
    assert _shape_a(acc, micro[2:])[0].step == 2


class _FlakySGD(torch.optim.SGD):
    fail = True

    def step(self, closure: Any = None) -> Any:
        if self.fail:
            self.fail = False
            raise RuntimeError("optimizer broke")
        return super().step(closure)


@pytest.mark.parametrize("shape", ["micro_step", "step"])
def test_optimizer_raising_drops_the_window(gen: torch.Generator, shape: str) -> None:
    micro = random_micro_batches(gen, [2, 3, 1, 2])
    model, ref = make_lm(), make_lm()
    opt = _FlakySGD(model.parameters(), lr=0.3)
    acc = Accumulator(model, opt, accum_steps=2)
    before = params_of(model)
    with pytest.raises(RuntimeError, match="optimizer broke"):
        _shape_a(acc, micro[:2]) if shape == "micro_step" else acc.step(micro[:2], lm_loss_fn)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert acc.flush() is None and acc.step_count == 0
    assert all(p.grad is None for p in model.parameters())
    res = acc.step(micro[2:], lm_loss_fn)  # the next window is exact, with nothing left over
    loss, n = lm_loss_fn(ref, cat_batches(micro[2:]))
    _plain_step(torch.optim.SGD(ref.parameters(), lr=0.3), loss / n)
    assert res.step == 1
    _assert_same(params_of(model), params_of(ref))


# --------------------------------------------------------------------------- accum_steps


def test_accum_steps_may_change_between_windows(gen: torch.Generator) -> None:
    lengths = [2, 4, 1, 3]
    micro = random_micro_batches(gen, [2, 1, 3, 2, 1, 2, 3, 1, 2, 2])
    model, ref = make_lm(), make_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05)
    acc = Accumulator(model, opt, accum_steps=lengths[0])
    start = 0
    for k in lengths:
        acc.accum_steps = k
        results = _shape_a(acc, micro[start : start + k])
        assert len(results) == 1
        loss, n = lm_loss_fn(ref, cat_batches(micro[start : start + k]))
        assert results[0].loss == pytest.approx(float(loss.detach() / n), rel=1e-12)
        _plain_step(ref_opt, loss / n)
        start += k
    _assert_same(params_of(model), params_of(ref))
    assert acc.state_dict()["accum_steps"] == 3


def test_accum_steps_cannot_change_inside_a_window(gen: torch.Generator) -> None:
    model = make_lm()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=3)
    with acc.micro_step():
        with pytest.raises(AccumulatorStateError):
            acc.accum_steps = 2
        acc.backward(*lm_loss_fn(model, random_micro_batches(gen, [2])[0]))
    with pytest.raises(AccumulatorStateError, match="inside an open window"):
        acc.accum_steps = 5
    assert acc.accum_steps == 3
    for bad, exc in ((0, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(exc):
            acc.accum_steps = bad
    assert acc.flush() is not None
    acc.accum_steps = 5
    assert acc.accum_steps == 5


# --------------------------------------------------------------------------- fp16 grad scaler


def _fp32_pair() -> tuple[nn.Module, nn.Module]:
    model = make_lm(torch.float32)
    return model, copy.deepcopy(model)


def test_grad_scaler_gives_the_unscaled_update(gen: torch.Generator) -> None:
    micro = random_micro_batches(gen, [2, 3, 1, 2, 2, 1])
    model, plain = _fp32_pair()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    scaled = Accumulator(model, torch.optim.AdamW(model.parameters(), lr=0.05), accum_steps=3,
                         grad_scaler=scaler, max_grad_norm=0.5)
    unscaled = Accumulator(plain, torch.optim.AdamW(plain.parameters(), lr=0.05), accum_steps=3,
                           max_grad_norm=0.5)
    got, want = _shape_a(scaled, micro), _shape_a(unscaled, micro)
    for a, b in zip(got, want, strict=True):
        assert not a.skipped
        assert a.loss == pytest.approx(b.loss, rel=1e-6)  # the logged loss is unscaled
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)  # the norm too
    assert scaler.get_scale() == 2.0**14  # grew after each good window
    _assert_same(params_of(model), params_of(plain), rtol=1e-5, atol=1e-6)


def test_grad_scaler_overflow_skips_the_window_and_backs_off(gen: torch.Generator) -> None:
    micro = random_micro_batches(gen, [2, 3, 1, 2])
    model, plain = _fp32_pair()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    acc = Accumulator(model, opt, accum_steps=2, grad_scaler=scaler, skip_nonfinite=False)
    before, opt_state = params_of(model), copy.deepcopy(opt.state_dict())

    def overflowing(m: nn.Module, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        loss, n = lm_loss_fn(m, mb)
        return loss * 1e36, n  # finite in fp32, inf once scaled by 2**10

    with acc.micro_step():
        acc.backward(*lm_loss_fn(model, micro[0]))
    with acc.micro_step():
        res = acc.backward(*overflowing(model, micro[1]))
    assert res is not None and res.skipped and res.step == 0  # skipped even with skip_nonfinite=False
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.state_dict()["state"] == opt_state["state"] == {}
    assert scaler.get_scale() == 2.0**9  # backed off
    res = acc.step(micro[2:], lm_loss_fn)  # the scaler is ready for the next window
    want = Accumulator(plain, torch.optim.AdamW(plain.parameters(), lr=0.05)).step(micro[2:], lm_loss_fn)
    assert not res.skipped and res.step == 1
    _assert_same(params_of(model), params_of(plain), rtol=1e-5, atol=1e-6)
    assert res.loss == pytest.approx(want.loss, rel=1e-6)


def test_grad_scaler_arguments() -> None:
    model = make_lm(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="GradScaler"):
        Accumulator(model, opt, grad_scaler=object())
    with pytest.raises(ValueError, match="grad_dtype"):
        Accumulator(model, opt, grad_scaler=torch.amp.GradScaler("cpu"), grad_dtype=torch.float32)


# --------------------------------------------------------------------------- skip limit


def _nan_loss(model: nn.Module, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    loss, n = lm_loss_fn(model, mb)
    return loss * float("nan"), n


def test_max_skipped_windows_stops_an_endless_run_of_skips(gen: torch.Generator) -> None:
    micro = random_micro_batches(gen, [2, 2])
    empty = {"ids": micro[0]["ids"], "labels": torch.full_like(micro[0]["labels"], IGNORE)}
    model = make_lm()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), max_skipped_windows=3)
    assert acc.step(micro, _nan_loss).skipped
    assert acc.step([empty], lm_loss_fn).skipped
    assert not acc.step(micro, lm_loss_fn).skipped  # a good window resets the count
    assert acc.step(micro, _nan_loss).skipped
    assert acc.step([empty], lm_loss_fn).skipped
    with pytest.raises(RuntimeError, match=r"3 consecutive windows skipped.*non-finite gradient.*no items"):
        acc.step(micro, _nan_loss)
    assert acc.flush() is None and all(p.grad is None for p in model.parameters())
    assert acc.state_dict()["consecutive_skipped"] == 3


def test_max_skipped_windows_argument() -> None:
    model = make_lm()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_skipped_windows"):
            Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), max_skipped_windows=bad)


# --------------------------------------------------------------------------- metric schedulers


def test_reduce_lr_on_plateau_gets_the_exact_window_loss(gen: torch.Generator) -> None:
    seen: list[float] = []

    class Spy(torch.optim.lr_scheduler.ReduceLROnPlateau):
        def step(self, metrics: Any, epoch: Any = None) -> None:  # type: ignore[override]
            seen.append(metrics)
            super().step(metrics)

    model = make_lm()
    opt = torch.optim.SGD(model.parameters(), lr=2.0)  # large: the loss goes up, the lr must drop
    sched = Spy(opt, factor=0.5, patience=0)
    acc = Accumulator(model, opt, accum_steps=2, scheduler=sched)
    micro = random_micro_batches(gen, [3, 2] * 6)
    results = _shape_a(acc, micro)
    assert seen == [r.loss for r in results]  # exactly the windows' mean losses
    assert sched.best == min(r.loss for r in results)
    assert opt.param_groups[0]["lr"] < 2.0


# --------------------------------------------------------------------------- optimizer guard


@pytest.mark.parametrize("call", ["step", "zero_grad", "zero_grad_inside"])
def test_users_own_optimizer_calls_inside_a_window_raise(gen: torch.Generator, call: str) -> None:
    """Leftovers from the plain loop; measured: zero_grad 0.899 -> 0.808 accuracy, step diverges."""
    micro = random_micro_batches(gen, [2, 3, 1])
    model, ref = make_lm(), make_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    acc = Accumulator(model, opt, accum_steps=3)
    with acc.micro_step():
        acc.backward(*lm_loss_fn(model, micro[0]))
    snap = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    with pytest.raises(AccumulatorStateError, match=r"optimizer\.(step|zero_grad)\(\) called while"):
        if call == "step":
            opt.step()
        elif call == "zero_grad":
            opt.zero_grad()
        else:
            with acc.micro_step():
                opt.zero_grad(set_to_none=False)
    for p, (w, g) in zip(model.parameters(), snap, strict=True):
        assert torch.equal(p, w) and torch.equal(p.grad, g)  # bitwise untouched
    assert opt.state_dict()["state"] == {}
    # The window is intact: finishing it gives the plain full-batch step.
    res = _shape_a(acc, micro[1:])
    assert res and res[0].step == 1
    loss, n = lm_loss_fn(ref, cat_batches(micro))
    _plain_step(torch.optim.AdamW(ref.parameters(), lr=0.05), loss / n)
    _assert_same(params_of(model), params_of(ref))


def test_optimizer_calls_between_windows_still_work(gen: torch.Generator) -> None:
    model = make_lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, opt, accum_steps=2)
    _shape_a(acc, random_micro_batches(gen, [2, 2]))
    opt.zero_grad()  # harmless outside a window
    opt.step()  # no gradients: a no-op, as in torch
    # The guard does not travel with copies or state dicts.
    clone = copy.deepcopy(opt)
    assert "zero_grad" not in vars(clone)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    with acc.micro_step():
        acc.backward(*lm_loss_fn(model, random_micro_batches(gen, [2])[0]))
    clone.zero_grad()  # a copy is not guarded by this Accumulator
