"""Split a batch into micro-batches along dim 0, whatever container it comes in."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch


def _leading_sizes(batch: Any, path: str, out: dict[str, int]) -> None:
    """Collect the dim-0 size of every tensor leaf, keyed by where it sits."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise ValueError(f"cannot split a 0-dim tensor at {path or 'batch'}")
        out[path or "batch"] = batch.shape[0]
    elif isinstance(batch, dict):
        for k, v in batch.items():
            _leading_sizes(v, f"{path}[{k!r}]", out)
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for f in dataclasses.fields(batch):
            _leading_sizes(getattr(batch, f.name), f"{path}.{f.name}", out)
    elif isinstance(batch, (list, tuple)):
        for i, v in enumerate(batch):
            _leading_sizes(v, f"{path}[{i}]", out)


def batch_size(batch: Any) -> int:
    """The common dim-0 size of every tensor in ``batch``; ValueError if they differ."""
    sizes: dict[str, int] = {}
    _leading_sizes(batch, "", sizes)
    if not sizes:
        raise ValueError("batch contains no tensors to split")
    distinct = set(sizes.values())
    if len(distinct) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(f"tensors in the batch have different leading dimensions ({shown})")
    return distinct.pop()


def map_tensors(batch: Any, fn: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of ``batch``, keeping the containers' types."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return type(batch)((k, map_tensors(v, fn)) for k, v in batch.items())
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        # Copy and set every field (not dataclasses.replace, which would reset
        # init=False fields to their defaults); object.__setattr__ also works when frozen.
        out = copy.copy(batch)
        for f in dataclasses.fields(batch):
            object.__setattr__(out, f.name, map_tensors(getattr(batch, f.name), fn))
        return out
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch  # non-tensor leaves (ints, strings, None) go to every micro-batch


def _slice(batch: Any, start: int, stop: int) -> Any:
    return map_tensors(batch, lambda t: t[start:stop])


def split(batch: Any, micro_batch_size: int) -> list[Any]:
    """Split ``batch`` along dim 0 into micro-batches of ``micro_batch_size`` (last may be smaller).

    Works on tensors and on dicts, tuples, namedtuples, lists and dataclasses of them,
    nested; non-tensor leaves are repeated in every micro-batch. Slices are views.
    """
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int):
        raise TypeError(f"micro_batch_size must be an int, got {type(micro_batch_size).__name__}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    n = batch_size(batch)
    return [
        _slice(batch, i * micro_batch_size, min(n, (i + 1) * micro_batch_size))
        for i in range(math.ceil(n / micro_batch_size))
    ]
