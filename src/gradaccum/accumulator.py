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
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradaccum import sync
from gradaccum.noise import NoiseScale, SmallBatchSums

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
    noise_scale: float | None = None
    """EMA estimate of the gradient noise scale B_simple, in items (``measure_noise=True``);
    None until two windows were measured."""


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
        grad_scaler: a ``torch.amp.GradScaler`` for fp16 training: every micro-batch's
            backward is scaled, the window is unscaled once (before normalisation,
            clipping and the non-finite check), an overflow skips the window and the
            scaler backs off.
        max_skipped_windows: raise RuntimeError after this many consecutive skipped
            windows (non-finite gradient, fp16 overflow, or no items); None: never.
        measure_noise: estimate the gradient noise scale (``StepResult.noise_scale``,
            see :mod:`gradaccum.noise`) from each micro-batch's own gradient norm and
            the window's gradient. Changes no weight; costs one norm per parameter per
            micro-batch, taken in a gradient hook (no copy, no host sync). Not with FSDP2 (its gradients are
            held unsharded inside FSDP2 until the window's last micro-batch). Pass a
            ``gradaccum.noise.NoiseScale`` to choose its EMA decay.

    The parameters a window covers are re-read from the optimizer (and the model) each
    time a window opens, so a parameter outside the model (a learnable loss weight) or
    one unfrozen later and added with ``optimizer.add_param_group`` is normalised,
    clipped, checked and summed over ranks like every other.
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
        grad_scaler: Any = None,
        max_skipped_windows: int | None = None,
        measure_noise: bool | NoiseScale = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _check_accum_steps(accum_steps)
        if max_grad_norm is not None and not (max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if grad_dtype is not None and not (
            isinstance(grad_dtype, torch.dtype) and grad_dtype.is_floating_point
        ):
            raise TypeError(f"grad_dtype must be a floating torch.dtype, got {grad_dtype!r}")
        if max_skipped_windows is not None and (
            isinstance(max_skipped_windows, bool)
            or not isinstance(max_skipped_windows, numbers.Integral)
            or max_skipped_windows < 1
        ):
            raise ValueError(f"max_skipped_windows must be an int >= 1 or None, got {max_skipped_windows!r}")
        if grad_scaler is not None:
            if not all(callable(getattr(grad_scaler, m, None)) for m in ("scale", "unscale_", "update")):
                raise TypeError("grad_scaler must be a torch.amp.GradScaler (scale, unscale_, update)")
            if grad_dtype is not None:
                raise ValueError(
                    "grad_scaler with grad_dtype is not supported: fp16 training with a GradScaler "
                    "keeps fp32 weights (autocast), whose gradients are fp32 already"
                )
        self.model = model
        self.optimizer = optimizer
        self._accum_steps = int(accum_steps)
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.grad_dtype = grad_dtype
        self.skip_nonfinite = skip_nonfinite
        self.sync_every_micro_batch = bool(sync_every_micro_batch)
        self.grad_scaler = grad_scaler
        self.max_skipped_windows = max_skipped_windows
        self._reduction = sync.grad_reduction(model)
        if measure_noise and self._reduction == "fsdp":
            raise ValueError("measure_noise is not supported with FSDP2: pass measure_noise=False")
        # True: the default estimator; a NoiseScale instance: that one (e.g. another EMA decay).
        self._noise = measure_noise if isinstance(measure_noise, NoiseScale) else (
            NoiseScale() if measure_noise else None
        )
        if grad_dtype is not None and self._reduction in ("ddp", "fsdp"):
            raise ValueError(
                "grad_dtype is not supported with DDP/FSDP wrappers: keep fp32 master "
                "parameters, or use FSDP2's MixedPrecisionPolicy(reduce_dtype=torch.float32)"
            )
        # [distributed] Parameters whose gradients the wrapper (DDP/FSDP2) reduces; every
        # other trainable parameter the window covers is summed over ranks by gradaccum.
        self._wrapper_params = _wrapper_reduced(model, self._reduction)
        self._params: list[torch.Tensor] = []
        self._extra: list[torch.Tensor] = []  # trainable, not reduced by the wrapper
        self._refresh_params()
        # Counters (state_dict) and the open window.
        self.step_count = 0
        self.skipped_steps = 0
        self.consecutive_skipped = 0
        self._skip_reasons: dict[str, int] = {}
        self.micro_steps = 0
        self.items_seen: int | float = 0
        self._hooks: list[Any] = []
        self._reset_window()
        self._in_micro = False
        self._in_step = False
        self._applying = False  # inside our own optimizer.step()/zero_grad()
        # fp32 (or grad_dtype) buffers: each micro-batch's low-precision gradient is
        # added here right after it is accumulated, then p.grad is dropped, so
        # low-precision sums never pile up over the window.
        # The hooks that fill them live only while a window is open (see _open_window),
        # so a model outlives its Accumulator with ordinary .grad behaviour.
        self._buffers: dict[int, torch.Tensor] = {}
        _guard_optimizer(self)
        _warn_batchnorm(model)

    @property
    def noise(self) -> NoiseScale | None:
        """The noise-scale estimator (``measure_noise``): its EMAs of tr(Σ) and |G|², windows measured."""
        return self._noise

    @property
    def accum_steps(self) -> int:
        """Micro-batches per window (shape (a)); may change between windows, never inside one."""
        return self._accum_steps

    @accum_steps.setter
    def accum_steps(self, value: int) -> None:
        _check_accum_steps(value)
        if self._window_open():
            raise AccumulatorStateError(
                f"accum_steps changed from {self._accum_steps} to {value} inside an open window: "
                "change it between windows (after a StepResult or flush())"
            )
        self._accum_steps = int(value)

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
        if last and self._checks_boundaries():
            self._agree_on_boundary(closing_complete=True)
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
        if self._checks_boundaries():
            if self._agree_on_boundary(closing_complete=False) == 0:
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
        if self._checks_boundaries():
            self._agree_on_boundary(closing_complete=True)
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
            "consecutive_skipped": self.consecutive_skipped,
            "micro_steps": self.micro_steps,
            "items_seen": self.items_seen,
            "accum_steps": self.accum_steps,
            **({"noise": self._noise.state_dict()} if self._noise is not None else {}),
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
        self.consecutive_skipped = int(state.get("consecutive_skipped", 0))  # absent before 0.2
        if self._noise is not None and "noise" in state:
            self._noise.load_state_dict(state["noise"])

    # ----------------------------------------------------------------- internals
    def _refresh_params(self) -> None:
        """Re-read which parameters a window covers: the optimizer's and the model's trainable ones.

        Done when a window opens (a loop over the parameters we make then anyway), so a
        parameter added with ``optimizer.add_param_group`` or unfrozen since the last
        window is covered, and one frozen since is left alone.
        """
        params = dict.fromkeys(self.model.parameters())
        params.update(dict.fromkeys(p for g in self.optimizer.param_groups for p in g["params"]))
        self._params = [p for p in params if p.requires_grad]
        self._extra = [p for p in self._params if p not in self._wrapper_params]

    def _open_window(self) -> None:
        """Before a window's first backward: drop stray gradients, attach the window's hooks."""
        self._refresh_params()
        for p in self._params:
            p.grad = None
        if self.grad_dtype is not None:
            self._hooks = [
                p.register_post_accumulate_grad_hook(self._stash_grad)
                for p in self._params
                if p.dtype != self.grad_dtype
            ]
        if self._noise is not None:
            self._hooks += [p.register_hook(self._norm_hook) for p in self._params]

    def _reset_window(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._micro_in_window = 0
        self._loss_acc: torch.Tensor | None = None
        self._items_num: int | float = 0
        self._items_t: torch.Tensor | None = None
        self._synced = False
        # measure_noise: per micro-batch of this rank, the squared norm of its own SUM
        # gradient (device scalar) and its item count (a number or a device tensor).
        self._micro_sq: list[torch.Tensor] = []
        self._micro_norms: list[torch.Tensor] = []  # filled by the gradient hooks during backward
        self._micro_items: list[int | float | torch.Tensor] = []

    def _stat_device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    def _backward(self, loss_sum: Any, num_items: Any, synced: bool) -> None:
        _check_loss(loss_sum)
        n = count_items(num_items)
        if self._micro_in_window == 0:
            self._open_window()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss_sum).backward()  # fp16: scaled, unscaled once per window
        else:
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
        if self._noise is not None:
            self._record_micro_norm(n)

    def _record_micro_norm(self, num_items: int | float | torch.Tensor) -> None:
        """measure_noise: this micro-batch's own squared gradient norm, from the hooks' norms."""
        norms, self._micro_norms = self._micro_norms, []
        if norms:
            if len({(x.device, x.dtype) for x in norms}) > 1:  # parameters on several devices or dtypes
                norms = [x.to(norms[0].device, torch.float64) for x in norms]
            self._micro_sq.append(torch.stack(norms).to(torch.float64).square().sum())
            self._micro_items.append(num_items)

    def _norm_hook(self, grad: torch.Tensor) -> None:
        """measure_noise: the incoming gradient of one parameter, before it is accumulated.

        Autograd hands a leaf's hook the total gradient of this backward (shared weights
        summed), so each micro-batch's norm is exact and no gradient is copied.
        """
        # fp32 at least (a cast to fp64 would copy the gradient; fp32's reduction is accurate
        # enough for a statistic that is averaged over windows anyway).
        low = grad.dtype in (torch.float16, torch.bfloat16)
        self._micro_norms.append(torch.linalg.vector_norm(grad, dtype=torch.float32 if low else None))

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

    def _all_reduce_grads(self, params: list[torch.Tensor]) -> None:
        """[distributed] Sum these parameters' window gradients over ranks ourselves.

        Used where no wrapper sync ran (a partial window, an unwrapped model) and for
        parameters no wrapper reduces (outside the model, or unfrozen after DDP was
        built). Missing gradients (a rank with no micro-batch in a partial window, an
        unused parameter) count as zero, so every rank ends with the same gradients.
        """
        buffered = {id(p) for p in params if self.grad_dtype is not None and p.dtype != self.grad_dtype}
        dtypes = [self.grad_dtype if id(p) in buffered else p.dtype for p in params]
        current = [self._buffers.get(id(p), p.grad) for p in params]
        summed = sync.all_reduce_optional_grads_sum(current, params, dtypes)  # type: ignore[arg-type]
        for p, old, new in zip(params, current, summed, strict=True):
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
        parts = [loss, items]
        if self._noise is not None:
            parts += self._micro_sums(dev)
        return sync.all_reduce_sum(torch.stack(parts))

    def _micro_sums(self, dev: torch.device) -> list[torch.Tensor]:
        """measure_noise: this rank's (Σ_j |S_j|²/b_j, n, Σ_j b_j) over its micro-batches,
        on the device (summed over ranks with the window's loss and items)."""
        if not self._micro_sq:
            return [torch.zeros((), dtype=torch.float64, device=dev)] * 3
        sq = torch.stack([x.to(dev) for x in self._micro_sq])
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            sq = sq / float(self.grad_scaler.get_scale()) ** 2  # fp16: the hooks saw scaled gradients
        items = torch.stack([
            n.to(dev, torch.float64) if isinstance(n, torch.Tensor)
            else torch.tensor(float(n), dtype=torch.float64, device=dev)
            for n in self._micro_items
        ])
        seen = items > 0  # a micro-batch with no items has no mean gradient
        weighted = torch.where(seen, sq / items.clamp_min(1e-300), 0.0).sum()
        return [weighted, seen.sum().to(torch.float64), torch.where(seen, items, 0.0).sum()]

    def _reduce_over_ranks(self) -> list[torch.Tensor]:
        """[distributed] Make every rank hold the window's gradient summed over ranks.

        Returns the gradients that hold the wrapper's *average* over ranks (DDP/FSDP2
        after their synced backward): those are divided by items / world_size, the
        others by items, so all end as the same full-window mean.
        """
        averaged: list[torch.Tensor] = []
        if self._reduction in ("ddp", "fsdp") and self._synced:
            averaged = [g for p in self._params if p in self._wrapper_params
                        for g in (self._buffers.get(id(p), p.grad),) if g is not None]
            if self._extra:
                self._all_reduce_grads(self._extra)
        elif self._reduction == "fsdp":
            sync.reduce_fsdp_deferred_grads(self.model)  # partial window: FSDP2 held them back
            if self._extra:
                self._all_reduce_grads(self._extra)
        elif self._reduction != "local":
            self._all_reduce_grads(self._params)  # partial window under DDP, or an unwrapped model
        return averaged

    def _finish_window(self) -> StepResult:
        """Normalise, check, clip and apply the window: atomically.

        Whatever raises on the way (the optimizer, the scheduler, a collective), the
        window is closed and its gradients dropped, so nothing is ever applied twice.
        """
        self._applying = True
        unscaled = stepped = False
        num_items: int | float = 0
        try:
            stats = self._window_stats()
            averaged = self._reduce_over_ranks()
            if self.grad_scaler is not None:
                self._unscale()
                unscaled = True
            grads = self._grads()
            lr = float(self.optimizer.param_groups[0]["lr"])
            # Normalise and take the norm on the device, then read loss, items and norm
            # back in one transfer: the window's only host sync.
            if averaged:
                kept = {id(g) for g in averaged}
                scale_grads_(averaged, stats[1] / sync.world_size())
                scale_grads_([g for g in grads if id(g) not in kept], stats[1])
            else:
                scale_grads_(grads, stats[1])
            norm_t = total_norm(grads).to(stats.device, torch.float64)
            loss_total, items_total, *noise_sums, norm = torch.cat([stats, norm_t.reshape(1)]).tolist()
            if items_total < 0:
                raise ValueError(f"num_items summed to {items_total} over the window: counts must be >= 0")
            num_items = int(items_total) if float(items_total).is_integer() else items_total
            if items_total == 0:
                return self._skip(float("nan"), num_items, float("nan"), lr, "no items")
            loss = loss_total / items_total
            if not math.isfinite(norm) and (self.skip_nonfinite or unscaled):
                reason = "fp16 overflow (grad scaler)" if unscaled else "non-finite gradient"
                return self._skip(loss, num_items, norm, lr, reason)
            noise = self._update_noise(noise_sums, norm, items_total)
            if self.max_grad_norm is not None:
                clip_grads_(grads, self.max_grad_norm, norm)
            self._move_buffers_to_grads()
            self.optimizer.step()
            stepped = True
            self.step_count += 1
            self.consecutive_skipped = 0
            self._step_scheduler(loss)
            self.optimizer.zero_grad(set_to_none=True)
            self._close_window(num_items)
            return StepResult(loss, num_items, norm, False, lr, self.step_count, noise)
        except BaseException:
            if self._micro_in_window:
                if stepped:  # the weights moved: the step counts, its gradients go
                    self.optimizer.zero_grad(set_to_none=True)
                    self._close_window(num_items)
                else:
                    self._discard_window()
            raise
        finally:
            if unscaled:
                self.grad_scaler.update()  # backs off after an overflow that unscale_ found
            self._applying = False

    def _update_noise(self, sums: list[float], norm: float, items: float) -> float | None:
        """measure_noise: feed the window to the estimator (the same numbers on every rank)."""
        if self._noise is None:
            return None
        # The normalised window gradient is S / B, so |S|² = (norm · B)².
        return self._noise.update(SmallBatchSums(*sums), (norm * items) ** 2, items)

    def _unscale(self) -> None:
        """fp16: divide the window's summed gradients by the loss scale, once per window.

        ``unscale_`` covers the optimizer's parameters and records overflow for the
        scaler's ``update()``; trainable model parameters outside the optimizer (rare)
        are divided here too, so the norm is over true gradients.
        """
        self.grad_scaler.unscale_(self.optimizer)
        stepped = {p for g in self.optimizer.param_groups for p in g["params"]}
        others = [p.grad for p in self._params if p not in stepped and p.grad is not None]
        if others:
            torch._foreach_div_(others, float(self.grad_scaler.get_scale()))

    def _step_scheduler(self, loss: float) -> None:
        if self.scheduler is None:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(loss)  # a metric scheduler: the window's exact mean loss
        else:
            self.scheduler.step()

    def _move_buffers_to_grads(self) -> None:
        for p in self._params:
            buf = self._buffers.pop(id(p), None)
            if buf is not None:
                p.grad = buf.to(p.dtype)

    def _skip(self, loss: float, num_items: int | float, norm: float, lr: float, reason: str) -> StepResult:
        self._discard_window()
        self.skipped_steps += 1
        self.consecutive_skipped += 1
        self._skip_reasons[reason] = self._skip_reasons.get(reason, 0) + 1
        limit = self.max_skipped_windows
        if limit is not None and self.consecutive_skipped >= limit:
            why = ", ".join(f"{n} x {r}" for r, n in self._skip_reasons.items())
            raise RuntimeError(
                f"gradaccum: {self.consecutive_skipped} consecutive windows skipped (max_skipped_windows="
                f"{limit}; skips so far: {why}): training is not progressing; check the data, the loss "
                "and the learning rate"
            )
        noise = self._noise.noise_scale if self._noise is not None else None
        return StepResult(loss, num_items, norm, True, lr, self.step_count, noise)

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
        applying, self._applying = self._applying, True
        try:
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            self._applying = applying
        self._reset_window()

    # ----------------------------------------------------------------- guards
    def _window_open(self) -> bool:
        return bool(self._micro_in_window or self._in_micro or self._in_step)

    def _refuse_if_open(self, call: str) -> None:
        """The optimizer guard: the user's own step()/zero_grad() would corrupt an open window."""
        if self._window_open() and not self._applying:
            raise AccumulatorStateError(
                f"{call} called while an accumulation window is open ({self._micro_in_window} of "
                f"{self.accum_steps} micro-batches): the Accumulator steps and clears the optimizer "
                "itself; remove the call from your loop"
            )

    def _checks_boundaries(self) -> bool:
        """[distributed] Whether window boundaries are agreed between ranks (see below)."""
        return self._reduction != "local" and sync.world_size() > 1

    def _agree_on_boundary(self, closing_complete: bool) -> int:
        """[distributed] Every rank says how it closes this window: one 3-number all-reduce.

        A window closes either with a synchronising backward (its last micro-batch in
        ``micro_step()``, or ``step()``) or with ``flush()``. Their collectives differ,
        so if one rank does the first while another does the second, the backends fail
        with a collective mismatch (gloo aborts the process). Asked first, every rank
        learns of it and raises the same one-line error instead. Returns the number of
        micro-batches open over all ranks (what ``flush()`` needs anyway).
        """
        t = torch.tensor(
            [float(closing_complete), float(not closing_complete), float(self._micro_in_window)],
            dtype=torch.float64, device=self._stat_device(),
        )
        complete, flushing, open_micro = sync.all_reduce_sum(t).tolist()
        if complete and flushing:
            self._discard_window()
            raise AccumulatorStateError(
                f"ranks disagree on the window boundary: {int(complete)} rank(s) closed a window with a "
                f"synchronising micro-batch while {int(flushing)} called flush() on a partial one; give "
                "every rank the same number of micro-batches per window (shape (a)), or use step()"
            )
        return int(open_micro)


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


def _check_accum_steps(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"accum_steps must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"accum_steps must be >= 1, got {value}")


def _wrapper_reduced(model: nn.Module, reduction: str) -> set[torch.Tensor]:
    """[distributed] The parameters whose gradients the DDP/FSDP2 wrapper all-reduces."""
    if reduction == "ddp":
        # DDP reduces what required grad when it was built, less what it was told to
        # ignore; we read that now, so build the Accumulator right after DDP. A parameter
        # unfrozen later is reduced by gradaccum instead.
        managed = getattr(model, "_module_parameters", None) or list(model.parameters())
        delayed = getattr(model, "_delay_all_reduce_params", None) or []
        return {p for p in managed if p.requires_grad} | set(delayed)
    if reduction == "fsdp":
        return set(model.parameters())
    return set()


def _guard_optimizer(acc: Accumulator) -> None:
    """Make the user's own ``optimizer.step()`` / ``zero_grad()`` refuse to run mid-window.

    A leftover ``zero_grad()`` silently drops part of a window, a leftover ``step()``
    applies an unnormalised one (both measured: accuracy 0.899 -> 0.808, and divergence).
    ``step`` has a public pre-hook; ``zero_grad`` has none, so the instance's method is
    wrapped (optimizers pickle without instance attributes, so saving is unaffected).
    Both checks are a few attribute reads, once per optimizer call.
    """
    ref = weakref.ref(acc)

    def check(call: str) -> None:
        owner = ref()
        if owner is not None:
            owner._refuse_if_open(call)

    acc.optimizer.register_step_pre_hook(lambda opt, args, kwargs: check("optimizer.step()"))
    inner = acc.optimizer.zero_grad

    def zero_grad(*args: Any, **kwargs: Any) -> None:
        check("optimizer.zero_grad()")
        inner(*args, **kwargs)

    acc.optimizer.zero_grad = zero_grad  # type: ignore[method-assign]


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
