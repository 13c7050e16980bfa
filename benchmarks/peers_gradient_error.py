"""Peers, gradient error: the gradient each contender hands to ``optimizer.step()`` against
a float64 full-batch reference, over complete windows and a partial last window.

Part of compare_peers.py, which runs it on every workload.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import common
import torch
from common import Batch, Workload
from peers_contenders import (
    accelerate_micro,
    accelerate_setup,
    examples_loader,
    lightning_classes,
    lightning_fit,
    lightning_module,
)
from torch import nn

import gradaccum as ga


def to_float64(batch: Batch) -> Batch:
    """Floating tensors of a (nested) batch in float64; integer tensors untouched."""
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: to_float64(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_float64(v) for v in batch)
    return batch


class Reference:
    """Full-batch float64 gradient of a window, at a model's current parameters."""

    def __init__(self, model: nn.Module, workload: Workload) -> None:
        self.twin = common.clone(model).double()
        self.workload = workload

    def grad(self, params: Sequence[torch.Tensor], window: Sequence[Batch]) -> torch.Tensor:
        with torch.no_grad():
            for t, p in zip(self.twin.parameters(), params, strict=True):
                t.copy_(p)
        self.twin.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        for mb in window:
            s, n = self.workload.loss_sum(self.twin, to_float64(mb))
            total = total + s
            count += int(n)
        (total / count).backward()
        return common.flat_grad(self.twin.parameters())


class GradCheck:
    """Compares each gradient handed to optimizer.step() with the float64 full-batch gradient.

    Optimizer step j is checked against window j (micro-batches j*k .. j*k+k-1, cut
    short at the end), at the parameters the step sees, so later windows are checked
    fairly even after the contenders' parameters have drifted apart.
    """

    def __init__(self, work: Workload, model: nn.Module, windows: list[list[Batch]]) -> None:
        self.ref = Reference(model, work)
        self.windows = windows
        self.errors: list[float] = []

    def check(self, params: Sequence[torch.Tensor]) -> None:
        j = len(self.errors)
        if j >= len(self.windows):  # more steps than windows: record as a total miss
            self.errors.append(math.inf)
            return
        self.errors.append(common.rel_err(common.flat_grad(params), self.ref.grad(params, self.windows[j])))

    def pre_hook(self, params: Sequence[torch.Tensor]) -> Callable[..., None]:
        return lambda optimizer, args, kwargs: self.check(params)


def grad_error(
    work: Workload, peer: str, k: int, n_micro: int, micro_batch: int, seed: int = 1
) -> dict[str, Any]:
    """Applied-gradient error of one contender over n_micro micro-batches at k (AdamW, no clipping)."""
    examples = work.make_examples(n_micro * micro_batch, seed)
    micro = work.micro_batches(examples, micro_batch)
    windows = [micro[i : i + k] for i in range(0, len(micro), k)]
    model = work.build_model(seed)
    check = GradCheck(work, model, windows)
    params = list(model.parameters())
    if peer == "hand":
        opt = common.make_optimizer(model, work.lr)
        opt.register_step_pre_hook(check.pre_hook(params))
        for win in windows:
            common.hand_window(model, opt, win, sum(work.count(mb) for mb in win), work.loss_sum)
    elif peer == "gradaccum":
        opt = common.make_optimizer(model, work.lr)
        opt.register_step_pre_hook(check.pre_hook(params))
        acc = ga.Accumulator(model, opt, accum_steps=k)
        for mb in micro:
            with acc.micro_step():
                acc.backward(*work.loss_sum(model, mb))
        acc.flush()
    elif peer == "accelerate":
        # The prepared DataLoader is what lets Accelerate step on a short last window.
        accelerator, pmodel, popt, loader = accelerate_setup(
            model, work.lr, k, examples_loader(work, examples, micro_batch)
        )
        popt.optimizer.register_step_pre_hook(check.pre_hook(params))
        for mb in loader:
            accelerate_micro(accelerator, pmodel, popt, work.mean_loss, mb, None)
    elif peer == "lightning":
        callback_cls, _ = lightning_classes()

        class Capture(callback_cls):  # type: ignore[misc,valid-type]
            # Lightning runs the last backward inside optimizer.step(closure), so a torch
            # pre-hook would fire too early; this hook fires after it, before clipping.
            def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
                check.check(params)

        lightning_fit(
            lightning_module(model, work.mean_loss, work.lr),
            examples_loader(work, examples, micro_batch),
            k,
            callbacks=[Capture()],
        )
    else:
        raise ValueError(peer)
    full = [e for e, w in zip(check.errors, windows, strict=False) if len(w) == k]
    partial = [e for e, w in zip(check.errors, windows, strict=False) if len(w) < k]
    return {
        "windows": [len(w) for w in windows],
        "steps_taken": len(check.errors),
        "rel_err_full": max(full) if full else None,
        "rel_err_partial": partial[0] if partial else None,
        "rel_err_per_step": check.errors,
    }
