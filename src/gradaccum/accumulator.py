"""The window state machine: micro_step, backward, step, flush.

Every micro-batch's loss is a SUM over its items, so after the window the parameter
gradients hold d(Σ loss_sum)/dθ. The window's total item count is then summed over
ranks and the gradients are divided by it exactly once. That is the full-batch mean
gradient whatever the micro-batch sizes, token counts, window length or rank count,
and nothing about the window has to be known before it starts (streaming works).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradaccum import sync

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, int | torch.Tensor]"]


class AccumulatorStateError(RuntimeError, ValueError):
    """The Accumulator was used out of order (e.g. backward outside micro_step)."""


@dataclass(frozen=True)
class StepResult:
    """What one completed window did."""

    loss: float
    """Exact mean loss over the whole effective batch (all micro-batches, all ranks)."""
    num_items: int | float
    """Items (samples or non-ignored tokens) in the window, over all ranks."""
    grad_norm: float
    """L2 norm of the normalised, accumulated gradient, before clipping."""
    skipped: bool
    """True when the window changed nothing (non-finite gradient, or zero items)."""
    lr: float
    """Learning rate of the first param group used for this step."""
    step: int
    """Optimizer steps taken so far (skipped windows not counted)."""


def _check_loss(loss_sum: Any) -> None:
    if not isinstance(loss_sum, torch.Tensor):
        raise TypeError(f"loss_sum must be a torch.Tensor, got {type(loss_sum).__name__}")
    if loss_sum.dim() != 0:
        raise ValueError(
            f"loss_sum must be a scalar (0-dim) SUM-reduced loss, got shape {tuple(loss_sum.shape)}"
        )
    if not loss_sum.requires_grad:
        raise ValueError("loss_sum does not require grad: was it computed under torch.no_grad()?")


def count_items(num_items: Any) -> int | float | torch.Tensor:
    """Validate a micro-batch's item count; returns it as a Python number or 0-dim tensor."""
    if isinstance(num_items, bool):
        raise TypeError("num_items must be a number or a tensor, not bool")
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a single number, got shape {tuple(num_items.shape)}")
        if num_items.is_complex() or num_items.dtype == torch.bool:
            raise TypeError(f"num_items has unsupported dtype {num_items.dtype}")
        t = num_items.detach().reshape(())
        # A CPU check is free; on an accelerator we check the window total instead so
        # that no micro-batch forces a host sync.
        if t.device.type == "cpu" and not (t >= 0).item():
            raise ValueError(f"num_items must be >= 0, got {t.item()}")
        return t
    if not isinstance(num_items, numbers.Real):
        raise TypeError(f"num_items must be a number or a tensor, got {type(num_items).__name__}")
    if not math.isfinite(num_items) or num_items < 0:
        raise ValueError(f"num_items must be a finite number >= 0, got {num_items}")
    return num_items


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all gradient tensors (non-finite when any element is)."""
    if not grads:
        return torch.zeros(())
    low = (torch.float16, torch.bfloat16)
    if any(hasattr(g, "full_tensor") or g.dtype in low for g in grads):
        # Half-precision grads get an fp32 norm; DTensors go one by one (see below).
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32 if g.dtype in low else None) for g in grads]
    else:
        norms = list(torch._foreach_norm(grads))  # a few kernels, not one per parameter
    if all(hasattr(n, "full_tensor") for n in norms):
        # [distributed] FSDP2 DTensor grads: each norm is a partial over the shards.
        # Stack them and gather once, instead of one collective per parameter.
        return torch.linalg.vector_norm(torch.stack(norms).to(torch.float64)).full_tensor()
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device, torch.float64) for n in norms]))


def scale_grads_(grads: list[torch.Tensor], divisor: torch.Tensor) -> None:
    """Divide every gradient by ``divisor`` in place (the one normalisation per window).

    ``divisor`` stays a device tensor, so normalising needs no host sync.
    """
    if grads:
        torch._foreach_div_(grads, divisor)


def clip_grads_(grads: list[torch.Tensor], max_norm: float, norm: float) -> None:
    """Scale gradients so their joint L2 norm is at most ``max_norm`` (torch's rule)."""
    coef = max_norm / (norm + 1e-6)
    if grads and coef < 1.0:
        torch._foreach_mul_(grads, coef)


class Accumulator:
    """Accumulate gradients over micro-batches and take one exact optimizer step per window.

    Args:
        model: the module being trained (plain, DDP-wrapped or FSDP2-sharded).
        optimizer: any ``torch.optim.Optimizer``; stepped once per window.
        accum_steps: micro-batches per optimizer step, per rank (shape (a) of use).
        scheduler: LR scheduler stepped once per optimizer step (never per micro-batch).
        max_grad_norm: clip the normalised, accumulated gradient to this L2 norm.
        grad_dtype: accumulate gradients of lower-precision parameters in buffers of
            this dtype (e.g. ``torch.float32`` for bf16 models).
        skip_nonfinite: a window with an inf/nan gradient changes nothing at all.
        sync_every_micro_batch: let a DDP/FSDP2 wrapper communicate gradients on every
            micro-batch instead of only the window's last. Still exact, but k times the
            traffic. Worth it only with FSDP2: gradients are then reduce-scattered and kept
            sharded, instead of held unsharded (a full gradient per rank) through the window.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        accum_steps: int = 1,
        scheduler: Any = None,
        max_grad_norm: float | None = None,
        grad_dtype: torch.dtype | None = None,
        skip_nonfinite: bool = True,
        sync_every_micro_batch: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(accum_steps, bool) or not isinstance(accum_steps, numbers.Integral):
            raise TypeError(f"accum_steps must be an int, got {type(accum_steps).__name__}")
        if accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
        if max_grad_norm is not None and not (max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if grad_dtype is not None and not (
            isinstance(grad_dtype, torch.dtype) and grad_dtype.is_floating_point
        ):
            raise TypeError(f"grad_dtype must be a floating torch.dtype, got {grad_dtype!r}")
        self.model = model
        self.optimizer = optimizer
        self.accum_steps = int(accum_steps)
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.grad_dtype = grad_dtype
        self.skip_nonfinite = skip_nonfinite
        self.sync_every_micro_batch = bool(sync_every_micro_batch)
        self._reduction = sync.grad_reduction(model)
        if grad_dtype is not None and self._reduction in ("ddp", "fsdp"):
            raise ValueError(
                "grad_dtype is not supported with DDP/FSDP wrappers: keep fp32 master "
                "parameters, or use FSDP2's MixedPrecisionPolicy(reduce_dtype=torch.float32)"
            )
        self._params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
        # Counters (state_dict) and the open window.
        self.step_count = 0
        self.skipped_steps = 0
        self.micro_steps = 0
        self.items_seen: int | float = 0
        self._hooks: list[Any] = []
        self._reset_window()
        self._in_micro = False
        self._in_step = False
        # fp32 (or grad_dtype) buffers: each micro-batch's low-precision gradient is
        # added here right after it is accumulated, then p.grad is dropped, so
        # low-precision sums never pile up over the window.
        # The hooks that fill them live only while a window is open (see _open_window),
        # so a model outlives its Accumulator with ordinary .grad behaviour.
        self._buffers: dict[int, torch.Tensor] = {}
        _warn_batchnorm(model)

    # ----------------------------------------------------------------- shape (a)
    @contextlib.contextmanager
    def micro_step(self) -> Iterator[None]:
        """Context for one micro-batch's forward and backward.

        Gradient sync is suppressed on every micro-batch but the window's last; the
        context must wrap the forward too, because DDP decides during forward.
        """
        if self._in_step:
            raise AccumulatorStateError("micro_step() inside step(): use one shape per window")
        if self._in_micro:
            raise AccumulatorStateError("micro_step() blocks cannot be nested")
        last = self._micro_in_window + 1 >= self.accum_steps
        self._in_micro = True
        self._did_backward = False
        try:
            with sync.no_grad_sync(self.model, skip=not (last or self.sync_every_micro_batch)):
                yield
        finally:
            self._in_micro = False

    def backward(self, loss_sum: torch.Tensor, num_items: int | torch.Tensor) -> StepResult | None:
        """Backpropagate one micro-batch's SUM loss; returns a StepResult when it closed a window."""
        if self._in_step:
            raise AccumulatorStateError("backward() inside step(): step() runs backward itself")
        if not self._in_micro:
            raise AccumulatorStateError("backward() must be called inside `with acc.micro_step():`")
        if self._did_backward:
            raise AccumulatorStateError("backward() called twice in one micro_step()")
        last = self._micro_in_window + 1 >= self.accum_steps
        self._backward(loss_sum, num_items, synced=last or self.sync_every_micro_batch)
        self._did_backward = True
        if self._micro_in_window >= self.accum_steps:
            return self._finish_window()
        return None

    def flush(self) -> StepResult | None:
        """Apply a partial last window (normalised by its real item count); None if empty.

        Under torch.distributed every rank must call it (it is collective).
        """
        if self._in_micro or self._in_step:
            raise AccumulatorStateError("flush() inside micro_step()/step()")
        if sync.is_distributed() and sync.world_size() > 1:
            n = torch.tensor([float(self._micro_in_window)], device=self._stat_device())
            if sync.all_reduce_sum(n).item() == 0:
                return None
        elif self._micro_in_window == 0:
            return None
        return self._finish_window()

    # ----------------------------------------------------------------- shape (b)
    def step(self, micro_batches: Iterable[Any], loss_fn: LossFn) -> StepResult:
        """Run ``loss_fn(model, mb)`` on every micro-batch of the iterable as ONE window."""
        if self._in_micro or self._in_step:
            raise AccumulatorStateError("step() inside micro_step()/step()")
        if self._micro_in_window:
            raise AccumulatorStateError(
                "step() while a micro_step() window is open: call flush() first"
            )
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(model, micro_batch)")
        pairs = _flag_last(micro_batches)
        self._in_step = True
        try:
            for mb, last in pairs:
                synced = last or self.sync_every_micro_batch
                with sync.no_grad_sync(self.model, skip=not synced):
                    out = loss_fn(self.model, mb)
                    if not (isinstance(out, (tuple, list)) and len(out) == 2):
                        raise TypeError("loss_fn must return (loss_sum, num_items)")
                    self._backward(out[0], out[1], synced=synced)
                del mb, out  # the optimizer step need not hold the last micro-batch alive
        except BaseException:
            self._discard_window()
            raise
        finally:
            self._in_step = False
        if not self._micro_in_window:
            raise ValueError("step() got no micro-batches")
        return self._finish_window()

    def discard(self) -> None:
        """Forget the open window (gradients and counts), e.g. to replay it after an OOM."""
        if self._in_micro or self._in_step:
            raise AccumulatorStateError("discard() inside micro_step()/step()")
        self._discard_window()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        if self._micro_in_window:
            raise AccumulatorStateError("state_dict() inside an open window: call flush() first")
        return {
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
            "micro_steps": self.micro_steps,
            "items_seen": self.items_seen,
            "accum_steps": self.accum_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._micro_in_window or self._in_micro or self._in_step:
            raise AccumulatorStateError("load_state_dict() inside an open window")
        missing = {"step", "skipped_steps", "micro_steps", "items_seen"} - set(state)
        if missing:
            raise ValueError(f"Accumulator state is missing {sorted(missing)}")
        self.step_count = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.micro_steps = int(state["micro_steps"])
        self.items_seen = state["items_seen"]

    # ----------------------------------------------------------------- internals
    def _open_window(self) -> None:
        """Before a window's first backward: drop stray gradients, attach grad_dtype hooks."""
        for p in self._params:
            p.grad = None
        if self.grad_dtype is not None:
            self._hooks = [
                p.register_post_accumulate_grad_hook(self._stash_grad)
                for p in self._params
                if p.dtype != self.grad_dtype
            ]

    def _reset_window(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._micro_in_window = 0
        self._loss_acc: torch.Tensor | None = None
        self._items_num: int | float = 0
        self._items_t: torch.Tensor | None = None
        self._synced = False

    def _stat_device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    def _backward(self, loss_sum: Any, num_items: Any, synced: bool) -> None:
        _check_loss(loss_sum)
        n = count_items(num_items)
        if self._micro_in_window == 0:
            self._open_window()
        loss_sum.backward()
        # Keep the logged loss in float64 on the device: no host sync per micro-batch.
        d = loss_sum.detach().to(torch.float64)
        self._loss_acc = d if self._loss_acc is None else self._loss_acc + d
        if isinstance(n, torch.Tensor):
            n = n.to(d.device, torch.float64)
            self._items_t = n if self._items_t is None else self._items_t + n
        else:
            self._items_num += n
        self._micro_in_window += 1
        self._synced = synced

    def _stash_grad(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        buf = self._buffers.get(id(p))
        if buf is None:
            self._buffers[id(p)] = p.grad.to(self.grad_dtype, copy=True)  # type: ignore[union-attr]
        else:
            buf.add_(p.grad)  # type: ignore[arg-type]
        p.grad = None

    def _grads(self) -> list[torch.Tensor]:
        """The window's gradient tensors: grad_dtype buffers where kept, else p.grad."""
        out = []
        for p in self._params:
            g = self._buffers.get(id(p), p.grad)
            if g is not None:
                out.append(g)
        return out

    def _all_reduce_grads(self) -> None:
        """[distributed] Sum the window's gradients over ranks ourselves (no wrapper sync ran).

        Missing gradients (a rank with no micro-batch in a partial window, an unused
        parameter) count as zero, so every rank ends with the same gradients.
        """
        buffered = {id(p) for p in self._params if self.grad_dtype is not None and p.dtype != self.grad_dtype}
        dtypes = [self.grad_dtype if id(p) in buffered else p.dtype for p in self._params]
        current = [self._buffers.get(id(p), p.grad) for p in self._params]
        summed = sync.all_reduce_optional_grads_sum(current, self._params, dtypes)  # type: ignore[arg-type]
        for p, old, new in zip(self._params, current, summed, strict=True):
            if old is None and new is not None:
                if id(p) in buffered:
                    self._buffers[id(p)] = new
                else:
                    p.grad = new

    def _window_stats(self) -> torch.Tensor:
        """[Σ loss_sum, Σ num_items] over the window and all ranks: one small all-reduce."""
        dev = self._stat_device()
        loss = torch.zeros((), dtype=torch.float64, device=dev)
        if self._loss_acc is not None:
            loss = loss + self._loss_acc.to(dev)
        items = torch.tensor(float(self._items_num), dtype=torch.float64, device=dev)
        if self._items_t is not None:
            items = items + self._items_t.to(dev)
        return sync.all_reduce_sum(torch.stack([loss, items]))

    def _finish_window(self) -> StepResult:
        stats = self._window_stats()
        factor = 1.0
        # [distributed] Which sum over ranks the gradients hold now.
        if self._reduction in ("ddp", "fsdp") and self._synced:
            factor = float(sync.world_size())  # the wrapper averaged; we want the sum
        elif self._reduction == "fsdp":
            sync.reduce_fsdp_deferred_grads(self.model)  # partial window: FSDP2 held them back
        elif self._reduction != "local":
            self._all_reduce_grads()  # partial window under DDP, or an unwrapped model
        grads = self._grads()
        lr = float(self.optimizer.param_groups[0]["lr"])
        # Normalise and take the norm on the device, then read loss, items and norm back
        # in one transfer: the window's only host sync.
        scale_grads_(grads, stats[1] / factor)
        norm_t = total_norm(grads).to(stats.device, torch.float64)
        loss_total, items_total, norm = torch.cat([stats, norm_t.reshape(1)]).tolist()
        if items_total < 0:
            self._discard_window()
            raise ValueError(f"num_items summed to {items_total} over the window: counts must be >= 0")
        num_items = int(items_total) if float(items_total).is_integer() else items_total
        if items_total == 0:
            return self._skip(float("nan"), num_items, float("nan"), lr)
        loss = loss_total / items_total
        if self.skip_nonfinite and not math.isfinite(norm):
            return self._skip(loss, num_items, norm, lr)
        if self.max_grad_norm is not None:
            clip_grads_(grads, self.max_grad_norm, norm)
        self._move_buffers_to_grads()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self._close_window(num_items)
        return StepResult(loss, num_items, norm, False, lr, self.step_count)

    def _move_buffers_to_grads(self) -> None:
        for p in self._params:
            buf = self._buffers.pop(id(p), None)
            if buf is not None:
                p.grad = buf.to(p.dtype)

    def _skip(self, loss: float, num_items: int | float, norm: float, lr: float) -> StepResult:
        self._discard_window()
        self.skipped_steps += 1
        return StepResult(loss, num_items, norm, True, lr, self.step_count)

    def _close_window(self, num_items: int | float) -> None:
        self.micro_steps += self._micro_in_window
        self.items_seen += num_items
        self._reset_window()

    def _discard_window(self) -> None:
        """Forget the open window: gradients, buffers and window counters."""
        self._buffers.clear()
        for p in self._params:
            p.grad = None
        if self._reduction == "fsdp":
            sync.drop_fsdp_deferred_grads(self.model)  # [distributed] else they leak into the next window
        self.optimizer.zero_grad(set_to_none=True)
        self._reset_window()


def _flag_last(micro_batches: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """Yield ``(micro_batch, is_last)``.

    A sequence knows its length; any other iterable is read one item ahead so that only
    the real last micro-batch syncs gradients (streaming works, one item is buffered).
    """
    if isinstance(micro_batches, Sequence):
        n = len(micro_batches)
        for i, mb in enumerate(micro_batches):
            yield mb, i == n - 1
        return
    it = iter(micro_batches)
    sentinel = object()
    nxt = next(it, sentinel)
    while nxt is not sentinel:
        mb, nxt = nxt, next(it, sentinel)
        yield mb, nxt is sentinel


def _warn_batchnorm(model: nn.Module) -> None:
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        warnings.warn(
            f"gradaccum: {len(bns)} BatchNorm layer(s) (e.g. '{bns[0]}') compute statistics "
            "per micro-batch, not over the effective batch; accumulation cannot make them "
            "match a full-batch run (consider GroupNorm/LayerNorm or SyncBatchNorm).",
            UserWarning,
            stacklevel=3,
        )
