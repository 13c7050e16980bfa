"""gradaccum side by side with a hand-written loop, Hugging Face Accelerate and Lightning.

Workloads (benchmarks/common.py): the built-in demo model and task, a plain MLP
regression, and a tiny transformers GPT-2 with padded variable-length sequences.
Contenders, at the same micro-batch size and k:

- hand:       an exact hand-written loop (summed loss / the window's known item total);
- gradaccum:  Accumulator, shape (a) (micro_step + backward, flush for a short window);
- accelerate: ``with accelerator.accumulate(model)`` + ``accelerator.backward(mean loss)``,
              as its documentation shows;
- lightning:  ``Trainer(accumulate_grad_batches=k)`` on a LightningModule whose
              training_step returns the mean loss, as its documentation shows.

Measures: step-time ratio against the hand loop (median of per-round ratios), peak
memory (RSS growth of a fresh process per contender), relative error of the gradient
handed to ``optimizer.step()`` against a float64 full-batch reference (complete
windows, and a partial last window), and how much the logged loss moves when k
changes at a fixed effective batch.

A second part (``--sections hf-trainer``, in benchmarks/hf_trainer_peer.py) puts
gradaccum's ``Trainer``, as ``gradaccum train --model DIR`` uses it, next to the Hugging
Face ``transformers.Trainer`` with ``gradient_accumulation_steps`` on a tiny Llama with
variable-length prompt/completion data: applied-gradient error against float64,
logged-loss error, and tokens/s (one torch thread, A/A control).

This file is the entry point: it runs every comparison and writes the results. Each
comparison has its own file: peers_speed.py, peers_gradient_error.py,
peers_logged_loss.py, peers_memory.py; the contenders are driven by peers_contenders.py,
the table and plot are drawn by peers_report.py.

    python benchmarks/compare_peers.py            # full run, writes docs/benchmarks.{md,json,png}
    python benchmarks/compare_peers.py --quick    # a fast, rougher run; prints, writes nothing
    python benchmarks/compare_peers.py --sections hf-trainer   # only the transformers.Trainer part
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import hf_trainer_peer  # noqa: E402
from common import Workload  # noqa: E402
from peers_contenders import PEERS, available  # noqa: E402
from peers_gradient_error import grad_error  # noqa: E402
from peers_logged_loss import logged_loss_vs_k  # noqa: E402
from peers_memory import memory  # noqa: E402
from peers_report import markdown, plot  # noqa: E402
from peers_speed import speed  # noqa: E402

SECTIONS = ("peers", "hf-trainer")
DOCS = common.DOCS
# Micro-batch size per workload (k is shared). demo: 16 x 8 = 128, the demo's default effective batch.
MICRO = {"demo": 16, "mlp": 64, "gpt2": 8}
WORKLOADS: dict[str, Callable[[], Workload]] = {
    "demo": common.demo_workload,
    "mlp": common.mlp_workload,
    "gpt2": common.gpt2_workload,
}


QUICK = {"rounds": 6, "warmup": 2, "pretrain_steps": 5, "loss_windows": 2, "mem_windows": 2}
FULL = {"rounds": 30, "warmup": 3, "pretrain_steps": 30, "loss_windows": 4, "mem_windows": 2}


def run_all(
    workloads: dict[str, tuple[Workload, int]],
    cfg: dict[str, int],
    k: int = 8,
    measure_memory: bool = True,
    peers: Sequence[str] | None = None,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Every measure on every workload; ``workloads`` maps a name to (workload, micro-batch size)."""
    peers = [p for p in (peers or PEERS) if available(p)]
    common.set_threads()
    res: dict[str, Any] = {
        "machine": common.machine_info(),
        "setting": {
            "k": k,
            "micro_batch": {name: mb for name, (_, mb) in workloads.items()},
            **cfg,
            "quick": cfg != FULL,
            "peers": peers,
            "missing_peers": [p for p in PEERS if p not in peers],
            "optimizer": "AdamW(lr per workload, weight_decay=0.01)",
            "speed_clip_norm": 1.0,
            "grad_error_windows": "10 micro-batches at k=4: windows of 4, 4 and a partial 2",
            "logged_loss_ks": [1, 4, 8],
        },
        "workloads": {},
    }
    for name, (work, mb) in workloads.items():
        entry: dict[str, Any] = {"description": work.description, "micro_batch": mb}
        progress(f"{name}: speed")
        entry["speed"] = speed(work, k, mb, cfg["rounds"], cfg["warmup"])
        progress(f"{name}: gradient error")
        entry["grad_error"] = {p: grad_error(work, p, 4, 10, mb) for p in peers}
        progress(f"{name}: logged loss vs k")
        entry["logged_loss"] = logged_loss_vs_k(
            work,
            peers,
            [1, 4, 8],
            eff_batch=8 * mb,
            windows=cfg["loss_windows"],
            pretrain_steps=cfg["pretrain_steps"],
        )
        if measure_memory:
            progress(f"{name}: memory")
            entry["memory"] = {p: memory(work, p, k, mb, cfg["mem_windows"]) for p in peers}
        res["workloads"][name] = entry
    return res


def write_docs(res: dict[str, Any], out: Path) -> None:
    """The generated section of benchmarks.md and the plot benchmarks.png."""
    out.mkdir(parents=True, exist_ok=True)
    common.write_section(
        out / "benchmarks.md", "compare_peers", markdown(res) + "\n\n![benchmarks](benchmarks.png)"
    )
    plot(res, out / "benchmarks.png")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    # Libraries print banners; keep stdout clean for --json and the memory probe.
    with contextlib.redirect_stdout(sys.stderr):
        yield



def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="fewer rounds and windows; prints the table, writes nothing"
    )
    p.add_argument("--workloads", default="demo,mlp,gpt2", help="comma-separated subset of demo,mlp,gpt2")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--out", type=Path, default=DOCS, help="where benchmarks.{md,json,png} go (default docs/)")
    p.add_argument("--no-write", action="store_true", help="print the table only; write nothing")
    p.add_argument("--json", action="store_true", help="print the JSON result")
    p.add_argument("--k", type=int, default=8, help="micro-batches per optimizer step for speed/memory (8)")
    p.add_argument(
        "--render", action="store_true", help="only redraw the table and plot from <out>/benchmarks.json"
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated: peers (Accelerate, Lightning on demo/mlp/gpt2), hf-trainer "
        "(transformers.Trainer on a tiny Llama); default both",
    )
    p.add_argument(
        "--hf-threads", type=int, default=1, help="torch threads for the hf-trainer part (default 1)"
    )
    return p


def _render(a: argparse.Namespace, sections: Sequence[str]) -> int:
    stored = json.loads((a.out / "benchmarks.json").read_text())
    if "peers" in sections and "compare_peers" in stored:
        write_docs(stored["compare_peers"], a.out)
    if "hf-trainer" in sections and "hf_trainer" in stored:
        hf_trainer_peer.write_docs(stored["hf_trainer"], a.out)
    return 0


def _peers_section(a: argparse.Namespace, names: Sequence[str], write: bool, t0: float) -> dict[str, Any]:
    with _stdout_to_stderr():
        res = run_all(
            {w: (WORKLOADS[w](), MICRO[w]) for w in names},
            QUICK if a.quick else FULL,
            k=a.k,
            measure_memory=not a.no_memory,
            progress=lambda s: print(f"[{time.perf_counter() - t0:6.1f}s] {s}", flush=True),
        )
    res["wall_seconds"] = time.perf_counter() - t0
    if not a.json:
        print(markdown(res))
    if write:
        a.out.mkdir(parents=True, exist_ok=True)
        common.merge_json(a.out / "benchmarks.json", "compare_peers", res)
        write_docs(res, a.out)
    return res


def _hf_trainer_section(a: argparse.Namespace, write: bool, t0: float) -> dict[str, Any]:
    with _stdout_to_stderr():
        hf = hf_trainer_peer.measure(
            a.quick,
            a.hf_threads,
            progress=lambda s: print(f"[{time.perf_counter() - t0:6.1f}s] hf-trainer: {s}", flush=True),
        )
    if not a.json:
        print("\n" + hf_trainer_peer.markdown(hf))
    if write:
        hf_trainer_peer.write_docs(hf, a.out)
    return hf


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    sections = [x for x in a.sections.split(",") if x]
    if not sections or any(x not in SECTIONS for x in sections):
        p.error(f"--sections: choose from {', '.join(SECTIONS)}")
    if a.render:
        return _render(a, sections)
    names = [w for w in a.workloads.split(",") if w]
    bad = [w for w in names if w not in WORKLOADS]
    if bad:
        p.error(f"--workloads: unknown {bad}; choose from {sorted(WORKLOADS)}")
    t0 = time.perf_counter()
    write = not (a.no_write or a.quick)  # a rough run must not replace the published numbers
    out: dict[str, Any] = {}
    if "peers" in sections:
        out["compare_peers"] = _peers_section(a, names, write, t0)
    if "hf-trainer" in sections:
        out["hf_trainer"] = _hf_trainer_section(a, write, t0)
    if a.json:
        print(json.dumps(out if len(out) > 1 else next(iter(out.values())), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
