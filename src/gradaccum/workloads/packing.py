"""--packing and --loss-per for the language-model workloads (demo and Hugging Face).

Packed micro-batches come from :func:`gradaccum.batching.pack`; this module makes them
the workload's collate, forwards them (and padded ones) through the model, and checks
up front that the model really keeps each example to itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradaccum import losses
from gradaccum._decoder import model_dtype
from gradaccum.batching import pack
from gradaccum.workloads.errors import WorkloadError

ATTENTION_MODES = ("position_ids", "mask")
"""How a packed row can keep its examples apart, in the order tried: transformers' own packed
support (it finds the examples from ``position_ids``), else a 4-D block-causal mask."""


class PackCollator:
    """Examples -> one packed micro-batch: rows of at most ``max_row`` tokens (None: one row).

    Picklable, like :class:`~gradaccum.workloads.data.Collator`."""

    def __init__(self, pad_id: int, max_row: int | None = None, attention: str = "position_ids") -> None:
        self.pad_id = int(pad_id)
        self.max_row = max_row
        self.attention = attention

    def __call__(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        total = sum(len(ids) for ids, _ in examples)
        row = self.max_row if self.max_row is not None else total
        (batch,) = pack(examples, total, max_row_tokens=row, pad_id=self.pad_id, attention=self.attention)
        return batch


class PackedLoss:
    """``loss_fn(model, padded_batch)`` that packs the batch's rows (one example each) first:
    lets ``ga.check`` split a batch by examples and still run packed micro-batches."""

    def __init__(self, collate: Any, loss_fn: Any) -> None:
        self.collate = collate
        self.loss_fn = loss_fn

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = batch["attention_mask"].sum(-1).tolist()
        examples = [(ids[:n].tolist(), lab[:n].tolist())
                    for ids, lab, n in zip(batch["input_ids"], batch["labels"], lengths, strict=True)]
        return self.loss_fn(model, self.collate(examples))


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], per: str = "token"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, num_items)`` of a padded or packed micro-batch (``losses.causal_lm``).

    Labels are not passed to the model (its own loss is a mean). A packed batch's 4-D
    mask is cast to the model's dtype here, so one packed batch serves every precision.
    """
    kwargs = model_inputs(model, batch)
    logits = model(**kwargs).logits
    labels = batch["labels"].to(logits.device)
    if per == "sequence":
        return losses.causal_lm(logits, labels, per="sequence", position_ids=kwargs.get("position_ids"))
    return losses.causal_lm(logits, labels)


def model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The forward's arguments of a padded or packed batch, on the model's device, labels left
    out; a 4-D mask in the model's dtype; no KV cache (transformers finds packed examples from
    ``position_ids`` only without one)."""
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device), "use_cache": False}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"].to(device)
    mask = batch.get("attention_mask")
    if mask is not None:
        mask = mask.to(device)
        kwargs["attention_mask"] = _as_dtype(mask, model_dtype(model)) if mask.dim() == 4 else mask
    return kwargs


def _as_dtype(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask in ``dtype``: 0 stays 0, the blocked entries become dtype's minimum."""
    if mask.dtype == dtype:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask != 0, torch.finfo(dtype).min)


def confined_attention(model: nn.Module, vocab_size: int, flag: str = "--packing") -> str:
    """The first of :data:`ATTENTION_MODES` that really keeps packed examples apart in this
    model (verified, not assumed); WorkloadError naming ``flag`` when none does."""
    for mode in ATTENTION_MODES:
        if not leaks(model, vocab_size, mode):
            return mode
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "its attention")
    raise WorkloadError(f"{flag}: the model's attention ({impl}) cannot be confined to each packed example "
                        "(neither position_ids nor a 4-D mask keeps them apart); train without --packing")


def leaks(model: nn.Module, vocab_size: int, attention: str) -> bool:
    """Whether a packed example sees the one before it: two examples share a row, then the
    first one's tokens change; the second one's logits must not move (masked attention
    weights are exactly zero, so they stay equal to rounding of the same kernels)."""
    vocab = max(2, min(int(vocab_size), 1000))
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(vocab, (2, 5), generator=g).tolist()
    changed = [(t + 1) % vocab for t in first]
    with torch.no_grad():
        base = lm_logits(model, pack([(first, first), (second, second)], 10, attention=attention)[0], 5)
        other = lm_logits(model, pack([(changed, changed), (second, second)], 10, attention=attention)[0], 5)
    return bool((base - other).abs().max() > 1e-4 * base.abs().max())


def lm_logits(model: nn.Module, batch: dict[str, torch.Tensor], start: int) -> torch.Tensor:
    """Logits of a packed row from position ``start`` on, in eval mode (no dropout)."""
    kwargs = model_inputs(model, batch)
    was = model.training
    model.eval()
    try:
        return model(**kwargs).logits[0, start:].float()
    finally:
        model.train(was)
