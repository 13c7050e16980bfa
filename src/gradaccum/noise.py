"""Gradient noise scale from the gradients an accumulation window already has.

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", appendix A:
B_simple = tr(Σ) / |G|², where G is the true (dataset-mean) gradient per item and Σ
the per-item gradient covariance. It predicts the critical batch (in items) beyond
which a larger batch stops saving optimizer steps.

Estimator. A batch of b items drawn i.i.d. has a sum gradient S with mean gradient
g = S/b and E|g|² = |G|² + tr(Σ)/b, i.e. E[|S|²/b] = b·|G|² + tr(Σ). A window of B
items (sum gradient S) is cut into small batches j (sum gradients S_j over b_j items,
all at the same weights). Summing the per-batch equations over n small batches that
partition the window (Σ b_j = B) and subtracting the window's own equation:

    E[Σ_j |S_j|²/b_j − |S|²/B] = (B|G|² + n·tr Σ) − (B|G|² + tr Σ) = (n − 1)·tr Σ

so  tr Σ ≈ (Σ_j |S_j|²/b_j − |S|²/B) / (n − 1)  and  |G|² ≈ (|S|²/B − tr Σ) / B,

both unbiased for any sizes b_j. This is the one-way ANOVA between-groups estimator,
Σ_j b_j·|g_j − g_big|² / (n − 1). It is also the weighted least-squares fit of the
line |g|² = |G|² + tr Σ·(1/b) through the (most precise) window point, with the
small-batch points weighted ∝ b_j² (the inverse of their variance when noise dominates,
Var|g_j|² ∝ 1/b_j²). With equal sizes b it reduces exactly to McCandlish's
|G|² = (B|g_big|² − b|g_small|²)/(B − b), tr Σ = (|g_small|² − |g_big|²)/(1/b − 1/B).

The same subtraction works for any collection of sub-batches of the window, not just a
partition: with k = Σ b_j / B (how many times they cover the window),
tr Σ ≈ (Σ_j |S_j|²/b_j − k·|S|²/B) / (n − k). That is what lets the ranks' local
window gradients under torch.distributed join as further small batches, alongside or
instead of micro-batches. (When the micro-batches of *all* ranks are pooled, rank windows
add nothing: the between-rank variation is already part of Σ_j b_j·|g_j − g_big|².)
The window carries no information when n − k ≤ 0 (one micro-batch on one rank: the
small batch *is* the window), and is skipped.

Everything the estimator needs from a window is three sums over small batches,
(Σ |S_j|²/b_j, n, Σ b_j), plus the window's |S|² and B: sums, so each rank computes its
own share and one all-reduce (appended to the one the window already does) gives every
rank the same numbers, hence the same noise scale. No collective is called here.

Across windows: noise_scale = EMA(tr Σ) / EMA(|G|²), a ratio of EMAs. Single-window
estimates of |G|² are often negative, so a ratio per window would be unusable. Its 90%
error bar (:meth:`NoiseScale.interval`) comes from the windows' spread. The
result is in items (samples or tokens, whatever num_items counts); `critical_batch`
converts it to examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gradaccum._interval import LEVEL, WindowMoments

# About 20 windows of memory (1/(1 − 0.95)): a single window's |G|² estimate is very
# noisy, so the EMA has to pool tens of windows, while the noise scale drifts over
# hundreds to thousands of steps during training (it grows as the loss falls), and
# the adaptive batch rule must see that drift within tens of steps, not hundreds.
DEFAULT_EMA = 0.95


@dataclass(frozen=True)
class SmallBatchSums:
    """The sum-reducible statistics of a window's small batches.

    ``weighted_sq`` = Σ_j |S_j|²/b_j (S_j a small batch's SUM gradient over b_j items),
    ``count`` = n (small batches with b_j > 0), ``items`` = Σ_j b_j. Add two of them to
    pool micro-batches of several ranks, or micro-batches with rank-local windows.
    """

    weighted_sq: float = 0.0
    count: float = 0.0
    items: float = 0.0

    @classmethod
    def of(cls, sq_norms: Sequence[float], items: Sequence[float]) -> SmallBatchSums:
        """From per-small-batch squared norms of SUM gradients and their item counts."""
        if len(sq_norms) != len(items):
            raise ValueError(f"{len(sq_norms)} squared norms but {len(items)} item counts")
        weighted, count, total = 0.0, 0, 0.0
        for sq, b in zip(sq_norms, items, strict=True):
            sq, b = float(sq), float(b)
            if b < 0:
                raise ValueError(f"item counts must be >= 0, got {b}")
            if b == 0:
                continue  # an empty micro-batch has no mean gradient (and S_j = 0)
            weighted += sq / b
            count += 1
            total += b
        return cls(weighted, float(count), total)

    def __add__(self, other: SmallBatchSums) -> SmallBatchSums:
        return SmallBatchSums(
            self.weighted_sq + other.weighted_sq, self.count + other.count, self.items + other.items
        )

    def as_tuple(self) -> tuple[float, float, float]:
        """(weighted_sq, count, items): the fixed order to all-reduce them in."""
        return (self.weighted_sq, self.count, self.items)


def estimate_window(
    small: SmallBatchSums, window_sq_norm: float, window_items: float
) -> tuple[float, float] | None:
    """Unbiased (|G|², tr Σ) from one window, or None when the window carries no information.

    ``window_sq_norm`` is |S|² of the window's SUM gradient (all ranks), ``window_items`` B.
    """
    big_sq, big_b = float(window_sq_norm), float(window_items)
    if big_b <= 0 or not all(map(math.isfinite, (*small.as_tuple(), big_sq, big_b))):
        return None  # an empty or non-finite window (the Accumulator skips those too)
    cover = small.items / big_b
    dof = small.count - cover
    # Float item counts (e.g. summed over ranks) can leave n − k a rounding error above 0.
    if dof <= 1e-9 * max(small.count, 1.0):
        return None
    trace = (small.weighted_sq - cover * big_sq / big_b) / dof
    grad_sq = (big_sq / big_b - trace) / big_b
    return grad_sq, trace


class NoiseScale:
    """EMA estimate of the gradient noise scale B_simple = tr(Σ)/|G|², in items.

    Feed it one window at a time with :meth:`update` (sums, as after an all-reduce) or
    :meth:`observe` (per-batch lists). Windows without information are ignored.

    Args:
        ema: decay per measured window, in [0, 1]. 1 gives the plain mean over all
            windows; 0 only the last window.
    """

    def __init__(self, ema: float = DEFAULT_EMA) -> None:
        if not 0.0 <= ema <= 1.0:
            raise ValueError(f"ema must be in [0, 1], got {ema}")
        self.ema = float(ema)
        # Decayed sums Σ ema^age·x and their weight Σ ema^age: the EMA is their ratio,
        # bias-corrected from the first window on (the Adam correction), and ema=1 is
        # the plain mean.
        self._trace_sum = 0.0
        self._grad_sq_sum = 0.0
        self._weight = 0.0
        self.windows = 0
        """Windows measured so far (skipped ones not counted)."""
        self._moments = WindowMoments(self.ema)  # the error bar's window-to-window spread

    def update(self, small: SmallBatchSums, window_sq_norm: float, window_items: float) -> float | None:
        """Add one window; returns the current :attr:`noise_scale`."""
        est = estimate_window(small, window_sq_norm, window_items)
        if est is not None:
            grad_sq, trace = est
            self._trace_sum = self.ema * self._trace_sum + trace
            self._grad_sq_sum = self.ema * self._grad_sq_sum + grad_sq
            self._weight = self.ema * self._weight + 1.0
            self._moments.add(trace, grad_sq)
            self.windows += 1
        return self.noise_scale

    def observe(
        self,
        micro_sq_norms: Sequence[float],
        micro_items: Sequence[float],
        window_sq_norm: float,
        window_items: float,
        rank_sq_norms: Sequence[float] = (),
        rank_items: Sequence[float] = (),
    ) -> float | None:
        """Add one window from lists: micro-batch and (optional) rank-local window SUM gradients.

        Squared norms are of SUM gradients, items their counts; the window's are over all
        ranks. Under torch.distributed, prefer summing each rank's
        :meth:`SmallBatchSums.of` over ranks and calling :meth:`update`: then all ranks
        pool all micro-batches and agree on the result.
        """
        small = SmallBatchSums.of(micro_sq_norms, micro_items) + SmallBatchSums.of(rank_sq_norms, rank_items)
        return self.update(small, window_sq_norm, window_items)

    @property
    def trace(self) -> float | None:
        """EMA of tr(Σ) per item, or None before any measured window."""
        return self._trace_sum / self._weight if self._weight > 0 else None

    @property
    def grad_sq(self) -> float | None:
        """EMA of |G|² per item, or None before any measured window."""
        return self._grad_sq_sum / self._weight if self._weight > 0 else None

    @property
    def noise_scale(self) -> float | None:
        """EMA(tr Σ) / EMA(|G|²) in items; None before two measured windows.

        Also None while EMA(|G|²) <= 0: noise so far swamps the true gradient, and no
        finite batch is supported by the measurement yet.
        """
        if self.windows < 2 or self._grad_sq_sum <= 0:
            return None
        # tr Σ >= 0; a negative EMA is estimation noise of a nearly noise-free gradient.
        return max(self._trace_sum / self._grad_sq_sum, 0.0)

    def interval(self, level: float = LEVEL) -> tuple[float, float] | None:
        """A ``level`` (default 90%) confidence interval (low, high) for the noise scale, in items.

        From the window-to-window spread of the (tr Σ, |G|²) estimates over the EMA's horizon
        (Fieller's interval for a ratio of means, :mod:`gradaccum._interval`). ``high`` is inf
        while EMA(|G|²) is not clearly above 0. None before two measured windows, or while the
        windows are still too few to read their spread (about three).
        """
        if self.windows < 2:
            return None
        return self._moments.interval(level)

    def state_dict(self) -> dict[str, Any]:
        return {
            "moments": self._moments.state_dict(),
            "ema": self.ema,
            "trace_sum": self._trace_sum,
            "grad_sq_sum": self._grad_sq_sum,
            "weight": self._weight,
            "windows": self.windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"ema", "trace_sum", "grad_sq_sum", "weight", "windows"} - set(state)
        if missing:
            raise ValueError(f"NoiseScale state is missing {sorted(missing)}")
        # The decayed sums mean nothing under another decay: refuse rather than resume inexactly.
        if float(state["ema"]) != self.ema:
            raise ValueError(f"NoiseScale state has ema={state['ema']}, this estimator ema={self.ema}")
        self._trace_sum = float(state["trace_sum"])
        self._grad_sq_sum = float(state["grad_sq_sum"])
        self._weight = float(state["weight"])
        self.windows = int(state["windows"])
        self._moments.load_state_dict(state.get("moments"))  # absent before the interval: afresh


def critical_batch(noise_scale: float | None, items_per_example: float) -> float | None:
    """The noise scale (items) as a batch in examples: items / mean items per example."""
    if noise_scale is None:
        return None
    if items_per_example <= 0:
        raise ValueError(f"items_per_example must be > 0, got {items_per_example}")
    return noise_scale / items_per_example
