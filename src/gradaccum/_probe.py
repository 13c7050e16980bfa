"""measure_noise's feed: each micro-batch's own gradient norm, taken after its backward.

While a window is open, the gradient of each parameter is held by the probe, not in
``p.grad``: before every backward ``p.grad`` is None, so afterwards it holds exactly that
micro-batch's gradient (autograd steals the incoming tensor, no copy). The probe then takes
all their norms in one fused ``torch._foreach_norm``, adds them to its window sums with one
``torch._foreach_add_`` (the very addition autograd would have made into ``p.grad``: the
sums are bitwise the same) and hands the sums back to ``p.grad`` when the window closes.

Why not a norm per parameter in a gradient hook (the first version): profiled on the
3-layer GPT-2 demo, the per-parameter kernels inside backward cost ~4x the same norms taken
after it, and holding the incoming gradients for a later fused norm cost more still (the
allocator can no longer reuse their memory). Hooks remain for the two cases where
``p.grad`` cannot be detached: ``grad_dtype`` buffers (their hook moves ``p.grad`` away
during backward) and a DDP wrapper's parameters on a synchronising backward (DDP reduces
``p.grad`` itself, so the window's sum must be there before that backward).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

_LOW = (torch.float16, torch.bfloat16)


def _norm_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    # fp32 at least (half-precision norms are too coarse for a difference of squares), fp64 where
    # a parameter is: the norms of one micro-batch then share one dtype and stack in one kernel.
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


class NormProbe:
    """One window's per-micro-batch squared gradient norms on this rank (no host sync)."""

    def __init__(self) -> None:
        self._detached: list[torch.Tensor] = []  # parameters whose window sums the probe holds
        self._sums: list[torch.Tensor | None] = []  # their sums over the window's micro-batches so far
        self._wrapped: list[torch.Tensor] = []  # detached ones a DDP wrapper reduces
        self._dtype = torch.float32
        self._device: torch.device | None = None  # set when the norms need moving to one device
        self._pending: list[torch.Tensor] = []  # norms the hooks took in the current backward
        self._norms: list[torch.Tensor] = []  # per micro-batch: 1-D, its parameters' norms
        self._items: list[int | float | torch.Tensor] = []

    def attach(self, params: Sequence[torch.Tensor], buffered: Callable[[torch.Tensor], bool],
               wrapped: set[torch.Tensor]) -> list[Any]:
        """At the window's opening: detach every parameter that can be; hook the rest."""
        self._detached = [p for p in params if not buffered(p)]
        self._sums = [None] * len(self._detached)
        self._wrapped = [p for p in self._detached if p in wrapped]
        self._dtype = _norm_dtype(self._detached)
        devices = {p.device for p in self._detached}
        self._device = next(iter(devices)) if len(devices) > 1 else None
        return [p.register_hook(self.hook) for p in params if buffered(p)]

    def before_backward(self, synced: bool) -> list[Any]:
        """[distributed] Before a synchronising backward, the wrapper's parameters get their window
        sums back in ``p.grad`` for good (DDP reduces them there), measured by hooks from then on."""
        if not (synced and self._wrapped):
            return []
        keep = {id(p) for p in self._wrapped}
        self._hand_back([i for i, p in enumerate(self._detached) if id(p) in keep])
        hooks = [p.register_hook(self.hook) for p in self._wrapped]
        self._wrapped = []
        return hooks

    def hook(self, grad: torch.Tensor) -> None:
        """The incoming gradient of a parameter that stays in ``p.grad``: its norm, taken now
        (autograd hands a leaf's hook the total of this backward, shared weights summed)."""
        low = grad.dtype in _LOW
        self._pending.append(torch.linalg.vector_norm(grad, dtype=torch.float32 if low else None))

    def record(self, num_items: int | float | torch.Tensor) -> None:
        """After a micro-batch's backward: its norms, and its gradients added to the window sums."""
        parts = self._take(measure=True)
        if self._pending:
            parts.append(torch.stack([n.to(parts[0].device if parts else n.device, torch.float64)
                                      for n in self._pending]))
            self._pending = []
        if parts:
            both = torch.cat([x.to(torch.float64) for x in parts]) if len(parts) > 1 else parts[0]
            self._norms.append(both)
            self._items.append(num_items)

    def forget_pending(self) -> None:
        """A backward that raised: what it added to the gradients stays (as without the probe),
        its norms are no micro-batch's."""
        self._take(measure=False)
        self._pending = []

    def restore(self) -> None:
        """At the window's close: the window sums back in ``p.grad``, where the Accumulator reads them."""
        self._hand_back(range(len(self._detached)))

    def _hand_back(self, which: Sequence[int] | range) -> None:
        for i in which:
            p, s = self._detached[i], self._sums[i]
            if s is not None:
                p.grad = s
        drop = set(which)
        self._detached = [p for i, p in enumerate(self._detached) if i not in drop]
        self._sums = [s for i, s in enumerate(self._sums) if i not in drop]

    def _take(self, measure: bool) -> list[torch.Tensor]:
        """Move this backward's gradients from ``p.grad`` into the window sums; their norms (one
        1-D tensor) when ``measure``."""
        grads = [p.grad for p in self._detached]
        idx = [i for i, g in enumerate(grads) if g is not None]
        if not idx:
            return []
        got = grads if len(idx) == len(grads) else [grads[i] for i in idx]
        out = []
        if measure:
            norms = torch._foreach_norm(got, 2, dtype=self._dtype)  # type: ignore[call-arg]
            if self._device is not None:  # parameters on several devices
                norms = [n.to(self._device) for n in norms]
            out.append(torch.stack(norms))
        old = [self._sums[i] for i in idx]
        if all(s is not None for s in old):
            torch._foreach_add_(old, got)  # type: ignore[arg-type]
        else:
            for i, g in zip(idx, got, strict=True):
                s = self._sums[i]
                self._sums[i] = g if s is None else s.add_(g)
        for p in self._detached:
            p.grad = None
        return out

    def sums(self, dev: torch.device, grad_scaler: Any = None) -> list[torch.Tensor]:
        """This rank's (Σ_j |S_j|²/b_j, n, Σ_j b_j) over its micro-batches,
        on the device (summed over ranks with the window's loss and items)."""
        if not self._norms:
            return [torch.zeros((), dtype=torch.float64, device=dev)] * 3
        counts = [len(x) for x in self._norms]
        sq = torch.cat([x.to(dev, torch.float64) for x in self._norms]).square()
        if len(set(counts)) == 1:
            sq = sq.view(len(counts), counts[0]).sum(1)
        else:
            sq = torch.stack([x.sum() for x in sq.split(counts)])
        if grad_scaler is not None and grad_scaler.is_enabled():
            sq = sq / float(grad_scaler.get_scale()) ** 2  # fp16: the backward saw scaled gradients
        if all(not isinstance(n, torch.Tensor) for n in self._items):
            items = torch.tensor([float(n) for n in self._items], dtype=torch.float64, device=dev)
        else:
            items = torch.stack([
                n.to(dev, torch.float64) if isinstance(n, torch.Tensor)
                else torch.tensor(float(n), dtype=torch.float64, device=dev)
                for n in self._items
            ])
        seen = items > 0  # a micro-batch with no items has no mean gradient
        weighted = torch.where(seen, sq / items.clamp_min(1e-300), 0.0).sum()
        return [weighted, seen.sum().to(torch.float64), torch.where(seen, items, 0.0).sum()]
