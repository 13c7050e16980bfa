"""ga.check: the accumulation doctor, on models and loss functions with known defects."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import Batch, cat_batches, lm_loss_fn, make_lm, token_batch
from torch import nn

import gradaccum as ga


@pytest.fixture
def batch(gen: torch.Generator) -> Batch:
    # Variable lengths: a mean-of-means differs from the token mean.
    return cat_batches([token_batch(gen, [1, 6]), token_batch(gen, [2, 5]), token_batch(gen, [6, 6])])


def mean_loss(model: nn.Module, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    loss, n = lm_loss_fn(model, mb)
    return loss / n, n  # the classic mistake: a MEAN with the count


def per_sequence_weighted(model: nn.Module, mb: Batch) -> tuple[torch.Tensor, int]:
    """Token mean of the micro-batch times its sequence count: sums and doubles correctly,
    but weights each micro-batch by sequences instead of tokens."""
    loss, n = lm_loss_fn(model, mb)
    rows = mb["ids"].shape[0]
    return loss / n * rows, rows


def test_a_correct_sum_loss_passes(batch: Batch) -> None:
    report = ga.check(make_lm(), lm_loss_fn, batch, micro_batch_size=2)
    assert report.ok and report.findings == []
    assert report.gradient_rel_error is not None and report.gradient_rel_error < 1e-13
    assert str(report).splitlines()[-1].startswith("OK: accumulation-safe")


def test_a_mean_loss_is_caught(batch: Batch) -> None:
    report = ga.check(make_lm(), mean_loss, batch, micro_batch_size=2)
    assert not report.ok
    assert "mean-reduced-loss" in report.codes() and "gradient-mismatch" in report.codes()
    text = str(report)
    assert "a MEAN was returned" in text and text.splitlines()[-1].startswith("NOT OK")


def test_wrong_micro_batch_weighting_is_a_gradient_mismatch(batch: Batch) -> None:
    report = ga.check(make_lm(), per_sequence_weighted, batch, micro_batch_size=2)
    assert report.codes() == ["gradient-mismatch"]
    assert report.gradient_rel_error > 1e-3


def test_a_constant_item_count_is_caught(batch: Batch) -> None:
    report = ga.check(make_lm(), lambda m, mb: (lm_loss_fn(m, mb)[0], 7), batch, micro_batch_size=2)
    assert "mean-reduced-loss" in report.codes()
    assert any("num_items does not grow" in f.message for f in report.findings)


class Classifier(nn.Module):
    def __init__(self, norm: str = "", dropout: float = 0.0, unused: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.norm = nn.BatchNorm1d(8) if norm == "bn" else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(8, 3)
        self.spare = nn.Linear(2, 2) if unused else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.norm(self.inp(x)))))


def ce_sum(model: nn.Module, mb: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    x, y = mb
    return F.cross_entropy(model(x), y, reduction="sum"), y.shape[0]


def _data(gen: torch.Generator, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def test_batchnorm_is_flagged_with_its_measured_error(gen: torch.Generator) -> None:
    report = ga.check(Classifier("bn"), ce_sum, _data(gen), micro_batch_size=2)
    # An error since issue 20: a train-mode gradient off beyond rounding is never "OK".
    assert report.codes() == ["batchnorm"] and not report.ok and report.findings[0].level == "error"
    assert "off by" in report.findings[0].message and "'norm'" in report.findings[0].message


def test_dropout_is_nondeterministic_and_compared_without_it(gen: torch.Generator) -> None:
    report = ga.check(Classifier(dropout=0.5), ce_sum, _data(gen), micro_batch_size=2)
    assert report.codes() == ["nondeterministic"] and report.ok
    assert report.gradient_rel_error < 1e-5  # float32, dropout off


def test_unused_parameters(gen: torch.Generator) -> None:
    report = ga.check(Classifier(unused=True), ce_sum, _data(gen), micro_batch_size=4)
    assert report.codes() == ["unused-parameters"] and "spare" in report.findings[0].message


def test_micro_batches_without_items(gen: torch.Generator) -> None:
    b = cat_batches([token_batch(gen, [0, 0]), token_batch(gen, [3, 2])])
    report = ga.check(make_lm(), lm_loss_fn, b, micro_batch_size=2)
    assert report.codes() == ["no-items"] and report.ok
    empty = token_batch(gen, [0, 0, 0, 0])
    report = ga.check(make_lm(), lm_loss_fn, empty, micro_batch_size=2)
    assert report.codes() == ["no-items"] and not report.ok


def test_check_leaves_model_and_rng_exactly_as_found(gen: torch.Generator) -> None:
    model = Classifier("bn", dropout=0.3)
    model.train()
    model.out.eval()  # a mixed mode must come back too
    x, y = _data(gen)
    ce_sum(model, (x, y))[0].backward()  # stray gradients the user has
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    torch_rng, py_rng = torch.get_rng_state(), random.getstate()
    report = ga.check(model, ce_sum, (x, y), micro_batch_size=2)
    assert set(report.codes()) == {"batchnorm", "nondeterministic"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # running stats too
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert modes == [m.training for m in model.modules()]
    assert torch.equal(torch_rng, torch.get_rng_state()) and py_rng == random.getstate()


def in_batch_negatives(model: nn.Module, mb: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """A dual-encoder InfoNCE loss: every row's negatives are the other rows of its batch."""
    return ga.losses.info_nce(model(mb[0]), model(mb[1]), temperature=0.1)


def test_an_in_batch_negatives_loss_is_non_additive(gen: torch.Generator) -> None:
    x = torch.randn(8, 5, generator=gen)
    encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))
    report = ga.check(encoder, in_batch_negatives, (x, x + 0.1 * torch.randn(8, 5, generator=gen)))
    # Only its own finding: "return a SUM" (mean-reduced-loss) or "no per-micro-batch weighting"
    # (gradient-mismatch) would be wrong advice for a loss that already returns its sum.
    assert report.codes() == ["non-additive-loss"] and not report.ok
    assert report.findings[0].level == "error" and "step_cached" in report.findings[0].message
    assert report.gradient_rel_error > 1e-2  # still measured, and shown in the verdict line
    assert str(report).splitlines()[-1].startswith("NOT OK")


def test_additive_losses_are_not_non_additive(gen: torch.Generator, batch: Batch) -> None:
    assert ga.check(Classifier(), ce_sum, _data(gen)).codes() == []
    # A MEAN and a per-micro-batch weighting break additivity too, but keep their own findings.
    assert "non-additive-loss" not in ga.check(make_lm(), mean_loss, batch).codes()
    assert ga.check(make_lm(), per_sequence_weighted, batch).codes() == ["gradient-mismatch"]


def test_bad_arguments(batch: Batch) -> None:
    with pytest.raises(ValueError, match="at least two micro-batches"):
        ga.check(make_lm(), lm_loss_fn, batch, micro_batch_size=6)
    with pytest.raises(TypeError, match="callable"):
        ga.check(make_lm(), "loss", batch)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="loss_sum, num_items"):
        ga.check(make_lm(), lambda m, mb: lm_loss_fn(m, mb)[0], batch)


