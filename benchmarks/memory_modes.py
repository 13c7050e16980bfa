"""Predicted vs measured peak memory per rank, for each large-model mode, on CPU (issue 12).

A small Llama built from a config (4 layers, hidden 128, 8 heads, 2 kv heads,
vocabulary 512; fp32) trains with AdamW through ``gradaccum.Accumulator`` in windows
of k=4 micro-batches of 2 and 4 sequences of 128 tokens, in seven modes:

- one process: full fine-tune, LoRA r=8, gradient checkpointing, LoRA + checkpointing;
- two gloo ranks (subprocesses with torchrun's variables, hard timeout): FSDP2 with
  gradaccum's deferred reduce-scatter (one per window), FSDP2 with
  ``sync_every_micro_batch``, FSDP2 + LoRA.

Each process measures its own peak over one whole window, optimizer step included,
after a warm-up window (so AdamW's state exists, as in every window but the first):
``measured = resident + PeakTracker peak``, where *resident* is the storage bytes alive
before the window (weights or their shard, optimizer state) and the tracker follows
every storage allocated inside the window (``gradaccum.memory.PeakTracker``, the CPU
counterpart of ``torch.cuda.max_memory_allocated``). FSDP2 frees and re-allocates the
unsharded weights by resizing their storages, which the dispatcher does not see, so
the FSDP2 runs also count those resizes. The micro-batches are built before the window
and are not counted (neither prediction counts them).

The predictions are ``memory.analytic_estimate(...).raw_peak_bytes`` (no margin; the
planner adds 10%) and, for the one-process modes, the measured planner's raw peak
(``memory.plan(...).profile``: PeakTracker over a copy at micro-batches 1 and 2, then
extrapolated; it does not model FSDP2 sharding).

    python benchmarks/memory_modes.py            # table
    python benchmarks/memory_modes.py --json     # one JSON object

Runs in about a minute on 2 CPU cores (one torch thread per process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port  # noqa: E402

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 128, 352, 4, 8, 2, 512
SEQ = 128
ACCUM = 4
MICRO_BATCHES = (2, 4)
LORA_R = 8
WORLD = 2
MiB = 2**20

SINGLE_MODES = {  # name: (lora, checkpointing)
    "full": (False, False),
    "LoRA": (True, False),
    "ckpt": (False, True),
    "LoRA+ckpt": (True, True),
}
FSDP_MODES = {  # name: (lora, checkpointing, sync_every_micro_batch)
    "FSDP2": (False, False, False),
    "FSDP2 sync-every": (False, False, True),
    "FSDP2+LoRA": (True, False, False),
}


def build(lora: bool, ckpt: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from gradaccum.workloads import lora as wl

    hf_logging.set_verbosity_error()
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=SEQ)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    model.train()
    if lora:
        model = wl.apply_lora(model, r=LORA_R, seed=0)
    if ckpt:
        wl.enable_gradient_checkpointing(model)
    return model


def make_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` full-length sequences (no padding: the estimate's ``padded=False``)."""
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1000 + 17 * n + seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t  # DTensor -> its shard


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Storage bytes alive before the window: weights (shards), gradients if any, optimizer state."""
    from torch.utils._pytree import tree_flatten

    tensors: list[torch.Tensor] = []
    for p in model.parameters():
        tensors.append(_local(p))
        if p.grad is not None:
            tensors.append(_local(p.grad))
    for s in optimizer.state.values():
        tensors += [_local(t) for t in tree_flatten(s)[0] if isinstance(t, torch.Tensor)]
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() != 0:
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


class _ResizeCounter:
    """Make a PeakTracker count FSDP2's storage resizes (unsharded weights freed with
    ``storage.resize_(0)`` and re-allocated with ``resize_(n)``: not dispatcher ops)."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> _ResizeCounter:
        from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

        tr = self.tracker

        def free(tensor: torch.Tensor, _orig: Any = _fsdp_param.free_storage) -> None:
            tr.forget_storage(tensor.untyped_storage())
            _orig(tensor)

        def alloc(tensor: torch.Tensor, _orig: Any = _fsdp_param.alloc_storage) -> None:
            before = tensor.untyped_storage().data_ptr()
            _orig(tensor)
            if tensor.untyped_storage().data_ptr() != before:
                tr.track_storage(tensor.untyped_storage())

        for mod in (_fsdp_param, _fsdp_param_group):
            for name, fn in (("free_storage", free), ("alloc_storage", alloc)):
                if hasattr(mod, name):
                    self._saved.append((mod, name, getattr(mod, name)))
                    setattr(mod, name, fn)
        return self

    def __exit__(self, *exc: Any) -> None:
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)


def measure_window(model: nn.Module, micro: int, sync_every: bool = False, fsdp: bool = False,
                   rank: int = 0) -> dict[str, int]:
    """Peak bytes of one whole k-micro-batch window (after a warm-up window), on this process."""
    import contextlib

    import gradaccum as ga
    from gradaccum import memory
    from gradaccum.workloads import hf

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    acc = ga.Accumulator(model, opt, accum_steps=ACCUM, sync_every_micro_batch=sync_every)
    warm = [make_batch(micro, seed=100 * rank + i) for i in range(ACCUM)]
    acc.step(warm, hf.loss_fn)
    del warm
    mbs = [make_batch(micro, seed=100 * rank + 50 + i) for i in range(ACCUM)]
    resident = resident_bytes(model, opt)
    tracker = memory.PeakTracker("cpu")  # its storage key skips DTensor wrappers (FSDP2 shards)
    with tracker, (_ResizeCounter(tracker) if fsdp else contextlib.nullcontext()):
        acc.step(mbs, hf.loss_fn)
    peak = tracker.peak_bytes
    return {"resident": resident, "window_peak": peak, "measured": resident + peak}


def estimate(model: nn.Module, micro: int, lora: bool, ckpt: bool, world: int = 1, fsdp: bool = False,
             sync_every: bool = False) -> Any:
    from gradaccum import memory

    return memory.analytic_estimate(model, micro, SEQ, lora_r=LORA_R if lora else None, world_size=world,
                                    fsdp=fsdp, gradient_checkpointing=ckpt, sync_every_micro_batch=sync_every,
                                    padded=False, foreach=False)


def row(mode: str, rank: int, micro: int, est: Any, meas: dict[str, int],
        planner: int | None) -> dict[str, Any]:
    return {"mode": mode, "rank": rank, "micro_batch": micro, "predicted": est.raw_peak_bytes,
            "predicted_with_margin": est.predicted_peak_bytes, "planner": planner, **meas,
            "error_pct": 100.0 * (est.raw_peak_bytes - meas["measured"]) / meas["measured"],
            "estimate": est.to_json()}


def run_single() -> list[dict[str, Any]]:
    from gradaccum import memory
    from gradaccum.workloads import hf

    rows = []
    for mode, (lora, ckpt) in SINGLE_MODES.items():
        for micro in MICRO_BATCHES:
            model = build(lora, ckpt)
            est = estimate(model, micro, lora, ckpt)
            plan = memory.plan(model, hf.loss_fn, make_batch, effective_batch=micro * ACCUM,
                               budget_bytes="64GiB", world_size=1, measure_sizes=(1, 2))
            prof = plan.profile
            planner = prof.raw_peak_bytes(micro) - prof.batch_bytes(micro)
            meas = measure_window(model, micro)
            rows.append(row(mode, 0, micro, est, meas, planner))
            del model
    return rows


# ----------------------------------------------------------------------------- FSDP2 ranks
def rank_worker(out: Path) -> None:
    import torch.distributed as dist

    from gradaccum import distributed
    from gradaccum.workloads.fsdp import shard_fsdp2

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    distributed.setup_from_env()
    r = dist.get_rank()
    rows = []
    for mode, (lora, ckpt, every) in FSDP_MODES.items():
        for micro in MICRO_BATCHES:
            model = build(lora, ckpt)
            est = estimate(model, micro, lora, ckpt, world=WORLD, fsdp=True, sync_every=every)
            shard_fsdp2(model)
            meas = measure_window(model, micro, sync_every=every, fsdp=True, rank=r)
            rows.append(row(mode, r, micro, est, meas, None))
            del model
            dist.barrier()
    (out / f"rank{r}.json").write_text(json.dumps(rows))
    distributed.teardown()


def run_fsdp(timeout: float = 150.0) -> list[dict[str, Any]]:
    """Start WORLD ranks of this script as torchrun would; kill them all at ``timeout``."""
    with tempfile.TemporaryDirectory() as tmp:
        port = str(free_port())
        procs = []
        for r in range(WORLD):
            env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(WORLD),
                       LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                       OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            procs.append(subprocess.Popen([sys.executable, __file__, "--rank-worker", tmp], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + timeout
        errors = []
        for r, p in enumerate(procs):
            try:
                _, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                _, err = p.communicate()
                errors.append(f"rank {r}: timed out after {timeout:.0f}s\n{err[-2000:]}")
                continue
            if p.returncode != 0:
                errors.append(f"rank {r}: exit {p.returncode}\n{err[-2000:]}")
        if errors:
            raise RuntimeError("FSDP2 ranks failed:\n" + "\n".join(errors))
        rows = []
        for r in range(WORLD):
            rows += json.loads((Path(tmp) / f"rank{r}.json").read_text())
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'mode':<17}{'rank':>5}{'mb':>4}{'predicted':>11}{'planner':>10}{'measured':>10}{'err%':>8}"
             f"{'resident':>10}{'window':>9}   (MiB; predicted = analytic raw peak, no margin)"]
    for x in rows:
        planner = f"{x['planner'] / MiB:10.2f}" if x["planner"] is not None else f"{'n/a':>10}"
        lines.append(f"{x['mode']:<17}{x['rank']:>5}{x['micro_batch']:>4}"
                     f"{x['predicted'] / MiB:11.2f}{planner}"
                     f"{x['measured'] / MiB:10.2f}{x['error_pct']:+8.1f}{x['resident'] / MiB:10.2f}"
                     f"{x['window_peak'] / MiB:9.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rank-worker", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=("single", "fsdp"), help="run one half only")
    args = ap.parse_args()
    if args.rank_worker:
        rank_worker(Path(args.rank_worker))
        return
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    started = time.monotonic()
    rows = []
    if args.only != "fsdp":
        rows += run_single()
    if args.only != "single":
        order = list(FSDP_MODES)
        rows += sorted(run_fsdp(), key=lambda x: (order.index(x["mode"]), x["micro_batch"], x["rank"]))
    if args.json:
        print(json.dumps({"rows": rows, "seconds": time.monotonic() - started}))
    else:
        print(f"Llama {LAYERS} layers, hidden {HIDDEN}, vocab {VOCAB}, seq {SEQ}, fp32, AdamW, k={ACCUM}; "
              f"FSDP2 on {WORLD} gloo ranks")
        print(table(rows))
        print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
