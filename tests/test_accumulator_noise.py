"""Accumulator(measure_noise=True): the gradient noise scale against a closed-form answer.

A linear least-squares model at fixed weights (learning rate 0): per-example gradients
are exact in float64, so tr(Σ), |G|² and B_simple = tr(Σ)/|G|² are known. Micro-batches
are drawn with replacement, as the estimator's derivation assumes (gradaccum.noise).
"""

from __future__ import annotations

import io

import pytest
import torch
from conftest import lm_loss_fn, make_lm, random_micro_batches
from torch import nn

from gradaccum import Accumulator
from gradaccum.noise import NoiseScale

N_EXAMPLES, DIM = 512, 8


def least_squares(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor, float]:
    """Model, inputs, targets and the true B_simple (per item) at the model's weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_EXAMPLES, DIM, dtype=torch.float64, generator=g)
    w_true = torch.randn(DIM, dtype=torch.float64, generator=g)
    y = x @ w_true + 0.8 * torch.randn(N_EXAMPLES, dtype=torch.float64, generator=g)
    model = nn.Linear(DIM, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_true + 0.5 * torch.randn(DIM, dtype=torch.float64, generator=g))
    # Per-example gradient of 0.5 (x·w - y)² is (x·w - y) x.
    per_example = (x @ model.weight.detach()[0] - y)[:, None] * x
    mean = per_example.mean(0)
    trace = float(((per_example - mean) ** 2).sum(1).mean())
    return model, x, y, trace / float(mean @ mean)


def squared_error(model: nn.Module, mb: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    x, y = mb
    return 0.5 * ((model(x)[:, 0] - y) ** 2).sum(), x.shape[0]


@pytest.mark.parametrize("sizes", [[8, 8, 8, 8], [1, 5, 2, 9, 3]], ids=["equal", "unequal"])
@pytest.mark.parametrize("shape", ["micro_step", "step"])
def test_estimate_matches_the_closed_form(sizes: list[int], shape: str) -> None:
    model, x, y, truth = least_squares()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), accum_steps=len(sizes),
                      measure_noise=NoiseScale(ema=1.0))
    g = torch.Generator().manual_seed(1)
    result = None
    for _ in range(600):
        micro = [(x[i], y[i]) for i in (torch.randint(0, N_EXAMPLES, (b,), generator=g) for b in sizes)]
        if shape == "step":
            result = acc.step(micro, squared_error)
        else:
            for mb in micro:
                with acc.micro_step():
                    result = acc.backward(*squared_error(model, mb))
    assert result is not None and result.noise_scale is not None
    assert result.noise_scale == pytest.approx(truth, rel=0.10)


def test_measuring_changes_no_weight(gen: torch.Generator) -> None:
    micro = random_micro_batches(gen, [2, 3, 1, 2, 4, 1, 2, 3, 1])
    runs = []
    for measure in (False, True):
        model = make_lm()
        acc = Accumulator(model, torch.optim.AdamW(model.parameters(), lr=0.05), accum_steps=3,
                          max_grad_norm=0.5, measure_noise=measure)
        results = [acc.step(micro[i : i + 3], lm_loss_fn) for i in range(0, 9, 3)]
        runs.append((model, results))
    (plain, off), (measured, on) = runs
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), measured.parameters(), strict=True))
    assert [(r.loss, r.grad_norm) for r in off] == [(r.loss, r.grad_norm) for r in on]
    assert [r.noise_scale for r in off] == [None] * 3
    assert on[0].noise_scale is None and on[1].noise_scale is not None  # two windows measured
    assert on[2].noise_scale > 0


def test_noise_state_resumes_exactly(gen: torch.Generator) -> None:
    micro = random_micro_batches(gen, [2, 3, 1, 2, 4, 1, 2, 3, 1, 2, 2, 2])
    model = make_lm()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=3, measure_noise=True)
    for i in range(0, 6, 3):
        acc.step(micro[i : i + 3], lm_loss_fn)
    buf = io.BytesIO()
    torch.save({"acc": acc.state_dict(), "model": model.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twin = make_lm(seed=5)
    twin.load_state_dict(saved["model"])
    again = Accumulator(twin, torch.optim.SGD(twin.parameters(), lr=0.1), accum_steps=3, measure_noise=True)
    again.load_state_dict(saved["acc"])
    for i in range(6, 12, 3):
        a, b = acc.step(micro[i : i + 3], lm_loss_fn), again.step(micro[i : i + 3], lm_loss_fn)
        assert a.noise_scale == b.noise_scale and a.noise_scale is not None


def test_skipped_and_single_micro_batch_windows_are_not_measured(gen: torch.Generator) -> None:
    model = make_lm()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), measure_noise=True)
    micro = random_micro_batches(gen, [2, 3, 2])
    for _ in range(3):
        acc.step(micro[:1], lm_loss_fn)  # one micro-batch on one process: no information
    assert acc.noise is not None and acc.noise.windows == 0
    nan = acc.step(micro, lambda m, mb: (lm_loss_fn(m, mb)[0] * float("nan"), lm_loss_fn(m, mb)[1]))
    assert nan.skipped and nan.noise_scale is None and acc.noise.windows == 0
    assert acc.step(micro, lm_loss_fn).noise_scale is None  # one measured window so far
    assert acc.noise.windows == 1 and acc.noise.trace is not None and acc.noise.trace > 0


def test_grad_scaler_does_not_change_the_estimate() -> None:
    model, x, y, _ = least_squares()
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        m = nn.Linear(DIM, 1, bias=False).double()
        m.load_state_dict(model.state_dict())
        acc = Accumulator(m, torch.optim.SGD(m.parameters(), lr=0.0), grad_scaler=scaler, measure_noise=True)
        g = torch.Generator().manual_seed(5)
        for _ in range(20):
            res = acc.step([(x[i], y[i]) for i in (torch.randint(0, N_EXAMPLES, (4,), generator=g)
                                                   for _ in range(3))], squared_error)
        results.append(res.noise_scale)
    assert results[0] is not None and results[1] == pytest.approx(results[0], rel=1e-9)
