"""gradaccum: exact gradient accumulation for PyTorch."""

from gradaccum import losses, noise
from gradaccum.accumulator import Accumulator, AccumulatorStateError, StepResult
from gradaccum.batching import split
from gradaccum.check import Finding, Report, check
from gradaccum.memory import BudgetTooSmall, Plan, plan
from gradaccum.trainer import Trainer

__all__ = [
    "Accumulator",
    "AccumulatorStateError",
    "BudgetTooSmall",
    "Finding",
    "Plan",
    "Report",
    "StepResult",
    "Trainer",
    "check",
    "losses",
    "noise",
    "plan",
    "split",
]
__version__ = "0.1.0"
