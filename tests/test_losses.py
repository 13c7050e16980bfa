"""ga.losses: (loss_sum, num_items) helpers against plain F.cross_entropy."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import gradaccum as ga


def test_cross_entropy_is_sum_and_count(gen: torch.Generator) -> None:
    logits = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5), generator=gen)
    targets[0, 3:] = -100
    targets[2, :] = -100
    loss_sum, n = ga.losses.cross_entropy(logits, targets)
    want = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), reduction="sum")
    assert torch.equal(loss_sum, want)
    assert isinstance(n, torch.Tensor) and n.dtype == torch.int64 and int(n) == 3 + 5
    # sum / count is the usual mean loss
    mean = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
    torch.testing.assert_close(loss_sum / n, mean, rtol=1e-14, atol=0)
    loss_sum.backward()  # differentiable
    assert logits.grad is not None and bool((logits.grad[2] == 0).all())


def test_cross_entropy_custom_ignore_index(gen: torch.Generator) -> None:
    logits = torch.randn(6, 4, generator=gen)
    targets = torch.tensor([0, -1, 3, -1, 2, 1])
    loss_sum, n = ga.losses.cross_entropy(logits, targets, ignore_index=-1)
    assert int(n) == 4
    want = F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum")
    torch.testing.assert_close(loss_sum, want)


def test_cross_entropy_all_ignored_is_zero_over_zero(gen: torch.Generator) -> None:
    loss_sum, n = ga.losses.cross_entropy(torch.randn(2, 3, 4, generator=gen), torch.full((2, 3), -100))
    assert float(loss_sum) == 0.0 and int(n) == 0


def test_causal_lm_shifts_and_counts(gen: torch.Generator) -> None:
    vocab, lengths = 9, [5, 2, 1, 7]
    logits = torch.randn(4, 7, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (4, 7), generator=gen)
    for row, length in enumerate(lengths):
        labels[row, length:] = -100  # right padding
    loss_sum, n = ga.losses.causal_lm(logits, labels)
    # A sequence with L real tokens has L - 1 next-token predictions; a 1-token row has none.
    assert int(n) == sum(length - 1 for length in lengths)

    want = torch.zeros((), dtype=torch.float64)
    for row, length in enumerate(lengths):
        for t in range(length - 1):  # position t predicts token t + 1
            want = want + F.cross_entropy(logits[row, t], labels[row, t + 1], reduction="sum")
    torch.testing.assert_close(loss_sum, want, rtol=1e-13, atol=0)


def test_causal_lm_excludes_ignored_prompt_tokens(gen: torch.Generator) -> None:
    # SFT: only the answer is trained on; the prompt is masked with ignore_index.
    logits = torch.randn(1, 6, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, -100, 2, 4, 1]])
    loss_sum, n = ga.losses.causal_lm(logits, labels)
    assert int(n) == 3  # positions 2, 3, 4 predict labels 3, 4, 5
    want = F.cross_entropy(logits[0, 2:5], labels[0, 3:6], reduction="sum")
    torch.testing.assert_close(loss_sum, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("fn", [ga.losses.cross_entropy, ga.losses.causal_lm])
def test_low_precision_logits_are_summed_in_float32(fn: object, gen: torch.Generator) -> None:
    logits = (torch.randn(8, 64, 50, generator=gen) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 50, (8, 64), generator=gen)
    loss_sum, n = fn(logits, labels)  # type: ignore[operator]
    assert loss_sum.dtype == torch.float32
    shift = fn is ga.losses.causal_lm
    lg = logits[:, :-1] if shift else logits
    lb = labels[:, 1:] if shift else labels
    want = F.cross_entropy(lg.double().reshape(-1, 50), lb.reshape(-1), reduction="sum")
    assert float(loss_sum) == pytest.approx(float(want), rel=1e-6)
    # The same sum done in bf16 is visibly off: why the helper upcasts.
    in_bf16 = F.cross_entropy(lg.reshape(-1, 50), lb.reshape(-1), reduction="sum")
    assert in_bf16.dtype == torch.bfloat16
    assert abs(float(in_bf16) - float(want)) > 10 * abs(float(loss_sum) - float(want))


@pytest.mark.parametrize(
    ("logits_shape", "labels_shape"),
    [((2, 5, 7), (2, 4)), ((2, 5, 7), (5, 2)), ((10, 7), (2, 5))],
)
def test_shape_mismatch_raises(logits_shape: tuple[int, ...], labels_shape: tuple[int, ...]) -> None:
    logits, labels = torch.randn(logits_shape), torch.zeros(labels_shape, dtype=torch.long)
    with pytest.raises(ValueError, match="do not match"):
        ga.losses.cross_entropy(logits, labels)
    with pytest.raises(ValueError, match="do not match"):
        ga.losses.causal_lm(logits, labels)


def test_causal_lm_needs_a_sequence_dimension() -> None:
    with pytest.raises(ValueError):
        ga.losses.causal_lm(torch.randn(7), torch.zeros((), dtype=torch.long))


def test_cross_entropy_accepts_torch_class_dim_1_layout() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)  # (N, C, d1)
    targets = torch.randint(0, 5, (2, 7), generator=g)
    targets[0, :3] = -100
    loss, n = ga.losses.cross_entropy(logits, targets)
    want = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    assert int(n) == 11


def _info_nce_by_rows(q: torch.Tensor, candidates: torch.Tensor, temperature: Any) -> torch.Tensor:
    """Row by row: -log softmax over cosine / temperature, at the row's own key."""
    total = q.new_zeros(())
    for i in range(q.shape[0]):
        cos = torch.stack([F.cosine_similarity(q[i], c, dim=0) for c in candidates])
        total = total - torch.log_softmax(cos / temperature, dim=0)[i]
    return total


def test_info_nce_is_the_row_sum_over_in_batch_and_hard_negatives(gen: torch.Generator) -> None:
    q, k, neg = (torch.randn(n, 7, generator=gen, dtype=torch.float64) for n in (5, 5, 3))
    loss_sum, n = ga.losses.info_nce(q, k, 0.05)
    assert n == 5 and torch.allclose(loss_sum, _info_nce_by_rows(q, k, 0.05), rtol=1e-12, atol=0)
    with_neg, n = ga.losses.info_nce(q, k, 0.05, negatives=neg)
    assert n == 5 and torch.allclose(with_neg, _info_nce_by_rows(q, torch.cat([k, neg]), 0.05), rtol=1e-12)
    assert with_neg > loss_sum  # more candidates: a harder task
    # Cosine: the scale of a representation does not matter.
    assert torch.allclose(ga.losses.info_nce(3 * q, k / 2, 0.05)[0], loss_sum, rtol=1e-12)


def test_info_nce_couples_rows_and_a_learnable_temperature_gets_its_gradient(gen: torch.Generator) -> None:
    q, k = (torch.randn(6, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    t = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    whole, _ = ga.losses.info_nce(q, k, t)
    halves = ga.losses.info_nce(q[:3], k[:3], t)[0] + ga.losses.info_nce(q[3:], k[3:], t)[0]
    assert abs(float((whole - halves).detach())) > 0.1  # not a sum over examples: needs step_cached
    whole.backward()
    want = torch.autograd.grad(_info_nce_by_rows(q, k, t), t)[0]
    assert t.grad is not None and torch.allclose(t.grad, want, rtol=1e-10)


def test_info_nce_refuses_bad_shapes_by_name(gen: torch.Generator) -> None:
    q = torch.randn(4, 3, generator=gen)
    with pytest.raises(ValueError, match="queries .* and keys"):
        ga.losses.info_nce(q, q[:3], 0.1)
    with pytest.raises(ValueError, match="negatives"):
        ga.losses.info_nce(q, q, 0.1, negatives=torch.randn(2, 5))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ga.losses.info_nce(q, q, 0.0)
    with pytest.raises(ValueError, match="temperature must be a single number"):
        ga.losses.info_nce(q, q, torch.ones(2))
