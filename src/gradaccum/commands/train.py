"""``gradaccum train``: check the flags, claim --out, build the workload, plan, train, report."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from gradaccum import outdir, sync
from gradaccum.adaptive import DEFAULT_MAX_EFFECTIVE_BATCH, AdaptiveBatch
from gradaccum.checkpoint import CheckpointError
from gradaccum.commands import BadInput, RunFailed, bad_input, planning, report
from gradaccum.commands.common import (
    check_large_flags,
    check_packing_flags,
    check_token_budget,
    load,
    workload_spec,
)
from gradaccum.commands.defaults import (
    DEFAULT_MAX_GRAD_NORM,
    DEFAULT_STEPS,
    DEFAULT_WEIGHT_DECAY,
    MAX_STEPS,
    default_lr,
)
from gradaccum.outdir import OutDirError
from gradaccum.runlog import OutputWriteError
from gradaccum.schedules import default_warmup, warmup_then
from gradaccum.stopping import Stopped
from gradaccum.stream import BatchShape, check_divides_world, default_micro_batch
from gradaccum.trainer import Trainer
from gradaccum.workloads import Workload, WorkloadError, lora
from gradaccum.workloads.embedding import EmbeddingEval
from gradaccum.workloads.precision import Precision, device
from gradaccum.workloads.prepare import WorkloadSpec, longest_example, shard_workload

DEFAULT_AUTO_MICRO = 8  # --effective-batch auto without --micro-batch: start at 8 x 2 x world


def run(opts: argparse.Namespace) -> int:
    # Flags first (cheap, and each error names its flag), then the output directory,
    # then the data; nothing is created before all of them passed.
    try:
        outdir.check_mode(opts.resume, opts.overwrite)
    except OutDirError as e:
        raise BadInput(str(e)) from None
    check_large_flags(opts, "train")
    check_packing_flags(opts)
    _check_flag_pairs(opts)
    _check_schedule_flags(opts)
    adaptive = _adaptive_batch(opts)
    _check_batch_flags(opts)
    try:
        out = outdir.precheck(opts.out, opts.resume, opts.overwrite)
    except OutDirError as e:
        raise BadInput(str(e)) from None
    planned = opts.micro_batch == "auto" or (opts.micro_batch is None and opts.memory_budget is not None)
    spec = workload_spec(opts, seed=opts.seed, with_eval=True,
                         token_budget=opts.micro_batch_tokens is not None or planned)
    work, precision = load(spec)
    _resolve_schedule(opts, work)
    check_token_budget(opts.micro_batch_tokens, work)
    micro = _micro_batch(opts, spec, work)
    sync_every = False
    if spec.fsdp:
        sync_every = planning.fsdp_syncs_every_micro_batch(spec, work, micro, opts.memory_budget)
        try:
            shard_workload(work, precision)
        except WorkloadError as e:
            raise BadInput(str(e)) from None
    trainer = _trainer(opts, spec, work, precision, micro, out, adaptive, sync_every)
    trainer.console.notes.append(opts.data_note)  # said once the checkpoint and --out have passed
    try:
        summary = trainer.fit()
    except (CheckpointError, OutDirError) as e:
        raise BadInput(str(e)) from None
    except OutputWriteError as e:
        raise RunFailed(str(e)) from None
    except Stopped as e:
        if sync.rank() == 0:
            how = (resume_command(opts) if sync.world_size() == 1
                   else "run the same torchrun command with --resume")
            print(f"gradaccum train: {e}; resume with: {how}", file=sys.stderr, flush=True)
        return e.exit_code
    if summary["first_loss"] is None and sync.rank() == 0:
        raise RunFailed(f"all {opts.steps} steps were skipped (non-finite gradients, or no loss tokens): the "
                        f"weights did not change; check --lr, --lora-alpha and the data (outputs in {out})")
    if sync.rank() == 0:
        print(f"gradaccum: done: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} "
              f"in {summary['elapsed_s']:.1f}s; outputs in {out}", flush=True)
        for line in closing_lines(summary):
            print(f"gradaccum: {line}", flush=True)
    return 0


def _adaptive_batch(opts: argparse.Namespace) -> AdaptiveBatch | None:
    """--effective-batch auto: the growing batch, and ``opts.effective_batch`` set to its start."""
    opts.effective_batch_auto = False
    if opts.effective_batch != "auto":
        return None
    if opts.micro_batch == "auto" or opts.memory_budget is not None:
        raise BadInput("--effective-batch auto: give a fixed --micro-batch N (or none), not a memory plan")
    micro = opts.micro_batch if isinstance(opts.micro_batch, int) else DEFAULT_AUTO_MICRO
    try:
        adaptive = AdaptiveBatch(micro_batch=micro, world_size=sync.world_size(),
                                 max_effective_batch=opts.max_effective_batch or DEFAULT_MAX_EFFECTIVE_BATCH,
                                 lr_rule=opts.lr_batch_rule)
    except ValueError as e:
        raise bad_input(e) from None
    opts.effective_batch = adaptive.effective_batch
    opts.effective_batch_auto = True
    return adaptive


def _check_flag_pairs(opts: argparse.Namespace) -> None:
    """Flags that only mean something with another flag: refused alone, not silently ignored."""
    if opts.max_effective_batch is not None and opts.effective_batch != "auto":
        raise BadInput("--max-effective-batch: only with --effective-batch auto (it caps the growing batch)")
    if opts.lr_batch_rule is not None and opts.effective_batch != "auto":
        raise BadInput("--lr-batch-rule: only with --effective-batch auto (the lr follows the growing batch)")
    has_eval = opts.eval_data is not None or (opts.model == "demo" and opts.data is None)
    if opts.eval_every is not None and not has_eval:
        raise BadInput("--eval-every: only with --eval-data FILE (there is nothing to evaluate on)")


def _check_schedule_flags(opts: argparse.Namespace) -> None:
    if opts.steps is not None and opts.epochs is not None:
        raise BadInput("--epochs: give --steps or --epochs, not both")
    if opts.warmup_steps is not None and opts.warmup_ratio is not None:
        raise BadInput("--warmup-ratio: give --warmup-steps or --warmup-ratio, not both")


def _resolve_schedule(opts: argparse.Namespace, work: Workload) -> None:
    """Steps (from --epochs if given), the lr and the warm-up this workload gets, and a line saying
    what the steps mean in epochs. Sets ``opts.steps``, ``opts.lr``, ``opts.warmup``, ``opts.data_note``."""
    examples, batch = len(work.dataset), opts.effective_batch
    if opts.epochs is not None:
        opts.steps = max(1, math.ceil(opts.epochs * examples / batch))
        if opts.steps > MAX_STEPS:
            raise BadInput(f"--epochs {opts.epochs:g}: {opts.steps} steps of {batch} examples, more than "
                           f"{MAX_STEPS:.0e}")
    elif opts.steps is None:
        opts.steps = DEFAULT_STEPS
    if opts.lr is None:
        opts.lr = default_lr(opts.model, opts.lora_r is not None)
    opts.warmup = default_warmup(opts.steps)
    if opts.warmup_steps is not None:
        opts.warmup = opts.warmup_steps
    elif opts.warmup_ratio is not None:
        opts.warmup = round(opts.warmup_ratio * opts.steps)
    if opts.warmup > opts.steps:
        raise BadInput(f"--warmup-steps {opts.warmup}: longer than the run ({opts.steps} steps)")
    start = " (at the starting batch)" if opts.effective_batch_auto else ""
    epochs = opts.steps * batch / examples
    opts.data_note = (f"data: {examples} examples; an epoch is {examples / batch:.4g} steps of {batch} "
                      f"examples{start}; {opts.steps} steps cover {epochs:.3g} epochs; "
                      f"lr {opts.lr:g}, {opts.lr_scheduler} after {opts.warmup} warm-up steps")


def _check_batch_flags(opts: argparse.Namespace) -> None:
    try:
        check_divides_world(opts.effective_batch, sync.world_size())
        if isinstance(opts.micro_batch, int):
            BatchShape(opts.effective_batch, opts.micro_batch, sync.world_size())
    except ValueError as e:
        raise bad_input(e) from None


def _micro_batch(opts: argparse.Namespace, spec: WorkloadSpec, work: Workload) -> int:
    """--micro-batch N, or planned (auto, or a --memory-budget alone), or the default."""
    micro = opts.micro_batch
    if micro is None and opts.memory_budget is not None:
        micro = "auto"  # a budget with no micro-batch means: plan it
    if micro == "auto":
        from gradaccum import memory

        p = planning.plan(spec, work, opts.effective_batch, opts.memory_budget,
                          measure_noise=not opts.no_noise_scale and not spec.fsdp)
        chosen, why = int(p.micro_batch), "the largest that fits"
        if device().type == "cpu" and not spec.fsdp:
            chosen = planning.fastest_that_fits(work, p)
            why = f"the fastest of those that fit, measured on this CPU (largest that fits: {p.micro_batch})"
        if sync.rank() == 0:
            print(f"gradaccum: --micro-batch auto: {chosen}, {why}; predicted peak of the largest "
                  f"{memory.format_bytes(p.predicted_peak_bytes)} of {memory.format_bytes(p.budget_bytes)}",
                  flush=True)
        if spec.packing:
            return _as_token_budget(opts, work, chosen)
        return chosen
    if opts.micro_batch_tokens is not None:
        return opts.effective_batch // sync.world_size()  # the shape's micro-batch: one run of the window
    if micro is None:
        return default_micro_batch(opts.effective_batch // sync.world_size())
    return int(micro)


def _as_token_budget(opts: argparse.Namespace, work: Workload, examples: int) -> int:
    """--packing --micro-batch auto: the planned micro-batch of the longest example, as a token budget
    (memory follows tokens; the plan measured packed copies of that example)."""
    opts.micro_batch_tokens = examples * longest_example(work)
    if sync.rank() == 0:
        print(f"gradaccum: --packing: micro-batches of at most {opts.micro_batch_tokens} tokens "
              f"({examples} x the longest example)", flush=True)
    return opts.effective_batch // sync.world_size()


def run_config(opts: argparse.Namespace, spec: WorkloadSpec, work: Workload, precision: Precision,
               adaptive: AdaptiveBatch | None) -> dict[str, Any]:
    """What defines the run besides steps, lr, batch and seed, keyed by flag (checked on --resume).

    --fsdp and --gradient-checkpointing change nothing but rounding: not part of it, so a
    checkpoint resumes on another number of ranks, sharded or not.
    """
    config = {
        "--model": "demo" if work.kind == "demo" else work.extra_state.get("model"),
        "--data": work.fingerprint,
        "--precision": precision.label,
        "--max-length": work.info.get("max_length"),
    }
    if spec.lora_r is not None:  # only when given: checkpoints of runs without LoRA stay as they were
        config.update({"--lora-r": spec.lora_r, "--lora-alpha": spec.resolved_lora_alpha})
        if spec.lora_dropout:
            config["--lora-dropout"] = spec.lora_dropout
        if spec.lora_targets:
            config["--lora-target-modules"] = ",".join(spec.lora_targets)
    if adaptive is not None:
        config["--max-effective-batch"] = adaptive.max_effective_batch
        if opts.lr_batch_rule is not None:  # only when given: older checkpoints stay resumable
            config["--lr-batch-rule"] = opts.lr_batch_rule
    if spec.loss_per != "token":  # another objective; --packing and the budget change only rounding
        config["--loss-per"] = spec.loss_per
    # Only where they differ from the defaults: checkpoints from before these flags stay resumable.
    given = {"--lr-scheduler": (opts.lr_scheduler, "cosine"), "--warmup-steps": (opts.warmup_steps, None),
             "--warmup-ratio": (opts.warmup_ratio, None),
             "--weight-decay": (opts.weight_decay, DEFAULT_WEIGHT_DECAY),
             "--max-grad-norm": (opts.max_grad_norm, DEFAULT_MAX_GRAD_NORM)}
    config.update({flag: value for flag, (value, default) in given.items() if value != default})
    return config


def _trainer(opts: argparse.Namespace, spec: WorkloadSpec, work: Workload, precision: Precision, micro: int,
             out: Path, adaptive: AdaptiveBatch | None, sync_every: bool) -> Trainer:
    # config.json and the trackers (what trainer_options gives wins: a test's own trackers)
    reports = report.for_trainer(opts, out, micro, run_config(opts, spec, work, precision, adaptive))
    opts.trainer_options = {**reports, **opts.trainer_options}
    try:
        return Trainer(
            model=work.model, dataset=work.dataset, loss_fn=work.loss_fn, collate_fn=work.collate_fn,
            effective_batch=opts.effective_batch, micro_batch=micro, steps=opts.steps, lr=opts.lr,
            seed=opts.seed, max_grad_norm=opts.max_grad_norm or None, weight_decay=opts.weight_decay,
            scheduler_factory=lambda opt: warmup_then(opt, opts.steps, opts.lr_scheduler, opts.warmup),
            out_dir=out, checkpoint_every=opts.checkpoint_every, resume=opts.resume, overwrite=opts.overwrite,
            extra_state=work.extra_state, run_config=run_config(opts, spec, work, precision, adaptive),
            items_name=work.items, grad_dtype=work.grad_dtype, autocast_dtype=precision.autocast,
            eval_dataset=work.eval_dataset, eval_every=opts.eval_every, measure_noise=not opts.no_noise_scale,
            adaptive=adaptive, save_model=model_saver(work), final_metrics=final_metrics(work),
            sync_every_micro_batch=sync_every, micro_batch_tokens=opts.micro_batch_tokens,
            encode=work.encode, window_loss=work.window_loss, eval_fn=work.eval_fn,
            **opts.trainer_options,
        )
    except ValueError as e:
        raise bad_input(e) from None


def model_saver(work: Workload) -> Any:
    """OUT/model in save_pretrained form (safetensors weights, or the LoRA adapter alone, and the
    tokenizer when it has one); ``state_dict``: the full weights gathered from an FSDP2 model."""

    def save(model: Any, target: Path, state_dict: dict[str, Any] | None = None) -> None:
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one bar per shard at every checkpoint is noise
        try:
            (work.save_fn or lora.save_model)(model, work.tokenizer, target, state_dict=state_dict)
        finally:
            if bars:
                hf_logging.enable_progress_bar()

    return save if hasattr(work.model, "save_pretrained") else None


def final_metrics(work: Workload) -> Any:
    if isinstance(work.eval_fn, EmbeddingEval):
        return work.eval_fn.summary  # final_eval_recall_at_1
    if work.scores_fn is None:
        return None
    scores = work.scores_fn

    def metrics(model: Any) -> dict[str, Any]:
        by_kind = scores(model)
        return {"accuracy": {k: v["exact_match"] for k, v in by_kind.items()},
                "char_accuracy": {k: v["per_char"] for k, v in by_kind.items()}}

    return metrics


def closing_lines(summary: dict[str, Any]) -> list[str]:
    """What the run measured that the user should see: held-out loss and accuracy, and
    whether the effective batch was far from the measured critical batch."""
    lines = []
    if summary.get("final_eval_loss") is not None:
        lines.append(f"held-out loss {summary['final_eval_loss']:.4f}")
    if summary.get("accuracy"):
        acc = ", ".join(f"{kind} {v:.1%}" for kind, v in summary["accuracy"].items())
        lines.append(f"exact-match accuracy on held-out puzzles: {acc}")
    if summary.get("char_accuracy"):
        chars = ", ".join(f"{kind} {v:.1%}" for kind, v in summary["char_accuracy"].items())
        lines.append(f"answer characters right: {chars} (exact match counts a puzzle only when its whole "
                     "answer is right; the share of characters shows the progress before that)")
    critical, batch = summary.get("critical_batch"), summary.get("effective_batch")
    if critical is None or not batch:
        return lines
    if not critical > 0:
        lines.append("the measured gradient noise is too small to estimate a critical batch")
    else:
        lines.append(_critical_line(critical, summary.get("critical_batch_low"),
                                    summary.get("critical_batch_high"), batch))
    return lines


def _critical_line(critical: float, low: float | None, high: float | None, batch: int) -> str:
    """The critical batch against the batch in use: "well above / below" only when the whole 90%
    interval is (high None: unbounded)."""
    top = math.inf if high is None else high
    upper = "unbounded" if high is None else f"{high:.0f}"
    if low is not None and batch > 2 * top:
        verdict = ("well above it: a smaller batch (fewer accumulation steps) would reach the same loss with "
                   "fewer examples, at the price of more optimizer steps")
    elif low is not None and batch < 0.5 * low:
        verdict = ("well below it: a larger batch (more accumulation steps) would need fewer optimizer steps "
                   "for about the same examples; --effective-batch auto grows it, worth it when optimizer "
                   "steps (not examples) are what cost you")
    elif low is not None and 0.5 * batch <= low and top <= 2 * batch:
        verdict = "close to it: a good trade between examples and optimizer steps"
    else:
        span = "not yet measured" if low is None else f"{low:.0f} to {upper}"
        return (f"the critical batch has not settled yet: its 90% interval ({span} examples) is too wide to "
                f"place your effective batch {batch} above or below it; train longer before reading it")
    return (f"the measured critical batch is about {critical:.0f} examples (90% interval "
            f"{low:.0f}-{upper}); your effective batch {batch} is "
            f"{verdict}")


def resume_command(opts: argparse.Namespace) -> str:
    argv = [a for a in opts.argv if a != "--overwrite"]
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(["gradaccum", *argv])
