"""Gradient synchronisation across ranks: skip it mid-window, do it once per window.

DDP decides whether to all-reduce during the *forward* pass, so the no-sync context
must wrap forward and backward together; that is why ``Accumulator.micro_step()`` is
a context manager around the user's whole micro-batch. FSDP2 modules expose
``set_requires_gradient_sync`` instead of ``no_sync``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """True when a torch.distributed process group is up."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def is_fsdp2(model: nn.Module) -> bool:
    """An FSDP2 (``fully_shard``) root module: it has ``set_requires_gradient_sync``."""
    return hasattr(model, "set_requires_gradient_sync") and hasattr(model, "reshard")


def grad_reduction(model: nn.Module) -> str:
    """How the gradients of one window reach every rank.

    - ``"local"``: one process; nothing to do.
    - ``"ddp"`` / ``"fsdp"``: the wrapper averages gradients over ranks during the
      window's last backward (so the sum over ranks is ``world_size`` times that).
    - ``"manual"``: an unwrapped model under torch.distributed; gradaccum all-reduces
      (sums) the gradients itself once per window.
    """
    if world_size() == 1 and not is_ddp(model) and not is_fsdp2(model):
        return "local"
    if is_ddp(model):
        return "ddp"
    if is_fsdp2(model):
        return "fsdp"
    return "manual"


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Suppress the wrapper's gradient communication while ``skip`` is True."""
    if not skip:
        yield
        return
    if is_ddp(model):
        with model.no_sync():  # type: ignore[operator]
            yield
    elif is_fsdp2(model):
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
    else:
        yield


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op on one process) and return it."""
    if is_distributed() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads_sum(grads: list[torch.Tensor]) -> None:
    """Sum local gradients over ranks, flattened into one buffer per dtype/device.

    Used when the window's last backward ran without the wrapper's sync (a partial
    window through ``flush()``, or an unwrapped model under torch.distributed).
    """
    if not (is_distributed() and world_size() > 1) or not grads:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.dtype, g.device), []).append(g)
    for same in groups.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in same:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n
