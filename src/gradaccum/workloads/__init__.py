"""What a command trains: model, data, loss and collate, built from the --model/--data flags.

``build_workload`` (in :mod:`gradaccum.workloads.build`) makes the demo or a Hugging Face
causal LM workload; the submodules read data (``files``, ``data``), load models (``hf``,
``lora``, ``fsdp``), set precision (``precision``) and prepare a run (``prepare``). Every
failure caused by the user's model or data is a ``WorkloadError`` with one line naming the
flag and path. The names load on first use, so the command line checks its flags before
torch and transformers are imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradaccum.workloads.errors import WorkloadError

if TYPE_CHECKING:
    from gradaccum.workloads.build import Example, Workload, build_workload

__all__ = ["Example", "Workload", "WorkloadError", "build_workload"]


def __getattr__(name: str) -> Any:
    if name in ("Example", "Workload", "build_workload"):
        return getattr(importlib.import_module("gradaccum.workloads.build"), name)
    raise AttributeError(f"module 'gradaccum.workloads' has no attribute {name!r}")
