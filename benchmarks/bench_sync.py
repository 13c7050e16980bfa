"""One gradient sync per window against one per micro-batch: DDP on CPU, gloo, 2 processes.

Both contenders are exact and do the same arithmetic; they differ only in when the
gradients cross the wire:

- ``every``: a plain DDP loop: ``loss_sum.backward()`` on every micro-batch, so DDP
  all-reduces every bucket k times per window; then one normalisation and one step.
- ``gradaccum``: ``Accumulator(ddp_model, ..., accum_steps=k)``: no communication until
  the window's last micro-batch, then one all-reduce of every bucket.

Each contender trains its own copy of the model. In every round each runs one window,
in an order that alternates every round, after a barrier so both ranks start
together; a window's time is the slower rank's. Reported per k: median (and quartiles)
of the per-round ratio ``every / gradaccum`` (> 1: gradaccum faster), warm-up rounds
excluded. At the end both copies must hold the same parameters.

    python benchmarks/bench_sync.py                 # k = 1, 4, 16
    python benchmarks/bench_sync.py --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port  # noqa: E402

import gradaccum as ga  # noqa: E402

WORLD = 2


def build_model(hidden: int, layers: int, features: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Linear(features, hidden), nn.GELU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(hidden, hidden), nn.GELU()]
    mods.append(nn.Linear(hidden, classes))
    return nn.Sequential(*mods)


def loss_sum(model: nn.Module, mb: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    x, y = mb
    return nn.functional.cross_entropy(model(x), y, reduction="sum"), y.numel()


def every_sync_window(model: DDP, opt: torch.optim.Optimizer, mbs: list[Any]) -> None:
    """The plain loop: DDP averages every bucket after every micro-batch's backward."""
    items = 0
    for mb in mbs:
        loss, n = loss_sum(model, mb)
        loss.backward()
        items += n
    total = torch.tensor([float(items)])
    dist.all_reduce(total)  # the global item count, as gradaccum does
    scale = dist.get_world_size() / float(total)  # DDP averaged; we want sum / items
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch._foreach_mul_(grads, scale)
    # gradaccum computes the norm for its StepResult and its non-finite check: so do we.
    if not math.isfinite(float(torch.nn.utils.get_total_norm(grads))):
        raise FloatingPointError("non-finite gradient")
    opt.step()
    opt.zero_grad(set_to_none=True)


def worker(rank: int, port: int, cfg: dict[str, Any], results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    nparams = 0
    try:
        out: dict[str, Any] = {}
        gen = torch.Generator().manual_seed(100 + rank)
        for k in cfg["ks"]:
            models = {
                name: DDP(build_model(cfg["hidden"], cfg["layers"], cfg["features"], cfg["classes"]))
                for name in ("every", "gradaccum")
            }
            nparams = sum(p.numel() for p in models["every"].parameters())
            opts = {n: torch.optim.SGD(m.parameters(), lr=0.01) for n, m in models.items()}
            acc = ga.Accumulator(models["gradaccum"], opts["gradaccum"], accum_steps=k)
            ratios, times = [], {"every": [], "gradaccum": []}
            for rnd in range(cfg["warmup"] + cfg["rounds"]):
                mbs = [
                    (
                        torch.randn(cfg["micro_batch"], cfg["features"], generator=gen),
                        torch.randint(0, cfg["classes"], (cfg["micro_batch"],), generator=gen),
                    )
                    for _ in range(k)
                ]
                took = {}
                order = ("every", "gradaccum") if rnd % 2 == 0 else ("gradaccum", "every")
                for name in order:
                    dist.barrier()
                    t0 = time.perf_counter()
                    if name == "every":
                        every_sync_window(models["every"], opts["every"], mbs)
                    else:
                        acc.step(mbs, loss_sum)
                    dt = torch.tensor([time.perf_counter() - t0])
                    dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the window ends when both ranks are done
                    took[name] = float(dt)
                if rnd >= cfg["warmup"]:
                    ratios.append(took["every"] / took["gradaccum"])
                    for name in took:
                        times[name].append(took[name])
            diff = max(
                float((a - b).abs().max().detach())
                for a, b in zip(models["every"].parameters(), models["gradaccum"].parameters(), strict=True)
            )
            q = statistics.quantiles(ratios, n=4)
            out[str(k)] = {
                "ratio_median": statistics.median(ratios),
                "ratio_q1": q[0],
                "ratio_q3": q[2],
                "every_ms": 1e3 * statistics.median(times["every"]),
                "gradaccum_ms": 1e3 * statistics.median(times["gradaccum"]),
                "max_param_diff": diff,
            }
        if rank == 0:
            results.put({"params": nparams, "results": out})
        dist.barrier()  # leave together: a group torn down under a peer's feet can abort it
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16], help="micro-batches per window")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cfg = {
        "ks": args.ks,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "micro_batch": args.micro_batch,
        "hidden": args.hidden,
        "layers": args.layers,
        "features": 256,
        "classes": 64,
    }
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(worker, args=(free_port(), cfg, results), nprocs=WORLD, start_method="spawn")
    report = {"world_size": WORLD, "backend": "gloo", "device": "cpu", "config": cfg, **results.get()}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"DDP on CPU, gloo, {WORLD} processes; MLP with {report['params'] / 1e6:.2f}M parameters "
        f"({4 * report['params'] / 2**20:.1f} MiB of fp32 gradients per sync); micro-batch "
        f"{args.micro_batch}; median of {args.rounds} rounds"
    )
    print(f"{'k':>4} {'every-sync ms':>14} {'gradaccum ms':>13} {'ratio (q1-q3)':>22} {'param diff':>11}")
    for k, r in report["results"].items():
        spread = f"({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f})"
        print(
            f"{k:>4} {r['every_ms']:>14.1f} {r['gradaccum_ms']:>13.1f} "
            f"{r['ratio_median']:>8.2f}x {spread} {r['max_param_diff']:>11.1e}"
        )
    ok = all(r["max_param_diff"] < 1e-4 for r in report["results"].values())
    if not ok:
        print("contenders diverged: the comparison is invalid", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
