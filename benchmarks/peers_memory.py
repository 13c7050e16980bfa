"""Peers, memory: peak bytes of tensors each contender allocates over a few windows.

Part of compare_peers.py, which runs it on every workload.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import common
import torch
from common import Workload
from peers_contenders import (
    accelerate_micro,
    accelerate_setup,
    batches_loader,
    lightning_fit,
    lightning_module,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import gradaccum as ga


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of CPU tensor storage created while the mode is active.

    Every op's output storage is counted once (views share it) until it is freed;
    tensors that existed before (the parameters) are not counted. tracemalloc cannot
    see torch's allocations and RSS keeps freed pages, so this is the honest CPU
    measure of what training allocates: activations, gradients, optimizer state and
    temporaries. Ops run by autograd during backward pass through the mode too.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        # torch keeps one Python object per live storage, so id() identifies it until
        # it is freed, and the finalizer runs exactly when it is freed.
        key = id(st)
        if key in self._live or st.nbytes() == 0:
            return
        self._live[key] = st.nbytes()
        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta:
                self._track(t)
        return out


def memory(work: Workload, peer: str, k: int, micro_batch: int, windows: int) -> dict[str, float]:
    """Peak bytes of tensors one contender allocates over ``windows`` windows (clipping on).

    Counted with LiveTensorBytes: activations, gradients, optimizer state and
    temporaries, not the parameters themselves.
    """
    micro = work.micro_batches(work.make_examples(windows * k * micro_batch, 3), micro_batch)
    wins = [micro[w * k : (w + 1) * k] for w in range(windows)]
    model = work.build_model(3)
    run: Callable[[], Any]
    if peer == "hand":
        opt = common.make_optimizer(model, work.lr)

        def run() -> None:
            for w in wins:
                common.hand_window(model, opt, w, sum(work.count(mb) for mb in w), work.loss_sum, 1.0)
    elif peer == "gradaccum":
        acc = ga.Accumulator(model, common.make_optimizer(model, work.lr), accum_steps=k, max_grad_norm=1.0)

        def run() -> None:
            for w in wins:
                common.gradaccum_window(acc, w, work.loss_sum)
    elif peer == "accelerate":
        accelerator, pmodel, popt = accelerate_setup(model, work.lr, k)

        def run() -> None:
            for mb in micro:
                accelerate_micro(accelerator, pmodel, popt, work.mean_loss, mb, 1.0)
    elif peer == "lightning":
        module = lightning_module(model, work.mean_loss, work.lr)

        def run() -> None:
            lightning_fit(module, batches_loader(micro), k, max_grad_norm=1.0)
    else:
        raise ValueError(peer)
    gc.collect()
    with LiveTensorBytes() as counter:
        run()
    return {
        "peak_mib": counter.peak / 2**20,
        "params_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
    }
