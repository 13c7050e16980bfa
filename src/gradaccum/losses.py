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
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss: position t predicts ``labels[..., t + 1]``.

    ``logits`` is ``(B, T, V)`` and ``labels`` is ``(B, T)``. Only the shifted,
    non-ignored labels are counted, so a sequence of L real tokens contributes L - 1.
    """
    if logits.dim() < 2 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match: "
            "expected logits (B, T, V) and labels (B, T)"
        )
    return cross_entropy(logits[..., :-1, :], labels[..., 1:], ignore_index)
