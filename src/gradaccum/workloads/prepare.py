"""prepare_workload: build -> LoRA -> activation checkpointing -> device, then (under
``--fsdp``, once the micro-batch is known) shard with FSDP2.

What a command trains, in the order that keeps memory and numerics right: LoRA before
checkpointing (peft wraps the layers), the device move after both, FSDP2 last (it moves
each shard to the device itself).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch

from gradaccum import sync
from gradaccum.batching import example_length
from gradaccum.workloads import hf, lora, packing
from gradaccum.workloads.build import Workload, build_workload
from gradaccum.workloads.errors import WorkloadError
from gradaccum.workloads.precision import Precision, device, resolve


@dataclass(frozen=True)
class WorkloadSpec:
    """What to train: the model/data flags of the commands that train or measure a model."""

    model: str = "demo"
    """``demo`` or a Hugging Face model directory."""
    data: str | None = None
    """Training data file (default: the demo's generated task)."""
    eval_data: str | None = None
    """Held-out data file."""
    max_length: int | None = None
    """Cut examples to this many tokens."""
    seed: int = 0
    """Seeds the demo's model and task, and the LoRA adapters' initialisation."""
    precision: str = "auto"
    """auto | fp32 | bf16 | fp16."""
    lora_r: int | None = None
    """Train rank-r LoRA adapters instead of the weights."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (default: 2 x lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (0: the micro-batch changes nothing but rounding)."""
    lora_targets: tuple[str, ...] | None = None
    """Projections to adapt (default: every attention and MLP projection)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward."""
    fsdp: bool = False
    """Shard with FSDP2 over the torchrun ranks (see :func:`shard_workload`)."""
    packing: bool = False
    """Pack each micro-batch's examples into rows, attention confined to each example."""
    token_budget: bool = False
    """Packed micro-batches are token budgets: rows then hold at most the longest example allowed."""
    loss_per: str = "token"
    """``token``: the window's token mean; ``sequence``: the mean over sequences of their token means."""

    @property
    def resolved_lora_alpha(self) -> float | None:
        if self.lora_r is None:
            return None
        alpha = self.lora_alpha if self.lora_alpha is not None else lora.DEFAULT_ALPHA_PER_R * self.lora_r
        return float(alpha)


def prepare_workload(spec: WorkloadSpec, to_device: bool = True, adapt: bool = True
                     ) -> tuple[Workload, Precision]:
    """Build the workload, apply LoRA and checkpointing (``adapt``; the analytic planner counts
    them itself), and move it to this process's device (not under ``spec.fsdp``: FSDP2 places
    the shards). Bad input: WorkloadError (one line)."""
    precision = resolve(spec.precision, device(), fsdp=spec.fsdp, lora=spec.lora_r is not None)
    if precision.name == "bf16" and device().type == "cpu" and sync.rank() == 0:
        print("gradaccum: --precision bf16 on a CPU: most CPUs have no fast bf16 matrix kernels (measured "
              "1.4x to 8x slower than fp32); bf16 halves the weights' memory, fp32 is faster",
              file=sys.stderr, flush=True)
    work = build_workload(spec.model, spec.data, spec.eval_data, spec.max_length, spec.seed,
                          dtype=precision.weights, progress=sys.stderr.isatty() and sync.rank() == 0)
    if work.kind == "demo" and precision.weights == "bf16":
        work.model.to(torch.bfloat16)
        work.grad_dtype = torch.float32
    _say_truncated(work)
    if not adapt:
        _batching(work, spec)
        return work, precision
    if spec.lora_r is not None:
        targets = list(spec.lora_targets) if spec.lora_targets else None
        work.model = lora.apply_lora(work.model, spec.lora_r, spec.lora_alpha, seed=spec.seed,
                                     dropout=spec.lora_dropout, targets=targets)
    if spec.gradient_checkpointing:
        lora.enable_gradient_checkpointing(work.model)
    # Adapters train in fp32 whatever the base dtype: fp32 buffers only for low-precision trained weights.
    work.grad_dtype = hf.grad_dtype_for(work.model)
    if to_device and not spec.fsdp:
        work.model.to(device())
    _batching(work, spec)  # on the device: the packing check runs a few tokens through the model
    return work, precision


def shard_workload(work: Workload, precision: Precision) -> None:
    """FSDP2 over the ranks (``fully_shard`` per decoder layer, then the root), in place."""
    from gradaccum.workloads import fsdp

    param_dtype, reduce_dtype = precision.fsdp_dtypes()
    work.model = fsdp.shard_fsdp2(work.model, param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    work.grad_dtype = None  # FSDP2 holds and reduces gradients itself (reduce_dtype)


def _batching(work: Workload, spec: WorkloadSpec) -> None:
    """--packing (verified on this model: examples must not see each other) and --loss-per."""
    if spec.loss_per != "token" or spec.packing:
        work.loss_fn = functools.partial(packing.lm_loss, per=spec.loss_per)
    if not spec.packing:
        return
    vocab = work.model.get_input_embeddings().num_embeddings
    attention = packing.confined_attention(work.model, vocab)
    row = None
    if spec.token_budget:
        row = work.info.get("max_length") or longest_example(work)
    work.padded_collate_fn = work.collate_fn
    work.collate_fn = packing.PackCollator(getattr(work.collate_fn, "pad_id", 0), row, attention)
    work.info["packing"] = attention


def longest_example(work: Workload) -> int:
    """Tokens in the longest training example (the planner's worst case)."""
    return max(example_length(ex) for ex in work.dataset)


def _say_truncated(work: Workload) -> None:
    if sync.rank() != 0:
        return
    for what, n, total in (("--data", work.truncated, len(work.dataset)),
                           ("--eval-data", work.eval_truncated, len(work.eval_dataset or ()))):
        if n:
            print(f"gradaccum: {what}: {n} of {total} examples cut to --max-length "
                  f"{work.info.get('max_length')} tokens", file=sys.stderr, flush=True)


__all__ = ["WorkloadError", "WorkloadSpec", "longest_example", "prepare_workload", "shard_workload"]
