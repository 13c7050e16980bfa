"""Learning-rate schedules, one tick per optimizer step (never per micro-batch)."""

from __future__ import annotations

import math
from typing import Any

import torch


def default_warmup(steps: int) -> int:
    """Warm-up steps when none are asked for: a tenth of the run, between 1 and 20."""
    return max(1, min(20, steps // 10))


def warmup_then(optimizer: torch.optim.Optimizer, steps: int, kind: str = "cosine", warmup: int | None = None,
                floor: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then ``kind``: ``cosine`` decay to ``floor`` x the peak lr, ``linear`` decay to 0
    (as the Hugging Face Trainer), or ``constant``; one tick per optimizer step."""
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"kind must be cosine, linear or constant, got {kind!r}")
    warm = warmup if warmup is not None else default_warmup(steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, steps - warm))
        if kind == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress if kind == "linear" else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int | None = None,
                  floor: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``floor`` x the peak lr, one tick per optimizer step."""
    return warmup_then(optimizer, steps, "cosine", warmup, floor)


def recompute_current_lr(scheduler: Any) -> None:
    """Set the optimizer's lr to what ``scheduler`` gives for its current step now.

    After a resume that extends the run, a LambdaLR over the new total would otherwise apply
    the old schedule's last lr for one more step (it recomputes only when stepped).
    """
    if scheduler is None or isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return
    scheduler.last_epoch -= 1
    scheduler.step()  # recomputes the same step's lr, inside step() as torch wants
