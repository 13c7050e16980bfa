"""The precision policy: what ``--precision`` means for the weights, autocast and FSDP2.

- ``auto``: bf16 autocast on a CUDA device that supports it, else fp32;
- ``bf16``: bf16 weights (half the memory), gradients accumulated in fp32 buffers;
  under FSDP2 (full fine-tune) fp32 weight shards computing in bf16 and reducing in fp32
  instead, because gradaccum cannot keep fp32 buffers for FSDP2's sharded gradients;
- ``fp16``: fp16 autocast with the engine's loss scaling, CUDA only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from gradaccum.workloads.errors import WorkloadError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class Precision:
    """The resolved ``--precision`` on this machine."""

    name: str
    """fp32 | bf16 | bf16-autocast | fp16 (``auto`` resolved)."""
    weights: str
    """The weights' dtype: ``bf16`` or ``fp32``."""
    autocast: torch.dtype | None
    """Forward passes run under ``torch.autocast`` in this dtype, or None."""
    fsdp: bool = False
    """Sharded with FSDP2: bf16 becomes FSDP2's mixed precision (see the module docstring)."""

    @property
    def label(self) -> str:
        """What a checkpoint records: FSDP2's bf16 has other numerics than bf16 weights."""
        return "bf16 (FSDP2 mixed precision)" if self.fsdp and self.name == "bf16" else self.name

    def fsdp_dtypes(self) -> tuple[torch.dtype | None, torch.dtype | None]:
        """FSDP2's MixedPrecisionPolicy (param_dtype, reduce_dtype): bf16 compute and fp32
        gradient reduction for bf16, else none."""
        import torch  # here and below: the command line reads PRECISIONS before torch is imported

        return (torch.bfloat16, torch.float32) if self.name == "bf16" else (None, None)


def resolve(name: str, device: torch.device, fsdp: bool = False, lora: bool = False) -> Precision:
    """``--precision NAME`` on ``device``; ``fsdp``/``lora``: the run shards / trains adapters."""
    import torch

    on_cuda = device.type == "cuda"
    if name not in PRECISIONS:
        raise WorkloadError(f"--precision {name}: not one of {', '.join(PRECISIONS)}")
    if name == "fp16" and not on_cuda:
        raise WorkloadError("--precision fp16: needs a CUDA device (fp16 autocast with loss scaling); "
                            "use fp32 or bf16 on CPU")
    if name == "auto":
        name = "bf16-autocast" if on_cuda and torch.cuda.is_bf16_supported() else "fp32"
    weights = "bf16" if name == "bf16" else "fp32"
    if fsdp and name == "bf16" and not lora:
        weights = "fp32"  # FSDP2 keeps fp32 weight shards and computes in bf16 instead
    autocast = {"bf16-autocast": torch.bfloat16, "fp16": torch.float16}.get(name)
    return Precision(name, weights, autocast, fsdp)


def device() -> torch.device:
    """This process's device: its CUDA device under torchrun (LOCAL_RANK), else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
