"""gradaccum.noise: the gradient noise scale estimator against closed-form truth.

The reference problem is linear least squares at FIXED weights: every example's gradient
is known exactly in float64, so the true tr(Σ) (population covariance over the dataset),
|G|² and B_simple = tr(Σ)/|G|² are too. Micro-batches are drawn with replacement, which
is exactly the i.i.d. model the estimator is unbiased under.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gradaccum.noise import NoiseScale, SmallBatchSums, critical_batch, estimate_window


def least_squares_grads(seed: int = 0, n: int = 1000, dim: int = 8) -> torch.Tensor:
    """Per-example gradients of 0.5·(x·w − y)² at a fixed w away from the optimum."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    w_star = torch.randn(dim, generator=gen, dtype=torch.float64)
    y = x @ w_star + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    w = w_star + 0.3 * torch.randn(dim, generator=gen, dtype=torch.float64)
    return (x @ w - y)[:, None] * x


def truth(grads: torch.Tensor) -> tuple[float, float]:
    """(|G|², tr Σ) of the dataset: the mean gradient and the population covariance."""
    mean = grads.mean(0)
    return float(mean @ mean), float(((grads - mean) ** 2).sum(1).mean())


def window_sums(grads: torch.Tensor, sizes: list[int], windows: int, seed: int) -> torch.Tensor:
    """SUM gradients of `windows` windows of micro-batches of `sizes` items: (windows, k, dim)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(grads), (windows, sum(sizes)), generator=gen)
    parts = grads[idx].split(sizes, dim=1)  # empty micro-batches give a zero sum, as in training
    return torch.stack([p.sum(1) for p in parts], dim=1)


def sq(rows: torch.Tensor) -> list[float]:
    """Squared norm of each row (one SUM gradient per row)."""
    return (rows**2).sum(-1).tolist()


def sq1(vec: torch.Tensor) -> float:
    return float(vec @ vec)


GRADS = least_squares_grads()
G2, TRACE = truth(GRADS)
B_SIMPLE = TRACE / G2  # about 14 items


@pytest.mark.parametrize("sizes", [[8] * 8, [3, 5, 8, 13, 1, 10, 0]], ids=["equal", "unequal-with-empty"])
def test_converges_to_true_b_simple(sizes: list[int]) -> None:
    est = NoiseScale(ema=1.0)  # plain mean over windows: tests the estimator's bias
    sums = window_sums(GRADS, sizes, windows=1000, seed=1)
    for micro in sums:
        est.observe(sq(micro), sizes, sq1(micro.sum(0)), sum(sizes))
    assert est.windows == 1000
    assert est.noise_scale == pytest.approx(B_SIMPLE, rel=0.10)
    assert est.trace == pytest.approx(TRACE, rel=0.10)
    assert est.grad_sq == pytest.approx(G2, rel=0.10)


def test_two_ranks() -> None:
    """2 simulated ranks, 4 micro-batches each: the three ways the Accumulator can feed it."""
    sizes = [6, 4, 7, 5]
    local = [window_sums(GRADS, sizes, windows=1000, seed=seed) for seed in (2, 3)]
    pooled, with_ranks, ranks_only = NoiseScale(1.0), NoiseScale(1.0), NoiseScale(1.0)
    for m0, m1 in zip(*local, strict=True):
        s0, s1 = m0.sum(0), m1.sum(0)
        big_sq, big_b = sq1(s0 + s1), 2 * sum(sizes)
        # (a) each rank's micro-batch sums, summed over ranks (an all-reduce): every rank agrees.
        summed = SmallBatchSums.of(sq(m0), sizes) + SmallBatchSums.of(sq(m1), sizes)
        pooled.update(summed, big_sq, big_b)
        # (b) rank 0's own micro-batches plus both ranks' local windows as further small batches.
        with_ranks.observe(
            sq(m0), sizes, big_sq, big_b, rank_sq_norms=sq(torch.stack([s0, s1])), rank_items=[sum(sizes)] * 2
        )
        # (c) local windows only (plain DDP, or micro-batch norms not measured).
        ranks_only.observe([], [], big_sq, big_b, sq(torch.stack([s0, s1])), [sum(sizes)] * 2)
    for est in (pooled, with_ranks, ranks_only):
        assert est.noise_scale == pytest.approx(B_SIMPLE, rel=0.10)


def test_default_ema_tracks_truth() -> None:
    """The default decay pools ~40 windows: coarser than the mean, still near the truth."""
    est = NoiseScale()
    sizes = [8] * 8
    for micro in window_sums(GRADS, sizes, windows=300, seed=4):
        est.observe(sq(micro), sizes, sq1(micro.sum(0)), sum(sizes))
    assert est.noise_scale == pytest.approx(B_SIMPLE, rel=0.25)


@pytest.mark.parametrize("sizes", [[1, 2], [2, 1, 1], [3]], ids=["1+2", "2+1+1", "one"])
def test_exactly_unbiased_by_enumeration(sizes: list[int]) -> None:
    """Average over every equally likely window of a 3-example dataset = the truth, exactly."""
    grads = torch.tensor([[1.0, 0.0], [2.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
    g2, tr = truth(grads)
    ests = []
    for draw in itertools.product(range(3), repeat=sum(sizes)):
        micro = torch.stack([p.sum(0) for p in grads[list(draw)].split(sizes)])
        ests.append(estimate_window(SmallBatchSums.of(sq(micro), sizes), sq1(micro.sum(0)), sum(sizes)))
    if len(sizes) == 1:
        assert all(e is None for e in ests)  # the micro-batch is the window: no information
        return
    assert sum(e[0] for e in ests) / len(ests) == pytest.approx(g2, rel=1e-12)
    assert sum(e[1] for e in ests) / len(ests) == pytest.approx(tr, rel=1e-12)


def test_rank_windows_as_extra_small_batches_unbiased_by_enumeration() -> None:
    """Rank 0's micro-batches (1 + 2 items) and both ranks' local windows (3 and 1 items):
    the small batches cover the window 1.75 times, and the estimate is still exactly unbiased."""
    grads = torch.tensor([[1.0, 0.0], [2.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
    g2, tr = truth(grads)
    ests = []
    for draw in itertools.product(range(3), repeat=4):
        micro = torch.stack([p.sum(0) for p in grads[list(draw)].split([1, 2, 1])])
        ranks = torch.stack([micro[:2].sum(0), micro[2]])
        small = SmallBatchSums.of(sq(micro[:2]), [1, 2]) + SmallBatchSums.of(sq(ranks), [3, 1])
        ests.append(estimate_window(small, sq1(micro.sum(0)), 4))
    assert sum(e[0] for e in ests) / len(ests) == pytest.approx(g2, rel=1e-12)
    assert sum(e[1] for e in ests) / len(ests) == pytest.approx(tr, rel=1e-12)


def test_hand_computed_windows() -> None:
    # Equal sizes: micro sums 1 and 3 over one item each; window sum 4 over 2 items.
    # McCandlish: |g_small|² = (1 + 9)/2 = 5, |g_big|² = 4, b = 1, B = 2:
    # |G|² = (2·4 − 1·5)/(2 − 1) = 3, tr Σ = (5 − 4)/(1 − 1/2) = 2.
    assert estimate_window(SmallBatchSums.of([1.0, 9.0], [1, 1]), 16.0, 2) == pytest.approx((3.0, 2.0))
    # Unequal: sums 2 over 1 item and 3 over 3 items, window 5 over 4:
    # tr Σ = (4/1 + 9/3 − 25/4)/(2 − 1) = 0.75, |G|² = (25/4 − 0.75)/4 = 1.375.
    assert estimate_window(SmallBatchSums.of([4.0, 9.0], [1, 3]), 25.0, 4) == pytest.approx((1.375, 0.75))


def test_ratio_of_emas_and_none_before_two_windows() -> None:
    est = NoiseScale(ema=0.5)
    assert est.noise_scale is None and est.trace is None and est.grad_sq is None
    assert est.observe([1.0, 9.0], [1, 1], 16.0, 2) is None  # |G|² 3, tr Σ 2: one window only
    assert est.trace == pytest.approx(2.0) and est.grad_sq == pytest.approx(3.0)
    ns = est.observe([4.0, 9.0], [1, 3], 25.0, 4)  # |G|² 1.375, tr Σ 0.75
    # Weights 0.5 (older) and 1: EMA(tr) = (1 + 0.75)/1.5, EMA(|G|²) = (1.5 + 1.375)/1.5.
    assert est.trace == pytest.approx(1.75 / 1.5) and est.grad_sq == pytest.approx(2.875 / 1.5)
    assert ns == est.noise_scale == pytest.approx(1.75 / 2.875)  # not the mean of 2/3 and 0.75/1.375


def test_uninformative_windows_are_skipped() -> None:
    est = NoiseScale()
    est.observe([16.0], [2], 16.0, 2)  # a single micro-batch on one rank
    est.observe([16.0, 0.0, 0.0], [2, 0, 0], 16.0, 2)  # the others empty: B == b
    est.observe([0.0, 0.0], [0, 0], 0.0, 0)  # no items at all
    est.observe([1.0, math.inf], [1, 1], math.inf, 2)  # a non-finite window
    assert est.windows == 0 and est.noise_scale is None
    assert estimate_window(SmallBatchSums(), 4.0, 2) is None


def test_negative_grad_sq_gives_none_and_negative_trace_zero() -> None:
    est = NoiseScale()
    # Micro sums 1 and -1 cancel: |g_big|² = 0, so the |G|² estimate is negative.
    est.observe([1.0, 1.0], [1, 1], 0.0, 2)
    est.observe([1.0, 1.0], [1, 1], 0.0, 2)
    assert est.windows == 2 and est.noise_scale is None
    est = NoiseScale()
    # Micro sums equal and the window large: tr Σ estimate < 0 is noise; clamp to 0.
    for _ in range(2):
        est.update(SmallBatchSums(weighted_sq=1.0, count=2, items=2), 16.0, 2)
    assert est.trace is not None and est.trace < 0 and est.noise_scale == 0.0


def test_state_dict_round_trip_resumes_exactly() -> None:
    sizes = [3, 5, 8]
    sums = window_sums(GRADS, sizes, windows=20, seed=5)
    whole, first = NoiseScale(), NoiseScale()
    for micro in sums[:10]:
        for est in (whole, first):
            est.observe(sq(micro), sizes, sq1(micro.sum(0)), sum(sizes))
    resumed = NoiseScale()
    resumed.load_state_dict(first.state_dict())
    for micro in sums[10:]:
        for est in (whole, resumed):
            est.observe(sq(micro), sizes, sq1(micro.sum(0)), sum(sizes))
    assert resumed.state_dict() == whole.state_dict()
    assert resumed.noise_scale == whole.noise_scale  # bitwise, not approximately
    with pytest.raises(ValueError, match="ema"):
        NoiseScale(ema=0.9).load_state_dict(whole.state_dict())
    with pytest.raises(ValueError, match="missing"):
        NoiseScale().load_state_dict({"ema": 0.95})


def test_small_batch_sums() -> None:
    s = SmallBatchSums.of([4.0, 7.0, 9.0], [2, 0, 3])  # the empty micro-batch is ignored
    assert s.as_tuple() == (4.0 / 2 + 9.0 / 3, 2.0, 5.0)
    assert (s + s).as_tuple() == (10.0, 4.0, 10.0)
    with pytest.raises(ValueError):
        SmallBatchSums.of([1.0], [1, 2])
    with pytest.raises(ValueError):
        SmallBatchSums.of([1.0], [-1])
    with pytest.raises(ValueError):
        NoiseScale(ema=1.5)


def test_critical_batch_in_examples() -> None:
    assert critical_batch(None, 12.0) is None
    assert critical_batch(1200.0, 12.0) == 100.0  # 1200 tokens at 12 tokens per example
    with pytest.raises(ValueError):
        critical_batch(10.0, 0)
