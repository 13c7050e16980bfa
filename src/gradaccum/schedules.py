"""Learning-rate schedules, one tick per optimizer step (never per micro-batch)."""

from __future__ import annotations

import math
from typing import Any

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int | None = None,
                  floor: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``floor`` x the peak lr, one tick per optimizer step."""
    warm = warmup if warmup is not None else max(1, min(20, steps // 10))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def recompute_current_lr(scheduler: Any) -> None:
    """Set the optimizer's lr to what ``scheduler`` gives for its current step now.

    After a resume that extends the run, a LambdaLR over the new total would otherwise apply
    the old schedule's last lr for one more step (it recomputes only when stepped).
    """
    if scheduler is None or isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return
    scheduler.last_epoch -= 1
    scheduler.step()  # recomputes the same step's lr, inside step() as torch wants
