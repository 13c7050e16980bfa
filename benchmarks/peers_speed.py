"""Peers, speed: window time of every contender and its per-round speed ratio to the hand loop.

A second, identical hand loop (the A/A control) gives the noise floor. Part of
compare_peers.py, which runs it on every workload.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import common
import torch
from common import Batch, Workload
from peers_contenders import (
    accelerate_micro,
    accelerate_setup,
    available,
    batches_loader,
    lightning_classes,
    lightning_fit,
    lightning_module,
)
from torch import nn

import gradaccum as ga

AA = "hand (A/A control)"


def speed(
    work: Workload,
    k: int,
    micro_batch: int,
    rounds: int,
    warmup: int,
    seed: int = 0,
    max_grad_norm: float = 1.0,
) -> dict[str, Any]:
    """Window times of every contender and their per-round speed ratio against the hand loop.

    hand, gradaccum and Accelerate run one window each per round in a rotating order.
    Lightning owns its loop, so it runs in its own fit(); a callback runs one hand-loop
    window (on a separate model copy) next to every Lightning window, before it on odd
    windows and after it on even ones, which pairs every Lightning window with a hand
    window taken at the same moment.
    """
    n = warmup + rounds
    micro = work.micro_batches(work.make_examples(n * k * micro_batch, seed), micro_batch)
    windows = [micro[w * k : (w + 1) * k] for w in range(n)]
    totals = [sum(work.count(mb) for mb in win) for win in windows]
    base = work.build_model(seed)

    def hand_loop() -> Callable[[int], Any]:
        model = common.clone(base)
        opt = common.make_optimizer(model, work.lr)
        return lambda r: common.hand_window(model, opt, windows[r], totals[r], work.loss_sum, max_grad_norm)

    ga_model = common.clone(base)
    acc = ga.Accumulator(
        ga_model, common.make_optimizer(ga_model, work.lr), accum_steps=k, max_grad_norm=max_grad_norm
    )
    contenders: dict[str, Callable[[int], Any]] = {
        "hand": hand_loop(),
        # A second, identical hand loop: its ratio to the first is the noise floor.
        AA: hand_loop(),
        "gradaccum": lambda r: common.gradaccum_window(acc, windows[r], work.loss_sum),
    }
    if available("accelerate"):
        accelerator, acc_model, acc_opt = accelerate_setup(common.clone(base), work.lr, k)

        def accel(r: int) -> None:
            for mb in windows[r]:
                accelerate_micro(accelerator, acc_model, acc_opt, work.mean_loss, mb, max_grad_norm)

        contenders["accelerate"] = accel
    times = common.interleave(contenders, rounds=rounds, warmup=warmup)
    out: dict[str, Any] = {}
    for name, ts in times.items():
        out[name] = {"window_ms": common.summary([t * 1e3 for t in ts]), "interleaved": "rotating order"}
        if name != "hand":
            out[name]["speed_ratio"] = common.summary(common.ratios(times["hand"], ts))
    if available("lightning"):
        out["lightning"] = _lightning_speed(work, base, windows, totals, k, warmup, max_grad_norm)
    return out


def _lightning_speed(
    work: Workload,
    base: nn.Module,
    windows: list[list[Batch]],
    totals: list[int],
    k: int,
    warmup: int,
    max_grad_norm: float,
) -> dict[str, Any]:
    pair_model = common.clone(base)
    pair_opt = common.make_optimizer(pair_model, work.lr)

    def hand(w: int) -> float:
        with torch.enable_grad():
            return common.timed(
                lambda: common.hand_window(
                    pair_model, pair_opt, windows[w], totals[w], work.loss_sum, max_grad_norm
                )
            )

    timer = _paired_timer(k, hand)
    module = lightning_module(common.clone(base), work.mean_loss, work.lr)
    flat = [mb for win in windows for mb in win]
    lightning_fit(module, batches_loader(flat), k, callbacks=[timer], max_grad_norm=max_grad_norm)
    lit, hand_t = timer.lit[warmup:], timer.hand[warmup:]
    return {
        "window_ms": common.summary([t * 1e3 for t in lit]),
        "hand_window_ms": common.summary([t * 1e3 for t in hand_t]),
        "speed_ratio": common.summary(common.ratios(hand_t, lit)),
        "interleaved": "own fit(); paired with a hand window run from a callback",
    }


def _paired_timer(k: int, hand: Callable[[int], float]) -> Any:
    """A Lightning callback timing each window of k batches, a hand window run next to it."""
    callback_cls, _ = lightning_classes()

    class PairedTimer(callback_cls):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            self.lit: list[float] = []
            self.hand: list[float] = []
            self.mark: float | None = None
            self.pending = 0.0  # hand time spent inside the current Lightning window

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if self.mark is None:
                self.mark = time.perf_counter()
            w = batch_idx // k
            if batch_idx % k == 0 and w % 2 == 1:
                t = hand(w)
                self.hand.append(t)
                self.pending += t

        def on_train_batch_end(
            self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            if (batch_idx + 1) % k:
                return
            assert self.mark is not None
            self.lit.append(time.perf_counter() - self.mark - self.pending)
            self.pending = 0.0
            w = batch_idx // k
            if w % 2 == 0:
                self.hand.append(hand(w))
            self.mark = time.perf_counter()

    return PairedTimer()
