"""The batch arithmetic and the data order: what one optimizer step consumes.

``effective_batch = micro_batch x accum_steps x world_size`` is written once, here
(:class:`BatchShape`). Data order depends only on the seed and the position in the
stream, counted in examples: a step of effective batch E takes the next E examples of
a stream of per-epoch seeded permutations, and each rank its contiguous shard of them.
So the micro-batch changes nothing but float rounding, E may change between steps
(``--effective-batch auto``), and resuming needs only the position.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

DEFAULT_MICRO_CAP = 16
"""The default micro-batch: the largest divisor of the per-rank batch up to this."""


class ShapeError(ValueError):
    """A batch shape that cannot be: ``param`` names the offending parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ShapeError(name, f"{name} must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class BatchShape:
    """One optimizer step's examples: ``micro_batch`` x ``accum_steps`` on each of ``world_size`` ranks."""

    effective_batch: int
    """Examples per optimizer step over all ranks."""
    micro_batch: int
    """Examples per forward/backward on one rank."""
    world_size: int = 1
    """Ranks sharing the effective batch."""

    def __post_init__(self) -> None:
        effective = _positive_int("effective_batch", self.effective_batch)
        micro = _positive_int("micro_batch", self.micro_batch)
        world = _positive_int("world_size", self.world_size)
        check_divides_world(effective, world)
        per_rank = effective // world
        if micro > per_rank:
            raise ShapeError("micro_batch", f"micro_batch {micro} is larger than the per-rank effective "
                                            f"batch {per_rank}")
        if per_rank % micro:
            raise ShapeError("micro_batch", f"effective_batch {effective} is not divisible by micro_batch "
                                            f"{micro}" + (f" x world_size {world}" if world > 1 else ""))

    @property
    def per_rank(self) -> int:
        """Examples of each step on one rank."""
        return self.effective_batch // self.world_size

    @property
    def accum_steps(self) -> int:
        """Micro-batches per window on one rank."""
        return self.per_rank // self.micro_batch

    def with_micro_batch(self, micro_batch: int) -> BatchShape:
        """The same effective batch in micro-batches of another size (the OOM replay)."""
        return replace(self, micro_batch=micro_batch)


class WindowShape(NamedTuple):
    """One window as it ran, where it differs from the BatchShape: with a token budget the
    number of micro-batches (and so their mean size) varies from window to window."""

    effective_batch: int
    micro_batch: int
    """Examples per micro-batch on rank 0, rounded up."""
    accum_steps: int
    """Micro-batches of the window on rank 0."""
    world_size: int


def check_divides_world(effective_batch: int, world_size: int) -> None:
    """The effective batch must split evenly over the ranks."""
    if effective_batch % world_size:
        raise ShapeError("effective_batch", f"effective_batch {effective_batch} is not divisible by the "
                                            f"world size {world_size}")


def micro_batch_candidates(per_rank: int) -> list[int]:
    """Every micro-batch that divides a per-rank batch, smallest first."""
    return [d for d in range(1, per_rank + 1) if per_rank % d == 0]


def default_micro_batch(per_rank: int, cap: int = DEFAULT_MICRO_CAP) -> int:
    """The largest divisor of the per-rank batch up to ``cap``."""
    return max(d for d in micro_batch_candidates(per_rank) if d <= cap)


def next_smaller_micro_batch(per_rank: int, micro_batch: int) -> int | None:
    """The next smaller divisor of the per-rank batch (None below 1): the OOM replay's step down."""
    smaller = [d for d in micro_batch_candidates(per_rank) if d < micro_batch]
    return smaller[-1] if smaller else None


def stream_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Dataset indices at stream positions ``[start, start + count)``: per-epoch shuffles
    seeded by ``seed`` and the epoch, so any position is found without replaying."""
    import torch  # here: the command line checks batch shapes before it imports torch

    out: list[int] = []
    epoch, perm = -1, []
    for pos in range(start, start + count):
        if pos // n != epoch:
            epoch = pos // n
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=g).tolist()
        out.append(perm[pos % n])
    return out


def rank_indices(n: int, seed: int, position: int, shape: BatchShape, rank: int) -> list[int]:
    """This rank's contiguous shard of the effective batch that starts at stream ``position``."""
    return stream_indices(n, seed, position + rank * shape.per_rank, shape.per_rank)
