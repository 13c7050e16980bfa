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


# --------------------------------------------------------------------------- packing
IGNORE_INDEX = -100


def example_length(example: Any) -> int:
    """Tokens of one example: ``{"input_ids": ...}`` or an ``(input_ids, labels)`` pair."""
    ids = example["input_ids"] if isinstance(example, dict) else example[0]
    return len(ids)


def token_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive runs of example indices whose lengths sum to at most ``max_tokens`` each.

    In order, so a window's micro-batches hold the same examples however they are grouped."""
    groups: list[list[int]] = []
    used = max_tokens + 1
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"max_tokens {max_tokens} is smaller than example {i} ({n} tokens)")
        if used + n > max_tokens:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


def _rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the examples of one micro-batch in as few rows as it finds."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        slot = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if slot is None:
            rows.append([])
            free.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= lengths[i]
    return rows


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(R, 1, W, W)`` additive mask: 0 where a token may attend (same example, not later),
    the dtype's minimum elsewhere. Examples start where ``position_ids`` is 0."""
    segments = (position_ids == 0).cumsum(-1)
    same = segments.unsqueeze(-1) == segments.unsqueeze(-2)
    width = position_ids.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    mask = torch.zeros(same.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~(same & causal), torch.finfo(dtype).min).unsqueeze(1)


def _pack_rows(
    examples: list[Any], rows: list[list[int]], pad_id: int, attention: str
) -> dict[str, torch.Tensor]:
    width = max(sum(example_length(examples[i]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # padding: one-token examples
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ex = examples[i]
            ids = ex["input_ids"] if isinstance(ex, dict) else ex[0]
            lab = ex["labels"] if isinstance(ex, dict) else ex[1]
            n = len(ids)
            input_ids[r, at:at + n] = torch.as_tensor(ids, dtype=torch.long)
            labels[r, at:at + n] = torch.as_tensor(lab, dtype=torch.long)
            labels[r, at] = IGNORE_INDEX  # never predict an example from the one before it
            position_ids[r, at:at + n] = torch.arange(n)
            at += n
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if attention == "mask":
        batch["attention_mask"] = block_causal_mask(position_ids)
    return batch


def pack(
    examples: Any,
    max_tokens: int,
    max_row_tokens: int | None = None,
    pad_id: int = 0,
    attention: str = "mask",
) -> list[dict[str, torch.Tensor]]:
    """Pack examples into micro-batches of at most ``max_tokens`` real tokens each.

    ``examples``: dicts with ``input_ids`` and ``labels`` (or ``(input_ids, labels)`` pairs),
    consecutive runs of them per micro-batch, in order. Each micro-batch is a dict of
    ``input_ids``, ``labels`` (each example's first label masked), ``position_ids``
    (restarting at 0 per example) and, with ``attention="mask"``, a 4-D additive
    ``attention_mask`` confining attention to each example (float32; cast it to the
    model's dtype). ``attention="position_ids"`` leaves the mask out, for attention
    implementations that find the examples from ``position_ids`` (flash-attention).
    Rows hold at most ``max_row_tokens`` (default ``max_tokens``: one row each) and are
    right-padded with ``pad_id``. ``model(**batch)`` minus ``labels`` is the forward.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    capacity = max_tokens if max_row_tokens is None else max_row_tokens
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"max_row_tokens must be a positive int, got {max_row_tokens!r}")
    if attention not in ("mask", "position_ids"):
        raise ValueError(f"attention must be 'mask' or 'position_ids', got {attention!r}")
    examples = list(examples)
    lengths = [example_length(ex) for ex in examples]
    if any(n < 1 for n in lengths):
        raise ValueError("examples must have at least one token each")
    longest = max(lengths, default=0)
    if longest > capacity:
        raise ValueError(f"max_row_tokens {capacity} is smaller than the longest example ({longest} tokens)")
    out = []
    for group in token_groups(lengths, max_tokens):
        rows = _rows([lengths[i] for i in group], capacity)
        out.append(_pack_rows([examples[i] for i in group], rows, pad_id, attention))
    return out
