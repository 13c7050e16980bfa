"""Command-line front end: ``gradaccum train | plan | bench | compare | check | generate``
(``python -m gradaccum`` too): argparse and dispatch; what a command trains is built in
:mod:`gradaccum.workloads`, the commands that are more than a flag live in their own modules.

Exit codes: 0 done, 2 bad input (one line naming the flag or file; nothing in --out
touched), 1 anything else (one line when a write fails, e.g. a full disk), 130 / 143
stopped by SIGINT / SIGTERM after saving a checkpoint (resume with --resume).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn

from gradaccum import sync

DEFAULT_OUT = "runs/gradaccum"
DEFAULT_STEPS = 600
DEFAULT_LR = 3e-3
DEFAULT_MICRO_CAP = 16  # default micro-batch: the largest divisor of the per-rank batch up to this
TASK_SIZE = 20_000  # generated examples in the default task (several epochs over a default run)
MAX_EFFECTIVE_BATCH = 2**20  # examples per optimizer step: far beyond any real run, refused up front
MAX_STEPS = 10**9
MAX_SEED = 2**32 - 1
MAX_REPEATS = 1000
DEFAULT_MAX_AUTO_BATCH = 1024  # --effective-batch auto grows up to this many examples
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MAX_LORA_R = 65536
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


class BadInput(Exception):
    """Bad flags, files or configs: exit code 2 with a one-line message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints usage plus the error; we promise one line.
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default: "(default: X)" unless the help already says it, or X is None/False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action) or text


def _int_at_least(low: int, high: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {_short_int(v)}")
        return v

    return parse


def _short_int(v: int) -> str:
    text = str(v)
    return text if len(text) <= 20 else f"{text[:6]}...({len(text)} digits)"


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)
_batch_int = _int_at_least(1, MAX_EFFECTIVE_BATCH)


def _micro(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else _batch_int(text)


_effective = _micro  # N or "auto"


def _lr(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _size(text: str) -> int:
    from gradaccum.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from gradaccum import __version__

    p = _Parser(prog="gradaccum", description="Exact gradient accumulation for PyTorch.",
                formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"gradaccum {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,plan,bench,compare,check,generate}",
                           parser_class=_Parser)
    t = sub.add_parser("train", formatter_class=_HelpFormatter,
                       help="train the built-in demo, or --model DIR on --data FILE, with accumulation")
    _add_common(t, auto=True)
    t.add_argument("--max-effective-batch", type=_batch_int, default=DEFAULT_MAX_AUTO_BATCH, metavar="N",
                   help="with --effective-batch auto: the largest effective batch it may grow to")
    t.add_argument("--eval-data", default=None, metavar="FILE",
                   help="held-out data in --data's formats: its exact item-mean loss is logged as eval_loss "
                        "(the demo evaluates on held-out generated puzzles)")
    t.add_argument("--eval-every", type=_non_negative_int, default=None, metavar="N",
                   help="evaluate every N steps and at the end (default: ten times per run; "
                        "0: only at the end)")
    t.add_argument("--no-noise-scale", action="store_true",
                   help="do not measure the gradient noise scale / critical batch")
    t.add_argument("--micro-batch", type=_micro, default=None, metavar="N|auto",
                   help="examples per forward/backward (default: the largest divisor of the per-rank "
                        f"batch up to {DEFAULT_MICRO_CAP}; auto: plan it from --memory-budget)")
    t.add_argument("--steps", type=_int_at_least(1, MAX_STEPS), default=DEFAULT_STEPS, metavar="N",
                   help="optimizer steps in the whole run")
    t.add_argument("--lr", type=_lr, default=DEFAULT_LR, metavar="F",
                   help="peak learning rate (AdamW, linear warm-up then cosine decay)")
    t.add_argument("--seed", type=_int_at_least(0, MAX_SEED), default=0, metavar="N",
                   help="seeds data order and initialisation")
    t.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help="output directory")
    t.add_argument("--resume", action="store_true",
                   help="continue exactly from OUT/checkpoint.pt (the flags that define the run must match)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, such an --out is refused)")
    t.add_argument("--checkpoint-every", type=_non_negative_int, default=50, metavar="N",
                   help="save a checkpoint every N steps (0: only at the end; always on SIGTERM/SIGINT)")
    pl = sub.add_parser("plan", help="choose the micro-batch that fits a memory budget",
                        formatter_class=_HelpFormatter)
    _add_common(pl)
    pl.add_argument("--world-size", type=_int_at_least(1, 1 << 20), default=None, metavar="N",
                    help="plan for N ranks from this one process (default: torchrun's world size, or 1); "
                         "with --fsdp, the number of shards")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    b = sub.add_parser("bench", help="throughput (examples/s) of each micro-batch that fits",
                       formatter_class=_HelpFormatter)
    _add_common(b)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--out", default="runs/bench", metavar="DIR",
                   help="directory for bench.png and bench.json")
    b.add_argument("--repeats", type=_int_at_least(1, MAX_REPEATS), default=3, metavar="N",
                   help="timed windows per micro-batch")
    c = sub.add_parser("compare", formatter_class=_HelpFormatter,
                       help="full batch vs accumulated vs mean-of-means vs small batch, in one picture")
    _add_workload(c)
    c.add_argument("--effective-batch", type=_batch_int, default=64, metavar="N",
                   help="examples per optimizer step")
    c.add_argument("--micro-batch", type=_batch_int, default=8, metavar="N",
                   help="examples per micro-batch (and the batch of 'small')")
    c.add_argument("--steps", type=_int_at_least(1, 100_000), default=40, metavar="N",
                   help="optimizer steps of the effective batch")
    c.add_argument("--lr", type=_lr, default=DEFAULT_LR, metavar="F", help="learning rate (AdamW, constant)")
    c.add_argument("--seed", type=_int_at_least(0, MAX_SEED), default=0, metavar="N",
                   help="seeds data order and initialisation")
    c.add_argument("--memory-budget", type=_size, default=None, metavar="SIZE",
                   help="memory 'full' may use (default: as for plan)")
    c.add_argument("--out", default="runs/compare", metavar="DIR",
                   help="directory for compare.json and compare.png")
    c.add_argument("--json", action="store_true", help="print compare.json's content instead of the table")
    k = sub.add_parser("check", help="is a model + loss function accumulation-safe? (exit 1 if not)",
                       formatter_class=_HelpFormatter)
    k.add_argument("target", nargs="?", default=None, metavar="TARGET",
                   help="FILE.py:FUNCTION or module:function returning (model, loss_fn, batch); "
                        "without it, the --model/--data workload is checked")
    _add_workload(k)
    k.add_argument("--micro-batch", type=_batch_int, default=2, metavar="N",
                   help="micro-batch size to compare against the full batch")
    k.add_argument("--batch", type=_batch_int, default=8, metavar="N",
                   help="without TARGET: examples of --data in the checked batch")
    g = sub.add_parser("generate", help="greedy completion from a model directory (e.g. OUT/model)",
                       formatter_class=_HelpFormatter)
    g.add_argument("--model", required=True, metavar="DIR", help="a Hugging Face model directory")
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    g.add_argument("--max-new-tokens", type=_int_at_least(1, 100_000), default=64, metavar="N",
                   help="tokens to generate at most")
    return p


def _add_large(p: argparse.ArgumentParser) -> None:
    """Issue 12's flags: LoRA, FSDP2 and activation checkpointing (train, plan, bench)."""
    p.add_argument("--lora-r", type=_int_at_least(1, MAX_LORA_R), default=None, metavar="N",
                   help="train rank-N LoRA adapters on every attention and MLP projection (base weights "
                        "frozen, adapters seeded by --seed, dropout 0); OUT/model holds the adapter")
    p.add_argument("--lora-alpha", type=_lr, default=None, metavar="F",
                   help="LoRA scaling numerator (default: 2 x --lora-r)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and optimizer state over the torchrun ranks with FSDP2 "
                        "(one fully_shard per decoder layer, then the root) instead of DDP")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder layer's activations in the backward: less memory, same "
                        "gradients")


def _add_common(p: argparse.ArgumentParser, auto: bool = False) -> None:
    p.add_argument("--effective-batch", type=_effective if auto else _batch_int, default=128,
                   metavar="N|auto" if auto else "N",
                   help="examples per optimizer step over all ranks"
                        + ("; auto: start at two micro-batches and grow with the measured critical batch"
                           if auto else ""))
    p.add_argument("--memory-budget", type=_size, default=None, metavar="SIZE",
                   help="bytes available, e.g. 2GiB, 500MB (default: the free memory of the CUDA device; "
                        "on CPU, half of the available RAM)")
    _add_workload(p)
    _add_large(p)


def _add_workload(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", metavar="demo|DIR",
                   help="'demo' (the built-in GPT-2) or a Hugging Face causal-LM directory (config, weights, "
                        "tokenizer: what save_pretrained writes)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help=".txt (one example per non-empty line) or .jsonl/.json with text, prompt+completion "
                        "or messages (default: the built-in generated task; required with --model DIR)")
    p.add_argument("--max-length", type=_int_at_least(3, 10**7), default=None, metavar="N",
                   help="cut examples to N tokens (default: the model's context; demo: 128)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on a CUDA device that supports it, else fp32; bf16: bf16 "
                        "weights with fp32 gradient accumulation; fp16: fp16 autocast with loss scaling "
                        "(CUDA only)")


class Precision:
    """What ``--precision`` means on this machine: the weights' dtype and autocast's."""

    def __init__(self, name: str, device: Any) -> None:
        import torch

        on_cuda = device.type == "cuda"
        if name == "fp16" and not on_cuda:
            raise BadInput("--precision fp16: needs a CUDA device (fp16 autocast with loss scaling); "
                           "use fp32 or bf16 on CPU")
        if name == "auto":
            name = "bf16-autocast" if on_cuda and torch.cuda.is_bf16_supported() else "fp32"
        self.name = name
        self.weights = "bf16" if name == "bf16" else "fp32"
        """bf16: the weights themselves (half the memory); gradients accumulate in fp32 buffers."""
        self.autocast = {"bf16-autocast": torch.bfloat16, "fp16": torch.float16}.get(name)


def load_workload(args: argparse.Namespace, seed: int | None = None, with_eval: bool = True) -> Any:
    """The --model/--data/--eval-data/--max-length workload; bad input -> BadInput (one line)."""
    from gradaccum.workloads import WorkloadError, build_workload

    precision = Precision(getattr(args, "precision", "fp32"), _device())
    if getattr(args, "fsdp", False) and precision.name == "bf16" and getattr(args, "lora_r", None) is None:
        # Under FSDP2 gradaccum cannot keep fp32 gradient buffers (grad_dtype) for bf16 weights:
        # FSDP2 keeps fp32 weight shards and computes in bf16 (MixedPrecisionPolicy) instead.
        precision.weights = "fp32"
    try:
        work = build_workload(
            args.model, args.data, getattr(args, "eval_data", None) if with_eval else None,
            args.max_length, args.seed if seed is None else seed,
            dtype=precision.weights, progress=sys.stderr.isatty() and sync.rank() == 0,
        )
    except WorkloadError as e:
        raise BadInput(str(e)) from None
    if work.kind == "demo" and precision.weights == "bf16":
        import torch

        work.model.to(torch.bfloat16)
        work.grad_dtype = torch.float32
    work.precision = precision
    if sync.rank() == 0:
        for what, n, total in (("--data", work.truncated, len(work.dataset)),
                               ("--eval-data", work.eval_truncated, len(work.eval_dataset or ()))):
            if n:
                print(f"gradaccum: {what}: {n} of {total} examples cut to --max-length "
                      f"{work.info.get('max_length')} tokens", file=sys.stderr, flush=True)
    return work


# --------------------------------------------------------------------------- LoRA, FSDP2, checkpointing
def _check_large_flags(args: argparse.Namespace, command: str) -> None:
    """Combinations of --lora-r / --lora-alpha / --fsdp / --gradient-checkpointing that are refused
    up front (exit 2, one line, nothing touched)."""
    if getattr(args, "lora_alpha", None) is not None and getattr(args, "lora_r", None) is None:
        raise BadInput("--lora-alpha: only with --lora-r N (it scales the LoRA adapters)")
    if not getattr(args, "fsdp", False):
        return
    if args.precision == "fp16":
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
        if args.effective_batch == "auto":
            raise BadInput("--effective-batch auto with --fsdp: not supported (the gradient noise scale it "
                           "grows with is not measured under FSDP2); give --effective-batch N")


def _has_weights(path: str) -> bool:
    p = Path(path)
    return any(any(p.glob(pattern)) for pattern in WEIGHT_FILES)


def _config_only(args: argparse.Namespace) -> bool:
    """--model DIR is a directory with config.json but no weights (enough to plan, not to run)."""
    if args.model == "demo":
        return False
    p = Path(args.model)
    return p.is_dir() and (p / "config.json").is_file() and not _has_weights(args.model)


def _apply_large(args: argparse.Namespace, work: Any) -> None:
    """LoRA (seeded by --seed), then activation checkpointing, on the loaded model, in place."""
    from gradaccum.workloads import WorkloadError, hf, lora

    try:
        if getattr(args, "lora_r", None) is not None:
            seed = getattr(args, "seed", 0)  # plan and bench have no --seed: the init does not change memory
            work.model = lora.apply_lora(work.model, args.lora_r, args.lora_alpha, seed=seed)
        if getattr(args, "gradient_checkpointing", False):
            lora.enable_gradient_checkpointing(work.model)
    except WorkloadError as e:
        raise BadInput(str(e)) from None
    # Adapters train in fp32 whatever the base dtype: fp32 buffers only for low-precision trained weights.
    work.grad_dtype = hf.grad_dtype_for(work.model)


def _lora_alpha(args: argparse.Namespace) -> float | None:
    from gradaccum.workloads.lora import DEFAULT_ALPHA_PER_R

    if getattr(args, "lora_r", None) is None:
        return None
    return float(args.lora_alpha if args.lora_alpha is not None else DEFAULT_ALPHA_PER_R * args.lora_r)


def _fsdp_dtypes(precision: Any) -> tuple[Any, Any]:
    """FSDP2's MixedPrecisionPolicy for --precision: bf16 compute and fp32 gradient reduction
    (then FSDP2 also holds a window's unsharded gradients in fp32), else none."""
    import torch

    if precision.name == "bf16":
        return torch.bfloat16, torch.float32
    return None, None


def _estimate_kwargs(args: argparse.Namespace, model: Any, fsdp: bool) -> dict[str, Any]:
    from gradaccum._analytic import _model_dtype

    return {"lora_r": getattr(args, "lora_r", None), "fsdp": fsdp,
            "gradient_checkpointing": bool(getattr(args, "gradient_checkpointing", False)),
            "dtype": _model_dtype(model)}


def _longest(work: Any) -> int:
    return max(len(ex[0]) for ex in work.dataset)


def _min_budget(args: argparse.Namespace) -> int:
    """--memory-budget, or the default budget; the smallest over the ranks (collective)."""
    from gradaccum import memory

    budget = args.memory_budget if args.memory_budget is not None else memory.default_budget_bytes(_device())
    if sync.world_size() > 1:
        import torch
        import torch.distributed as dist

        t = torch.tensor([budget], dtype=torch.int64, device=sync.collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        budget = int(t.item())
    return budget


def _shard(args: argparse.Namespace, work: Any, micro: int) -> bool:
    """--fsdp: shard the (LoRA / checkpointed) model with FSDP2; returns whether to reduce-scatter
    on every micro-batch (the planner predicts the window's held gradients do not fit)."""
    from gradaccum import memory
    from gradaccum.workloads import WorkloadError, fsdp

    kwargs = _estimate_kwargs(args, work.model, fsdp=True)
    kwargs.pop("fsdp")
    budget = _min_budget(args)
    every = memory.fsdp_needs_sync_every_micro_batch(work.model, micro, _longest(work), budget,
                                                     sync.world_size(), **kwargs)
    param_dtype, reduce_dtype = _fsdp_dtypes(work.precision)
    try:
        work.model = fsdp.shard_fsdp2(work.model, param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    except WorkloadError as e:
        raise BadInput(str(e)) from None
    work.grad_dtype = None  # FSDP2 holds and reduces gradients itself (reduce_dtype)
    if every and sync.rank() == 0:
        print(f"gradaccum: --fsdp: a window's unsharded gradients are predicted not to fit "
              f"{memory.format_bytes(budget)}: reduce-scattering on every micro-batch instead of once per "
              f"window (same result, more communication)", flush=True)
    return every


def default_micro_batch(per_rank: int, cap: int = DEFAULT_MICRO_CAP) -> int:
    from gradaccum.memory import candidate_micro_batches

    return max(d for d in candidate_micro_batches(per_rank) if d <= cap)


def cmd_train(args: argparse.Namespace) -> int:
    from gradaccum.adaptive import AdaptiveBatch
    from gradaccum.checkpoint import CheckpointError
    from gradaccum.runlog import OutDirError, OutputWriteError
    from gradaccum.trainer import Stopped, Trainer

    # Flags first (cheap, and each error names its flag), then the output directory,
    # then the data; nothing is created before all of them passed.
    if args.resume and args.overwrite:
        raise BadInput("--resume and --overwrite contradict each other: give one")
    _check_large_flags(args, "train")
    world = sync.world_size()
    auto = args.effective_batch == "auto"
    if auto:
        if args.micro_batch == "auto" or args.memory_budget is not None:
            raise BadInput("--effective-batch auto: give a fixed --micro-batch N (or none), "
                           "not a memory plan")
        micro = args.micro_batch if isinstance(args.micro_batch, int) else DEFAULT_AUTO_MICRO
        try:
            adaptive = AdaptiveBatch(micro_batch=micro, world_size=world,
                                     max_effective_batch=args.max_effective_batch)
        except ValueError as e:
            raise BadInput(str(e)) from None
        args.effective_batch = adaptive.effective_batch
    else:
        adaptive = None
        if args.effective_batch % world:
            raise BadInput(f"--effective-batch {args.effective_batch} is not divisible by the world size "
                           f"{world}")
    per_rank = args.effective_batch // world
    if isinstance(args.micro_batch, int):
        try:
            from gradaccum.trainer import _check_sizes

            _check_sizes(args.effective_batch, args.micro_batch, world)
        except ValueError as e:
            raise BadInput(str(e)) from None
    out = _checked_out(args.out, args.resume, args.overwrite)
    work = load_workload(args)
    _apply_large(args, work)
    if not args.fsdp:
        work.model.to(_device())  # FSDP2 moves each shard to the device as it shards
    micro = args.micro_batch
    if micro is None and args.memory_budget is not None:
        micro = "auto"  # a budget with no micro-batch means: plan it
    if micro == "auto":
        micro = _auto_micro_batch(args, work)
    elif micro is None:
        micro = default_micro_batch(per_rank)
    sync_every = _shard(args, work, micro) if args.fsdp else False
    precision_name = work.precision.name
    if args.fsdp and precision_name == "bf16":
        precision_name = "bf16 (FSDP2 mixed precision)"  # other numerics than bf16 weights without --fsdp
    # --fsdp and --gradient-checkpointing change nothing but rounding: not part of what defines
    # the run, so a checkpoint resumes on another number of ranks, sharded or not.
    run_config = {
        "--model": "demo" if work.kind == "demo" else work.extra_state.get("model"),
        "--data": work.fingerprint,
        "--precision": precision_name,
        "--max-length": work.info.get("max_length"),
    }
    if args.lora_r is not None:  # only when given: checkpoints of runs without LoRA stay as they were
        run_config.update({"--lora-r": args.lora_r, "--lora-alpha": _lora_alpha(args)})
    if adaptive is not None:
        run_config["--max-effective-batch"] = args.max_effective_batch
    try:
        trainer = Trainer(
            model=work.model,
            dataset=work.dataset,
            loss_fn=work.loss_fn,
            collate_fn=work.collate_fn,
            effective_batch=args.effective_batch,
            micro_batch=micro,
            steps=args.steps,
            lr=args.lr,
            seed=args.seed,
            scheduler_factory=lambda opt: warmup_cosine(opt, args.steps),
            out_dir=out,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            overwrite=args.overwrite,
            extra_state=work.extra_state,
            run_config=run_config,
            items_name="tokens",
            grad_dtype=work.grad_dtype,
            autocast_dtype=work.precision.autocast,
            eval_dataset=work.eval_dataset,
            eval_every=args.eval_every,
            measure_noise=not args.no_noise_scale,
            adaptive=adaptive,
            save_model=_model_saver(work),
            final_metrics=_final_metrics(work),
            sync_every_micro_batch=sync_every,
        )
    except ValueError as e:
        raise BadInput(str(e)) from None
    try:
        summary = trainer.fit()
    except (CheckpointError, OutDirError) as e:
        raise BadInput(str(e)) from None
    except OutputWriteError as e:
        raise RunFailed(str(e)) from None
    except Stopped as e:
        if sync.rank() == 0:
            how = ("run the same torchrun command with --resume" if world > 1
                   else f"{_resume_command(args)}")
            print(f"gradaccum train: {e}; resume with: {how}", file=sys.stderr, flush=True)
        return e.exit_code
    if sync.rank() == 0:
        print(
            f"gradaccum: done: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} "
            f"in {summary['elapsed_s']:.1f}s; outputs in {out}",
            flush=True,
        )
        for line in _closing_lines(summary):
            print(f"gradaccum: {line}", flush=True)
    return 0


DEFAULT_AUTO_MICRO = 8  # --effective-batch auto without --micro-batch: start at 8 x 2 x world


def _model_saver(work: Any) -> Any:
    """OUT/model in save_pretrained form (safetensors weights, or the LoRA adapter alone, and the
    tokenizer when it has one); ``state_dict``: the full weights gathered from an FSDP2 model."""
    from gradaccum.workloads import lora

    def save(model: Any, target: Path, state_dict: dict[str, Any] | None = None) -> None:
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one bar per shard at every checkpoint is noise
        try:
            lora.save_model(model, work.tokenizer, target, state_dict=state_dict)
        finally:
            if bars:
                hf_logging.enable_progress_bar()

    return save if hasattr(work.model, "save_pretrained") else None


def _final_metrics(work: Any) -> Any:
    if work.accuracy_fn is None:
        return None
    return lambda model: {"accuracy": work.accuracy_fn(model)}


def _closing_lines(summary: dict[str, Any]) -> list[str]:
    """What the run measured that the user should see: held-out loss and accuracy, and
    whether the effective batch was far from the measured critical batch."""
    lines = []
    if summary.get("final_eval_loss") is not None:
        lines.append(f"held-out loss {summary['final_eval_loss']:.4f}")
    if summary.get("accuracy"):
        acc = ", ".join(f"{kind} {v:.1%}" for kind, v in summary["accuracy"].items())
        lines.append(f"exact-match accuracy on held-out puzzles: {acc}")
    critical, batch = summary.get("critical_batch"), summary.get("effective_batch")
    if critical is not None and batch:
        ratio = batch / critical
        if ratio > 2:
            verdict = ("well above it: a smaller batch (fewer accumulation steps) would reach the same loss "
                       "with fewer examples, at the price of more optimizer steps")
        elif ratio < 0.5:
            verdict = ("well below it: a larger batch (more accumulation steps) would need fewer optimizer "
                       "steps for the same examples; try --effective-batch auto")
        else:
            verdict = "close to it: a good trade between examples and optimizer steps"
        lines.append(f"the measured critical batch is about {critical:.0f} examples; your effective batch "
                     f"{batch} is {verdict}")
    return lines


class RunFailed(Exception):
    """A failure that is not bad input but deserves one line, not a traceback (exit 1)."""


def _checked_out(out_text: str, resume: bool, overwrite: bool) -> Path:
    """Rank 0 checks --out (read-only: nothing is created); every rank learns the verdict."""
    from gradaccum import runlog

    error = None
    if sync.rank() == 0:
        try:
            runlog.guard(out_text, resume, overwrite)
        except runlog.OutDirError as e:
            error = str(e)
    if sync.world_size() > 1:
        from gradaccum.trainer import _any_rank

        if _any_rank(error is not None) and error is None:
            error = f"--out {out_text}: refused by rank 0 (see its message)"
    if error is not None:
        raise BadInput(error)
    return Path(out_text)


def _resume_command(args: argparse.Namespace) -> str:
    argv = [a for a in getattr(args, "argv", []) if a != "--overwrite"]
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(["gradaccum", *argv])


def warmup_cosine(optimizer: Any, steps: int, warmup: int | None = None, floor: float = 0.1) -> Any:
    """Linear warm-up then cosine decay to ``floor`` x the peak lr, one tick per optimizer step."""
    import torch

    warm = warmup if warmup is not None else max(1, min(20, steps // 10))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _device() -> Any:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _make_batch(work: Any) -> Any:
    """Worst-case micro-batches for the planner: n copies of the longest example."""
    longest = max(work.dataset, key=lambda ex: len(ex[0]))
    return lambda n: work.collate_fn([longest] * n)


def _plan(args: argparse.Namespace, work: Any, world_size: int | None = None) -> Any:
    """The memory plan for this workload (collective under torch.distributed): measured, or
    analytic under --fsdp (one process cannot measure a sharded run)."""
    from gradaccum import memory

    try:
        if getattr(args, "fsdp", False):
            return _analytic_plan(args, work.model, _longest(work), world_size or sync.world_size(),
                                  _min_budget(args))[0]
        return memory.plan(
            work.model, work.loss_fn, _make_batch(work), args.effective_batch,
            budget_bytes=args.memory_budget, grad_dtype=work.grad_dtype, world_size=world_size,
        )
    except memory.BudgetTooSmall as e:
        raise BadInput(f"--memory-budget {memory.format_bytes(e.budget_bytes)}: {e}") from None
    except ValueError as e:  # e.g. an effective batch that does not divide over --world-size
        raise BadInput(f"--effective-batch {args.effective_batch}: {e}") from None


def _analytic_plan(args: argparse.Namespace, model: Any, seq_len: int, world: int, budget: int) -> Any:
    """(plan, estimate at its micro-batch, sync_every_micro_batch) from the analytic estimate.

    Under --fsdp the one-reduce-scatter-per-window layout is planned first; when not even
    micro-batch 1 fits that way, reduce-scattering every micro-batch (what train then does).
    """
    from gradaccum import memory

    kw = _estimate_kwargs(args, model, fsdp=bool(getattr(args, "fsdp", False)))
    every = False
    try:
        p = memory.analytic_plan(model, args.effective_batch, seq_len, budget, world_size=world, **kw)
    except memory.BudgetTooSmall:
        if not kw["fsdp"]:
            raise
        every = True
        p = memory.analytic_plan(model, args.effective_batch, seq_len, budget, world_size=world,
                                 sync_every_micro_batch=True, **kw)
    est = memory.analytic_estimate(model, p.micro_batch, seq_len, world_size=world,
                                   sync_every_micro_batch=every, margin=p.margin, **kw)
    return p, est, every


def _auto_micro_batch(args: argparse.Namespace, work: Any) -> int:
    from gradaccum import memory

    p = _plan(args, work)
    if sync.rank() == 0:
        print(
            f"gradaccum: --micro-batch auto: {p.micro_batch} (predicted peak "
            f"{memory.format_bytes(p.predicted_peak_bytes)} of {memory.format_bytes(p.budget_bytes)})",
            flush=True,
        )
    return int(p.micro_batch)


def cmd_plan(args: argparse.Namespace) -> int:
    import json


    _check_large_flags(args, "plan")
    if args.world_size is not None and sync.world_size() > 1 and args.world_size != sync.world_size():
        raise BadInput(f"--world-size {args.world_size}: differs from torchrun's {sync.world_size()}")
    world = args.world_size or sync.world_size()
    if args.effective_batch % world:
        raise BadInput(f"--effective-batch {args.effective_batch} is not divisible by the world size {world}")
    if args.fsdp or _config_only(args):
        return _cmd_plan_analytic(args, world)
    work = load_workload(args, seed=0, with_eval=False)
    _apply_large(args, work)
    work.model.to(_device())
    p = _plan(args, work, world)
    if sync.rank() != 0:
        return 0
    if args.json:
        print(json.dumps({**p.to_json(), "method": "measured"}))
        return 0
    _print_plan(p)
    return 0


def _print_plan(p: Any, header: str = "") -> None:
    from gradaccum import memory

    print(f"effective batch {p.effective_batch}, world size {p.world_size}, "
          f"budget {memory.format_bytes(p.budget_bytes)} ({p.budget_bytes} bytes){header}")
    print(f"{'micro-batch':>11}  {'accum':>5}  {'predicted peak':>14}  fits")
    per_rank = p.effective_batch // p.world_size
    for row in p.table:
        m, peak = row["micro_batch"], row["predicted_peak_bytes"]
        mark = "  <- chosen" if m == p.micro_batch else ""
        fits = "yes" if peak <= p.budget_bytes else "no"
        print(f"{m:>11}  {per_rank // m:>5}  {memory.format_bytes(peak):>14}  {fits:>4}{mark}")
    print(f"plan: micro-batch {p.micro_batch} x accum steps {p.accum_steps} x world size {p.world_size} "
          f"= {p.effective_batch}")


def _cmd_plan_analytic(args: argparse.Namespace, world: int) -> int:
    """plan from the analytic estimate: --fsdp (sharding is not measurable in one process) or a
    --model directory with config.json only (no weights or tokenizer are read)."""
    import json

    from gradaccum import memory
    from gradaccum.workloads import WorkloadError, hf

    precision = Precision(args.precision, _device())
    if args.fsdp and precision.name == "bf16" and args.lora_r is None:
        precision.weights = "fp32"  # as train does: fp32 shards, bf16 compute (see load_workload)
    if args.model == "demo":
        work = load_workload(args, seed=0, with_eval=False)
        model, seq_len = work.model, int(work.info["max_length"])
        if work.kind == "demo" and precision.weights == "bf16":
            import torch

            model.to(torch.bfloat16)
    else:
        try:
            model = hf.load_config_only(args.model, dtype=precision.weights)
        except WorkloadError as e:
            raise BadInput(str(e)) from None
        context = hf.max_positions(model.config)
        if args.max_length is not None and context is not None and args.max_length > context:
            raise BadInput(f"--max-length {args.max_length}: longer than the model's context "
                           f"({context} tokens)")
        seq_len = args.max_length or context
        if seq_len is None:
            raise BadInput(f"--max-length: required (the config of --model {args.model} names no "
                           "context length)")
    if args.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise BadInput(f"--gradient-checkpointing: {type(model).__name__} does not support it")
    budget = args.memory_budget if args.memory_budget is not None else memory.default_budget_bytes(_device())
    try:
        p, est, every = _analytic_plan(args, model, seq_len, world, budget)
    except memory.BudgetTooSmall as e:
        raise BadInput(f"--memory-budget {memory.format_bytes(e.budget_bytes)}: {e}") from None
    except ValueError as e:
        raise BadInput(f"--model {args.model}: cannot estimate its memory ({e})") from None
    if sync.rank() != 0:
        return 0
    why = "--fsdp" if args.fsdp else "config.json only"
    if args.json:
        print(json.dumps({**p.to_json(), "method": "analytic", "seq_len": seq_len,
                          "sync_every_micro_batch": every, "estimate": est.to_json()}))
        return 0
    mode = ", ".join(x for x in (f"LoRA r={args.lora_r}" if args.lora_r else "full fine-tune",
                                 f"FSDP2 over {world}" if args.fsdp else "",
                                 "activation checkpointing" if args.gradient_checkpointing else "") if x)
    print(f"analytic estimate ({why}): {est.total_params / 1e9:.3g} B parameters, "
          f"{est.trainable_params / 1e6:.4g} M trained; {mode}; sequence length {seq_len}")
    _print_plan(p, header="; per rank")
    f = memory.format_bytes
    print(f"per rank at micro-batch {p.micro_batch}: weights {f(est.params_bytes)}, gathered "
          f"{f(est.unsharded_params_bytes)}, gradients {f(est.grad_bytes + est.accum_buffer_bytes)}, held "
          f"{f(est.held_grad_bytes)}, optimizer {f(est.optimizer_state_bytes)}, activations "
          f"{f(est.activation_bytes)}, transient {f(est.transient_bytes)}")
    if every:
        print("--fsdp: a window's unsharded gradients do not fit: train reduce-scatters on every micro-batch")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from gradaccum import memory

    _check_large_flags(args, "bench")
    if _config_only(args):
        raise BadInput(f"--model {args.model}: has no weights (config.json only): bench runs the model; "
                       "`gradaccum plan` estimates its memory from the config alone")
    out = None
    if args.out is not None:
        from gradaccum import runlog

        try:
            out = runlog.check_out_path(args.out)
            runlog.check_writable(out)
            for name in ("bench.png", "bench.json"):
                if (out / name).exists() and not (out / name).is_file():
                    raise runlog.OutDirError(f"--out {out}: {out / name} is not a regular file")
        except runlog.OutDirError as e:
            raise BadInput(str(e)) from None
    work = load_workload(args, seed=0, with_eval=False)
    _apply_large(args, work)
    work.model.to(_device())
    p = _plan(args, work)
    fits = [r["micro_batch"] for r in p.table if r["predicted_peak_bytes"] <= p.budget_bytes]
    per_rank = p.effective_batch // p.world_size
    rows = memory.measure_throughput(
        work.model, work.loss_fn, _make_batch(work), fits, window_batch=per_rank, repeats=args.repeats
    )
    if not rows:
        raise BadInput("bench: no candidate micro-batch ran")
    # One bench item is one example (a whole window of examples is timed).
    rows = [{"micro_batch": r["micro_batch"], "examples_per_s": r["items_per_s"],
             "seconds_per_step": r["seconds_per_step"]} for r in rows]
    best = max(rows, key=lambda r: r["examples_per_s"])
    result = {
        "device": str(_device()),
        "effective_batch": p.effective_batch,
        "world_size": p.world_size,
        "budget_bytes": p.budget_bytes,
        "planned_micro_batch": p.micro_batch,
        "fastest_micro_batch": best["micro_batch"],
        "rows": rows,
    }
    if out is not None and sync.rank() == 0:
        from gradaccum.checkpoint import atomic_write_bytes

        try:
            out.mkdir(parents=True, exist_ok=True)
            _plot_bench(rows, best["micro_batch"], p.micro_batch, out / "bench.png")
            text = json.dumps(result, indent=2) + "\n"
            atomic_write_bytes(out / "bench.json", lambda f: f.write(text.encode()))
        except OSError as e:
            from gradaccum.runlog import write_error

            raise RunFailed(str(write_error(out, e, "writing bench.png / bench.json"))) from None
        result["plot"] = str(out / "bench.png")
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"device {result['device']}, effective batch {p.effective_batch} (one timed step = one window)")
    print(f"{'micro-batch':>11}  {'accum':>5}  {'examples/s':>10}  {'s/step':>7}")
    for r in rows:
        m = r["micro_batch"]
        note = ("  <- fastest" if m == best["micro_batch"] else "") + (
            "  (largest that fits)" if m == p.micro_batch else "")
        rate, secs = r["examples_per_s"], r["seconds_per_step"]
        print(f"{m:>11}  {per_rank // m:>5}  {rate:>10.1f}  {secs:>7.3f}{note}")
    print(f"fastest: micro-batch {best['micro_batch']}; largest that fits: {p.micro_batch}"
          + (f"; plot: {result['plot']}" if "plot" in result else ""))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import json

    from gradaccum import compare, runlog

    if sync.world_size() > 1:
        raise BadInput("compare runs in one process: start it without torchrun")
    if args.effective_batch % args.micro_batch:
        raise BadInput(f"--effective-batch {args.effective_batch} is not divisible by --micro-batch "
                       f"{args.micro_batch}")
    try:
        out = runlog.check_out_path(args.out)
        runlog.check_writable(out)
        for name in (compare.COMPARE_JSON, compare.COMPARE_PNG):
            if (out / name).exists() and not (out / name).is_file():
                raise runlog.OutDirError(f"--out {out}: {out / name} is not a regular file")
    except runlog.OutDirError as e:
        raise BadInput(str(e)) from None
    work = load_workload(args, with_eval=False)
    work.model.to(_device())
    fits, note = compare.full_batch_fits(work.model, work.dataset, work.loss_fn, work.collate_fn,
                                         args.effective_batch, args.memory_budget)
    print(f"gradaccum compare: full batch of {args.effective_batch}: {note}", flush=True)
    result = compare.run(
        work.model, work.dataset, work.loss_fn, work.collate_fn, args.effective_batch, args.micro_batch,
        args.steps, args.lr, args.seed, full_fits=fits, full_note=note,
        progress=lambda name: print(f"gradaccum compare: training '{name}' ...", file=sys.stderr, flush=True),
    )
    try:
        compare.write(result, out)
    except OSError as e:
        raise RunFailed(str(runlog.write_error(out, e, "writing compare.json / compare.png"))) from None
    if args.json:
        print(json.dumps(result))
    else:
        print(compare.table(result))
        print(f"gradaccum compare: {out / compare.COMPARE_PNG}, {out / compare.COMPARE_JSON}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from gradaccum.check import check, load_target

    if args.target is not None:
        try:
            model, loss_fn, batch = load_target(args.target)
        except ValueError as e:
            raise BadInput(str(e)) from None
    else:
        work = load_workload(args, seed=0, with_eval=False)
        if len(work.dataset) < 2:
            raise BadInput("check: the data has fewer than two examples")
        examples = [work.dataset[i] for i in range(min(args.batch, len(work.dataset)))]
        model, loss_fn, batch = work.model, work.loss_fn, work.collate_fn(examples)
    try:
        report = check(model, loss_fn, batch, micro_batch_size=args.micro_batch)
    except (ValueError, TypeError) as e:
        raise BadInput(f"check: {e}") from None
    print(report, flush=True)
    return 0 if report.ok else 1


def cmd_generate(args: argparse.Namespace) -> int:
    from gradaccum.generate import generate
    from gradaccum.workloads import WorkloadError

    try:
        text = generate(args.model, args.prompt, args.max_new_tokens)
    except WorkloadError as e:
        raise BadInput(str(e)) from None
    print(text, flush=True)
    return 0


def _plot_bench(rows: list[dict[str, float]], fastest: int, planned: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    xs = [r["micro_batch"] for r in rows]
    ax.plot(xs, [r["examples_per_s"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batch")
    ax.set_ylabel("examples / s (whole window)")
    ax.axvline(fastest, color="green", ls="--", label=f"fastest: {fastest}")
    ax.axvline(planned, color="gray", ls=":", label=f"largest that fits: {planned}")
    ax.legend()
    ax.grid(alpha=0.3)
    from gradaccum.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with _suppress_os_error():
        # Paths that are not valid UTF-8 arrive as surrogates; print them, don't crash.
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {"train": cmd_train, "plan": cmd_plan, "bench": cmd_bench, "compare": cmd_compare,
                "check": cmd_check, "generate": cmd_generate}
    from gradaccum import distributed

    if "OMP_NUM_THREADS" not in os.environ:
        # The built-in model is far too small to gain from intra-op threads, and on a
        # busy machine their spin-waiting made a step 50x slower (measured). Opt back in
        # with OMP_NUM_THREADS.
        import torch

        torch.set_num_threads(1)
    try:
        distributed.setup_from_env()
        return handlers[args.command](args)
    except (BadInput, distributed.DistributedSetupError) as e:
        print(f"gradaccum {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"gradaccum {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gradaccum {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # A dead or hung peer rank: one line on every surviving rank, not a traceback.
        message = distributed.failure_message(e)
        if message is None:
            raise
        print(f"gradaccum {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        distributed.teardown()


def _suppress_os_error() -> Any:
    import contextlib

    return contextlib.suppress(AttributeError, OSError, ValueError)
