"""Command-line front end: ``gradaccum train | plan | bench`` (``python -m gradaccum`` too).

Exit codes: 0 done, 2 bad input (one line naming the flag or file; nothing in --out
touched), 1 anything else (one line when a write fails, e.g. a full disk), 130 / 143
stopped by SIGINT / SIGTERM after saving a checkpoint (resume with --resume).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shlex
import sys
from dataclasses import dataclass
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
    sub = p.add_subparsers(dest="command", metavar="{train,plan,bench}", parser_class=_Parser)
    t = sub.add_parser("train", help="train the built-in demo (or --data FILE) with accumulation",
                       formatter_class=_HelpFormatter)
    _add_common(t)
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
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    b = sub.add_parser("bench", help="throughput (examples/s) of each micro-batch that fits",
                       formatter_class=_HelpFormatter)
    _add_common(b)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--out", default="runs/bench", metavar="DIR",
                   help="directory for bench.png and bench.json")
    b.add_argument("--repeats", type=_int_at_least(1, MAX_REPEATS), default=3, metavar="N",
                   help="timed windows per micro-batch")
    return p


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--effective-batch", type=_batch_int, default=128, metavar="N",
                   help="examples per optimizer step over all ranks")
    p.add_argument("--memory-budget", type=_size, default=None, metavar="SIZE",
                   help="bytes available, e.g. 2GiB, 500MB (default: the free memory of the CUDA device; "
                        "on CPU, half of the available RAM)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="UTF-8 text file, one example per non-empty line, character level "
                        "(default: the built-in generated task)")


@dataclass
class Workload:
    """Model, data and loss for a command: the demo task, or --data FILE."""

    model: Any
    dataset: list[Any]
    loss_fn: Any
    collate_fn: Any
    extra_state: dict[str, Any]
    fingerprint: str = "demo"
    """What the data is, for resume: "demo" or "sha256:<hex>" of the --data file."""


def load_workload(data: str | None, seed: int) -> Workload:
    from gradaccum import demo

    if data is None:
        examples, tok, max_len = demo.make_examples(TASK_SIZE, seed), demo.TASK_TOKENIZER, demo.TASK_MAX_LEN
        extra = {"task": "demo", "vocab": "".join(tok.alphabet)}
    else:
        try:
            examples, tok = demo.load_text_examples(data)
        except demo.TextFileError as e:
            raise BadInput(str(e)) from None
        max_len = max(len(ids) for ids, _ in examples)
        extra = {"task": "text", "vocab": "".join(tok.alphabet)}
    fingerprint = "demo" if data is None else _fingerprint(data)
    model = demo.build_model(tok.vocab_size, max_len, seed=seed)
    extra["max_len"] = max_len
    return Workload(model, examples, demo.loss_fn, demo.collate, extra, fingerprint)


def _fingerprint(data: str) -> str:
    from gradaccum.demo.task import TextFileError, read_data_file

    try:
        return "sha256:" + hashlib.sha256(read_data_file(data)).hexdigest()
    except TextFileError as e:
        raise BadInput(str(e)) from None


def default_micro_batch(per_rank: int, cap: int = DEFAULT_MICRO_CAP) -> int:
    from gradaccum.memory import candidate_micro_batches

    return max(d for d in candidate_micro_batches(per_rank) if d <= cap)


def cmd_train(args: argparse.Namespace) -> int:
    from gradaccum.checkpoint import CheckpointError
    from gradaccum.runlog import OutDirError, OutputWriteError
    from gradaccum.trainer import Stopped, Trainer

    # Flags first (cheap, and each error names its flag), then the output directory,
    # then the data; nothing is created before all of them passed.
    if args.resume and args.overwrite:
        raise BadInput("--resume and --overwrite contradict each other: give one")
    world = sync.world_size()
    if args.effective_batch % world:
        raise BadInput(f"--effective-batch {args.effective_batch} is not divisible by the world size {world}")
    per_rank = args.effective_batch // world
    if isinstance(args.micro_batch, int):
        try:
            from gradaccum.trainer import _check_sizes

            _check_sizes(args.effective_batch, args.micro_batch, world)
        except ValueError as e:
            raise BadInput(str(e)) from None
    out = _checked_out(args.out, args.resume, args.overwrite)
    work = load_workload(args.data, args.seed)
    work.model.to(_device())
    micro = args.micro_batch
    if micro is None and args.memory_budget is not None:
        micro = "auto"  # a budget with no micro-batch means: plan it
    if micro == "auto":
        micro = _auto_micro_batch(args, work)
    elif micro is None:
        micro = default_micro_batch(per_rank)
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
            run_config={"--model": "demo", "--data": work.fingerprint},
            items_name="tokens",
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
    return 0


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


def _make_batch(work: Workload) -> Any:
    """Worst-case micro-batches for the planner: n copies of the longest example."""
    longest = max(work.dataset, key=lambda ex: len(ex[0]))
    return lambda n: work.collate_fn([longest] * n)


def _plan(args: argparse.Namespace, work: Workload) -> Any:
    """The memory plan for this workload (collective under torch.distributed)."""
    from gradaccum import memory

    try:
        return memory.plan(
            work.model, work.loss_fn, _make_batch(work), args.effective_batch, budget_bytes=args.memory_budget
        )
    except memory.BudgetTooSmall as e:
        raise BadInput(f"--memory-budget {memory.format_bytes(e.budget_bytes)}: {e}") from None


def _auto_micro_batch(args: argparse.Namespace, work: Workload) -> int:
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

    from gradaccum import memory

    work = load_workload(args.data, seed=0)
    work.model.to(_device())
    p = _plan(args, work)
    if sync.rank() != 0:
        return 0
    if args.json:
        print(json.dumps(p.to_json()))
        return 0
    print(f"effective batch {p.effective_batch}, world size {p.world_size}, "
          f"budget {memory.format_bytes(p.budget_bytes)} ({p.budget_bytes} bytes)")
    print(f"{'micro-batch':>11}  {'accum':>5}  {'predicted peak':>14}  fits")
    per_rank = p.effective_batch // p.world_size
    for row in p.table:
        m, peak = row["micro_batch"], row["predicted_peak_bytes"]
        mark = "  <- chosen" if m == p.micro_batch else ""
        fits = "yes" if peak <= p.budget_bytes else "no"
        print(f"{m:>11}  {per_rank // m:>5}  {memory.format_bytes(peak):>14}  {fits:>4}{mark}")
    print(f"plan: micro-batch {p.micro_batch} x accum steps {p.accum_steps} x world size {p.world_size} "
          f"= {p.effective_batch}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from gradaccum import memory

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
    work = load_workload(args.data, seed=0)
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
    handlers = {"train": cmd_train, "plan": cmd_plan, "bench": cmd_bench}
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
