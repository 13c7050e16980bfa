"""gradaccum's Trainer against the Hugging Face Trainer on a tiny Llama with variable-length data.

Both contenders train the same model (a Llama built from a ``LlamaConfig`` and saved
with ``save_pretrained``, with a word-level tokenizer: nothing is downloaded) on the
same prompt/completion examples (TRL's SFT format, loss on the completion and EOS
only, padding labelled -100), in the same order, with the same micro-batch size and
number of accumulation steps, the same ``torch.optim.AdamW`` (lr, weight_decay=0.01
on every parameter), a constant learning rate and the same gradient clipping:

- **gradaccum**: what ``gradaccum train --model DIR --data FILE.jsonl`` runs:
  ``gradaccum.workloads.build_workload(DIR, FILE)`` (``AutoModelForCausalLM``, the
  tokenized, memory-mapped examples, the exact summed loss and the right-padding
  collator), then ``gradaccum.Trainer(...).fit()`` writing its metrics to a temporary
  ``--out`` directory.
- **transformers**: ``transformers.Trainer`` with ``gradient_accumulation_steps=k``,
  ``per_device_train_batch_size=micro``, logging every step, on the same Arrow-backed
  examples (viewed in gradaccum's data order) and the same collator. Its sampler is a
  ``SequentialSampler`` (``_get_train_sampler`` overridden), so both see the same
  micro-batches; the model computes its own loss, normalised by the Trainer's
  ``num_items_in_batch``.

Measures (see :func:`run`): the relative error of the gradient each contender hands
to ``optimizer.step()`` (captured by an optimizer step pre-hook) against a float64
full-batch reference at the same parameters; the error of the loss each one logs for
a step against the exact token mean of that step's batch; and tokens per second of
training (counted tokens, i.e. labels really predicted after the causal shift). For
speed each trainer runs its own loop in its own thread, and the threads take turns
one optimizer step at a time (:class:`Baton`), in a rotating order, so a busy machine
slows all of them alike; a second copy of the Trainer is the A/A control, and, when
the Trainer measures the gradient noise scale, a gradaccum run without it shows that
measurement's cost.

This file is the entry point. The model and data are made by hf_trainer_setup.py, the
contenders built by hf_trainer_contenders.py; the two comparisons are
hf_trainer_exactness.py and hf_trainer_throughput.py.

    python benchmarks/hf_trainer_peer.py           # or: compare_peers.py --sections hf-trainer
    python benchmarks/hf_trainer_peer.py --quick   # rough; prints, writes nothing
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from hf_trainer_contenders import AA, GA, HF, Config, has_noise_switch  # noqa: E402
from hf_trainer_exactness import exactness  # noqa: E402
from hf_trainer_setup import Setup, Size, make_setup  # noqa: E402
from hf_trainer_throughput import throughput  # noqa: E402

QUICK = {"runs": 1, "warmup": 2, "steps": 8, "check_steps": 2}
FULL = {"runs": 6, "warmup": 3, "steps": 50, "check_steps": 3}


def run(setup: Setup, cfg: Config, runs: int, warmup: int, check_steps: int,
        progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Everything, on one thread: exactness in float64 and float32, then throughput."""
    threads = torch.get_num_threads()
    res: dict[str, Any] = {
        "machine": common.machine_info(),
        "setting": {
            "model": setup.size.describe(),
            "micro_batch": cfg.micro,
            "k": cfg.k,
            "effective_batch": cfg.effective,
            "optimizer": f"torch.optim.AdamW(lr={cfg.lr}, weight_decay={cfg.weight_decay}), constant lr",
            "max_grad_norm": cfg.max_grad_norm,
            "steps_per_run": cfg.steps,
            "warmup_steps": warmup,
            "runs": runs,
            "check_steps": check_steps,
            "torch_threads": threads,
        },
    }
    res["machine"]["gradaccum_source"] = source_state()
    res["setting"]["noise_scale_measured_by_default"] = has_noise_switch()
    check_cfg = Config(cfg.micro, cfg.k, check_steps, cfg.lr, cfg.weight_decay, None, cfg.seed)
    progress("exactness, float64")
    res["float64"] = exactness(setup, check_cfg, torch.float64)
    progress("exactness, float32")
    res["float32"] = exactness(setup, check_cfg, torch.float32)
    progress("throughput")
    res["throughput"] = throughput(setup, cfg, runs, warmup)
    return res


def source_state() -> str:
    """The gradaccum commit this ran from, and whether src/ had uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"commit {head}" + (" with uncommitted changes in src/" if dirty else "")


# --------------------------------------------------------------------------- reporting
def _err(e: float) -> str:
    if math.isinf(e):
        return "missed"
    return f"{e:.1e}" if e < 1e-3 else f"{100 * e:.2f} %"


def markdown(res: dict[str, Any]) -> str:
    m, s, t = res["machine"], res["setting"], res["throughput"]
    clip = s["max_grad_norm"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {s['torch_threads']} torch thread"
        f"{'s' if s['torch_threads'] != 1 else ''}, 1-min load average {m['load_average_1min']:.1f} at the "
        f"start), Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"gradaccum {m['gradaccum']} ({m.get('gradaccum_source', 'source unknown')}).",
        "",
        f"{s['model']}. Micro-batch {s['micro_batch']} x k = {s['k']} (effective batch "
        f"{s['effective_batch']} examples), {s['optimizer']}. Exactness: {s['check_steps']} optimizer "
        "steps, no clipping, every step checked. Speed: float32, clipping at "
        f"{clip}; {s['runs']} runs of {s['steps_per_run']} steps per contender, their steps interleaved "
        f"one by one in a rotating order, the first {s['warmup_steps']} steps of each run dropped "
        f"({t['steps_measured']} steps and {t['tokens_measured']:,} counted tokens measured per contender).",
        "",
        "| contender | grad error, float64 model | grad error, float32 model | logged-loss error, "
        "float64 | logged-loss error, float32 | tokens/s | step time, median | speed vs transformers "
        "(median, IQR) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in t.get("contenders", (GA, HF, AA)):
        ratio = t[name].get("speed_ratio")
        rtxt = f"{ratio['median']:.3f} ({ratio['q1']:.3f}-{ratio['q3']:.3f})" if ratio else "1 (baseline)"
        if name not in res["float64"]:
            errs = "| | | |"
        else:
            e64, e32 = res["float64"][name], res["float32"][name]
            errs = (f"{_err(e64['grad_rel_err_max'])} | {_err(e32['grad_rel_err_max'])} | "
                    f"{_err(e64['logged_loss_rel_err_max'])} | {_err(e32['logged_loss_rel_err_max'])} |")
        lines.append(
            f"| {name} | {errs} {t[name]['tokens_per_s']:,.0f} | {t[name]['step_ms']['median']:.1f} ms "
            f"| {rtxt} |"
        )
    lines += [
        "",
        "Errors: the largest over the checked steps, against a float64 full-batch reference at the "
        "parameters each step sees (gradient: relative L2 norm of the difference; loss: relative difference "
        "from the exact token mean of the step's batch). Tokens: labels really predicted after the causal "
        "shift. tokens/s: all measured tokens over all measured step time. Speed: the median and quartiles "
        "of the per-step ratio transformers step time / contender step time (above 1: faster than the "
        "Trainer).",
    ]
    return "\n".join(lines)


def measure(quick: bool = False, threads: int = 1, size: Size | None = None,
            progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """The whole benchmark (QUICK or FULL plan) on ``threads`` torch threads, in a temporary directory.

    The thread count is restored afterwards.
    """
    plan = QUICK if quick else FULL
    cfg = Config(steps=plan["steps"])
    before = torch.get_num_threads()
    common.set_threads(threads)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            setup = make_setup(Path(tmp), size or Size())
            res = run(setup, cfg, plan["runs"], plan["warmup"], plan["check_steps"], progress)
    finally:
        torch.set_num_threads(before)
    res["wall_seconds"] = time.perf_counter() - t0
    res["setting"]["quick"] = quick
    return res


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a rough run; prints the table, writes nothing")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--out", type=Path, default=common.DOCS, help="where benchmarks.{md,json} go")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    res = measure(a.quick, a.threads, progress=lambda s: print(
        f"[{time.perf_counter() - t0:6.1f}s] hf-trainer: {s}", file=sys.stderr, flush=True))
    print(markdown(res))
    if not (a.quick or a.no_write):
        write_docs(res, a.out)
    return 0


def write_docs(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    common.merge_json(out / "benchmarks.json", "hf_trainer", res)
    common.write_section(out / "benchmarks.md", "hf_trainer", markdown(res))


if __name__ == "__main__":
    sys.exit(main())
