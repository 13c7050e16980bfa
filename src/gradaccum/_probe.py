"""measure_noise's feed: each micro-batch's own gradient norm, taken after its backward.

While a window is open, its gradient sums are held by the probe, not in ``p.grad``, so
that after each backward ``p.grad`` holds exactly that micro-batch's gradient:

- parameters of one device and dtype (fp32/fp64, up to ``FLAT_MAX_BYTES`` of them) get
  ``p.grad`` as views of one flat buffer; autograd adds each micro-batch's gradient into it
  in place, and the probe then takes its squared norm with one dot product, adds it to a
  second flat buffer (the window's sum) and zeroes it: three kernels per micro-batch, no
  Python loop over parameters, at the price of one more gradient's memory while a window
  is open (hence the cap: beyond it, below);
- other parameters have ``p.grad`` None before each backward, so autograd hands over the
  incoming tensor (no copy); one fused ``torch._foreach_norm`` and one
  ``torch._foreach_add_`` into the sums follow;
- ``grad_dtype`` buffers (their own hook moves ``p.grad`` away during backward) and a DDP
  wrapper's parameters on its synchronising backward (DDP reduces ``p.grad`` itself) keep a
  norm per parameter in a gradient hook.

The sums are the very additions autograd would have made into ``p.grad`` (adding into a
zeroed buffer is exact), so the weights are those of ``measure_noise=False``; they go back to
``p.grad`` when the window closes (None for a parameter no backward reached, as without the
probe). Why not a norm per parameter in a hook everywhere (the first version): profiled on
the 3-layer GPT-2 demo, those per-parameter kernels inside backward, and the per-parameter
Python work after it, were most of the measured cost (docs/noise.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

_LOW = (torch.float16, torch.bfloat16)
FLAT_MAX_BYTES = 256 * 2**20
"""Largest gradient (per device and dtype) given the flat double buffer: one more gradient's
memory is cheap below it, and above it per-parameter costs are small beside a micro-batch's compute."""


class FlatGroup:
    """Parameters of one device and dtype whose ``p.grad`` are views of one flat buffer."""

    def __init__(self, params: list[torch.Tensor], cache: dict[Any, Any]) -> None:
        self.params = params
        # The per-micro-batch buffer and its views outlive the window (``cache``, the engine's):
        # fresh memory every window costs page faults. Zeroed again in case a window was dropped.
        # (The window's sum too: the optimizer's zero_grad lets go of it after every step.)
        key = tuple(id(p) for p in params)
        if key not in cache:
            if len(cache) > 8:
                cache.clear()
            n, p0 = sum(p.numel() for p in params), params[0]
            flats = [torch.zeros(n, dtype=p0.dtype, device=p0.device) for _ in range(2)]
            cache[key] = [(f, self._views(f)) for f in flats]
        (self.current, views), (self.total, self.total_views) = cache[key]
        self.current.zero_()
        self.taken = 0  # backwards added to the window's sum so far
        self.seen = [False] * len(params)  # reached by some backward of the window
        for p, v in zip(params, views, strict=True):
            p.grad = v

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, at = [], 0
        for p in self.params:
            out.append(flat[at : at + p.numel()].view_as(p))
            at += p.numel()
        return out

    def hooks(self) -> list[Any]:
        """Mark which parameters a backward reached (a Python flag, no kernel)."""
        def marker(i: int) -> Callable[[torch.Tensor], None]:
            def mark(_grad: torch.Tensor) -> None:
                self.seen[i] = True
            return mark
        return [p.register_hook(marker(i)) for i, p in enumerate(self.params)]

    def take(self, measure: bool) -> torch.Tensor | None:
        """After a backward: its squared norm (when ``measure``); the gradient into the window's sum."""
        sq = torch.dot(self.current, self.current).reshape(1) if measure else None
        if self.taken:
            self.total.add_(self.current)
        else:
            self.total.copy_(self.current)  # the first: a copy, so the sum needs no zeroing
        self.taken += 1
        self.current.zero_()
        return sq

    def restore(self) -> None:
        for p, v, seen in zip(self.params, self.total_views, self.seen, strict=True):
            p.grad = v if seen and self.taken else None


def _norm_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    # fp32 at least (half-precision norms are too coarse for a difference of squares), fp64 where
    # a parameter is: the norms of one micro-batch then share one dtype and stack in one kernel.
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


class NormProbe:
    """One window's per-micro-batch squared gradient norms on this rank (no host sync)."""

    def __init__(self, cache: dict[Any, Any] | None = None) -> None:
        self._cache = {} if cache is None else cache  # FlatGroup's buffers, kept across windows
        self._flat: list[FlatGroup] = []
        self._detached: list[torch.Tensor] = []  # parameters whose window sums the probe holds
        self._sums: list[torch.Tensor | None] = []  # their sums over the window's micro-batches so far
        self._wrapped: list[torch.Tensor] = []  # detached ones a DDP wrapper reduces
        self._dtype = torch.float32
        self._device: torch.device | None = None  # set when the norms need moving to one device
        self._pending: list[torch.Tensor] = []  # norms the hooks took in the current backward
        self._norms: list[torch.Tensor] = []  # per micro-batch: 1-D, squared norms (of parameters, groups)
        self._items: list[int | float | torch.Tensor] = []

    def attach(self, params: Sequence[torch.Tensor], buffered: Callable[[torch.Tensor], bool],
               wrapped: set[torch.Tensor]) -> list[Any]:
        """At the window's opening: flat buffers or detached ``p.grad`` where possible; hook the rest."""
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in params:
            if not buffered(p) and p not in wrapped and p.dtype in (torch.float32, torch.float64):
                groups.setdefault((p.device, p.dtype), []).append(p)
        flat = [g for g in groups.values()
                if sum(p.numel() for p in g) * g[0].element_size() <= FLAT_MAX_BYTES]
        self._flat = [FlatGroup(g, self._cache) for g in flat]
        in_flat = {id(p) for g in flat for p in g}
        self._detached = [p for p in params if not buffered(p) and id(p) not in in_flat]
        self._sums = [None] * len(self._detached)
        self._wrapped = [p for p in self._detached if p in wrapped]
        self._dtype = _norm_dtype(self._detached)
        devices = {p.device for p in self._detached}
        self._device = next(iter(devices)) if len(devices) > 1 else None
        marks = [h for g in self._flat for h in g.hooks()]
        return marks + [p.register_hook(self.hook) for p in params if buffered(p)]

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
        """After a micro-batch's backward: its squared norms, and its gradients added to the window sums."""
        parts = [g.take(measure=True) for g in self._flat] + self._take(measure=True)
        if self._pending:
            parts.append(torch.stack([n.to(parts[0].device if parts else n.device, torch.float64)
                                      for n in self._pending]).square())
            self._pending = []
        if parts:
            both = torch.cat([x.to(torch.float64) for x in parts]) if len(parts) > 1 else parts[0]
            self._norms.append(both)
            self._items.append(num_items)

    def forget_pending(self) -> None:
        """A backward that raised: what it added to the gradients stays (as without the probe),
        its norms are no micro-batch's."""
        for g in self._flat:
            g.take(measure=False)
        self._take(measure=False)
        self._pending = []

    def restore(self) -> None:
        """At the window's close: the window sums back in ``p.grad``, where the Accumulator reads them."""
        for g in self._flat:
            g.restore()
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
            out.append(torch.stack(norms).square())
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
        sq = torch.cat([x.to(dev, torch.float64) for x in self._norms])
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
