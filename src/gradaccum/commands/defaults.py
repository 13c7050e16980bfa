"""The command line's defaults, where a default depends on what is trained (no torch here: the
parser reads them)."""

from __future__ import annotations

DEFAULT_STEPS = 600
"""Optimizer steps of a run given neither --steps nor --epochs."""
MAX_STEPS = 10**9
"""More optimizer steps than any real run: refused up front."""
DEFAULT_LR = 3e-3
"""The built-in demo's learning rate (a small model trained from scratch)."""
DEFAULT_LR_FULL = 5e-5
"""--model DIR, full fine-tune: the Hugging Face Trainer's default."""
DEFAULT_LR_LORA = 2e-4
"""--model DIR with --lora-r: what LoRA recipes use."""
DEFAULT_WEIGHT_DECAY = 0.01
"""AdamW's decoupled weight decay."""
DEFAULT_MAX_GRAD_NORM = 1.0
"""Clip the accumulated gradient's L2 norm to this (0: no clipping)."""
SCHEDULES = ("cosine", "linear", "constant")
"""After the linear warm-up: cosine to 10% of the peak, linear to 0 (as the HF Trainer), constant."""


def default_lr(model: str, lora: bool) -> float:
    """--lr when none is given: the demo's, a full fine-tune's or LoRA's."""
    if model == "demo":
        return DEFAULT_LR
    return DEFAULT_LR_LORA if lora else DEFAULT_LR_FULL
