"""Gradient synchronisation across ranks: skip it mid-window, do it once per window.

DDP decides whether to all-reduce during the *forward* pass, so the no-sync context
must wrap forward and backward together; that is why ``Accumulator.micro_step()`` is
a context manager around the user's whole micro-batch. FSDP2 modules expose
``set_requires_gradient_sync`` instead of ``no_sync``.

When a window ends without the wrapper's sync (a partial window closed by
``flush()``, or an unwrapped model under torch.distributed) gradaccum sums the
gradients itself: :func:`all_reduce_optional_grads_sum` for plain tensors and
:func:`reduce_fsdp_deferred_grads` for FSDP2's unsharded, deferred gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from gradaccum._grads import GradBuffers


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


def data_parallel(model: nn.Module) -> nn.Module:
    """``model`` ready for this process group: wrapped in DDP under torch.distributed unless it
    is already DDP or FSDP2; unchanged on one process."""
    if world_size() > 1 and not (is_ddp(model) or is_fsdp2(model)):
        return nn.parallel.DistributedDataParallel(model)
    return model


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


def all_reduce_optional_grads_sum(
    grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype]
) -> list[torch.Tensor | None]:
    """Sum per-parameter gradients over ranks when some ranks may hold ``None``.

    A rank can miss a gradient for a parameter it never used, or for all of them when
    it had no micro-batch in a partial window; every rank must still contribute a
    buffer of the same layout to the collective, so a missing gradient counts as zero.
    One 0/1 flag per parameter rides in the same buffer, so a parameter that *no* rank
    has a gradient for stays ``None`` (the optimizer skips it, as on one process).
    ``like[i]`` gives the shape and device and ``dtypes[i]`` the dtype of gradient i;
    both must agree across ranks. One all-reduce per (dtype, device) group.
    """
    out: list[torch.Tensor | None] = list(grads)
    if not (is_distributed() and world_size() > 1):
        return out
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, (p, dt) in enumerate(zip(like, dtypes, strict=True)):
        groups.setdefault((dt, p.device), []).append(i)
    for (dt, dev), idx in groups.items():
        parts = [_zeros_if_none(grads[i], like[i], dt) for i in idx]
        flags = torch.tensor([float(grads[i] is not None) for i in idx], dtype=dt, device=dev)
        flat = torch.cat([*parts, flags])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        anyone = flat[flat.numel() - len(idx) :].tolist()  # one host sync per group
        offset = 0
        for k, i in enumerate(idx):
            n = like[i].numel()
            if anyone[k] > 0:
                g = grads[i]
                if g is None:
                    out[i] = flat[offset : offset + n].view(like[i].shape).clone()
                else:
                    g.copy_(flat[offset : offset + n].view_as(g))
            offset += n
    return out


def drop_fsdp_deferred_grads(model: nn.Module) -> None:
    """Forget FSDP2's held-back unsharded gradients (a discarded window's)."""
    try:
        for fp in _fsdp_params(model):
            fp.unsharded_accumulated_grad = None
            unsharded = getattr(fp, "_unsharded_param", None)  # made at the first forward
            if unsharded is not None:
                unsharded.grad = None
    except AttributeError as e:
        raise RuntimeError(
            f"gradaccum: cannot clear FSDP2's deferred gradients with this torch version ({e})"
        ) from e


def _held_grad(fp: Any) -> torch.Tensor | None:
    """One FSDP2 parameter's held-back gradient: where it sits depends on the precision policy."""
    acc = fp.unsharded_accumulated_grad
    unsharded = getattr(fp, "_unsharded_param", None)
    local = unsharded.grad if unsharded is not None else None
    if acc is not None and local is not None:
        return acc + local
    return acc if acc is not None else local


def _zeros_if_none(g: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if g is None:
        return torch.zeros(like.numel(), dtype=dtype, device=like.device)
    return g.reshape(-1).to(dtype)


def _fsdp_params(model: nn.Module) -> list[Any]:
    """FSDP2's per-parameter records (private API, hence the narrow, checked use)."""
    from torch.distributed.fsdp import FSDPModule

    out = []
    for m in model.modules():
        if isinstance(m, FSDPModule):
            for group in m._get_fsdp_state()._fsdp_param_groups:
                out.extend(group.fsdp_params)
    return out


def reduce_fsdp_deferred_grads(model: nn.Module) -> None:
    """Sum FSDP2 gradients held back by ``set_requires_gradient_sync(False)`` and shard them.

    After a no-sync backward FSDP2 keeps each parameter's *unsharded* local gradient
    and reduce-scatters it only in the next synced backward. A partial window closed by
    ``flush()`` has no next backward, and FSDP2 has no public call that reduces the
    held gradients, so we do it here: one all-reduce (SUM) of the unsharded gradients,
    then each rank keeps its own shard as the sharded DTensor ``.grad``, where FSDP2
    would have put it (unaveraged: the caller normalises by the item count). This
    touches FSDP2 internals; if they change, it fails with a clear error rather than
    stepping with a wrong gradient.
    """
    try:
        records = _fsdp_params(model)
        held: list[torch.Tensor | None] = []
        for fp in records:
            mesh = fp.sharded_param.device_mesh
            if mesh.ndim != 1 or mesh.size() != world_size():
                raise NotImplementedError(
                    "flush() of a partial FSDP2 window needs a 1-D mesh over all ranks; use step() "
                    "or sync_every_micro_batch=True"
                )
            held.append(_held_grad(fp))
        like = [fp.sharded_param for fp in records]  # global shape and this rank's device
        # The dtype FSDP2 accumulates in: fixed by the policy, so every rank agrees.
        dtypes = [fp.reduce_dtype or fp.param_dtype or fp.orig_dtype for fp in records]
        summed = all_reduce_optional_grads_sum(held, like, dtypes)
        me, ws = rank(), world_size()
        drop_fsdp_deferred_grads(model)
        for fp, full in zip(records, summed, strict=True):
            if full is None:
                continue
            dim = fp.fsdp_placement.dim
            chunks = torch.chunk(full, ws, dim=dim)  # FSDP2's split: torch.chunk, padded
            if me < len(chunks):
                shard = chunks[me]
            else:  # fewer chunks than ranks (a small dim): this rank's shard is empty
                shape = list(full.shape)
                shape[dim] = 0
                shard = full.new_zeros(shape)
            shard = shard.to(fp.sharded_param.dtype).contiguous()
            if fp.sharded_param.grad is not None:
                fp.sharded_param.grad._local_tensor.add_(shard)
            else:
                fp.sharded_param.grad = fp.to_sharded_dtensor(shard)
    except (AttributeError, TypeError) as e:
        raise RuntimeError(
            "gradaccum: cannot reduce FSDP2's deferred gradients with this torch version "
            f"({type(e).__name__}: {e}); close windows with step(), use whole windows, or pass "
            "sync_every_micro_batch=True"
        ) from e


def collective_device() -> torch.device:
    """Where a small tensor must live for this process group's collectives."""
    backend = str(dist.get_backend())
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- the Accumulator's window
def wrapper_reduced(model: nn.Module, reduction: str) -> set[torch.Tensor]:
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


def all_reduce_window_grads(params: list[torch.Tensor], buffers: GradBuffers) -> None:
    """[distributed] Sum these parameters' window gradients over ranks ourselves.

    Used where no wrapper sync ran (a partial window, an unwrapped model) and for
    parameters no wrapper reduces (outside the model, or unfrozen after DDP was
    built). Missing gradients (a rank with no micro-batch in a partial window, an
    unused parameter) count as zero, so every rank ends with the same gradients.
    """
    dtypes = [buffers.dtype if buffers.buffered(p) else p.dtype for p in params]
    current = [buffers.grad_of(p) for p in params]
    summed = all_reduce_optional_grads_sum(current, params, dtypes)  # type: ignore[arg-type]
    for p, old, new in zip(params, current, summed, strict=True):
        if old is None and new is not None:
            buffers.set_grad(p, new)


def reduce_window(
    model: nn.Module,
    reduction: str,
    synced: bool,
    params: list[torch.Tensor],
    extra: list[torch.Tensor],
    wrapper_params: set[torch.Tensor],
    buffers: GradBuffers,
) -> list[torch.Tensor]:
    """[distributed] Make every rank hold the window's gradient summed over ranks.

    ``synced``: the window's last backward ran the wrapper's sync; ``extra``: the
    ``params`` not in ``wrapper_params`` (the ones the wrapper does not reduce).
    Returns the gradients that hold the wrapper's *average* over ranks (DDP/FSDP2
    after their synced backward): those are divided by items / world_size, the
    others by items, so all end as the same full-window mean.
    """
    averaged: list[torch.Tensor] = []
    if reduction in ("ddp", "fsdp") and synced:
        averaged = [g for p in params if p in wrapper_params
                    for g in (buffers.grad_of(p),) if g is not None]
        if extra:
            all_reduce_window_grads(extra, buffers)
    elif reduction == "fsdp":
        reduce_fsdp_deferred_grads(model)  # partial window: FSDP2 held them back
        if extra:
            all_reduce_window_grads(extra, buffers)
    elif reduction != "local":
        all_reduce_window_grads(params, buffers)  # partial window under DDP, or an unwrapped model
    return averaged


class BoundaryVotes(NamedTuple):
    """How the ranks close one window (sums over ranks; see :func:`agree_on_boundary`)."""

    complete: int
    """Ranks closing it with a synchronising backward (``micro_step()``'s last, or ``step()``)."""
    flushing: int
    """Ranks closing a partial window with ``flush()``."""
    open_micro: int
    """Micro-batches open in the window, over all ranks."""


def agree_on_boundary(closing_complete: bool, open_micro: int, device: torch.device) -> BoundaryVotes:
    """[distributed] Every rank says how it closes this window: one 3-number all-reduce.

    A window closes either with a synchronising backward (its last micro-batch in
    ``micro_step()``, or ``step()``) or with ``flush()``. Their collectives differ,
    so if one rank does the first while another does the second, the backends fail
    with a collective mismatch (gloo aborts the process). Asked first, every rank
    learns of it and can raise the same one-line error instead.
    """
    t = torch.tensor(
        [float(closing_complete), float(not closing_complete), float(open_micro)],
        dtype=torch.float64, device=device,
    )
    complete, flushing, total = all_reduce_sum(t).tolist()
    return BoundaryVotes(int(complete), int(flushing), int(total))


# --------------------------------------------------------------------------- step_cached
def gather_rows(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """[distributed] Each tensor's rows from every rank, in rank order (ranks may hold different
    counts). Only this rank's rows carry gradient, and only back to this rank: the loss on them
    is computed identically on every rank, so each rank keeps its own rows' share (no reduction)."""
    if world_size() == 1:
        return list(tensors)
    counts = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64, device=tensors[0].device)
    every = [torch.empty_like(counts) for _ in range(world_size())]
    dist.all_gather(every, counts)
    rows = torch.stack(every).tolist()  # [rank][tensor]
    out = []
    for i, t in enumerate(tensors):
        most = max(r[i] for r in rows)
        padded = t.detach().new_zeros((most, *t.shape[1:]))
        padded[: t.shape[0]] = t.detach()
        slots = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(slots, padded)
        parts = [s[: r[i]] for s, r in zip(slots, rows, strict=True)]
        parts[rank()] = t  # with its graph: the gradient of this rank's own rows
        out.append(torch.cat(parts))
    return out


# --------------------------------------------------------------------------- small agreements
def any_rank(flag: bool) -> bool:
    """True if ``flag`` is True on any rank (one tiny all-reduce; no collective on one process)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    return bool(all_reduce_sum(t).item() > 0)


def max_over_ranks(value: int) -> int:
    """The largest ``value`` over the ranks (``value`` itself on one process)."""
    return _reduce_int(value, "max")


def min_over_ranks(value: int) -> int:
    """The smallest ``value`` over the ranks (``value`` itself on one process)."""
    return _reduce_int(value, "min")


def _reduce_int(value: int, how: str) -> int:
    if world_size() == 1:
        return int(value)
    op = dist.ReduceOp.MAX if how == "max" else dist.ReduceOp.MIN
    t = torch.tensor([int(value)], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t, op=op)
    return int(t.item())


# --------------------------------------------------------------------------- broadcast (memory planner)
def broadcast_ints(values: Sequence[int] | None, length: int, src: int = 0) -> list[int]:
    """Rank ``src``'s ``length`` ints on every rank (other ranks pass None). One broadcast."""
    if values is None:
        t = torch.zeros(length, dtype=torch.int64, device=collective_device())
    else:
        t = torch.tensor(list(values), dtype=torch.int64, device=collective_device())
    dist.broadcast(t, src=src)
    return t.tolist()
