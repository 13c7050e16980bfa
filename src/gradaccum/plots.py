"""loss.png: the run's curves from its metrics rows (loss, optimiser, critical batch).

Kept apart from :mod:`gradaccum.runlog` (which writes the rows) so each stays one job;
matplotlib is imported only when a picture is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Series:
    key: str
    label: str
    axis: str = "left"  # "left" or "right" (a twin y axis)
    log: bool = False
    style: str = "-"
    band: tuple[str, str] | None = None  # row keys of a shaded interval around the line (low, high)


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: tuple[Series, ...]
    right_ylabel: str = ""
    always: bool = False  # drawn even when none of its series has data
    needs: str = ""  # drawn only when some row has this key


PANELS: tuple[Panel, ...] = (
    Panel("loss", "mean loss per item",
          (Series("loss", "train loss"), Series("eval_loss", "eval loss", style="o-")), always=True),
    Panel("optimiser", "learning rate", (Series("lr", "learning rate"),
                                         Series("grad_norm", "gradient norm (before clipping)", axis="right",
                                                log=True)),
          right_ylabel="gradient norm", always=True),
    Panel("critical batch (gradient noise scale)", "examples",
          (Series("critical_batch", "measured critical batch (band: 90% interval)", log=True,
                  band=("critical_batch_low", "critical_batch_high")),
           Series("effective_batch", "effective batch in use", style="--")), needs="critical_batch"),
)
"""loss.png's panels, left to right. A series is drawn when some row has its key, so
new metrics (eval loss, noise scale) only need an entry here."""


def _points(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _band(ax: Any, rows: Sequence[dict[str, Any]], keys: tuple[str, str], color: str) -> None:
    """Shade low..high at the steps that have both ends (an unbounded high has none yet)."""
    lows, highs = (dict(zip(*_points(rows, key), strict=True)) for key in keys)
    steps = [x for x in lows if x in highs]
    if steps:
        ax.fill_between(steps, [lows[x] for x in steps], [highs[x] for x in steps], color=color, alpha=0.2,
                        lw=0)


def plot_losses(rows: Sequence[dict[str, Any]], path: Path, panels: Sequence[Panel] = PANELS) -> None:
    """loss.png: the loss, then learning rate and gradient norm, then any optional panel with data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradaccum.checkpoint import atomic_write_bytes

    rows = [r for r in rows if not r.get("skipped") and isinstance(r.get("step"), int)]
    shown = [p for p in panels
             if p.always or (_points(rows, p.needs)[0] if p.needs else any(_points(rows, s.key)[0]
                                                                          for s in p.series))]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), constrained_layout=True,
                             squeeze=False)
    for ax, panel in zip(axes[0], shown, strict=True):
        right = None
        handles = []
        for i, s in enumerate(panel.series):
            xs, ys = _points(rows, s.key)
            if not xs:
                continue
            if s.axis == "right":
                right = right or ax.twinx()
                target = right
            else:
                target = ax
            (line,) = target.plot(xs, ys, s.style, lw=1.2, ms=3, color=f"C{i}", label=s.label)
            if s.band is not None:
                _band(target, rows, s.band, f"C{i}")
            if s.log and min(ys) > 0:
                target.set_yscale("log")
            handles.append(line)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(panel.ylabel)
        if right is not None:
            right.set_ylabel(panel.right_ylabel)
        ax.set_title(panel.title)
        ax.grid(alpha=0.3)
        if len(handles) > 1:
            ax.legend(handles=handles, loc="best", fontsize="small")
    batches = [r["effective_batch"] for r in rows if isinstance(r.get("effective_batch"), int)]
    eb = "?" if not batches else (str(batches[0]) if min(batches) == max(batches)
                                  else f"{batches[0]} -> {batches[-1]}, auto")
    fig.suptitle(f"gradaccum (effective batch {eb})")
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
