"""gradaccum: exact gradient accumulation for PyTorch."""

from gradaccum import losses
from gradaccum.accumulator import Accumulator, AccumulatorStateError, StepResult
from gradaccum.batching import split
from gradaccum.memory import BudgetTooSmall, Plan, plan
from gradaccum.trainer import Trainer

__all__ = [
    "Accumulator",
    "AccumulatorStateError",
    "BudgetTooSmall",
    "Plan",
    "StepResult",
    "Trainer",
    "losses",
    "plan",
    "split",
]
__version__ = "0.1.0"
