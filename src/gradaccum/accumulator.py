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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradaccum import sync
from gradaccum._grads import clip_grads_, normalise_, scale_grads_, total_norm, unscale_window_
from gradaccum._guards import (
    AccumulatorStateError,
    check_accum_steps,
    check_arguments,
    check_reduction,
    count_items,
    guard_optimizer,
    warn_batchnorm,
)
from gradaccum._window import WindowEngine, flag_last
from gradaccum.cached import EncodeFn, WindowLossFn
from gradaccum.noise import NoiseScale

# AccumulatorStateError, count_items and the gradient helpers stay importable from here:
# gradaccum/__init__.py, check.py, compare.py and users' code import them from this module.
__all__ = [
    "Accumulator", "AccumulatorStateError", "LossFn", "StepResult",
    "clip_grads_", "count_items", "scale_grads_", "total_norm",
]

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, int | torch.Tensor]"]


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
    noise_scale_low: float | None = None
    """Lower end of a 90% interval for the noise scale (items), from the window-to-window spread
    (``NoiseScale.interval``); None until about three windows were measured."""
    noise_scale_high: float | None = None
    """Upper end of that interval; inf while the measured |G|² is not clearly above 0."""


class Accumulator(WindowEngine):
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
            the window's gradient. Changes no weight; costs one fused norm per micro-batch after its backward
            (no copy, no host sync; ``p.grad`` is None between micro-batches). Not with FSDP2 (its gradients
            are held unsharded inside FSDP2 until the window's last micro-batch). Pass a
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
        check_arguments(model, optimizer, accum_steps, max_grad_norm, grad_dtype, max_skipped_windows,
                        grad_scaler)
        reduction = sync.grad_reduction(model)
        check_reduction(reduction, measure_noise, grad_dtype)
        # True: the default estimator; a NoiseScale instance: that one (e.g. another EMA decay).
        noise = measure_noise if isinstance(measure_noise, NoiseScale) else (
            NoiseScale() if measure_noise else None
        )
        super().__init__(model, optimizer, grad_dtype, grad_scaler, max_skipped_windows, noise, reduction)
        self._accum_steps = int(accum_steps)
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.grad_dtype = grad_dtype
        self.skip_nonfinite = skip_nonfinite
        self.sync_every_micro_batch = bool(sync_every_micro_batch)
        self._did_backward = False  # in the current micro_step()
        guard_optimizer(optimizer, self._refuse_if_open)
        warn_batchnorm(model)

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
        check_accum_steps(value)
        if self._window_open():
            raise AccumulatorStateError(
                f"accum_steps changed from {self._accum_steps} to {value} inside an open window: "
                "change it between windows (after a StepResult or flush())"
            )
        self._accum_steps = int(value)

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps taken so far, skipped windows not counted (``StepResult.step``):
        ``while acc.optimizer_steps < steps: ...``. Read-only; ``load_state_dict`` restores it."""
        return self.step_count

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
        last = self._window.micro + 1 >= self.accum_steps
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
        """Backpropagate one micro-batch's SUM loss; returns a StepResult when it closed a window.

        If autograd raises (e.g. a graph already freed), the micro-batch is not counted and
        ``backward`` may be called again in the same ``micro_step()``. A window's first backward
        leaves the window as it was before the call; a later one may have added part of its
        gradient before failing (autograd cannot undo that): ``discard()`` drops the window.
        """
        if self._in_step:
            raise AccumulatorStateError("backward() inside step(): step() runs backward itself")
        if not self._in_micro:
            raise AccumulatorStateError("backward() must be called inside `with acc.micro_step():`")
        if self._did_backward:
            raise AccumulatorStateError("backward() called twice in one micro_step()")
        last = self._window.micro + 1 >= self.accum_steps
        self._backward(loss_sum, num_items, synced=last or self.sync_every_micro_batch)
        self._did_backward = True
        if self._window.micro >= self.accum_steps:
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
        elif self._window.micro == 0:
            return None
        return self._finish_window()

    # ----------------------------------------------------------------- shape (b)
    def step(self, micro_batches: Iterable[Any], loss_fn: LossFn) -> StepResult:
        """Run ``loss_fn(model, mb)`` on every micro-batch of the iterable as ONE window."""
        self._open_step("step()", {"loss_fn": (loss_fn, "loss_fn(model, micro_batch)")})
        pairs = flag_last(micro_batches)
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
        if not self._window.micro:
            raise ValueError("step() got no micro-batches")
        return self._finish_window()

    def step_cached(
        self, micro_batches: Iterable[Any], encode: EncodeFn, window_loss: WindowLossFn
    ) -> StepResult:
        """One window of a loss that couples its examples (in-batch negatives), made exact by a
        representation cache (:mod:`gradaccum.cached`).

        ``encode(model, micro) -> Tensor | tuple[Tensor, ...]`` gives a micro-batch's
        representations (rows along dim 0). ``window_loss(reps) -> (loss_sum, num_items)`` runs
        once, on the window's representations concatenated in micro-batch order, then rank order.
        Each micro-batch is encoded twice: without grad, then with grad under the same torch RNG
        state (dropout replays). The step follows the full-batch gradient of loss_sum / num_items,
        with clipping, skipping, scheduler, grad_dtype, grad_scaler and one sync as in ``step()``;
        ``StepResult.noise_scale`` is None (no additive per-micro-batch gradients to measure).
        """
        self._open_step("step_cached()", {"encode": (encode, "encode(model, micro_batch) -> reps"),
                                          "window_loss": (window_loss, "window_loss(reps) -> (loss_sum, n)")})
        self._cached_window(micro_batches, encode, window_loss, self.sync_every_micro_batch)
        return self._finish_window()

    def discard(self) -> None:
        """Forget the open window (gradients and counts), e.g. to replay it after an OOM."""
        if self._in_micro or self._in_step:
            raise AccumulatorStateError("discard() inside micro_step()/step()")
        self._discard_window()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        if self._window.micro:
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
        if self._window.micro or self._in_micro or self._in_step:
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

    # ----------------------------------------------------------------- closing a window
    def _finish_window(self) -> StepResult:
        """Normalise, check, clip and apply the window: atomically.

        Whatever raises on the way (the optimizer, the scheduler, a collective), the
        window is closed and its gradients dropped, so nothing is ever applied twice.
        """
        self._applying = True
        unscaled = stepped = False
        num_items: int | float = 0
        try:
            sums = self._window.sums(self._grads.device(), self.grad_scaler)
            averaged = self._grads.reduce(self._window.synced)
            if self.grad_scaler is not None:
                unscale_window_(self.grad_scaler, self.optimizer, self._grads.params)
                unscaled = True
            grads = self._grads.tensors()
            lr = float(self.optimizer.param_groups[0]["lr"])
            # Normalise and take the norm on the device, then read loss, items and norm
            # back in one transfer: the window's only host sync.
            normalise_(grads, averaged, sums.items, sync.world_size())
            totals = sums.read(total_norm(grads))
            if totals.items < 0:
                raise ValueError(f"num_items summed to {totals.items} over the window: counts must be >= 0")
            num_items = int(totals.items) if float(totals.items).is_integer() else totals.items
            if totals.items == 0:
                return self._skip(float("nan"), num_items, float("nan"), lr, "no items")
            loss = totals.loss / totals.items
            if not math.isfinite(totals.norm) and (self.skip_nonfinite or unscaled):
                reason = "fp16 overflow (grad scaler)" if unscaled else "non-finite gradient"
                return self._skip(loss, num_items, totals.norm, lr, reason)
            noise = self._update_noise(totals)
            self._grads.apply(grads, self.max_grad_norm, totals.norm)
            self.optimizer.step()
            stepped = True
            self.step_count += 1
            self.consecutive_skipped = 0
            _step_scheduler(self.scheduler, loss)
            self.optimizer.zero_grad(set_to_none=True)
            self._close_window(num_items)
            return StepResult(loss, num_items, totals.norm, False, lr, self.step_count, *noise)
        except BaseException:
            if self._window.micro:
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

    def _skip(self, loss: float, num_items: int | float, norm: float, lr: float, reason: str) -> StepResult:
        noise = self._count_skip(reason)
        return StepResult(loss, num_items, norm, True, lr, self.step_count, *noise)

    # ----------------------------------------------------------------- guards
    def _window_open(self) -> bool:
        return bool(self._window.micro or self._in_micro or self._in_step)

    def _refuse_if_open(self, call: str) -> None:
        """The optimizer guard: the user's own step()/zero_grad() would corrupt an open window."""
        if self._window_open() and not self._applying:
            raise AccumulatorStateError(
                f"{call} called while an accumulation window is open ({self._window.micro} of "
                f"{self.accum_steps} micro-batches): the Accumulator steps and clears the optimizer "
                "itself; remove the call from your loop"
            )


def _step_scheduler(scheduler: Any, loss: float) -> None:
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(loss)  # a metric scheduler: the window's exact mean loss
    else:
        scheduler.step()
