"""The Trainer's settings: what to train, on what, how long, and where the outputs go.

Kept apart from the loop (:mod:`gradaccum.trainer`) so each reads top to bottom: these
are the constructor's arguments, one docstring each; ``Trainer`` adds the behaviour.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradaccum import outdir
from gradaccum.accumulator import LossFn
from gradaccum.adaptive import AdaptiveBatch
from gradaccum.trackers import Trackers


def default_collate(examples: list[Any]) -> Any:
    return torch.utils.data.default_collate(examples)


@dataclass
class TrainerSettings:
    """What a :class:`~gradaccum.trainer.Trainer` is asked to do: every field is a constructor argument."""

    model: nn.Module
    """The module to train. Under torch.distributed it is wrapped in DDP unless already wrapped."""
    dataset: Sequence[Any]
    """Indexable examples (``len`` and ``[i]``); each optimizer step draws ``effective_batch``."""
    loss_fn: LossFn
    """``loss_fn(model, micro_batch) -> (loss_sum, num_items)``, the engine's contract."""
    effective_batch: int = 128
    """Examples per optimizer step over all ranks: micro_batch x accum_steps x world_size."""
    micro_batch: int = 16
    """Examples per forward/backward on one rank; must divide effective_batch / world_size."""
    steps: int = 100
    """Total optimizer steps (a resumed run continues up to this number)."""
    lr: float = 1e-3
    """Learning rate given to the default optimizer and the schedule."""
    optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None
    """``params -> optimizer``; default AdamW(lr, weight_decay)."""
    scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None = None
    """``optimizer -> scheduler`` stepped once per optimizer step; default none (constant lr)."""
    collate_fn: Callable[[list[Any]], Any] = default_collate
    """Turns a list of examples into one micro-batch (pad here, per micro-batch)."""
    seed: int = 0
    """Seeds the data order (and torch's RNG at start); same seed, same data every step."""
    max_grad_norm: float | None = 1.0
    """Clip the normalised, accumulated gradient to this norm; None disables."""
    out_dir: str | Path | None = None
    """Where metrics.jsonl, checkpoint.pt, summary.json and loss.png go; None writes nothing."""
    checkpoint_every: int = 0
    """Save checkpoint.pt every N optimizer steps (0: only at the end)."""
    resume: bool = False
    """Continue exactly from out_dir/checkpoint.pt."""
    overwrite: bool = False
    """Replace a run already in out_dir (without it, such an out_dir is refused)."""
    progress: bool | None = None
    """tqdm bar; None: only when stderr is a terminal (else plain log lines)."""
    log_every: int = 10
    """Steps between plain log lines when there is no progress bar."""
    extra_state: dict[str, Any] = field(default_factory=dict)
    """Plain data saved in the checkpoint (e.g. the vocabulary), checked on resume."""
    run_config: dict[str, Any] = field(default_factory=dict)
    """What else defines the run, keyed by the caller's name for it (the CLI: the flag, e.g.
    ``{"--data": "sha256:..."}``): saved in the checkpoint with ``--steps``, ``--lr``,
    ``--effective-batch`` and ``--seed``; ``resume`` refuses a checkpoint whose value differs."""
    items_name: str = "items"
    """What ``num_items`` counts (e.g. "tokens"): names the throughput column ``<items>_per_s``."""
    handle_signals: bool = True
    """On SIGTERM/SIGINT finish the window, save a checkpoint and raise :class:`Stopped`."""
    oom_replay: bool = True
    """On CUDA out-of-memory, drop to the next smaller micro-batch and replay the window."""
    grad_dtype: torch.dtype | None = None
    """Accumulate gradients of low-precision weights in this dtype (fp32 for bf16 weights)."""
    autocast_dtype: torch.dtype | None = None
    """Run forward passes under ``torch.autocast`` in this dtype (bf16, or fp16 with a GradScaler)."""
    eval_dataset: Sequence[Any] | None = None
    """Held-out examples: the exact item-mean loss on them is logged as ``eval_loss``."""
    eval_every: int | None = None
    """Evaluate every N steps and at the end; None: ten times per run; 0: only at the end."""
    measure_noise: bool = True
    """Measure the gradient noise scale (``noise_scale``, ``critical_batch`` in the metrics)."""
    adaptive: AdaptiveBatch | None = None
    """``--effective-batch auto``: grows accum_steps as the critical batch grows (see adaptive.py)."""
    save_model: Callable[..., None] | None = None
    """``save_model(model, path)`` writes the trained model to ``OUT/model`` (rank 0, at every
    checkpoint and at the end). For a model sharded with FSDP2 it is called as
    ``save_model(model, path, state_dict=...)`` with the full state dict gathered to rank 0."""
    sync_every_micro_batch: bool = False
    """Passed to the Accumulator: communicate gradients on every micro-batch (FSDP2 when the
    window's unsharded gradients would not fit); the same result, more communication."""
    final_metrics: Callable[[nn.Module], dict[str, Any]] | None = None
    """Scores the trained model once at the end (e.g. the demo's accuracy per puzzle kind)."""
    on_step: Callable[[dict[str, Any]], None] | None = None
    """Called on every rank after each optimizer step (after its checkpoint) with the step's
    metrics row; whatever it raises ends the run there (an early stop, an injected fault)."""
    trackers: Trackers | None = None
    """Where else the run is reported (TensorBoard, W&B, MLflow, Trackio; rank 0): each gets the rows
    a written checkpoint covers, once, and at the end the summary and loss.png."""
    run_record: dict[str, Any] | None = None
    """The resolved run (flags, planned micro-batch, versions): ``OUT/config.json``, written at the
    run's first step."""
    oom_agreement: bool | None = None
    """Under torch.distributed: whether the ranks agree before each window's synchronising
    micro-batch that none ran out of memory (so all replay together). None: only on CUDA,
    the only device that raises OutOfMemoryError."""

    weight_decay: float = 0.01
    """The default AdamW's decoupled weight decay."""
    micro_batch_tokens: int | None = None
    """A token budget per micro-batch instead of ``micro_batch`` examples: each window's
    examples (the same ones) go in consecutive runs of at most this many tokens, so the
    number of micro-batches varies by window and by rank; ``collate_fn`` packs each run.
    An out-of-memory error replays the window at half the budget."""
    encode: Callable[[nn.Module, Any], Any] | None = None
    """With ``window_loss``: each window goes through ``Accumulator.step_cached(micro_batches, encode,
    window_loss)`` instead of ``loss_fn`` per micro-batch, for a loss that couples the window's
    examples (in-batch negatives); ``encode(model, micro) -> representations``."""
    window_loss: Callable[[Any], tuple[torch.Tensor, Any]] | None = None
    """``window_loss(reps) -> (loss_sum, num_items)`` on the whole window's representations (over ranks)."""
    eval_fn: Callable[[nn.Module, Sequence[Any]], dict[str, Any]] | None = None
    """Scores ``eval_dataset`` instead of the item-mean ``loss_fn``: ``eval_fn(model, eval_dataset)``
    returns the row's values by key (``eval_loss``, and e.g. ``eval_recall_at_1``)."""

    def check(self) -> None:
        """ValueError naming the first setting that cannot be (the Trainer calls it first)."""
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if len(self.dataset) == 0:
            raise ValueError("the dataset is empty")
        tokens = self.micro_batch_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"micro_batch_tokens must be a positive integer, got {tokens!r}")
        if (self.encode is None) != (self.window_loss is None):
            raise ValueError("encode and window_loss go together (step_cached needs both)")
        outdir.check_mode(self.resume, self.overwrite)
