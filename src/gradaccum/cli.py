"""Command-line front end: ``gradaccum train | plan | bench | compare | check | generate``
(``python -m gradaccum`` too): argparse and dispatch only. Each command is a module of
:mod:`gradaccum.commands` with ``run(opts) -> exit code``.

Exit codes: 0 done, 2 bad input (one line naming the flag or file; nothing in --out
touched), 1 anything else (one line when a write fails, e.g. a full disk), 130 / 143
stopped by SIGINT / SIGTERM after saving a checkpoint (resume with --resume).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, NoReturn

from gradaccum.adaptive import DEFAULT_MAX_EFFECTIVE_BATCH, LR_RULES
from gradaccum.commands import BadInput, RunFailed, precheck
from gradaccum.commands.argtypes import (
    LOSS_PER,
    batch_int,
    dropout,
    effective,
    fraction,
    int_at_least,
    lr,
    micro,
    names,
    non_negative_float,
    non_negative_int,
    positive_float,
    report_to,
    size,
)
from gradaccum.commands.defaults import (
    DEFAULT_LR,
    DEFAULT_LR_FULL,
    DEFAULT_LR_LORA,
    DEFAULT_MAX_GRAD_NORM,
    DEFAULT_STEPS,
    DEFAULT_WEIGHT_DECAY,
    MAX_STEPS,
    SCHEDULES,
)
from gradaccum.stream import DEFAULT_MICRO_CAP
from gradaccum.workloads.precision import PRECISIONS

DEFAULT_OUT = "runs/gradaccum"
MAX_SEED = 2**32 - 1
MAX_REPEATS = 1000
MAX_LORA_R = 65536
MAX_EPOCHS = 1e6
MAX_LORA_ALPHA = 2.0**20  # alpha / r scales the adapters' output: beyond this it only overflows


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


def build_parser() -> argparse.ArgumentParser:
    from gradaccum import __version__

    p = _Parser(prog="gradaccum", description="Exact gradient accumulation for PyTorch.",
                formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"gradaccum {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,plan,bench,compare,check,generate}",
                           parser_class=_Parser)
    for add in (_add_train, _add_plan, _add_bench, _add_compare, _add_check, _add_generate):
        add(sub)
    return p


def _add_train(sub: Any) -> None:
    t = sub.add_parser("train", formatter_class=_HelpFormatter,
                       help="train the built-in demo, or --model DIR on --data FILE, with accumulation")
    _add_common(t, auto=True)
    t.add_argument("--max-effective-batch", type=batch_int, default=None, metavar="N",
                   help="with --effective-batch auto: the largest effective batch it may grow to "
                        f"(default: {DEFAULT_MAX_EFFECTIVE_BATCH})")
    t.add_argument("--lr-batch-rule", choices=LR_RULES, default=None,
                   help="with --effective-batch auto: how the learning rate follows the growing batch, "
                        "by the square root of its growth, linearly, or not at all (default: sqrt for "
                        "Adam-family optimizers, linear for SGD)")
    t.add_argument("--eval-data", default=None, metavar="FILE",
                   help="held-out data in --data's formats: its exact item-mean loss is logged as eval_loss "
                        "(the demo evaluates on held-out generated puzzles)")
    t.add_argument("--eval-every", type=non_negative_int, default=None, metavar="N",
                   help="evaluate every N steps and at the end (default: ten times per run; "
                        "0: only at the end)")
    t.add_argument("--no-noise-scale", action="store_true",
                   help="do not measure the gradient noise scale / critical batch")
    t.add_argument("--micro-batch", type=micro, default=None, metavar="N|auto",
                   help="examples per forward/backward (default: the largest divisor of the per-rank "
                        f"batch up to {DEFAULT_MICRO_CAP}; auto: plan it from --memory-budget)")
    t.add_argument("--micro-batch-tokens", type=int_at_least(1, 10**9), default=None, metavar="N",
                   help="with --packing: micro-batches of at most N tokens (the same examples per step), in "
                        "rows no longer than the longest example allowed; instead of --micro-batch")
    _add_schedule(t)
    t.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0, metavar="N",
                   help="seeds data order and initialisation")
    t.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help="output directory")
    t.add_argument("--resume", action="store_true",
                   help="continue exactly from OUT/checkpoint.pt (the flags that define the run must match)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, such an --out is refused)")
    t.add_argument("--checkpoint-every", type=non_negative_int, default=50, metavar="N",
                   help="save a checkpoint every N steps (0: only at the end; always on SIGTERM/SIGINT)")
    _add_report_to(t)


def _add_schedule(t: argparse.ArgumentParser) -> None:
    """How long and how fast: steps or epochs, the learning rate and its schedule, the optimizer."""
    t.add_argument("--steps", type=int_at_least(1, MAX_STEPS), default=None, metavar="N",
                   help=f"optimizer steps in the whole run (default: {DEFAULT_STEPS}); or give --epochs")
    t.add_argument("--epochs", type=positive_float(MAX_EPOCHS), default=None, metavar="F",
                   help="passes over --data instead of --steps: steps = ceil(F x examples / effective batch)")
    t.add_argument("--lr", type=lr, default=None, metavar="F",
                   help=f"peak learning rate of AdamW (default: {DEFAULT_LR:g}); with --model DIR the "
                        f"default is {DEFAULT_LR_FULL:g}, or {DEFAULT_LR_LORA:g} with --lora-r")
    t.add_argument("--lr-scheduler", choices=SCHEDULES, default="cosine",
                   help="after the linear warm-up: cosine decay to 10%% of the peak, linear decay to 0, or "
                        "constant")
    t.add_argument("--warmup-steps", type=non_negative_int, default=None, metavar="N",
                   help="linear warm-up steps (default: a tenth of the run, between 1 and 20)")
    t.add_argument("--warmup-ratio", type=fraction, default=None, metavar="F",
                   help="warm-up as a fraction of the run's steps (instead of --warmup-steps)")
    t.add_argument("--weight-decay", type=fraction, default=DEFAULT_WEIGHT_DECAY, metavar="F",
                   help="AdamW's decoupled weight decay")
    t.add_argument("--max-grad-norm", type=non_negative_float, default=DEFAULT_MAX_GRAD_NORM, metavar="F",
                   help="clip the accumulated gradient's L2 norm to F (0: no clipping)")


def _add_plan(sub: Any) -> None:
    pl = sub.add_parser("plan", help="choose the micro-batch that fits a memory budget",
                        formatter_class=_HelpFormatter)
    _add_common(pl)
    pl.add_argument("--world-size", type=int_at_least(1, 1 << 20), default=None, metavar="N",
                    help="plan for N ranks from this one process (default: torchrun's world size, or 1); "
                         "with --fsdp, the number of shards")
    pl.add_argument("--json", action="store_true", help="print one JSON object")


def _add_bench(sub: Any) -> None:
    b = sub.add_parser("bench", help="throughput (examples/s) of each micro-batch that fits",
                       formatter_class=_HelpFormatter)
    _add_common(b)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--out", default="runs/bench", metavar="DIR",
                   help="directory for bench.png and bench.json")
    b.add_argument("--repeats", type=int_at_least(1, MAX_REPEATS), default=3, metavar="N",
                   help="timed windows per micro-batch")


def _add_compare(sub: Any) -> None:
    c = sub.add_parser("compare", formatter_class=_HelpFormatter,
                       help="full batch vs accumulated vs mean-of-means vs small batch, in one picture")
    _add_workload(c)
    c.add_argument("--effective-batch", type=batch_int, default=64, metavar="N",
                   help="examples per optimizer step")
    c.add_argument("--micro-batch", type=batch_int, default=8, metavar="N",
                   help="examples per micro-batch (and the batch of 'small')")
    c.add_argument("--steps", type=int_at_least(1, 100_000), default=40, metavar="N",
                   help="optimizer steps of the effective batch")
    c.add_argument("--lr", type=lr, default=DEFAULT_LR, metavar="F", help="learning rate (AdamW, constant)")
    c.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0, metavar="N",
                   help="seeds data order and initialisation")
    c.add_argument("--memory-budget", type=size, default=None, metavar="SIZE",
                   help="memory 'full' may use (default: as for plan)")
    c.add_argument("--out", default="runs/compare", metavar="DIR",
                   help="directory for compare.json and compare.png")
    c.add_argument("--json", action="store_true", help="print compare.json's content instead of the table")
    _add_report_to(c)


def _add_report_to(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report-to", type=report_to, default="none",
                   metavar="none|tensorboard,wandb,mlflow,trackio",
                   help="also log the run to these trackers (a comma list), each set up by its usual "
                        "environment variables (WANDB_PROJECT, WANDB_MODE=offline, MLFLOW_TRACKING_URI, "
                        "TRACKIO_PROJECT_NAME, ...); TensorBoard writes OUT/tensorboard. train sends each "
                        "step once a checkpoint covers it (--checkpoint-every), so none twice on --resume")


def _add_check(sub: Any) -> None:
    k = sub.add_parser("check", help="is a model + loss function accumulation-safe? (exit 1 if not)",
                       formatter_class=_HelpFormatter)
    k.add_argument("target", nargs="?", default=None, metavar="TARGET",
                   help="FILE.py:FUNCTION or module:function returning (model, loss_fn, batch); "
                        "without it, the --model/--data workload is checked")
    _add_workload(k)
    k.add_argument("--micro-batch", type=batch_int, default=2, metavar="N",
                   help="micro-batch size to compare against the full batch")
    k.add_argument("--batch", type=batch_int, default=8, metavar="N",
                   help="without TARGET: examples of --data in the checked batch")


def _add_generate(sub: Any) -> None:
    g = sub.add_parser("generate", formatter_class=_HelpFormatter,
                       help="complete a prompt with a model directory or a LoRA adapter (e.g. OUT/model)")
    g.add_argument("--model", required=True, metavar="DIR",
                   help="a Hugging Face model directory, or a LoRA adapter directory (adapter_config.json, "
                        "as train --lora-r writes to OUT/model): its base model is loaded from the directory "
                        "its base_model_name_or_path names, the adapter on top (needs peft: "
                        'pip install "gradaccum[lora]")')
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    g.add_argument("--max-new-tokens", type=int_at_least(1, 100_000), default=64, metavar="N",
                   help="tokens to generate at most")
    g.add_argument("--chat", action="store_true",
                   help="send --prompt as one user turn in the tokenizer's chat template and continue with "
                        "the assistant's reply")
    g.add_argument("--temperature", type=positive_float(100.0, zero=True), default=0.0, metavar="F",
                   help="0: greedy (the most likely token each time); between 0.001 and 100: sample, "
                        "sharper below 1, flatter above")
    g.add_argument("--top-p", type=fraction, default=None, metavar="F",
                   help="with --temperature > 0: sample only from the most likely tokens that together "
                        "hold probability F, in (0, 1] (default: 1, all tokens; top-k is off)")
    g.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=None, metavar="N",
                   help="with --temperature > 0: seeds the sampling; the same seed gives the same text "
                        "(default: 0)")
    g.add_argument("--merge-lora", action="store_true",
                   help="with a LoRA adapter --model: fold the adapter into its base model and save that "
                        "full model and the tokenizer to DIR-merged beside it (written atomically; an "
                        "existing DIR-merged is refused, never replaced), then generate from it; "
                        "--model DIR-merged then needs no peft")


def _add_large(p: argparse.ArgumentParser) -> None:
    """Issue 12's flags: LoRA, FSDP2 and activation checkpointing (train, plan, bench)."""
    p.add_argument("--lora-r", type=int_at_least(1, MAX_LORA_R), default=None, metavar="N",
                   help="train rank-N LoRA adapters on every attention and MLP projection (base weights "
                        "frozen, adapters seeded by --seed, dropout 0); OUT/model holds the adapter")
    p.add_argument("--lora-alpha", type=positive_float(MAX_LORA_ALPHA), default=None, metavar="F",
                   help="LoRA scaling numerator (default: 2 x --lora-r)")
    p.add_argument("--lora-dropout", type=dropout, default=0.0, metavar="F",
                   help="dropout on the adapters' input, in [0, 1) (0 keeps the micro-batch size from "
                        "changing anything but rounding)")
    p.add_argument("--lora-target-modules", type=names, default=None, metavar="A,B,...",
                   help="projections to adapt, e.g. q_proj,v_proj (default: every attention and MLP "
                        "projection)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and optimizer state over the torchrun ranks with FSDP2 "
                        "(one fully_shard per decoder layer, then the root) instead of DDP")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder layer's activations in the backward: less memory, same "
                        "gradients")


def _add_common(p: argparse.ArgumentParser, auto: bool = False) -> None:
    p.add_argument("--effective-batch", type=effective if auto else batch_int, default=128,
                   metavar="N|auto" if auto else "N",
                   help="examples per optimizer step over all ranks"
                        + ("; auto: start at two micro-batches and grow with the measured critical batch"
                           if auto else ""))
    p.add_argument("--memory-budget", type=size, default=None, metavar="SIZE",
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
    p.add_argument("--max-length", type=int_at_least(3, 10**7), default=None, metavar="N",
                   help="cut examples to N tokens (default: the model's context; demo: 128)")
    p.add_argument("--packing", action="store_true",
                   help="pack each micro-batch's examples into rows (position_ids restart per example, "
                        "attention kept within each example, verified on the model): no compute on padding; "
                        "the same examples per step and the same result up to rounding")
    p.add_argument("--loss-per", choices=LOSS_PER, default="token",
                   help="token: the mean over the window's loss tokens; sequence: the mean over its "
                        "sequences of each one's token mean")
    p.set_defaults(micro_batch_tokens=None)  # a train flag; the other commands never budget in tokens
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on a CUDA device that supports it, else fp32; bf16: bf16 "
                        "weights with fp32 gradient accumulation; fp16: fp16 autocast with loss scaling "
                        "(CUDA only)")


def main(argv: list[str] | None = None, *, trainer_options: dict[str, Any] | None = None) -> int:
    """Run ``gradaccum ARGV``; returns the exit code.

    ``trainer_options``: extra :class:`~gradaccum.trainer.Trainer` arguments for ``train`` when the
    command line is driven from Python (e.g. ``{"on_step": callback}``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    with contextlib.suppress(AttributeError, OSError, ValueError):
        # Paths that are not valid UTF-8 arrive as surrogates; print them, don't crash.
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    parser = build_parser()
    opts = parser.parse_args(argv)
    opts.argv, opts.trainer_options = argv, dict(trainer_options or {})
    if opts.command is None:
        parser.print_help()
        return 0
    try:
        precheck.inputs(opts)  # before the command's imports (torch, transformers: seconds)
    except BadInput as e:
        print(f"gradaccum {opts.command}: error: {e}", file=sys.stderr)
        return 2
    return _dispatch(opts)


def _dispatch(opts: argparse.Namespace) -> int:
    """Run the command; map its failures to exit codes and one line on stderr."""
    import importlib

    import torch

    from gradaccum import distributed

    if "OMP_NUM_THREADS" not in os.environ:
        # The built-in model is far too small to gain from intra-op threads, and on a
        # busy machine their spin-waiting made a step 50x slower (measured). Opt back in
        # with OMP_NUM_THREADS.
        torch.set_num_threads(1)
    try:
        command = importlib.import_module(f"gradaccum.commands.{opts.command}")
        distributed.setup_from_env()
        return int(command.run(opts))
    except (BadInput, distributed.DistributedSetupError) as e:
        print(f"gradaccum {opts.command}: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"gradaccum {opts.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gradaccum {opts.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # A dead or hung peer rank: one line on every surviving rank, not a traceback.
        message = distributed.failure_message(e)
        if message is None:
            raise
        print(f"gradaccum {opts.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        distributed.teardown()
