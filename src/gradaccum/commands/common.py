"""What several commands share: the workload flags, the refused flag combinations."""

from __future__ import annotations

import argparse
from pathlib import Path

from gradaccum import sync
from gradaccum.commands import BadInput
from gradaccum.workloads import Workload, WorkloadError
from gradaccum.workloads.precision import Precision
from gradaccum.workloads.prepare import WorkloadSpec, longest_example, prepare_workload

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


def workload_spec(opts: argparse.Namespace, seed: int = 0, with_eval: bool = False,
                  large: bool = True, token_budget: bool = False) -> WorkloadSpec:
    """The --model/--data/... flags as a WorkloadSpec; ``large``: the command has the LoRA /
    FSDP2 / checkpointing flags (train, plan, bench); ``token_budget``: packed micro-batches
    are sized in tokens (train --micro-batch-tokens, or planned)."""
    return WorkloadSpec(
        model=opts.model, data=opts.data, eval_data=opts.eval_data if with_eval else None,
        max_length=opts.max_length, seed=seed, precision=opts.precision,
        lora_r=opts.lora_r if large else None, lora_alpha=opts.lora_alpha if large else None,
        lora_dropout=opts.lora_dropout if large else 0.0,
        lora_targets=tuple(opts.lora_target_modules) if large and opts.lora_target_modules else None,
        gradient_checkpointing=opts.gradient_checkpointing if large else False,
        fsdp=opts.fsdp if large else False,
        packing=opts.packing, loss_per=opts.loss_per, token_budget=opts.packing and token_budget,
    )


def load(spec: WorkloadSpec, to_device: bool = True, adapt: bool = True) -> tuple[Workload, Precision]:
    """prepare_workload, with the workload's bad input as BadInput."""
    try:
        return prepare_workload(spec, to_device=to_device, adapt=adapt)
    except WorkloadError as e:
        raise BadInput(str(e)) from None


def check_large_flags(opts: argparse.Namespace, command: str) -> None:
    """Combinations of --lora-r / --lora-alpha / --fsdp / --gradient-checkpointing that are refused
    up front (exit 2, one line, nothing touched)."""
    for flag, value in (("--lora-alpha", opts.lora_alpha), ("--lora-dropout", opts.lora_dropout or None),
                        ("--lora-target-modules", opts.lora_target_modules)):
        if value is not None and opts.lora_r is None:
            raise BadInput(f"{flag}: only with --lora-r N (it configures the LoRA adapters)")
    if not opts.fsdp:
        return
    if opts.precision == "fp16":
        raise BadInput("--precision fp16 with --fsdp: not supported (fp16 loss scaling needs FSDP's sharded "
                       "grad scaler); use --precision bf16")
    if command == "bench":
        raise BadInput("--fsdp: bench times one process and FSDP2 needs several; "
                       "plan a sharded run with `gradaccum plan --fsdp --world-size N`")
    if command == "train":
        if not sync.is_distributed():
            raise BadInput("--fsdp: shards the model over torchrun's processes; launch with "
                           "`torchrun --nproc-per-node N -m gradaccum train ... --fsdp` (without torchrun, "
                           "drop --fsdp)")
        if opts.effective_batch == "auto":
            raise BadInput("--effective-batch auto with --fsdp: not supported (the gradient noise scale it "
                           "grows with is not measured under FSDP2); give --effective-batch N")


def check_packing_flags(opts: argparse.Namespace) -> None:
    """--micro-batch-tokens is a packed micro-batch's size: refused without --packing, beside
    another way of sizing the micro-batch, and where micro-batch counts must agree over ranks."""
    if opts.micro_batch_tokens is None:
        return
    flag = f"--micro-batch-tokens {opts.micro_batch_tokens}"
    if not opts.packing:
        raise BadInput(f"{flag}: only with --packing (a token budget is what packed micro-batches hold)")
    if opts.micro_batch is not None:
        raise BadInput(f"{flag}: give --micro-batch or --micro-batch-tokens, not both")
    if opts.memory_budget is not None:
        raise BadInput(f"{flag}: the budget is given, so --memory-budget has nothing to plan; drop one")
    if opts.effective_batch == "auto":
        raise BadInput(f"{flag}: not with --effective-batch auto (it grows micro-batches of examples)")
    if opts.fsdp:
        raise BadInput(f"{flag}: not with --fsdp (its ranks must run the same number of micro-batches)")


def check_token_budget(tokens: int | None, work: Workload) -> None:
    """A token budget holds at least the longest training example (after --max-length)."""
    longest = longest_example(work)
    if tokens is not None and tokens < longest:
        raise BadInput(f"--micro-batch-tokens {tokens}: smaller than the longest training example "
                       f"({longest} tokens after --max-length); give at least {longest}")


def config_only(model: str) -> bool:
    """--model DIR is a directory with config.json but no weights (enough to plan, not to run)."""
    if model == "demo":
        return False
    p = Path(model)
    has_weights = any(any(p.glob(pattern)) for pattern in WEIGHT_FILES)
    return p.is_dir() and (p / "config.json").is_file() and not has_weights
