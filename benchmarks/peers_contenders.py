"""The contenders of the peer comparisons (listed in compare_peers.py's docstring): the
Accelerate and Lightning drivers, written as each library's documentation shows, and
which peers are installed. The hand and gradaccum loops are shared with other
benchmarks, so they live in common.py.
"""

from __future__ import annotations

import functools
import importlib
import logging
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import common
import torch
from common import Batch, Workload
from torch import nn

PEERS = ("hand", "gradaccum", "accelerate", "lightning")


@functools.cache
def available(peer: str) -> bool:
    """hand and gradaccum always run; a peer only when its library imports."""
    if peer in ("hand", "gradaccum"):
        return True
    try:
        importlib.import_module("lightning.pytorch" if peer == "lightning" else peer)
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- Accelerate
def accelerate_setup(model: nn.Module, lr: float, k: int, loader: Any = None) -> tuple[Any, ...]:
    """A fresh Accelerator for k, with the model, optimizer (and loader) prepared.

    Accelerate keeps its accumulation state in a process-wide singleton, so only one
    k may be in use at a time: callers finish one run before starting another.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=k, cpu=True)
    opt = common.make_optimizer(model, lr)
    if loader is None:
        return (accelerator, *accelerator.prepare(model, opt))
    return (accelerator, *accelerator.prepare(model, opt, loader))


def accelerate_micro(
    accelerator: Any,
    model: nn.Module,
    opt: Any,
    mean_loss: Callable[..., torch.Tensor],
    mb: Batch,
    max_grad_norm: float | None,
) -> torch.Tensor:
    """One micro-batch exactly as Accelerate's gradient-accumulation guide writes it."""
    with accelerator.accumulate(model):
        loss = mean_loss(model, mb)
        accelerator.backward(loss)  # divides by gradient_accumulation_steps
        if max_grad_norm is not None and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()  # a no-op until the window's last micro-batch
        opt.zero_grad()
    return loss


# --------------------------------------------------------------------------- Lightning
def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*(GPU|TPU|HPU|LitLogger|litlogger).*")


def lightning_module(
    model: nn.Module, mean_loss: Callable[..., torch.Tensor], lr: float, log: bool = False
) -> Any:
    """The LightningModule a user writes: training_step returns the mean loss."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
            loss = mean_loss(self.model, batch)
            if log:
                self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return common.make_optimizer(self.model, lr)

    return Module()


def lightning_fit(
    module: Any,
    loader: Any,
    k: int,
    callbacks: Sequence[Any] = (),
    logger: Any = False,
    max_grad_norm: float | None = None,
) -> None:
    """One epoch of Lightning's own loop on CPU, logging/checkpointing/progress bar off."""
    import lightning.pytorch as pl

    _quiet_lightning()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            accumulate_grad_batches=k,
            gradient_clip_val=max_grad_norm,
            logger=logger,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=list(callbacks),
            default_root_dir=tmp,
        )
        trainer.fit(module, train_dataloaders=loader)


def lightning_classes() -> tuple[type, type]:
    """Callback and Logger base classes (imported lazily: Lightning is optional)."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger

    return pl.Callback, Logger


def batches_loader(batches: Sequence[Batch]) -> torch.utils.data.DataLoader:
    """A DataLoader over already-collated micro-batches (so collation is never timed)."""
    return torch.utils.data.DataLoader(list(batches), batch_size=None, collate_fn=lambda b: b)


def examples_loader(work: Workload, examples: Sequence[Any], micro_batch: int) -> torch.utils.data.DataLoader:
    """The DataLoader a peer user writes: examples, batch size, the collate function, no shuffle."""
    return torch.utils.data.DataLoader(list(examples), batch_size=micro_batch, collate_fn=work.collate)
