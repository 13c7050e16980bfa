"""Memory over a long run: RSS of ``gradaccum train`` sampled every second.

    python benchmarks/rss_long_run.py [--steps 2000] [--effective-batch 8] [--out DIR]

Starts the CLI in a subprocess (small effective batch, so 2,000 steps take a minute
or two on a CPU), reads VmRSS from /proc/PID/status once a second, and writes
``rss.json`` (every sample: seconds, step reached, RSS bytes) beside the run. It prints
the RSS at the first logged step and at the last step of the loop, the peak, the slope
of a least-squares line through those samples (bytes per 1,000 steps), and the RSS
after the end-of-run plot (matplotlib's import adds ~20 MiB once):
a leak shows as a slope well above zero, a flat run as noise around it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def steps_logged(metrics: Path) -> int:
    try:
        with open(metrics, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def watch(proc: subprocess.Popen, metrics: Path, started: float) -> list[dict[str, Any]]:
    """RSS and the step reached, sampled every second until the process ends."""
    samples = []
    while proc.poll() is None:
        rss = rss_bytes(proc.pid)
        if rss is not None:
            step = steps_logged(metrics)
            samples.append({"t": round(time.monotonic() - started, 2), "step": step, "rss": rss})
        time.sleep(1.0)
    return samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--effective-batch", type=int, default=8)
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--out", default=None, help="run directory (default: a fresh temporary one)")
    args = ap.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gradaccum-rss-")) / "run"
    cmd = [sys.executable, "-m", "gradaccum", "train", "--steps", str(args.steps),
           "--effective-batch", str(args.effective_batch), "--checkpoint-every", str(args.checkpoint_every),
           "--out", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples = watch(proc, out / "metrics.jsonl", started)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        print(f"train failed ({proc.returncode}): {err.strip()[-2000:]}", file=sys.stderr)
        return 1
    # The training loop proper: after the first step, before the end-of-run plot (which
    # imports matplotlib, ~20 MiB, once).
    running = [s for s in samples if 1 <= s["step"] < args.steps]
    if len(running) < 2:
        print("run too short to measure", file=sys.stderr)
        return 1
    first, last = running[0], running[-1]
    n = len(running)
    mx = sum(s["step"] for s in running) / n
    my = sum(s["rss"] for s in running) / n
    var = sum((s["step"] - mx) ** 2 for s in running)
    slope = sum((s["step"] - mx) * (s["rss"] - my) for s in running) / var if var else 0.0
    result = {
        "command": cmd,
        "steps": args.steps,
        "effective_batch": args.effective_batch,
        "seconds": round(time.monotonic() - started, 1),
        "rss_start_bytes": first["rss"],
        "rss_start_step": first["step"],
        "rss_end_bytes": last["rss"],
        "rss_end_step": last["step"],
        "rss_peak_bytes": max(s["rss"] for s in running),
        "rss_final_bytes": samples[-1]["rss"],
        "slope_bytes_per_1000_steps": round(slope * 1000),
        "samples": samples,
    }
    (out / "rss.json").write_text(json.dumps(result, indent=1) + "\n")
    mib = 2**20
    print(f"{args.steps} steps, effective batch {args.effective_batch}, {result['seconds']} s, "
          f"{len(samples)} samples (every 1 s)")
    print(f"RSS at step {first['step']}: {first['rss'] / mib:.1f} MiB; at step {last['step']}: "
          f"{last['rss'] / mib:.1f} MiB; peak {result['rss_peak_bytes'] / mib:.1f} MiB; "
          f"trend {slope * 1000 / mib:+.2f} MiB per 1000 steps; after the final plot and summary "
          f"{samples[-1]['rss'] / mib:.1f} MiB")
    print(f"samples: {out / 'rss.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
