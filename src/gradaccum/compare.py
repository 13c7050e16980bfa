"""``gradaccum compare``: see that accumulation trains like the full batch, and what does not.

From the same initial weights and the same data order, every contender sees the same
examples (step s of the effective batch E takes examples [s·E, (s+1)·E) of a seeded
per-epoch shuffle):

- ``full``: one forward/backward over all E examples per step (only when the memory
  planner says it fits; otherwise ``accumulated`` is the reference).
- ``accumulated``: gradaccum, k = E / micro_batch micro-batches per step.
- ``mean-of-means``: each micro-batch's MEAN loss divided by k, summed, one step: what
  Accelerate and Lightning do. Off whenever micro-batches hold different item counts.
- ``small``: no accumulation: batch = micro-batch, k times the optimizer steps.

For a loss that couples a window's examples (in-batch negatives: ``encode`` and ``window_loss``
given, ``loss_fn`` the same loss on one micro-batch) the contenders are ``full``, ``cached``
(``Accumulator.step_cached``: the full batch's gradient) and ``plain`` (``step()`` with the loss
per micro-batch: fewer negatives, the objective every peer's accumulation trains; its logged
loss is that objective's).

Every contender uses AdamW (weight decay 0.01), a constant learning rate and clipping at
1.0. The loss it logs is the exact item-mean loss of the step's examples before the
update, so the curves are on one scale; ``small``'s k steps per window are also summed
into one point per window for the deviation panel and the table.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradaccum import checkpoint
from gradaccum.accumulator import Accumulator, LossFn, clip_grads_, total_norm
from gradaccum.cached import EncodeFn, WindowLossFn
from gradaccum.stream import BatchShape, stream_indices

CONTENDERS = ("full", "accumulated", "mean-of-means", "small")
MAX_GRAD_NORM = 1.0
COMPARE_JSON = "compare.json"
COMPARE_PNG = "compare.png"


@dataclass
class Series:
    """What one contender did."""

    loss: list[float]
    """Item-mean loss of each optimizer step's examples, before its update."""
    examples_seen: list[int]
    """Examples seen after each optimizer step."""
    grad_norm: list[float]
    """Norm of the applied (normalised, unclipped) gradient at each step."""
    window_loss: list[float]
    """Item-mean loss per effective batch (for ``small``: its k steps pooled)."""
    seconds: float = 0.0
    peak_bytes: int = 0
    params: list[torch.Tensor] | None = None


data_order = stream_indices
"""Dataset indices at stream positions [start, start + count): the Trainer's order, so a
compare run sees what ``gradaccum train`` would."""


def full_batch_fits(
    model: nn.Module, dataset: Sequence[Any], loss_fn: LossFn, collate_fn: Callable[[list[Any]], Any],
    effective_batch: int, budget_bytes: int | None = None,
) -> tuple[bool, str]:
    """Whether one pass over the whole effective batch fits, by the memory planner
    (worst case: the longest example, repeated); and a note saying what it predicted."""
    from gradaccum import memory

    longest = max(dataset, key=lambda ex: len(ex[0]) if isinstance(ex, (tuple, list)) else 0)
    try:
        p = memory.plan(model, loss_fn, lambda n: collate_fn([longest] * n), effective_batch,
                        budget_bytes=budget_bytes, world_size=1, broadcast=False)
    except memory.BudgetTooSmall as e:
        return False, f"does not fit (even micro-batch 1 needs {memory.format_bytes(e.needed_bytes)})"
    row = next(r for r in p.table if r["micro_batch"] == effective_batch)
    predicted, budget = memory.format_bytes(row["predicted_peak_bytes"]), memory.format_bytes(p.budget_bytes)
    if row["predicted_peak_bytes"] > p.budget_bytes:
        return False, f"does not fit (predicted {predicted} of {budget})"
    return True, f"fits (predicted {predicted} of {budget})"


def run(
    model: nn.Module,
    dataset: Sequence[Any],
    loss_fn: LossFn,
    collate_fn: Callable[[list[Any]], Any],
    effective_batch: int,
    micro_batch: int,
    steps: int,
    lr: float,
    seed: int = 0,
    full_fits: bool = True,
    full_note: str = "",
    progress: Callable[[str], None] | None = None,
    encode: EncodeFn | None = None,
    window_loss: WindowLossFn | None = None,
) -> dict[str, Any]:
    """Train every contender from ``model``'s weights; returns compare.json's content (with ``encode``
    and ``window_loss``: the contenders of a loss coupling the window, see the module doc)."""
    k = BatchShape(effective_batch, micro_batch).accum_steps
    windows = [
        [dataset[i] for i in data_order(len(dataset), seed, s * effective_batch, effective_batch)]
        for s in range(steps)
    ]
    start = [p.detach().clone() for p in model.parameters()]
    runners: dict[str, Any] = {"full": _full, "accumulated": _accumulated, "mean-of-means": _mean_of_means,
                               "small": _small}
    if encode is not None and window_loss is not None:
        cached = functools.partial(_accumulated, encode=encode, window_loss=window_loss)
        runners = {"full": _full, "cached": cached, "plain": _accumulated}
    series: dict[str, Series] = {}
    for name in runners:
        if name == "full" and not full_fits:
            continue
        if progress is not None:
            progress(name)
        work = copy.deepcopy(model)
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(work.parameters(), lr=lr, weight_decay=0.01)
        t0 = time.perf_counter()
        s = runners[name](work, opt, windows, loss_fn, collate_fn, micro_batch, k)
        s.seconds = time.perf_counter() - t0
        s.params = [p.detach().clone() for p in work.parameters()]
        series[name] = s
    reference = "full" if "full" in series else next(iter(series))
    return _result(series, list(runners), reference, start, effective_batch, micro_batch, k, steps, lr, seed,
                   full_note)


# ----------------------------------------------------------------------------- contenders
def _sums(model: nn.Module, loss_fn: LossFn, batch: Any) -> tuple[torch.Tensor, float]:
    loss, n = loss_fn(model, batch)
    return loss, float(n)


def _value(loss: torch.Tensor) -> float:
    return float(loss.detach())


def _apply(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    """Clip the gradient that is in .grad (already a mean), step, clear; returns its norm."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = float(total_norm(grads))
    clip_grads_(grads, MAX_GRAD_NORM, norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def _micro(window: list[Any], micro_batch: int) -> list[list[Any]]:
    return [window[i : i + micro_batch] for i in range(0, len(window), micro_batch)]


def _full(model: nn.Module, opt: Any, windows: list[list[Any]], loss_fn: LossFn, collate: Any,
          micro_batch: int, k: int) -> Series:
    s = Series([], [], [], [])
    for step, window in enumerate(_peak_first(s, windows)):
        loss, n = _sums(model, loss_fn, collate(window))
        (loss / n).backward()
        s.loss.append(_value(loss) / n)
        s.grad_norm.append(_apply(model, opt))
        s.examples_seen.append((step + 1) * len(window))
    s.window_loss = list(s.loss)
    return s


def _accumulated(model: nn.Module, opt: Any, windows: list[list[Any]], loss_fn: LossFn, collate: Any,
                 micro_batch: int, k: int, encode: EncodeFn | None = None,
                 window_loss: WindowLossFn | None = None) -> Series:
    """gradaccum's ``step()``; with ``encode`` and ``window_loss``, ``step_cached()`` (``cached``)."""
    s = Series([], [], [], [])
    acc = Accumulator(model, opt, accum_steps=k, max_grad_norm=MAX_GRAD_NORM)
    for step, window in enumerate(_peak_first(s, windows)):
        micro = (collate(mb) for mb in _micro(window, micro_batch))
        res = acc.step(micro, loss_fn) if encode is None else acc.step_cached(micro, encode, window_loss)
        s.loss.append(res.loss)
        s.grad_norm.append(res.grad_norm)
        s.examples_seen.append((step + 1) * len(window))
    s.window_loss = list(s.loss)
    return s


def _mean_of_means(model: nn.Module, opt: Any, windows: list[list[Any]], loss_fn: LossFn, collate: Any,
                   micro_batch: int, k: int) -> Series:
    s = Series([], [], [], [])
    for step, window in enumerate(_peak_first(s, windows)):
        total, items = 0.0, 0.0
        for mb in _micro(window, micro_batch):
            loss, n = _sums(model, loss_fn, collate(mb))
            (loss / max(n, 1.0) / k).backward()  # each micro-batch's MEAN, divided by k
            total, items = total + _value(loss), items + n
        s.loss.append(total / items)
        s.grad_norm.append(_apply(model, opt))
        s.examples_seen.append((step + 1) * len(window))
    s.window_loss = list(s.loss)
    return s


def _small(model: nn.Module, opt: Any, windows: list[list[Any]], loss_fn: LossFn, collate: Any,
           micro_batch: int, k: int) -> Series:
    s = Series([], [], [], [])
    seen = 0
    for window in _peak_first(s, windows):
        total, items = 0.0, 0.0
        for mb in _micro(window, micro_batch):
            loss, n = _sums(model, loss_fn, collate(mb))
            (loss / max(n, 1.0)).backward()
            seen += len(mb)
            s.loss.append(_value(loss) / n if n else math.nan)
            s.grad_norm.append(_apply(model, opt))
            s.examples_seen.append(seen)
            total, items = total + _value(loss), items + n
        s.window_loss.append(total / items)
    return s


def _peak_first(s: Series, windows: list[list[Any]]) -> Any:
    """Yield the windows; the first one runs under a peak-memory tracker (its optimizer
    state is created then, so it is the contender's peak)."""
    from gradaccum.memory import PeakTracker

    on_cuda = torch.cuda.is_available()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield windows[0]
        s.peak_bytes = int(torch.cuda.max_memory_allocated() - base)
    else:
        with PeakTracker("cpu") as tracker:
            yield windows[0]
        s.peak_bytes = int(tracker.peak_bytes)
    yield from windows[1:]


# ----------------------------------------------------------------------------- results
def _rel_dev(got: list[float], want: list[float]) -> list[float]:
    return [abs(a - b) / abs(b) if b else math.inf for a, b in zip(got, want, strict=True)]


def _param_rel_diff(got: list[torch.Tensor], want: list[torch.Tensor], start: list[torch.Tensor]) -> float:
    """||θ - θ_ref|| / ||θ_ref - θ_0||: the difference against the reference's whole update."""
    num = sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(got, want, strict=True))
    den = sum(float(((b.double() - c.double()) ** 2).sum()) for b, c in zip(want, start, strict=True))
    return math.sqrt(num / den) if den else math.inf


def _result(series: dict[str, Series], names: list[str], reference: str, start: list[torch.Tensor],
            effective_batch: int, micro_batch: int, k: int, steps: int, lr: float, seed: int, full_note: str
            ) -> dict[str, Any]:
    ref = series[reference]
    assert ref.params is not None
    contenders: dict[str, Any] = {}
    for name in names:
        if name not in series:
            contenders[name] = {"ran": False, "reason": full_note or "does not fit"}
            continue
        s = series[name]
        assert s.params is not None
        dev = _rel_dev(s.window_loss, ref.window_loss)
        contenders[name] = {
            "ran": True,
            "loss": s.loss,
            "examples_seen": s.examples_seen,
            "grad_norm": s.grad_norm,
            "window_loss": s.window_loss,
            "rel_deviation": dev,
            "max_rel_deviation": max(dev),
            "final_loss": s.window_loss[-1],
            "optimizer_steps": len(s.loss),
            "seconds": round(s.seconds, 3),
            "peak_bytes": s.peak_bytes,
            f"param_rel_diff_vs_{reference}": _param_rel_diff(s.params, ref.params, start),
        }
    return {
        "reference": reference,
        "effective_batch": effective_batch,
        "micro_batch": micro_batch,
        "accum_steps": k,
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "contenders": contenders,
    }


def tracker_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per optimizer step of the effective batch, for the trackers: each contender's loss
    of that window, its deviation from the reference and (one step per window) its gradient norm."""
    rows = []
    for s in range(result["steps"]):
        row: dict[str, Any] = {"step": s + 1, "examples_seen": (s + 1) * result["effective_batch"]}
        for name, c in result["contenders"].items():
            if c["ran"]:
                row[f"{name}/loss"], row[f"{name}/rel_deviation"] = c["window_loss"][s], c["rel_deviation"][s]
                if len(c["grad_norm"]) == result["steps"]:
                    row[f"{name}/grad_norm"] = c["grad_norm"][s]
        rows.append(row)
    return rows


def tracker_summary(result: dict[str, Any]) -> dict[str, Any]:
    """compare.json's numbers per contender (final loss, deviation, seconds, peak memory, ...)."""
    return {name: {k: v for k, v in c.items() if not isinstance(v, list)}
            for name, c in result["contenders"].items() if c["ran"]}


def table(result: dict[str, Any]) -> str:
    """The console table: final loss, deviation from the reference, seconds, peak memory."""
    from gradaccum.memory import format_bytes

    ref = result["reference"]
    lines = [
        f"effective batch {result['effective_batch']} = micro-batch {result['micro_batch']} x "
        f"{result['accum_steps']} accumulation steps; {result['steps']} steps; reference: {ref}",
        f"{'contender':<14} {'final loss':>10} {'max dev vs ' + ref:>19} {'params vs ' + ref:>18} "
        f"{'opt steps':>9} {'seconds':>8} {'peak mem':>10}",
    ]
    for name, c in result["contenders"].items():
        if not c["ran"]:
            lines.append(f"{name:<14} {c['reason']}")
            continue
        diff = c[f"param_rel_diff_vs_{ref}"]
        lines.append(
            f"{name:<14} {c['final_loss']:>10.5f} {c['max_rel_deviation']:>19.2e} {diff:>18.2e} "
            f"{c['optimizer_steps']:>9} {c['seconds']:>8.1f} {format_bytes(c['peak_bytes']):>10}"
        )
    return "\n".join(lines)


def write(result: dict[str, Any], out: Path) -> None:
    """compare.json and compare.png into ``out`` (atomically each)."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1) + "\n"
    checkpoint.atomic_write_bytes(out / COMPARE_JSON, lambda f: f.write(text.encode()))
    plot(result, out / COMPARE_PNG)


COLORS = {"full": "black", "accumulated": "tab:blue", "mean-of-means": "tab:red", "small": "tab:orange",
          "cached": "tab:blue", "plain": "tab:red"}


def plot(result: dict[str, Any], path: Path) -> None:
    """Loss vs examples seen; relative deviation from the reference (log); gradient noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = result["reference"]
    ran = {n: c for n, c in result["contenders"].items() if c["ran"]}
    fig, axes = plt.subplots(3, 1, figsize=(8, 10), constrained_layout=True, sharex=True)
    for name, c in ran.items():
        style = {"color": COLORS[name], "label": name, "lw": 1.2}
        if name == "full":
            style.update(lw=2.5, alpha=0.5)
        axes[0].plot(c["examples_seen"], c["loss"], **style)
    axes[0].set_ylabel("training loss (item mean)")
    axes[0].legend()
    window_x = ran[ref]["examples_seen"]
    for name, c in ran.items():
        if name == ref:
            continue
        dev = [max(d, 1e-17) for d in c["rel_deviation"]]
        axes[1].plot(window_x, dev, color=COLORS[name], label=f"{name} vs {ref}")
    axes[1].set_yscale("log")
    axes[1].axhspan(1e-17, 1e-5, color="green", alpha=0.08, label="float rounding")
    axes[1].set_ylabel(f"|loss - {ref}| / {ref}")
    axes[1].legend(fontsize=8)
    for name, batch in (("small", result["micro_batch"]), ("accumulated", result["effective_batch"]),
                        ("cached", result["effective_batch"]), ("plain", result["effective_batch"])):
        if name in ran:
            axes[2].plot(ran[name]["examples_seen"], ran[name]["grad_norm"], color=COLORS[name],
                         label=f"{name} (batch {batch})", lw=0.8 if name == "small" else 1.5)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("gradient norm per step (log)")
    axes[2].set_xlabel("examples seen")
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"gradaccum compare: effective batch {result['effective_batch']} = "
                 f"{result['micro_batch']} x {result['accum_steps']}")
    checkpoint.atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
