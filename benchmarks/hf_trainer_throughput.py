"""HF Trainer comparison, throughput: tokens/s of each contender, their steps interleaved.

Part of hf_trainer_peer.py, which runs it in float32.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import common
import torch
from hf_trainer_contenders import (
    AA,
    GA,
    GA_NN,
    HF,
    Config,
    Prepared,
    Run,
    has_noise_switch,
    prepare_gradaccum,
    prepare_hf,
    quiet,
)
from hf_trainer_setup import Setup


class Baton:
    """Lets one contender's training loop (in its own thread) run exactly one optimizer step.

    The loop runs until the end of its next ``optimizer.step()`` (the probe's post-hook),
    then hands the baton back and waits. ``resumed[i]`` to ``ended[i]`` is step i: data
    loading, collation, forward/backward, clipping, the optimizer, the previous step's
    logging and bookkeeping, and never the waiting.
    """

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.go, self.done = threading.Event(), threading.Event()
        self.resumed: list[float] = []
        self.ended: list[float] = []
        self.result: Run | None = None
        self.error: BaseException | None = None
        prepared.probe.after_step = self._step_ended
        self.thread = threading.Thread(target=self._main, name=prepared.name, daemon=True)
        self.thread.start()

    def _wait_turn(self) -> None:
        self.go.wait()
        self.go.clear()
        self.resumed.append(time.perf_counter())

    def _step_ended(self) -> None:
        self.ended.append(time.perf_counter())
        self.done.set()
        self._wait_turn()

    def _main(self) -> None:
        self._wait_turn()
        try:
            self.result = self.prepared.train()
        except BaseException as e:  # re-raised in the main thread
            self.error = e
        finally:
            self.prepared.probe.after_step = None
            self.done.set()

    def turn(self) -> None:
        """Run this contender's next step (or, after its last step, the rest of its run)."""
        self.done.clear()
        self.go.set()
        while not self.done.wait(5.0):
            if not self.thread.is_alive():
                break
        if self.error is not None:
            raise RuntimeError(f"{self.prepared.name} failed") from self.error

    def step_seconds(self) -> list[float]:
        return [e - r for r, e in zip(self.resumed, self.ended, strict=False)]


def throughput(setup: Setup, cfg: Config, runs: int, warmup: int) -> dict[str, Any]:
    """Tokens/s in float32, the contenders' steps interleaved one by one, the order rotating.

    Every run trains each contender (and the Trainer a second time, the A/A control)
    from the same saved weights on the same examples, each in its own thread, taking
    turns step by step: in round s every contender runs its step s, in an order that
    rotates every round, so slow spells of a shared machine hit all alike. Building the
    trainers and the first ``warmup`` steps (start-up included) are not counted. Speed
    ratios are per step (the same examples for every contender), pooled over the runs.
    """
    names = [GA, *([GA_NN] if has_noise_switch() else []), HF, AA]
    prepare: dict[str, Callable[[], Prepared]] = {
        GA: lambda: prepare_gradaccum(setup, cfg, torch.float32, False),
        GA_NN: lambda: prepare_gradaccum(setup, cfg, torch.float32, False, GA_NN, measure_noise=False),
        HF: lambda: prepare_hf(setup, cfg, torch.float32, False),
        AA: lambda: prepare_hf(setup, cfg, torch.float32, False, AA),
    }
    secs: dict[str, list[float]] = {n: [] for n in names}
    toks: list[int] = []
    for run_index in range(runs):
        with contextlib.ExitStack() as stack, quiet():
            batons = {}
            for name in names:
                prepared = prepare[name]()
                stack.enter_context(prepared.cleanup)
                batons[name] = Baton(prepared)
            gc.collect()
            for step in range(cfg.steps + 1):  # the last turn lets every run finish
                shift = (run_index + step) % len(names)
                for name in names[shift:] + names[:shift]:
                    batons[name].turn()
            for b in batons.values():
                b.thread.join()
                assert b.result is not None and len(b.ended) == cfg.steps, (b.prepared.name, len(b.ended))
            for name in names:
                secs[name] += batons[name].step_seconds()[warmup:]
            toks += batons[GA].result.step_tokens[warmup:]  # type: ignore[union-attr]
    out: dict[str, Any] = {"steps_measured": len(toks), "tokens_measured": sum(toks), "contenders": names}
    for name in names:
        out[name] = {
            "tokens_per_s": sum(toks) / sum(secs[name]),
            "step_ms": common.summary([t * 1e3 for t in secs[name]]),
        }
        if name != HF:
            out[name]["speed_ratio"] = common.summary(common.ratios(secs[HF], secs[name]))
    return out
