"""``gradaccum bench``: examples/s of a whole window at each micro-batch that fits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gradaccum import memory, outdir, runlog, sync
from gradaccum.checkpoint import atomic_write_bytes
from gradaccum.commands import BadInput, RunFailed, planning
from gradaccum.commands.common import check_large_flags, config_only, load, workload_spec
from gradaccum.workloads.precision import device

REPORTS = ("bench.png", "bench.json")


def run(opts: argparse.Namespace) -> int:
    check_large_flags(opts, "bench")
    if config_only(opts.model):
        raise BadInput(f"--model {opts.model}: has no weights (config.json only): bench runs the model; "
                       "`gradaccum plan` estimates its memory from the config alone")
    out = None
    if opts.out is not None:
        try:
            out = outdir.check_report_dir(opts.out, REPORTS)
        except outdir.OutDirError as e:
            raise BadInput(str(e)) from None
    spec = workload_spec(opts)
    work, _ = load(spec)
    p = planning.plan(spec, work, opts.effective_batch, opts.memory_budget)
    fits = [r["micro_batch"] for r in p.table if r["predicted_peak_bytes"] <= p.budget_bytes]
    per_rank = p.effective_batch // p.world_size
    rows = memory.measure_throughput(work.model, work.loss_fn, planning.worst_case_batches(work), fits,
                                     window_batch=per_rank, repeats=opts.repeats)
    if not rows:
        raise BadInput("bench: no candidate micro-batch ran")
    # One bench item is one example (a whole window of examples is timed).
    rows = [{"micro_batch": r["micro_batch"], "examples_per_s": r["items_per_s"],
             "seconds_per_step": r["seconds_per_step"]} for r in rows]
    best = max(rows, key=lambda r: r["examples_per_s"])
    result = {"device": str(device()), "effective_batch": p.effective_batch, "world_size": p.world_size,
              "budget_bytes": p.budget_bytes, "planned_micro_batch": p.micro_batch,
              "fastest_micro_batch": best["micro_batch"], "rows": rows}
    if out is not None and sync.rank() == 0:
        _write(out, result, p.micro_batch)
    if opts.json:
        print(json.dumps(result))
    else:
        _print(result, per_rank)
    return 0


def _write(out: Path, result: dict[str, Any], planned: int) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        plot_bench(result["rows"], result["fastest_micro_batch"], planned, out / "bench.png")
        text = json.dumps(result, indent=2) + "\n"
        atomic_write_bytes(out / "bench.json", lambda f: f.write(text.encode()))
    except OSError as e:
        raise RunFailed(str(runlog.write_error(out, e, "writing bench.png / bench.json"))) from None
    result["plot"] = str(out / "bench.png")


def _print(result: dict[str, Any], per_rank: int) -> None:
    print(f"device {result['device']}, effective batch {result['effective_batch']} "
          "(one timed step = one window)")
    print(f"{'micro-batch':>11}  {'accum':>5}  {'examples/s':>10}  {'s/step':>7}")
    fastest, planned = result["fastest_micro_batch"], result["planned_micro_batch"]
    for r in result["rows"]:
        m = r["micro_batch"]
        note = ("  <- fastest" if m == fastest else "") + ("  (largest that fits)" if m == planned else "")
        rate, secs = r["examples_per_s"], r["seconds_per_step"]
        print(f"{m:>11}  {per_rank // m:>5}  {rate:>10.1f}  {secs:>7.3f}{note}")
    print(f"fastest: micro-batch {fastest}; largest that fits: {planned}"
          + (f"; plot: {result['plot']}" if "plot" in result else ""))


def plot_bench(rows: list[dict[str, float]], fastest: int, planned: int, path: Path) -> None:
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
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
