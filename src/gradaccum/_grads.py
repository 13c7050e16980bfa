"""A window's gradients: norms, the one normalisation, clipping, fp16 unscaling, grad_dtype buffers.

Everything here works on lists of gradient tensors with ``torch._foreach_*`` kernels,
so a window costs a few kernels, not one per parameter, and no host sync.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradaccum import sync


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


def normalise_(
    grads: list[torch.Tensor], averaged: list[torch.Tensor], items: torch.Tensor, world: int
) -> None:
    """Divide the window's summed gradients by its item count (over all ranks), in place.

    ``averaged`` (a subset of ``grads``) already hold the wrapper's mean over ``world``
    ranks, so they are divided by items / world instead: all end as the same full-window mean.
    """
    if averaged:
        kept = {id(g) for g in averaged}
        scale_grads_(averaged, items / world)
        scale_grads_([g for g in grads if id(g) not in kept], items)
    else:
        scale_grads_(grads, items)


def clip_grads_(grads: list[torch.Tensor], max_norm: float, norm: float) -> None:
    """Scale gradients so their joint L2 norm is at most ``max_norm`` (torch's rule)."""
    coef = max_norm / (norm + 1e-6)
    if grads and coef < 1.0:
        torch._foreach_mul_(grads, coef)


def unscale_window_(grad_scaler: Any, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """fp16: divide the window's summed gradients by the loss scale, once per window.

    ``unscale_`` covers the optimizer's parameters and records overflow for the
    scaler's ``update()``; trainable model parameters outside the optimizer (rare)
    are divided here too, so the norm is over true gradients.
    """
    grad_scaler.unscale_(optimizer)
    stepped = {p for g in optimizer.param_groups for p in g["params"]}
    others = [p.grad for p in params if p not in stepped and p.grad is not None]
    if others:
        torch._foreach_div_(others, float(grad_scaler.get_scale()))


class GradBuffers:
    """``grad_dtype`` (e.g. fp32) buffers for the gradients of lower-precision parameters.

    Each micro-batch's low-precision gradient is added here right after it is
    accumulated, then ``p.grad`` is dropped, so low-precision sums never pile up over
    the window. The hooks that fill them live only while a window is open (see
    :meth:`attach`), so a model outlives its Accumulator with ordinary ``.grad`` behaviour.
    With ``dtype=None`` nothing is buffered and every gradient is ``p.grad``.
    """

    def __init__(self, dtype: torch.dtype | None) -> None:
        self.dtype = dtype
        self._buffers: dict[int, torch.Tensor] = {}

    def buffered(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s window gradient is kept in a buffer (not in ``p.grad``)."""
        return self.dtype is not None and p.dtype != self.dtype

    def attach(self, params: list[torch.Tensor]) -> list[Any]:
        """Hook the parameters whose gradients are buffered; returns the hook handles."""
        return [p.register_post_accumulate_grad_hook(self.stash) for p in params if p.dtype != self.dtype]

    def stash(self, p: torch.Tensor) -> None:
        """The post-accumulate hook: move ``p.grad`` into its buffer."""
        if p.grad is None:
            return
        buf = self._buffers.get(id(p))
        if buf is None:
            self._buffers[id(p)] = p.grad.to(self.dtype, copy=True)  # type: ignore[arg-type]
        else:
            buf.add_(p.grad)
        p.grad = None

    def grad_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """``p``'s window gradient: its buffer where kept, else ``p.grad``."""
        return self._buffers.get(id(p), p.grad)

    def set_grad(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Give ``p`` a window gradient it had none of (in its buffer where kept)."""
        if self.buffered(p):
            self._buffers[id(p)] = grad
        else:
            p.grad = grad

    def grads(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The window's gradient tensors: grad_dtype buffers where kept, else p.grad."""
        out = []
        for p in params:
            g = self._buffers.get(id(p), p.grad)
            if g is not None:
                out.append(g)
        return out

    def move_to_grads(self, params: list[torch.Tensor]) -> None:
        """Hand the buffers to the optimizer as ``p.grad`` in the parameter's own dtype."""
        for p in params:
            buf = self._buffers.pop(id(p), None)
            if buf is not None:
                p.grad = buf.to(p.dtype)

    def clear(self) -> None:
        self._buffers.clear()


def covered_params(
    model: nn.Module, optimizer: torch.optim.Optimizer, wrapper_params: set[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters a window covers (the optimizer's and the model's trainable ones), and
    those of them the DDP/FSDP2 wrapper does not reduce."""
    found = dict.fromkeys(model.parameters())
    found.update(dict.fromkeys(p for g in optimizer.param_groups for p in g["params"]))
    params = [p for p in found if p.requires_grad]
    return params, [p for p in params if p not in wrapper_params]


class WindowGrads:
    """The gradients a window covers: which parameters, where their sums are held, and
    what is done to them once per window (reduce over ranks, unscale, normalise, hand over).

    The parameters are re-read from the optimizer (and the model) each time a window
    opens, so one added with ``optimizer.add_param_group`` or unfrozen since the last
    window is covered, and one frozen since is left alone.
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_dtype: torch.dtype | None,
        reduction: str,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.reduction = reduction
        self.buffers = GradBuffers(grad_dtype)
        # [distributed] Parameters whose gradients the wrapper (DDP/FSDP2) reduces; every
        # other trainable parameter the window covers is summed over ranks by gradaccum.
        self.wrapper_params = sync.wrapper_reduced(model, reduction)
        self.params: list[torch.Tensor] = []
        self.extra: list[torch.Tensor] = []  # trainable, not reduced by the wrapper
        self.params, self.extra = covered_params(model, optimizer, self.wrapper_params)

    def open(self) -> list[Any]:
        """Before a window's first backward: re-read the parameters, drop stray gradients,
        hook the buffered ones; returns the hook handles."""
        self.params, self.extra = covered_params(self.model, self.optimizer, self.wrapper_params)
        for p in self.params:
            p.grad = None
        return self.buffers.attach(self.params) if self.buffers.dtype is not None else []

    def device(self) -> torch.device:
        """Where the window's small statistics live."""
        return self.params[0].device if self.params else torch.device("cpu")

    def reduce(self, synced: bool) -> list[torch.Tensor]:
        """[distributed] Sum over ranks; returns the wrapper-averaged ones (``sync.reduce_window``)."""
        return sync.reduce_window(
            self.model, self.reduction, synced, self.params, self.extra, self.wrapper_params, self.buffers
        )

    def tensors(self) -> list[torch.Tensor]:
        """The window's gradient tensors: grad_dtype buffers where kept, else p.grad."""
        return self.buffers.grads(self.params)

    def apply(self, grads: list[torch.Tensor], max_grad_norm: float | None, norm: float) -> None:
        """Clip (``max_grad_norm``) and leave the gradients in ``p.grad`` for the optimizer."""
        if max_grad_norm is not None:
            clip_grads_(grads, max_grad_norm, norm)
        self.buffers.move_to_grads(self.params)

    def drop(self) -> None:
        """Forget the window's gradients: buffers, ``p.grad`` and FSDP2's held-back ones."""
        self.buffers.clear()
        for p in self.params:
            p.grad = None
        if self.reduction == "fsdp":
            sync.drop_fsdp_deferred_grads(self.model)  # [distributed] else they leak into the next window
