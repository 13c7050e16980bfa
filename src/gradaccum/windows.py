"""One optimizer step's micro-batches: which of the step's examples go together, and the
replay in smaller micro-batches after a CUDA out-of-memory error.

A step's examples (this rank's shard, :func:`gradaccum.stream.rank_indices`) are split
into ``micro_batch`` examples at a time, or, with ``micro_batch_tokens``, into consecutive
runs of at most that many tokens, so the number of micro-batches varies by window and by
rank. Either way the window holds the same examples, so the split changes only rounding.
With ``encode`` and ``window_loss`` (a loss coupling the window's examples) the window goes
through ``Accumulator.step_cached`` instead, replayed the same way.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradaccum import sync
from gradaccum.accumulator import Accumulator, StepResult
from gradaccum.batching import example_length, token_groups
from gradaccum.engine import device_type
from gradaccum.settings import TrainerSettings
from gradaccum.stream import BatchShape, WindowShape, next_smaller_micro_batch, rank_indices


class OutOfMemoryElsewhere(Exception):
    """Another rank ran out of memory in this window: every rank discards it and replays."""


class WindowRunner:
    """Feeds a step's micro-batches to the Accumulator; on out-of-memory, replays them smaller.

    ``settings`` are the Trainer's (dataset, collate, loss, seed, OOM options); the replay
    lowers ``settings.micro_batch_tokens`` in place, or hands a smaller shape to ``set_shape``.
    """

    def __init__(self, settings: TrainerSettings, set_shape: Callable[[BatchShape, Accumulator], None],
                 say: Callable[[str], None]) -> None:
        self.settings = settings
        self.set_shape = set_shape
        self.say = say
        self.rank = sync.rank()
        self.world_size = sync.world_size()
        self.agreed = False
        """Whether this window's ranks agreed that none ran out of memory (they are in the sync then)."""

    # ------------------------------------------------------------------ which examples together
    def groups(self, position: int, shape: BatchShape) -> list[list[int]]:
        """This rank's dataset indices of the step at stream ``position``, one list per micro-batch."""
        s = self.settings
        idx = rank_indices(len(s.dataset), s.seed, position, shape, self.rank)
        if s.micro_batch_tokens is None:
            return [idx[i : i + shape.micro_batch] for i in range(0, len(idx), shape.micro_batch)]
        lengths = [example_length(s.dataset[j]) for j in idx]
        return [[idx[i] for i in run] for run in token_groups(lengths, s.micro_batch_tokens)]

    def collate(self, group: list[int]) -> Any:
        return self.settings.collate_fn([self.settings.dataset[j] for j in group])

    def ran(self, shape: BatchShape, acc: Accumulator) -> BatchShape | WindowShape:
        """The shape the last window ran in (a token budget changes it from window to window)."""
        if self.settings.micro_batch_tokens is None:
            return shape
        micro = -(-shape.per_rank // acc.accum_steps)
        return WindowShape(shape.effective_batch, micro, acc.accum_steps, shape.world_size)

    def eval_micro_batch(self, shape: BatchShape, eval_dataset: Any) -> int:
        """Held-out examples per micro-batch: the micro-batch, or as many of the longest held-out
        example as the token budget holds."""
        tokens = self.settings.micro_batch_tokens
        if tokens is None:
            return shape.micro_batch
        return max(1, tokens // max(example_length(ex) for ex in eval_dataset))

    def autocast(self, model: nn.Module) -> Any:
        dtype = self.settings.autocast_dtype
        return contextlib.nullcontext() if dtype is None else torch.autocast(device_type(model), dtype=dtype)

    # ------------------------------------------------------------------ running, replaying
    def run(self, acc: Accumulator, model: nn.Module, position: int, shape: BatchShape, step: int
            ) -> StepResult:
        """One optimizer step; after an out-of-memory error, shrink the micro-batch and replay.

        The replay starts again from the window's first micro-batch with the same
        examples, so nothing is lost or counted twice and the effective batch stays.
        """
        while True:
            groups = self.groups(position, shape)
            result = self._window(acc, model, groups)
            if result is not None:
                return result
            if self.settings.micro_batch_tokens is not None:
                self._halve_token_budget(groups, step)
                continue
            smaller = next_smaller_micro_batch(shape.per_rank, shape.micro_batch)
            if smaller is None:
                raise RuntimeError(f"out of memory at step {step + 1} even with micro-batch 1")
            old, shape = shape.micro_batch, shape.with_micro_batch(smaller)
            self.set_shape(shape, acc)
            self.say(f"out of memory with micro-batch {old}; replaying step {step + 1} with "
                     f"micro-batch {shape.micro_batch} x accum steps {shape.accum_steps}")

    def _halve_token_budget(self, groups: list[list[int]], step: int) -> None:
        """Half the token budget, never below the window's longest example."""
        s = self.settings
        assert s.micro_batch_tokens is not None
        longest = max(example_length(s.dataset[j]) for group in groups for j in group)
        old = s.micro_batch_tokens
        if old <= longest:
            raise RuntimeError(f"out of memory at step {step + 1} even with micro-batch tokens {old} "
                               "(the window's longest example)")
        s.micro_batch_tokens = max(longest, old // 2)
        self.say(f"out of memory with micro-batch tokens {old}; replaying step {step + 1} with "
                 f"{s.micro_batch_tokens} tokens per micro-batch")

    def _window(self, acc: Accumulator, model: nn.Module, groups: list[list[int]]) -> StepResult | None:
        """Run the window; None when this or another rank ran out of memory (window discarded)."""
        s = self.settings
        agree = s.oom_replay and self.world_size > 1 and self._agrees_on_oom(model)
        self.agreed = False
        acc.accum_steps = len(groups)  # varies by window (and rank) with a token budget
        try:
            run = self._micro_steps if s.encode is None else self._cached
            return run(acc, model, groups, agree)
        except torch.cuda.OutOfMemoryError:
            if not s.oom_replay or self.agreed:
                raise  # after the agreement the other ranks are already inside the sync
        except OutOfMemoryElsewhere:
            agree = False  # agreed already
        # Outside the except block: the traceback no longer pins the window's tensors.
        acc.discard()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if agree:
            sync.any_rank(True)
        return None

    def _agreement(self, agree: bool, last: bool = True) -> None:
        """Under the OOM agreement, before a synchronising step: every rank says it is fine, or
        they all replay (OutOfMemoryElsewhere). A rank out of memory says so from ``_window``."""
        if agree:
            self.agreed = last
            if sync.any_rank(False):
                raise OutOfMemoryElsewhere

    def _micro_steps(self, acc: Accumulator, model: nn.Module, groups: list[list[int]], agree: bool
                     ) -> StepResult:
        s = self.settings
        result: StepResult | None = None
        for i, group in enumerate(groups):
            mb = self.collate(group)
            if i == acc.accum_steps - 1:
                self._agreement(agree)  # before the last micro-batch, whose backward syncs gradients
            with acc.micro_step():
                with self.autocast(model):
                    loss_sum, num_items = s.loss_fn(model, mb)
                result = acc.backward(loss_sum, num_items)
        assert result is not None
        return result

    def _cached(self, acc: Accumulator, model: nn.Module, groups: list[list[int]], agree: bool) -> StepResult:
        """The window through ``step_cached`` (a loss coupling its examples). Under the agreement the
        ranks agree twice: before the representations are gathered (once every micro-batch is
        encoded) and before the last re-encode, whose backward syncs gradients."""
        s = self.settings
        assert s.encode is not None and s.window_loss is not None
        encode_fn, calls = s.encode, [0]

        def micro_batches() -> Any:
            for group in groups:
                yield self.collate(group)
            self._agreement(agree, last=False)

        def encode(m: nn.Module, mb: Any) -> Any:
            calls[0] += 1
            if calls[0] == 2 * len(groups):  # each micro-batch is encoded twice: this is the last
                self._agreement(agree)
            return encode_fn(m, mb)

        with self.autocast(model):
            return acc.step_cached(micro_batches(), encode, s.window_loss)

    def _agrees_on_oom(self, model: nn.Module) -> bool:
        if self.settings.oom_agreement is not None:
            return self.settings.oom_agreement
        return any(p.is_cuda for p in model.parameters())
