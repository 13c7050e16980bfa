"""Loss helpers in the engine's contract: each returns ``(loss_sum, num_items)``.

The loss is SUM-reduced and computed in float32 (even for bf16/fp16 logits) so that
the window's total, divided once by the total item count, is the exact mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over all positions whose target is not ``ignore_index``.

    ``logits`` is ``(..., C)`` (or torch's ``(N, C, d1, ...)``) and ``targets`` is
    ``(...)``; returns the loss sum and the number of counted targets (a 0-dim int64
    tensor, so no host sync).
    """
    if (
        logits.shape[:-1] != targets.shape
        and logits.dim() >= 3
        and logits.shape[:1] + logits.shape[2:] == targets.shape
    ):
        logits = logits.movedim(1, -1)  # F.cross_entropy's class-in-dim-1 layout
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match: "
            "expected logits of shape targets.shape + (num_classes,)"
        )
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if flat_logits.dtype in (torch.float16, torch.bfloat16):
        flat_logits = flat_logits.float()  # a low-precision SUM over many tokens loses digits
    flat_targets = targets.reshape(-1)
    loss_sum = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="sum")
    return loss_sum, count_targets(flat_targets, ignore_index)


def count_targets(targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """How many entries of ``targets`` are counted (not ``ignore_index``)."""
    return (targets != ignore_index).sum()


def causal_lm(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    per: str = "token",
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss: position t predicts ``labels[..., t + 1]``.

    ``logits`` is ``(B, T, V)`` and ``labels`` is ``(B, T)``. ``per="token"`` returns (the
    sum over the shifted, non-ignored labels, their count), so a sequence of L real tokens
    contributes L - 1. ``per="sequence"`` returns (the sum over sequences of each
    sequence's token-mean, the number of sequences): a sequence is a row, or, given
    ``position_ids`` of a packed row, each run that starts where ``position_ids`` is 0.
    A sequence with no counted label counts as none.
    """
    if logits.dim() < 2 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match: "
            "expected logits (B, T, V) and labels (B, T)"
        )
    if per == "token":
        if position_ids is not None:
            raise ValueError("position_ids is only used with per='sequence'")
        return cross_entropy(logits[..., :-1, :], labels[..., 1:], ignore_index)
    if per != "sequence":
        raise ValueError(f"per must be 'token' or 'sequence', got {per!r}")
    return _per_sequence(logits, labels, ignore_index, position_ids)


def sequence_ids(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One id per position, distinct across rows and across the examples packed in a row
    (a new one wherever ``position_ids`` is 0); same shape as ``labels``."""
    rows = labels.reshape(-1, labels.shape[-1])
    if position_ids is None:
        ids = torch.arange(rows.shape[0], device=labels.device).unsqueeze(1).expand_as(rows)
        return ids.reshape(labels.shape)
    if position_ids.shape != labels.shape:
        raise ValueError(
            f"position_ids {tuple(position_ids.shape)} must match labels {tuple(labels.shape)}"
        )
    starts = position_ids.reshape(rows.shape) == 0
    starts[:, 0] = True  # a row always starts a sequence, whatever its first position
    ids = starts.flatten().cumsum(0) - 1  # row-major, so ids never collide across rows
    return ids.reshape(labels.shape)


def _per_sequence(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, position_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    # The label at t + 1 belongs to the sequence of position t + 1: in a packed row the
    # first label of each example is masked, so no example is predicted from another.
    ids = sequence_ids(labels, position_ids)[..., 1:].reshape(-1)
    targets = labels[..., 1:].reshape(-1)
    flat = logits[..., :-1, :].reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    per_token = F.cross_entropy(flat, targets, ignore_index=ignore_index, reduction="none")
    counted = targets != ignore_index
    size = labels.numel()
    sums = per_token.new_zeros(size).index_add_(0, ids, per_token)
    counts = torch.zeros(size, dtype=torch.int64, device=labels.device).index_add_(
        0, ids, counted.long()
    )
    has = counts > 0
    means = sums / counts.clamp(min=1).to(sums.dtype)
    return (means * has).sum(), has.sum()


def info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    temperature: float | torch.Tensor,
    negatives: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Contrastive loss with in-batch negatives (InfoNCE; sentence-transformers'
    MultipleNegativesRankingLoss is this with ``temperature = 1 / scale = 0.05``).

    Row i of ``queries`` ``(N, D)`` is scored against every key: its positive ``keys[i]``,
    the other N - 1 keys ``(N, D)``, and every row of ``negatives`` ``(M, D)`` (hard
    negatives, appended to the candidates). The score is the COSINE similarity divided by
    ``temperature`` (a float, or a 0-dim tensor: a learnable temperature gets its gradient);
    the loss is the cross-entropy of row i's scores against its positive. Returns (the sum
    over the N rows, N). It couples the rows, so it is not a sum over micro-batches: use it as
    ``window_loss`` in ``Accumulator.step_cached``, which computes it on the whole window.
    """
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape != keys.shape:
        raise ValueError(
            f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must both be (N, D), "
            "row i of keys the positive of row i of queries"
        )
    candidates = keys
    if negatives is not None:
        if negatives.dim() != 2 or negatives.shape[1] != keys.shape[1]:
            raise ValueError(f"negatives {tuple(negatives.shape)} must be (M, {keys.shape[1]})")
        candidates = torch.cat([keys, negatives])
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a single number, got shape {tuple(temperature.shape)}")
        temperature = temperature.reshape(())
    elif not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    low = (torch.float16, torch.bfloat16)
    q = F.normalize(queries.float() if queries.dtype in low else queries, dim=-1)
    c = F.normalize(candidates.float() if candidates.dtype in low else candidates, dim=-1)
    scores = q @ c.T / temperature
    targets = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(scores, targets, reduction="sum"), int(q.shape[0])
