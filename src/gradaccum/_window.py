"""The Accumulator's open window: one object, from its first backward to its close.

:class:`Window` holds what a window accumulates on this rank (micro-batch count, SUM
loss, item counts, the noise probe's per-micro-batch norms) and the gradient hooks that
live only while it is open; closing a window replaces it with a fresh one.
:class:`WindowSums` is its totals over all ranks, made by one small all-reduce.
:class:`WindowEngine` is the Accumulator's lifecycle of windows, under its public API.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from gradaccum import sync
from gradaccum._grads import WindowGrads
from gradaccum._guards import AccumulatorStateError, check_loss, check_skip_limit, count_items
from gradaccum._probe import NormProbe
from gradaccum.cached import CachedWindow, EncodeFn, WindowLossFn
from gradaccum.noise import NoiseScale, SmallBatchSums


@dataclass
class Window:
    """The open window on this rank."""

    micro: int = 0
    """Micro-batches backpropagated in it."""
    loss: torch.Tensor | None = None
    """Σ loss_sum, float64 on the device: no host sync per micro-batch."""
    items_num: int | float = 0
    """Σ num_items given as Python numbers."""
    items_t: torch.Tensor | None = None
    """Σ num_items given as tensors (float64, on the device)."""
    synced: bool = False
    """Its last backward ran the wrapper's gradient sync."""
    probe: NormProbe | None = None
    """measure_noise: each micro-batch's own gradient norm."""
    hooks: list[Any] = field(default_factory=list)
    """Gradient hooks attached while it is open (grad_dtype buffers, the noise probe)."""

    def open(self, grads: WindowGrads) -> None:
        """Before the first backward: open the gradients' window, hook the probe too."""
        self.hooks = grads.open()
        if self.probe is not None:
            self.hooks += self.probe.attach(grads.params, grads.buffers.buffered, grads.wrapper_params)

    def before_backward(self, synced: bool) -> None:
        """[distributed] The probe hands a DDP wrapper's gradients back before its synchronising backward."""
        if self.probe is not None:
            self.hooks += self.probe.before_backward(synced)

    def close(self) -> None:
        """Remove the hooks, so a model outlives its Accumulator with ordinary ``.grad`` behaviour."""
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def add(
        self, loss_sum: torch.Tensor, n: int | float | torch.Tensor, synced: bool, micro: int = 1
    ) -> None:
        """Count one micro-batch, after its backward: its loss, its items, its gradient norm
        (``micro``: a ``step_cached`` window's micro-batches, counted at once with no probe)."""
        d = loss_sum.detach().to(torch.float64)
        self.loss = d if self.loss is None else self.loss + d
        if isinstance(n, torch.Tensor):
            n = n.to(d.device, torch.float64)
            self.items_t = n if self.items_t is None else self.items_t + n
        else:
            self.items_num += n
        self.micro += micro
        self.synced = synced
        if self.probe is not None:
            self.probe.record(n)

    def sums(self, dev: torch.device, grad_scaler: Any) -> WindowSums:
        """Σ loss_sum, Σ num_items (and the probe's sums) over the window and all ranks.

        The first thing done at a window's close: the probe hands the gradients back to ``p.grad``."""
        if self.probe is not None:
            self.probe.restore()
        loss = torch.zeros((), dtype=torch.float64, device=dev)
        if self.loss is not None:
            loss = loss + self.loss.to(dev)
        items = torch.tensor(float(self.items_num), dtype=torch.float64, device=dev)
        if self.items_t is not None:
            items = items + self.items_t.to(dev)
        parts = [loss, items]
        if self.probe is not None:
            parts += self.probe.sums(dev, grad_scaler)
        return WindowSums(parts)


class WindowTotals(NamedTuple):
    """The window's sums over all ranks, read back to the host."""

    loss: float
    """Σ loss_sum."""
    items: float
    """Σ num_items."""
    noise_sums: list[float]
    """measure_noise: (Σ_j |S_j|²/b_j, n, Σ_j b_j) over the micro-batches of all ranks; else []."""
    norm: float
    """L2 norm of the normalised window gradient."""


class WindowSums:
    """The window's sums over all ranks, still on the device: one small all-reduce made them."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self._flat = sync.all_reduce_sum(torch.stack(parts))  # [loss, items, *noise sums]

    @property
    def items(self) -> torch.Tensor:
        """Σ num_items as a device scalar: the divisor, with no host sync."""
        return self._flat[1]

    def read(self, norm: torch.Tensor) -> WindowTotals:
        """The sums and the gradient norm to the host in one transfer: the window's only host sync."""
        norm_t = norm.to(self._flat.device, torch.float64)
        loss, items, *noise_sums, norm_f = torch.cat([self._flat, norm_t.reshape(1)]).tolist()
        return WindowTotals(loss, items, noise_sums, norm_f)


def flag_last(micro_batches: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
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


class WindowEngine:
    """The Accumulator's windows, under its public API: open, count, discard, close.

    It keeps the open :class:`Window`, the window's gradients (:class:`WindowGrads`) and
    the counters that ``state_dict`` saves, and agrees window boundaries between ranks.
    :class:`gradaccum.Accumulator` adds the public calls and applies a closed window.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        grad_dtype: torch.dtype | None,
        grad_scaler: Any,
        max_skipped_windows: int | None,
        noise: NoiseScale | None,
        reduction: str,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.grad_scaler = grad_scaler
        self.max_skipped_windows = max_skipped_windows
        self._reduction = reduction
        self._noise = noise
        self._grads = WindowGrads(model, optimizer, grad_dtype, reduction)
        self._probe_cache: dict[Any, Any] = {}  # measure_noise: buffers kept from window to window
        # Counters (state_dict) and the open window.
        self.step_count = 0
        self.skipped_steps = 0
        self.consecutive_skipped = 0
        self._skip_reasons: dict[str, int] = {}
        self.micro_steps = 0
        self.items_seen: int | float = 0
        self._window = self._new_window()
        self._in_micro = False
        self._in_step = False
        self._applying = False  # inside our own optimizer.step()/zero_grad()

    def _new_window(self) -> Window:
        return Window(probe=NormProbe(self._probe_cache) if self._noise is not None else None)

    def _reset_window(self) -> None:
        self._window.close()
        self._window = self._new_window()

    def _open_step(self, call: str, functions: dict[str, tuple[Any, str]]) -> None:
        """Before a window of ``step()`` / ``step_cached()``: the state checks, the user's functions
        (name -> (function, how it is called)), then the ranks' boundary vote."""
        if self._in_micro or self._in_step:
            raise AccumulatorStateError(f"{call} inside micro_step()/step()")
        if self._window.micro:
            raise AccumulatorStateError(f"{call} while a micro_step() window is open: call flush() first")
        for name, (fn, usage) in functions.items():
            if not callable(fn):
                raise TypeError(f"{name} must be callable: {usage}")
        if self._checks_boundaries():
            self._agree_on_boundary(closing_complete=True)

    def _cached_window(
        self, micro_batches: Iterable[Any], encode: EncodeFn, window_loss: WindowLossFn, sync_every: bool
    ) -> None:
        """``step_cached``'s window, up to its close (:mod:`gradaccum.cached`); dropped if anything raises."""
        self._in_step = True
        try:
            window = CachedWindow()
            window.encode(self.model, micro_batches, encode)
            # No noise probe: a coupled loss has no additive per-micro-batch gradients to measure.
            self._window.probe = None
            self._window.open(self._grads)
            loss_sum, n = window.loss_backward(window_loss, self._grads, self.grad_scaler)
            window.reencode(self.model, encode, sync_every)
            self._window.add(loss_sum, n, synced=True, micro=len(window))
        except BaseException:
            self._discard_window()
            raise
        finally:
            self._in_step = False

    def _backward(self, loss_sum: Any, num_items: Any, synced: bool) -> None:
        """One micro-batch's backward. If it raises, a window it opened is closed again (hooks,
        stray gradients), so a retry opens it once and counts exactly as if the call never happened."""
        check_loss(loss_sum)
        n = count_items(num_items)
        opening = self._window.micro == 0
        if opening:
            self._window.open(self._grads)
        self._window.before_backward(synced)
        try:
            if self.grad_scaler is not None:
                self.grad_scaler.scale(loss_sum).backward()  # fp16: scaled, unscaled once per window
            else:
                loss_sum.backward()
        except BaseException:
            if opening:
                self._discard_window()
            elif self._window.probe is not None:
                self._window.probe.forget_pending()  # the failed call's norms are no micro-batch's
            raise
        self._window.add(loss_sum, n, synced)

    def _update_noise(self, totals: WindowTotals) -> tuple[float | None, float | None, float | None]:
        """measure_noise: feed the window to the estimator (the same numbers on every rank); returns
        the noise scale and its 90% interval for the StepResult."""
        if self._noise is None or not totals.noise_sums:  # a step_cached window has no probe
            return None, None, None
        # The normalised window gradient is S / B, so |S|² = (norm · B)².
        small = SmallBatchSums(*totals.noise_sums)
        self._noise.update(small, (totals.norm * totals.items) ** 2, totals.items)
        return self._noise_now()

    def _noise_now(self) -> tuple[float | None, float | None, float | None]:
        """measure_noise: the noise scale and its 90% interval for a StepResult (None where unknown)."""
        if self._noise is None:
            return None, None, None
        bounds = self._noise.interval()
        return (self._noise.noise_scale, *(bounds if bounds is not None else (None, None)))

    def _count_skip(self, reason: str) -> tuple[float | None, float | None, float | None]:
        """Drop a skipped window and count it; returns the noise scale (and interval) for its StepResult."""
        self._discard_window()
        self.skipped_steps += 1
        self.consecutive_skipped += 1
        self._skip_reasons[reason] = self._skip_reasons.get(reason, 0) + 1
        check_skip_limit(self.consecutive_skipped, self.max_skipped_windows, self._skip_reasons)
        return self._noise_now()

    def _close_window(self, num_items: int | float) -> None:
        self.micro_steps += self._window.micro
        self.items_seen += num_items
        self._reset_window()

    def _discard_window(self) -> None:
        """Forget the open window: gradients, buffers and window counters."""
        self._grads.drop()
        applying, self._applying = self._applying, True
        try:
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            self._applying = applying
        self._reset_window()

    def _checks_boundaries(self) -> bool:
        """[distributed] Whether window boundaries are agreed between ranks (see below)."""
        return self._reduction != "local" and sync.world_size() > 1

    def _agree_on_boundary(self, closing_complete: bool) -> int:
        """[distributed] Every rank says how it closes this window (``sync.agree_on_boundary``).

        Ranks that disagree all raise the same one-line error instead of failing with a
        collective mismatch. Returns the micro-batches open over all ranks (for ``flush()``).
        """
        votes = sync.agree_on_boundary(closing_complete, self._window.micro, self._grads.device())
        if votes.complete and votes.flushing:
            self._discard_window()
            raise AccumulatorStateError(
                f"ranks disagree on the window boundary: {votes.complete} rank(s) closed a window with a "
                f"synchronising micro-batch while {votes.flushing} called flush() on a partial one; give "
                "every rank the same number of micro-batches per window (shape (a)), or use step()"
            )
        return votes.open_micro
