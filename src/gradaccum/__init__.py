"""gradaccum: exact gradient accumulation for PyTorch.

The public names load on first use (PEP 562), so ``gradaccum --help`` and the command line's
flag checks answer before torch is imported.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradaccum import losses, noise
    from gradaccum.accumulator import Accumulator, AccumulatorStateError, StepResult
    from gradaccum.batching import pack, split
    from gradaccum.check import Finding, Report, check
    from gradaccum.memory import BudgetTooSmall, Plan, plan
    from gradaccum.trainer import Trainer

_HOMES = {
    "Accumulator": "gradaccum.accumulator",
    "AccumulatorStateError": "gradaccum.accumulator",
    "StepResult": "gradaccum.accumulator",
    "split": "gradaccum.batching",
    "pack": "gradaccum.batching",
    "Finding": "gradaccum.check",
    "Report": "gradaccum.check",
    "BudgetTooSmall": "gradaccum.memory",
    "Plan": "gradaccum.memory",
    "plan": "gradaccum.memory",
    "Trainer": "gradaccum.trainer",
    "losses": None,
    "noise": None,
}
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
    "pack",
    "plan",
    "split",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'gradaccum' has no attribute {name!r}")
    home = _HOMES[name]
    value = importlib.import_module(f"gradaccum.{name}") if home is None else \
        getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES, "check"})


class _Package(types.ModuleType):
    """``ga.check`` is the function, though a submodule has the same name: importing
    ``gradaccum.check`` makes Python set the package's ``check`` to the module, which this
    property ignores (as the eager ``from gradaccum.check import check`` used to win)."""

    @property
    def check(self) -> Any:
        return importlib.import_module("gradaccum.check").check

    @check.setter
    def check(self, value: Any) -> None:
        if not isinstance(value, types.ModuleType):
            raise AttributeError("gradaccum.check is read-only")


sys.modules[__name__].__class__ = _Package
