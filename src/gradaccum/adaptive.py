"""``--effective-batch auto``: grow the effective batch as the measured critical batch grows.

The gradient noise scale B_simple (gradaccum.noise) predicts the critical batch: below it,
doubling the batch halves the optimizer steps needed; far above it, a bigger batch only
costs examples (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
sections 2.2-2.3, where B_crit ≈ B_simple). It is small early in training and grows as
the loss falls, so a fixed batch is too large early or too small late.

The rule, once per optimizer step:

- start with two micro-batches per window (the smallest window the estimator can read);
- when the LOWER end of the measured critical batch's 90% interval (examples; see
  ``NoiseScale.interval``) is at least twice the current effective batch, double
  ``accum_steps``: powers of two, one doubling at a time, never shrinking, never above
  ``max_effective_batch``. The micro-batch (and so memory) never changes. The point
  estimate alone is not enough: a single estimate is a noisy ratio, and a batch grown on
  noise cannot shrink back;
- wait for ``min_windows`` measured windows before the first decision and again after
  every change: single estimates are noisy (measured on the demo: one window's estimate
  jumped to 60x the settled value), and each doubling must be confirmed at the new batch;
- scale the learning rate with the batch: by the square root of the batch ratio for
  Adam-family optimizers (Malladi et al. 2022, "On the SDEs and Scaling Rules for
  Adaptive Gradient Algorithms"; Granziol et al. 2022), linearly for SGD (Goyal et al.
  2017, "Accurate, Large Minibatch SGD"); ``--lr-batch-rule none`` keeps it. ``--lr`` is the
  rate at the starting batch.

AdaptDL / Pollux (Qiao et al. 2021) adapted the batch online from the same statistic;
this is the simpler, monotone version of that idea.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

LR_RULES = ("sqrt", "linear", "none")
DEFAULT_MAX_EFFECTIVE_BATCH = 1024
"""The largest effective batch ``--effective-batch auto`` grows to unless told otherwise."""


def lr_rule_for(optimizer: torch.optim.Optimizer) -> str:
    """``linear`` for plain SGD, ``sqrt`` for Adam-family and every other adaptive optimizer."""
    import torch  # here: the command line reads this module's defaults before it imports torch

    return "linear" if isinstance(optimizer, torch.optim.SGD) else "sqrt"


@dataclass
class AdaptiveBatch:
    """The accumulation steps of ``--effective-batch auto`` and the learning-rate factor."""

    micro_batch: int
    """Examples per micro-batch per rank (fixed: memory does not change)."""
    world_size: int = 1
    """Ranks; the effective batch is micro_batch x accum_steps x world_size."""
    max_effective_batch: int = DEFAULT_MAX_EFFECTIVE_BATCH
    """Cap on the effective batch (examples)."""
    start_accum: int = 2
    """Micro-batches per window at the start (two: the estimator needs at least two)."""
    min_windows: int = 10
    """Measured windows before the batch may grow."""
    lr_rule: str | None = None
    """``sqrt`` (Adam-family), ``linear`` (SGD) or ``none``: how the learning rate follows the batch;
    None: chosen from the optimizer (:func:`lr_rule_for`) when training starts."""
    accum_steps: int = field(init=False)
    """Current micro-batches per window."""
    last_change: int = field(init=False, default=0)
    """Measured windows at the last change (the next decision waits ``min_windows`` more)."""

    def __post_init__(self) -> None:
        if self.lr_rule is not None and self.lr_rule not in LR_RULES:
            raise ValueError(f"lr_rule must be one of {LR_RULES}, got {self.lr_rule!r}")
        for name in ("micro_batch", "world_size", "start_accum", "max_effective_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.accum_steps = self.start_accum
        if self.effective_batch > self.max_effective_batch:
            raise ValueError(
                f"max_effective_batch {self.max_effective_batch} is below the starting effective batch "
                f"{self.effective_batch} (micro-batch {self.micro_batch} x {self.start_accum} x world size "
                f"{self.world_size})"
            )

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.accum_steps * self.world_size

    @property
    def start_batch(self) -> int:
        return self.micro_batch * self.start_accum * self.world_size

    def update(self, critical_batch_low: float | None, measured_windows: int) -> bool:
        """After a step: grow ``accum_steps`` if the critical batch's interval says so (its lower end,
        in examples, is at least twice the batch in use); True if it changed."""
        if critical_batch_low is None or math.isnan(critical_batch_low):
            return False
        if measured_windows - self.last_change < self.min_windows:
            return False
        doubled = 2 * self.effective_batch
        if critical_batch_low >= doubled and doubled <= self.max_effective_batch:
            self.accum_steps *= 2
            self.last_change = measured_windows
            return True
        return False

    def lr_factor(self) -> float:
        """Learning rate multiplier against the starting batch."""
        ratio = self.effective_batch / self.start_batch
        if self.lr_rule == "none":
            return 1.0
        return math.sqrt(ratio) if self.lr_rule in ("sqrt", None) else ratio

    def state_dict(self) -> dict[str, Any]:
        return {"accum_steps": self.accum_steps, "start_accum": self.start_accum,
                "max_effective_batch": self.max_effective_batch, "lr_rule": self.lr_rule,
                "last_change": self.last_change}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("start_accum", "max_effective_batch", "lr_rule"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"adaptive batch state has {key}={state.get(key)!r}, this run {getattr(self, key)!r}"
                )
        self.accum_steps = int(state["accum_steps"])
        self.last_change = int(state.get("last_change", 0))


def scale_lr(optimizer: torch.optim.Optimizer, scheduler: Any, ratio: float) -> None:
    """Multiply the learning rate by ``ratio``, now and in every later step of the schedule."""
    for g in optimizer.param_groups:
        g["lr"] *= ratio
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        # LambdaLR-style schedules recompute the lr from base_lrs every step.
        scheduler.base_lrs = [b * ratio for b in scheduler.base_lrs]
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
