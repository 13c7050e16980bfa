"""Peers, logged loss: how much the loss each contender logs moves when k changes at a
fixed effective batch (lr = 0, so only the logging differs), and how far it is from the
exact mean.

Part of compare_peers.py, which runs it on every workload.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import common
import torch
from common import Workload
from peers_contenders import (
    accelerate_micro,
    accelerate_setup,
    batches_loader,
    lightning_classes,
    lightning_fit,
    lightning_module,
)
from torch import nn

import gradaccum as ga


def pretrain(work: Workload, seed: int, steps: int, eff_batch: int) -> nn.Module:
    """A model trained a little (exactly), so per-token losses differ by position and length."""
    model = work.build_model(seed)
    opt = common.make_optimizer(model, work.lr)
    micro = work.micro_batches(work.make_examples(steps * eff_batch, seed + 100), eff_batch)
    for mb in micro:
        common.hand_window(model, opt, [mb], work.count(mb), work.loss_sum)
    return model


def logged_losses(
    work: Workload, peer: str, trained: nn.Module, examples: Sequence[Any], k: int, micro_batch: int
) -> list[float]:
    """What each contender logs per optimizer step, with lr=0 so only the logging differs.

    hand: Σ loss_sum / Σ items; gradaccum: StepResult.loss; Accelerate: the mean of the
    window's micro-batch mean losses (its examples sum ``loss`` per batch and divide by
    the number of batches); Lightning: what its logger receives from
    ``self.log("train_loss", loss)`` in training_step.
    """
    model = common.clone(trained)
    micro = work.micro_batches(examples, micro_batch)
    windows = [micro[i : i + k] for i in range(0, len(micro), k)]
    if peer == "hand":
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)
        return [
            common.hand_window(model, opt, w, sum(work.count(mb) for mb in w), work.loss_sum) for w in windows
        ]
    if peer == "gradaccum":
        acc = ga.Accumulator(model, torch.optim.AdamW(model.parameters(), lr=0.0), accum_steps=k)
        return [common.gradaccum_window(acc, w, work.loss_sum).loss for w in windows]
    if peer == "accelerate":
        accelerator, pmodel, popt = accelerate_setup(model, 0.0, k)
        out = []
        for w in windows:
            per_micro = [
                accelerate_micro(accelerator, pmodel, popt, work.mean_loss, mb, None).item() for mb in w
            ]
            out.append(sum(per_micro) / len(per_micro))
        return out
    if peer == "lightning":
        _, logger_cls = lightning_classes()

        class Recorder(logger_cls):  # type: ignore[misc,valid-type]
            def __init__(self) -> None:
                super().__init__()
                self.values: list[float] = []

            @property
            def name(self) -> str:
                return "recorder"

            @property
            def version(self) -> int:
                return 0

            def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
                pass

            def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
                if "train_loss" in metrics:
                    self.values.append(float(metrics["train_loss"]))

        rec = Recorder()
        lightning_fit(
            lightning_module(model, work.mean_loss, 0.0, log=True), batches_loader(micro), k, logger=rec
        )
        return rec.values
    raise ValueError(peer)


def logged_loss_vs_k(
    work: Workload,
    peers: Sequence[str],
    ks: Sequence[int],
    eff_batch: int,
    windows: int,
    pretrain_steps: int,
    seed: int = 2,
) -> dict[str, Any]:
    """Each contender's logged loss for the same data at each k (effective batch fixed)."""
    trained = pretrain(work, seed, pretrain_steps, eff_batch)
    examples = work.make_examples(windows * eff_batch, seed)
    exact = logged_losses(work, "hand", trained, examples, 1, eff_batch)
    out: dict[str, Any] = {"exact": exact, "eff_batch": eff_batch}
    for peer in peers:
        by_k = {k: logged_losses(work, peer, trained, examples, k, eff_batch // k) for k in ks}
        base = by_k[ks[0]]
        change = max(abs(v - b) / abs(b) for k in ks[1:] for v, b in zip(by_k[k], base, strict=True))
        off = max(abs(v - x) / abs(x) for k in ks for v, x in zip(by_k[k], exact, strict=True))
        out[peer] = {
            "by_k": {str(k): v for k, v in by_k.items()},
            "max_rel_change_vs_k1": change,
            "max_rel_err_vs_exact": off,
        }
    return out
