"""Overhead of gradaccum's Accumulator against a hand-written exact loop.

Same small transformer (a tiny transformers GPT-2 from a config), same padded
variable-length micro-batches, same k, same clipping, same AdamW. Each contender
trains its own identical copy of the model; in every round each one runs one window,
in an order that rotates every round, so machine drift hits all alike. Reported: the
per-round speed ratio hand_time / gradaccum_time (> 1: gradaccum faster), as a median
with quartiles, warm-up rounds excluded. At the end all copies must hold the same
parameters, which shows the contenders did the same work.

    python benchmarks/bench_overhead.py            # table
    python benchmarks/bench_overhead.py --json     # JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import gradaccum as ga  # noqa: E402

CONTENDERS = (
    "hand",
    "hand again (A/A control)",
    "gradaccum micro_step",
    "gradaccum step()",
    "gradaccum step(), measure_noise",
)


def run(
    rounds: int = 40,
    warmup: int = 4,
    k: int = 8,
    micro_batch: int = 8,
    n_layer: int = 2,
    seq_len: int = 64,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    param_tol: float = 1e-3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Measure and return the results as a JSON-ready dict.

    A second, identical hand loop runs as an A/A control: its "speed ratio" against
    the first shows how much of any measured difference is just noise.
    """
    common.set_threads(threads)
    work = common.gpt2_workload(n_layer=n_layer, max_len=seq_len)
    windows_total = warmup + rounds
    examples = work.make_examples(windows_total * k * micro_batch, seed)
    micro = work.micro_batches(examples, micro_batch)
    windows = [micro[w * k : (w + 1) * k] for w in range(windows_total)]
    # The hand loop is given each window's token total up front, outside the timing:
    # the most favourable case for it.
    totals = [sum(work.count(mb) for mb in win) for win in windows]

    base = work.build_model(seed)
    models = {name: common.clone(base) for name in CONTENDERS}
    losses: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    fns = _contenders(work, models, losses, windows, totals, k, max_grad_norm)
    times = common.interleave(fns, rounds=rounds, warmup=warmup)
    results = _results(times, models, losses, base)
    return {
        "benchmark": "overhead",
        "setting": {
            "model": work.description,
            "rounds": rounds,
            "warmup_rounds": warmup,
            "k": k,
            "micro_batch": micro_batch,
            "max_grad_norm": max_grad_norm,
            "optimizer": "AdamW",
            "tokens_per_window_median": sorted(totals)[len(totals) // 2],
        },
        "machine": common.machine_info(),
        "results": results,
        # Equal work: every copy's total parameter update agrees with the hand loop's
        # to param_tol (relative).
        "same_parameters": all(e.get("rel_update_diff_vs_hand", 0.0) <= param_tol for e in results.values()),
        "param_tol": param_tol,
    }


def _contenders(
    work: common.Workload,
    models: dict[str, nn.Module],
    losses: dict[str, list[float]],
    windows: Sequence[Sequence[common.Batch]],
    totals: Sequence[int],
    k: int,
    max_grad_norm: float,
) -> dict[str, Callable[[int], None]]:
    """One window of each contender, as a function of the round; each logs its loss in ``losses``."""
    opts = {name: common.make_optimizer(m, work.lr) for name, m in models.items()}
    acc_a, acc_b, acc_n = (
        ga.Accumulator(models[name], opts[name], accum_steps=k, max_grad_norm=max_grad_norm,
                       measure_noise=name.endswith("measure_noise"))
        for name in ("gradaccum micro_step", "gradaccum step()", "gradaccum step(), measure_noise")
    )

    def hand(name: str) -> Callable[[int], None]:
        def window(r: int) -> None:
            loss = common.hand_window(
                models[name], opts[name], windows[r], totals[r], work.loss_sum, max_grad_norm
            )
            losses[name].append(loss)

        return window

    def ga_micro(r: int) -> None:
        losses["gradaccum micro_step"].append(common.gradaccum_window(acc_a, windows[r], work.loss_sum).loss)

    def ga_step(r: int) -> None:
        losses["gradaccum step()"].append(acc_b.step(windows[r], work.loss_sum).loss)

    def ga_noise(r: int) -> None:
        losses["gradaccum step(), measure_noise"].append(acc_n.step(windows[r], work.loss_sum).loss)

    return dict(
        zip(CONTENDERS, (hand(CONTENDERS[0]), hand(CONTENDERS[1]), ga_micro, ga_step, ga_noise), strict=True)
    )


def _results(
    times: dict[str, list[float]],
    models: dict[str, nn.Module],
    losses: dict[str, list[float]],
    base: nn.Module,
) -> dict[str, Any]:
    """Window times, speed ratio to the hand loop and how far each copy ended from it."""
    results = {}
    for name in CONTENDERS:
        entry: dict[str, Any] = {"window_ms": common.summary([t * 1e3 for t in times[name]])}
        if name != "hand":
            entry["speed_ratio"] = common.summary(common.ratios(times["hand"], times[name]))
            entry["max_param_diff_vs_hand"] = max_param_diff(models["hand"], models[name])
            entry["rel_update_diff_vs_hand"] = rel_update_diff(models["hand"], models[name], base)
            entry["max_logged_loss_diff_vs_hand"] = max(
                abs(a - b) for a, b in zip(losses["hand"], losses[name], strict=True)
            )
        results[name] = entry
    return results


@torch.no_grad()
def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    """Largest absolute difference between two models' parameters."""
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@torch.no_grad()
def rel_update_diff(a: nn.Module, b: nn.Module, start: nn.Module) -> float:
    """||θ_a - θ_b|| / ||θ_a - θ_start||: how much two runs' total updates differ, relatively.

    Adam's first steps move every weight by about ±lr whatever its gradient's size, so
    a weight whose gradient is ~0 can flip sign on float rounding alone; an absolute
    bound on single weights is dominated by those, the relative update norm is not.
    """
    diff = torch.cat([(p - q).reshape(-1) for p, q in zip(a.parameters(), b.parameters(), strict=True)])
    moved = torch.cat([(p - q).reshape(-1) for p, q in zip(a.parameters(), start.parameters(), strict=True)])
    return float(diff.norm() / moved.norm())



NOISE_CONTENDERS = ("off", "off again (A/A control)", "measure_noise")


def run_noise(rounds: int = 120, warmup: int = 5, k: int = 8, micro_batch: int = 8, n_layer: int = 3,
              seq_len: int = 64, seed: int = 0) -> dict[str, Any]:
    """measure_noise=True against False: thread CPU time per window, one torch thread.

    CPU time of this thread, not wall time: on a shared machine other processes stretch the wall
    clock of whichever contender they happen to overlap, not the work it does. Each round runs one
    window of each copy in a rotating order; the overhead is the per-round ratio on/off − 1, and a
    second identical "off" copy gives the A/A control (what the noise of the measurement alone is).
    """
    torch.set_num_threads(1)
    work = common.gpt2_workload(n_layer=n_layer, max_len=seq_len)
    examples = work.make_examples((warmup + rounds) * k * micro_batch, seed)
    micro = work.micro_batches(examples, micro_batch)
    windows = [micro[w * k : (w + 1) * k] for w in range(warmup + rounds)]
    base = work.build_model(seed)
    models = {name: common.clone(base) for name in NOISE_CONTENDERS}
    accs = {name: ga.Accumulator(m, common.make_optimizer(m, work.lr), accum_steps=k, max_grad_norm=1.0,
                                 measure_noise=name == "measure_noise") for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in NOISE_CONTENDERS}
    results: dict[str, list[Any]] = {name: [] for name in NOISE_CONTENDERS}
    for r in range(warmup + rounds):
        shift = r % len(NOISE_CONTENDERS)
        for name in NOISE_CONTENDERS[shift:] + NOISE_CONTENDERS[:shift]:
            t = time.thread_time()
            results[name].append(accs[name].step(windows[r], work.loss_sum))
            if r >= warmup:
                times[name].append(time.thread_time() - t)
    off = times["off"]
    over = {name: common.summary([b / a - 1 for a, b in zip(off, times[name], strict=True)])
            for name in NOISE_CONTENDERS[1:]}
    # Against the mean of both "off" copies: drift of one copy (its memory layout, say) cancels.
    both = [(a + b) / 2 for a, b in zip(off, times[NOISE_CONTENDERS[1]], strict=True)]
    on = times["measure_noise"]
    over["measure_noise vs both off"] = common.summary([c / m - 1 for m, c in zip(both, on, strict=True)])
    pairs = zip(models["off"].parameters(), models["measure_noise"].parameters(), strict=True)
    same = all(torch.equal(p, q) for p, q in pairs)
    return {"benchmark": "noise_overhead", "gradaccum_path": str(Path(ga.__file__).parent),
            "setting": {"model": work.description, "rounds": rounds, "warmup_rounds": warmup, "k": k,
                        "micro_batch": micro_batch, "timer": "time.thread_time, 1 torch thread"},
            "machine": common.machine_info(), "window_cpu_ms": {n: common.summary([t * 1e3 for t in ts])
                                                               for n, ts in times.items()},
            "overhead": over, "weights_bitwise_equal": same,
            "noise_scale": results["measure_noise"][-1].noise_scale}


def noise_table(res: dict[str, Any]) -> str:
    lines = ["| contender | CPU ms per window, median | overhead vs off: median | IQR | min - max |",
             "|---|---:|---:|---|---|"]
    for name, o in [("off", None), *res["overhead"].items()]:
        w = res["window_cpu_ms"].get(name, res["window_cpu_ms"]["measure_noise"])
        cells = ("(baseline)", "", "") if o is None else (
            f"{o['median']:+.2%}", f"{o['q1']:+.2%} - {o['q3']:+.2%}", f"{o['min']:+.1%} - {o['max']:+.1%}")
        lines.append(f"| {name} | {w['median']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(res: dict[str, Any]) -> str:
    """Markdown table of a ``run()`` result."""
    lines = [
        "| contender | window time, median (ms) | speed ratio hand / contender: median | IQR | "
        "max abs param diff vs hand | relative update diff vs hand |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for name, e in res["results"].items():
        w = e["window_ms"]["median"]
        if "speed_ratio" in e:
            s = e["speed_ratio"]
            lines.append(
                f"| {name} | {w:.1f} | {s['median']:.3f} | {s['q1']:.3f} - {s['q3']:.3f} | "
                f"{e['max_param_diff_vs_hand']:.1e} | {e['rel_update_diff_vs_hand']:.1e} |"
            )
        else:
            lines.append(f"| {name} | {w:.1f} | (baseline) | | | |")
    return "\n".join(lines)


def describe(res: dict[str, Any]) -> str:
    """The setting, the machine, the table and the equal-work check, as Markdown."""
    m, s = res["machine"], res["setting"]
    return "\n".join(
        [
            f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, "
            f"1-min load average {m['load_average_1min']:.1f}), torch {m['torch']}, "
            f"transformers {m['transformers']}, gradaccum {m['gradaccum']}.",
            "",
            f"{s['model']}; k = {s['k']}, micro-batch {s['micro_batch']} sequences "
            f"(median {s['tokens_per_window_median']} counted tokens per window), {s['rounds']} rounds after "
            f"{s['warmup_rounds']} warm-up, clipping at {s['max_grad_norm']}, AdamW.",
            "",
            table(res),
            "",
            f"Same parameters at the end (relative update difference <= {res['param_tol']:g}): "
            f"{res['same_parameters']}.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=40, help="measured rounds (default 40)")
    p.add_argument("--warmup", type=int, default=4, help="warm-up rounds, not measured (default 4)")
    p.add_argument("--k", type=int, default=8, help="micro-batches per optimizer step (default 8)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch (default 8)")
    p.add_argument("--layers", type=int, default=2, help="GPT-2 layers (default 2)")
    p.add_argument("--seq-len", type=int, default=64, help="longest sequence (default 64)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--noise", action="store_true",
                   help="measure_noise on vs off instead (3-layer GPT-2, thread CPU time, A/A control); "
                        "--rounds defaults to 120 there")
    p.add_argument(
        "--write-docs",
        action="store_true",
        help="also store the result in docs/benchmarks.json and its table in docs/benchmarks.md",
    )
    a = p.parse_args(argv)
    if a.noise:
        nres = run_noise(rounds=a.rounds if a.rounds != 40 else 120, k=a.k, micro_batch=a.micro_batch)
        print(json.dumps(nres, indent=2) if a.json else noise_table(nres))
        return 0 if nres["weights_bitwise_equal"] else 1
    res = run(
        rounds=a.rounds,
        warmup=a.warmup,
        k=a.k,
        micro_batch=a.micro_batch,
        n_layer=a.layers,
        seq_len=a.seq_len,
        threads=a.threads,
    )
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(describe(res))
    if a.write_docs:
        common.merge_json(common.DOCS / "benchmarks.json", "overhead", res)
        common.write_section(common.DOCS / "benchmarks.md", "overhead", describe(res))
    return 0 if res["same_parameters"] else 1


if __name__ == "__main__":
    sys.exit(main())
