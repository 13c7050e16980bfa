"""Does ``--effective-batch auto`` pay where the literature says it should: training from scratch?

A small byte-level language model (a 2-layer causal transformer, width 64, 64-byte context)
learns the Python standard library's own sources, read from ``sysconfig``'s stdlib path
(nothing downloaded; every ``*.py`` file of the top directory, sorted; one file in 20 is held
out). Arms, each with AdamW, clipping at 1 and a 10-step linear lr warm-up:

- three fixed effective batches, each with its lr tuned on a 3-point grid (seed 0: the lr
  that reaches the target in the fewest tokens is kept for the other seeds);
- ``auto``: gradaccum's rule (:class:`gradaccum.adaptive.AdaptiveBatch`, the 90% interval of
  the measured critical batch), starting at the smallest fixed batch with its tuned lr,
  the lr scaled by the square root of the batch's growth;
- ``warm-up``: a fixed batch schedule, the smallest batch doubled every ``--ramp-tokens``
  tokens up to the largest, the lr scaled the same way.

Reported per arm over the seeds: optimizer steps and tokens until the held-out loss first
reaches ``--target`` (linearly interpolated between evaluations), median and range.

    python benchmarks/adaptive_batch.py                # the full run (see docs/noise.md)
    python benchmarks/adaptive_batch.py --smoke        # ~2 minutes, one seed
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import sysconfig
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import gradaccum as ga  # noqa: E402
from gradaccum.adaptive import AdaptiveBatch, scale_lr  # noqa: E402

CONTEXT = 64
MICRO = 4  # sequences per micro-batch: the memory never changes, only accum_steps does


# --------------------------------------------------------------------------- data and model
def stdlib_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) bytes of the standard library's top-level .py files."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, held = [], []
    for i, f in enumerate(files):
        (held if i % 20 == 7 else train).append(f.read_bytes())
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(held)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(256, d), nn.Parameter(torch.zeros(CONTEXT, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        nn.init.normal_(self.emb.weight, std=0.02)  # GPT-2's init: tied logits start near uniform

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x) @ self.emb.weight.T  # tied output


def loss_sum(model: nn.Module, seqs: torch.Tensor) -> tuple[torch.Tensor, int]:
    logits, labels = model(seqs[:, :-1]), seqs[:, 1:]
    return F.cross_entropy(logits.reshape(-1, 256), labels.reshape(-1), reduction="sum"), labels.numel()


def windows_of(data: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows of CONTEXT + 1 bytes."""
    starts = torch.randint(0, len(data) - CONTEXT - 1, (n,), generator=gen)
    return data[starts[:, None] + torch.arange(CONTEXT + 1)]


@torch.no_grad()
def held_out_loss(model: nn.Module, held: torch.Tensor) -> float:
    total, n = 0.0, 0
    for chunk in held.split(64):
        s, k = loss_sum(model, chunk)
        total, n = total + float(s), n + k
    return total / n


# --------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class Arm:
    name: str
    batch: int  # sequences; the starting batch for auto and warm-up
    lr: float
    kind: str = "fixed"  # fixed | auto | warmup
    max_batch: int = 0
    lr_rule: str = "sqrt"  # how the lr follows a growing batch: sqrt | none


@dataclass(frozen=True)
class Budget:
    target: float
    max_tokens: int
    eval_tokens: int  # evaluate every this many training tokens
    ramp_tokens: int  # warm-up arm: double the batch after every this many tokens
    held_out: int  # held-out sequences


def train_arm(arm: Arm, seed: int, budget: Budget) -> dict[str, Any]:
    """Train until the held-out loss reaches the target (or the token budget runs out)."""
    torch.set_num_threads(1)
    train, held_bytes = stdlib_bytes()
    held = windows_of(held_bytes, budget.held_out, torch.Generator().manual_seed(1234))
    torch.manual_seed(seed)
    model = ByteLM()
    opt = torch.optim.AdamW(model.parameters(), lr=arm.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    acc = ga.Accumulator(model, opt, accum_steps=arm.batch // MICRO, scheduler=sched, max_grad_norm=1.0,
                         measure_noise=True)
    auto = AdaptiveBatch(MICRO, max_effective_batch=arm.max_batch, lr_rule="sqrt") if arm.kind == "auto" \
        else None
    gen = torch.Generator().manual_seed(seed)
    steps, tokens, next_eval, t0 = 0, 0, 0, time.perf_counter()
    curve: list[tuple[int, int, float]] = []  # (steps, tokens, held-out loss)
    batch, grown = arm.batch, []
    while tokens < budget.max_tokens:
        if tokens >= next_eval:
            curve.append((steps, tokens, held_out_loss(model, held)))
            next_eval += budget.eval_tokens
            if curve[-1][2] <= budget.target:
                break
        seqs = windows_of(train, batch, gen)
        res = acc.step(list(seqs.split(MICRO)), loss_sum)
        steps, tokens = steps + 1, tokens + res.num_items
        new = _next_batch(arm, auto, acc, res, batch, tokens, budget)
        if new != batch:
            # the square-root rule, auto's default for AdamW
            scale_lr(opt, sched, math.sqrt(new / batch) if arm.lr_rule == "sqrt" else 1.0)
            batch = new
            grown.append((steps, tokens, batch))
            acc.accum_steps = batch // MICRO
    reached = _crossing(curve, budget.target)
    return {"arm": arm.name, "seed": seed, "lr": arm.lr, "reached": reached is not None,
            "steps": reached[0] if reached else None, "tokens": reached[1] if reached else None,
            "final_batch": batch, "grown": grown, "seconds": round(time.perf_counter() - t0, 1),
            "curve": curve}


def _next_batch(arm: Arm, auto: AdaptiveBatch | None, acc: ga.Accumulator, res: ga.StepResult, batch: int,
                tokens: int, budget: Budget) -> int:
    if auto is not None:
        low = None if res.noise_scale_low is None else res.noise_scale_low / CONTEXT  # tokens -> sequences
        auto.update(low, acc.noise.windows if acc.noise is not None else 0)
        return auto.effective_batch
    if arm.kind == "warmup":
        return min(arm.batch * 2 ** (tokens // budget.ramp_tokens), arm.max_batch)
    return batch


def _crossing(curve: list[tuple[int, int, float]], target: float) -> tuple[float, float] | None:
    """(steps, tokens) where the held-out loss first reaches the target, interpolated linearly."""
    for (s0, t0, l0), (s1, t1, l1) in zip(curve, curve[1:], strict=False):
        if l1 <= target < l0:
            f = (l0 - target) / (l0 - l1)
            return s0 + f * (s1 - s0), t0 + f * (t1 - t0)
    return None


# --------------------------------------------------------------------------- the experiment
def run(seeds: int, batches: tuple[int, ...], lr_grid: tuple[float, ...], base_lr: float, budget: Budget,
        workers: int) -> dict[str, Any]:
    """Tune each fixed arm's lr on seed 0, then every arm on every seed."""
    small, large = batches[0], batches[-1]
    lr_of = lambda b: base_lr * math.sqrt(b / small)  # noqa: E731
    tuning = [Arm(f"fixed {b}", b, lr_of(b) * f) for b in batches for f in lr_grid]
    with ProcessPoolExecutor(workers) as pool:
        tuned = list(pool.map(train_arm, tuning, [0] * len(tuning), [budget] * len(tuning)))
        best = {}
        for arm, r in zip(tuning, tuned, strict=True):
            # fewest tokens to the target; among arms that never reached it, the lowest final loss
            key = (r["tokens"] if r["reached"] else math.inf, 0 if r["reached"] else r["curve"][-1][2])
            if arm.batch not in best or key < best[arm.batch][0]:
                best[arm.batch] = (key, arm, r)
        arms = [best[b][1] for b in batches]
        start_lr = best[small][1].lr
        arms += [Arm("auto", 2 * MICRO, start_lr * math.sqrt(2 * MICRO / small), "auto", large),
                 Arm("warm-up", small, start_lr, "warmup", large)]
        jobs = [(a, s) for s in range(seeds) for a in arms if not (s == 0 and a.kind == "fixed")]
        results = [best[b][2] for b in batches]
        results += list(pool.map(train_arm, [a for a, _ in jobs], [s for _, s in jobs], [budget] * len(jobs)))
    return {"setting": {"seeds": seeds, "batches": batches, "lr_grid": lr_grid, "base_lr": base_lr,
                        **asdict(budget), "micro_batch": MICRO, "context": CONTEXT,
                        "model": "byte-level causal transformer, 2 layers, width 64, 4 heads, tied output"},
            "machine": common.machine_info(), "tuning": [_brief(r) for r in tuned],
            "results": [_brief(r) for r in results], "arms": [asdict(a) for a in arms]}


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in r.items() if k != "curve"}, "final_loss": r["curve"][-1][2],
            "evals": len(r["curve"])}


def table(res: dict[str, Any]) -> str:
    """Median and range over seeds of steps and tokens to the target, per arm."""
    lines = ["| arm | lr (start) | reached | optimizer steps: median (range) | tokens: median (range) | "
             "final batch |", "|---|---:|---|---:|---:|---:|"]
    for arm in res["arms"]:
        rs = [r for r in res["results"] if r["arm"] == arm["name"]]
        ok = [r for r in rs if r["reached"]]
        finals = sorted({r["final_batch"] for r in rs})
        lines.append(f"| {arm['name']} | {arm['lr']:.2g} | {len(ok)}/{len(rs)} | {_cell(ok, 'steps')} | "
                     f"{_cell(ok, 'tokens')} | {', '.join(map(str, finals))} |")
    return "\n".join(lines)


def _cell(ok: list[dict[str, Any]], key: str) -> str:
    if not ok:
        return "-"
    xs = [r[key] for r in ok]
    return f"{statistics.median(xs):,.0f} ({min(xs):,.0f}-{max(xs):,.0f})"


def verdict(res: dict[str, Any]) -> str:
    """The issue's goal: auto in <= 0.7x the steps of the fixed arm needing the fewest tokens, and
    <= 1.15x its tokens."""
    def med(name: str, key: str) -> float:
        ok = [r[key] for r in res["results"] if r["arm"] == name and r["reached"]]
        return statistics.median(ok) if len(ok) == res["setting"]["seeds"] else math.inf
    fixed = [a["name"] for a in res["arms"] if a["kind"] == "fixed"]
    best = min(fixed, key=lambda n: med(n, "tokens"))
    steps, tokens = med("auto", "steps") / med(best, "steps"), med("auto", "tokens") / med(best, "tokens")
    met = steps <= 0.7 and tokens <= 1.15
    return (f"Against {best} (the fixed batch needing the fewest tokens): auto took {steps:.2f}x its "
            f"optimizer steps and {tokens:.2f}x its tokens (medians over seeds); the goal (<= 0.7x steps, "
            f"<= 1.15x tokens) is {'met' if met else 'not met'}.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="~2 minutes: one seed, one lr, a small budget")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--target", type=float, default=1.9, help="held-out loss (nats per byte) to reach")
    p.add_argument("--max-tokens", type=int, default=3_000_000, help="per run, if the target is not reached")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    budget = Budget(a.target, a.max_tokens, eval_tokens=32_768, ramp_tokens=262_144, held_out=192)
    grid = (0.5, 1.0, 2.0)
    if a.smoke:
        budget = Budget(2.9, 120_000, eval_tokens=8_192, ramp_tokens=16_384, held_out=64)
        a.seeds, grid = 1, (1.0,)
    res = run(a.seeds, (8, 32, 128), grid, 2e-3, budget, a.workers)
    print(f"Target held-out loss {budget.target} nats/byte; {a.seeds} seed(s).\n")
    print(table(res))
    print("\n" + verdict(res))
    if a.json is not None:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
