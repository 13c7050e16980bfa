"""Held-out evaluation: the exact item-mean loss of a model over a dataset, on every rank."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gradaccum import sync
from gradaccum.accumulator import LossFn


def evaluate_loss(model: nn.Module, dataset: Sequence[Any], loss_fn: LossFn, collate_fn: Callable[..., Any],
                  micro_batch: int, autocast: Callable[[], Any] = contextlib.nullcontext) -> float:
    """Exact item-mean loss of ``model`` over ``dataset`` (Σ loss_sum / Σ num_items, all ranks)."""
    rank, world = sync.rank(), sync.world_size()
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    mine = range(rank, len(dataset), world)
    batches = math.ceil(len(mine) / micro_batch)
    if sync.is_fsdp2(model):
        # FSDP2 all-gathers weights in every forward: every rank runs as many as rank 0,
        # a rank out of examples runs one more and adds nothing.
        batches = math.ceil(math.ceil(len(dataset) / world) / micro_batch)
    try:
        with torch.no_grad(), autocast():
            for b in range(batches):
                idx = mine[b * micro_batch : (b + 1) * micro_batch]
                weight = 1.0 if len(idx) else 0.0
                batch = collate_fn([dataset[j] for j in (idx or [0])])
                loss_sum, n = loss_fn(model, batch)
                pair = [loss_sum.detach().double().cpu(), torch.as_tensor(n).double().cpu()]
                total += weight * torch.stack(pair)
    finally:
        model.train(was_training)
    if world > 1:
        total = sync.all_reduce_sum(total.to(sync.collective_device())).cpu()
    loss, items = total.tolist()
    return loss / items if items else math.nan
