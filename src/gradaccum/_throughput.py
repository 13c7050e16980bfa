"""Timing real training steps at candidate micro-batch sizes, on the model's device.

Private: :func:`measure_throughput` is re-exported by :mod:`gradaccum.memory`.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from gradaccum._livebytes import model_device
from gradaccum._memprofile import LossFn, MakeBatch, OptimizerFactory, adamw, isolated, unwrap
from gradaccum.accumulator import Accumulator


def measure_throughput(
    model: nn.Module,
    loss_fn: LossFn,
    make_batch: MakeBatch,
    candidates: Sequence[int],
    optimizer_factory: OptimizerFactory = adamw,
    repeats: int = 3,
    warmup: int = 1,
    window_batch: int | None = None,
) -> list[dict[str, float]]:
    """Time real training steps at each candidate micro-batch on the model's device.

    Without ``window_batch`` one timed step is one micro-batch forward+backward plus an
    optimizer step. With ``window_batch`` (examples per optimizer step on this process,
    a multiple of every candidate) one timed step is a whole gradaccum window of
    ``window_batch // micro_batch`` micro-batches through ``Accumulator.step``, which is
    what decides the speed of training at a fixed effective batch.

    Returns ``[{"micro_batch", "items_per_s", "seconds_per_step"}, ...]`` where items are
    examples (rows of the micro-batch) and seconds are the median over ``repeats`` after
    ``warmup`` untimed steps. Runs on a deep copy per candidate (the model is untouched);
    a candidate that runs out of CUDA memory is left out with a warning.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    src = unwrap(model)
    device = model_device(src)
    rows: list[dict[str, float]] = []
    for m in candidates:
        if window_batch is not None and window_batch % m:
            raise ValueError(f"window_batch {window_batch} is not a multiple of micro-batch {m}")
        k = 1 if window_batch is None else window_batch // m
        try:
            seconds = _time_candidate(src, loss_fn, make_batch, m, k, optimizer_factory, repeats, warmup,
                                      device)
            oom = False
        except torch.OutOfMemoryError:
            oom = True
        if oom:  # cleaned up outside the except block so the traceback frees the tensors
            if device.type == "cuda":
                torch.cuda.empty_cache()
            warnings.warn(f"gradaccum.memory: micro-batch {m} ran out of memory; left out", stacklevel=2)
            continue
        rows.append({"micro_batch": m, "items_per_s": m * k / seconds, "seconds_per_step": seconds})
    return rows


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_candidate(
    src: nn.Module, loss_fn: LossFn, make_batch: MakeBatch, m: int, k: int,
    optimizer_factory: OptimizerFactory, repeats: int, warmup: int, device: torch.device,
) -> float:
    with isolated(device):
        work = copy.deepcopy(src)
        work.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the BatchNorm warning belongs to the real run
            acc = Accumulator(work, optimizer_factory(work.parameters()), accum_steps=k)
        batch = make_batch(m)
        window = [batch] * k  # one batch reused: timing, not data, is measured here
        times = []
        for i in range(warmup + repeats):
            _sync_device(device)
            t0 = time.perf_counter()
            acc.step(window, loss_fn)
            _sync_device(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
