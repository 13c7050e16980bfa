"""gradaccum: exact gradient accumulation for PyTorch."""

from gradaccum import losses
from gradaccum.accumulator import Accumulator, AccumulatorStateError, StepResult
from gradaccum.batching import split
from gradaccum.trainer import Trainer

__all__ = ["Accumulator", "AccumulatorStateError", "StepResult", "Trainer", "losses", "split"]
__version__ = "0.1.0"
