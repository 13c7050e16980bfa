"""Peers, report: the results table and the three-panel plot of compare_peers.py's run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from peers_contenders import PEERS
from peers_speed import AA


def _fmt_ratio(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    return f"{s['median']:.2f} ({s['q1']:.2f}-{s['q3']:.2f})"


def _fmt_err(e: float | None) -> str:
    if e is None:
        return "-"
    if math.isinf(e):
        return "missed"
    return f"{e:.1e}" if e < 1e-3 else f"{100 * e:.1f} %"


def markdown(res: dict[str, Any]) -> str:
    """The results table (one row per workload and contender) plus the setting."""
    m, s = res["machine"], res["setting"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, "
        f"1-min load average {m['load_average_1min']:.1f} at the start), "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"accelerate {m['accelerate']}, lightning {m['lightning']}, gradaccum {m['gradaccum']}"
        + (" (quick run)" if s["quick"] else "")
        + ".",
        "",
        f"k = {s['k']} for speed and memory; speed: {s['rounds']} measured rounds after "
        f"{s['warmup']} warm-up, "
        f"clipping at norm {s['speed_clip_norm']} everywhere, {s['optimizer']}. "
        f"Gradient error: {s['grad_error_windows']}, no clipping. Logged loss: the same "
        f"{s['loss_windows']} effective batches of 8 micro-batches' worth, at k = 1, 4, 8, lr = 0.",
        "",
        "| workload | contender | window time, median | speed vs hand (median, IQR) | peak tensor memory | "
        "grad error, full windows | grad error, partial window | logged loss change k=1→4,8 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for wname, w in res["workloads"].items():
        for peer in PEERS:
            if peer not in w["grad_error"]:
                continue
            sp = w["speed"].get(peer, {})
            ms = sp.get("window_ms", {}).get("median")
            mem = w.get("memory", {}).get(peer, {})
            ge = w["grad_error"][peer]
            ll = w["logged_loss"][peer]
            ratio = "1 (baseline)" if peer == "hand" else _fmt_ratio(sp.get("speed_ratio"))
            if peer == "lightning":
                ratio += " †"
            time_ms = f"{ms:.1f} ms" if ms is not None else "-"
            rss = f"{mem['peak_mib']:.1f} MiB" if "peak_mib" in mem else "-"
            lines.append(
                f"| {wname} (micro-batch {w['micro_batch']}) | {peer} | {time_ms} | {ratio} | {rss} | "
                f"{_fmt_err(ge['rel_err_full'])} | {_fmt_err(ge['rel_err_partial'])} | "
                f"{100 * ll['max_rel_change_vs_k1']:.2f} % |"
            )
    noise = ", ".join(
        f"{wname} {_fmt_ratio(w['speed'][AA]['speed_ratio'])}"
        for wname, w in res["workloads"].items()
        if AA in w["speed"]
    )
    lines += ["", f"Noise floor: the hand loop against a second copy of itself in the same rounds: {noise}."]
    if s["missing_peers"]:
        lines += ["", f"Not installed, so not measured: {', '.join(s['missing_peers'])}."]
    lines += [
        "",
        "† Lightning owns its loop, so it runs in its own `Trainer.fit()`; a callback runs one hand-loop "
        "window (on its own model copy) right before or after each Lightning window, so each ratio still "
        "compares two windows measured at the same moment. Its window time includes Lightning's per-batch "
        "hooks.",
    ]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    """Three panels: speed ratio, applied-gradient error, logged-loss change with k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wnames = list(res["workloads"])
    peers = [p for p in PEERS if p in res["setting"]["peers"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(peers)
    for i, peer in enumerate(peers):
        xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(wnames))]
        speed_med, speed_lo, speed_hi, gfull, gpart, lchange = [], [], [], [], [], []
        for wn in wnames:
            w = res["workloads"][wn]
            sr = w["speed"].get(peer, {}).get("speed_ratio")
            med = 1.0 if peer == "hand" else (sr["median"] if sr else float("nan"))
            speed_med.append(med)
            speed_lo.append(0 if peer == "hand" or not sr else med - sr["q1"])
            speed_hi.append(0 if peer == "hand" or not sr else sr["q3"] - med)
            ge = w["grad_error"][peer]
            gfull.append(max(ge["rel_err_full"] or 0, 1e-9))
            gpart.append(max(ge["rel_err_partial"] or 0, 1e-9))
            lchange.append(100 * w["logged_loss"][peer]["max_rel_change_vs_k1"])
        axes[0].bar(xs, speed_med, width, yerr=[speed_lo, speed_hi], label=peer, capsize=2)
        axes[1].bar(xs, gfull, width, label=f"{peer}", color=f"C{i}")
        axes[1].scatter(xs, gpart, marker="v", color=f"C{i}", edgecolor="k", zorder=3)
        bars = axes[2].bar(xs, lchange, width, label=peer)
        axes[2].bar_label(bars, labels=[f"{v:.2g}" if v >= 0.01 else "0" for v in lchange], fontsize=7)
    titles = [
        "speed vs hand loop (median, IQR; >1 = faster)",
        "applied-gradient error vs fp64 (bars: full windows, ▼: partial)",
        "logged loss change when k changes (%)",
    ]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks(range(len(wnames)), wnames)
        ax.set_title(title, fontsize=10)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
