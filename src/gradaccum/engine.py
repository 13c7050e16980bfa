"""The optimizer, the lr schedule and the Accumulator of a ``Trainer`` run."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from gradaccum import sync
from gradaccum.accumulator import Accumulator
from gradaccum.adaptive import lr_rule_for
from gradaccum.settings import TrainerSettings
from gradaccum.stream import BatchShape


def build_engine(settings: TrainerSettings, model: nn.Module
                 ) -> tuple[torch.optim.Optimizer, Any, Accumulator]:
    """The optimizer (trainable parameters only), the schedule and the Accumulator of a run."""
    # Only what trains: frozen weights (a LoRA base model) get no optimizer state.
    params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = (settings.optimizer_factory or _adamw(settings.lr, settings.weight_decay))(params)
    sched = settings.scheduler_factory(opt) if settings.scheduler_factory else None
    if settings.adaptive is not None and settings.adaptive.lr_rule is None:
        settings.adaptive.lr_rule = lr_rule_for(opt)  # sqrt for Adam-family, linear for SGD
    scaler = None
    if settings.autocast_dtype == torch.float16:
        scaler = torch.amp.GradScaler(device_type(model))  # fp16 needs loss scaling
    shape = BatchShape(settings.effective_batch, settings.micro_batch, sync.world_size())
    acc = Accumulator(
        model, opt, shape.accum_steps, scheduler=sched, max_grad_norm=settings.max_grad_norm,
        grad_dtype=settings.grad_dtype, grad_scaler=scaler,
        measure_noise=settings.measure_noise and not sync.is_fsdp2(model),
        sync_every_micro_batch=settings.sync_every_micro_batch,
    )
    return opt, sched, acc


def _adamw(lr: float, weight_decay: float) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def device_type(model: nn.Module) -> str:
    """Where the model's first parameter lives (cpu when it has none)."""
    p = next(model.parameters(), None)
    return p.device.type if p is not None else "cpu"
