"""``gradaccum plan``: the largest micro-batch that fits the memory budget, and the table behind it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gradaccum import memory, sync
from gradaccum.commands import BadInput, bad_input, planning
from gradaccum.commands.common import check_large_flags, config_only, load, workload_spec
from gradaccum.memory import AnalyticEstimate
from gradaccum.stream import check_divides_world
from gradaccum.workloads import WorkloadError, hf
from gradaccum.workloads.precision import device, resolve
from gradaccum.workloads.prepare import WorkloadSpec, longest_example


def run(opts: argparse.Namespace) -> int:
    check_large_flags(opts, "plan")
    if opts.world_size is not None and sync.world_size() > 1 and opts.world_size != sync.world_size():
        raise BadInput(f"--world-size {opts.world_size}: differs from torchrun's {sync.world_size()}")
    world = opts.world_size or sync.world_size()
    try:
        check_divides_world(opts.effective_batch, world)
    except ValueError as e:
        raise bad_input(e) from None
    spec = workload_spec(opts, token_budget=True)  # --packing plans a token budget
    if spec.fsdp or config_only(opts.model):
        return _analytic(opts, spec, world)
    work, _ = load(spec)
    p = planning.plan(spec, work, opts.effective_batch, opts.memory_budget, world)
    if sync.rank() != 0:
        return 0
    tokens = {"micro_batch_tokens": p.micro_batch * longest_example(work)} if spec.packing else {}
    if opts.json:
        print(json.dumps({**p.to_json(), "method": "measured", **tokens}))
        return 0
    planning.print_plan(p)
    if tokens:
        n = tokens["micro_batch_tokens"]
        print(f"packing: micro-batches of at most {n} tokens ({p.micro_batch} x the longest example, in rows "
              f"of at most {work.info.get('max_length')}): train --packing --micro-batch-tokens {n}")
    return 0


def _model_for_estimate(opts: argparse.Namespace, spec: WorkloadSpec) -> tuple[Any, int]:
    """(model with real shapes, sequence length): the demo built, or a directory's config alone."""
    if opts.model == "demo":
        work, _ = load(spec, to_device=False, adapt=False)
        return work.model, int(work.info["max_length"])
    precision = resolve(spec.precision, device(), fsdp=spec.fsdp, lora=spec.lora_r is not None)
    try:
        model = hf.load_config_only(opts.model, dtype=precision.weights)
    except WorkloadError as e:
        raise BadInput(str(e)) from None
    context = hf.max_positions(model.config)
    if opts.max_length is not None and context is not None and opts.max_length > context:
        raise BadInput(f"--max-length {opts.max_length}: longer than the model's context ({context} tokens)")
    seq_len = opts.max_length or context
    if seq_len is None:
        raise BadInput(f"--max-length: required (the config of --model {opts.model} names no context length)")
    return model, seq_len


def _analytic(opts: argparse.Namespace, spec: WorkloadSpec, world: int) -> int:
    """plan from the analytic estimate: --fsdp (sharding is not measurable in one process) or a
    --model directory with config.json only (no weights or tokenizer are read)."""
    model, seq_len = _model_for_estimate(opts, spec)
    if spec.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise BadInput(f"--gradient-checkpointing: {type(model).__name__} does not support it")
    try:
        p, est, every = planning.analytic_plan(spec, model, opts.effective_batch, seq_len, world,
                                               planning.budget_bytes(opts.memory_budget))
    except memory.BudgetTooSmall as e:
        raise BadInput(f"--memory-budget {memory.format_bytes(e.budget_bytes)}: {e}") from None
    except ValueError as e:
        raise BadInput(f"--model {opts.model}: cannot estimate its memory ({e})") from None
    if sync.rank() != 0:
        return 0
    if opts.json:
        print(json.dumps({**p.to_json(), "method": "analytic", "seq_len": seq_len,
                          "sync_every_micro_batch": every, "estimate": est.to_json()}))
        return 0
    _print_estimate(opts, spec, world, p, est, seq_len, every)
    return 0


def _print_estimate(opts: argparse.Namespace, spec: WorkloadSpec, world: int, p: memory.Plan,
                    e: AnalyticEstimate, seq_len: int, every: bool) -> None:
    why = "--fsdp" if spec.fsdp else "config.json only"
    mode = ", ".join(x for x in (f"LoRA r={spec.lora_r}" if spec.lora_r else "full fine-tune",
                                 f"FSDP2 over {world}" if spec.fsdp else "",
                                 "activation checkpointing" if spec.gradient_checkpointing else "") if x)
    print(f"analytic estimate ({why}): {e.total_params / 1e9:.3g} B parameters, "
          f"{e.trainable_params / 1e6:.4g} M trained; {mode}; sequence length {seq_len}")
    planning.print_plan(p, header="; per rank")
    f = memory.format_bytes
    print(f"per rank at micro-batch {p.micro_batch}: weights {f(e.params_bytes)}, gathered "
          f"{f(e.unsharded_params_bytes)}, gradients {f(e.grad_bytes + e.accum_buffer_bytes)}, held "
          f"{f(e.held_grad_bytes)}, optimizer {f(e.optimizer_state_bytes)}, activations "
          f"{f(e.activation_bytes)}, transient {f(e.transient_bytes)}")
    if every:
        print("--fsdp: a window's unsharded gradients do not fit: train reduce-scatters on every micro-batch")
