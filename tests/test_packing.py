"""Packing (``ga.pack``, ``--packing``, token budgets) and the per-sequence normaliser.

The bar: a packed run is the padded run up to float rounding. A float64 GPT-2 under sdpa
(float64 throughout), SGD, so weights follow the gradients linearly. Bound 1e-10: each
step's gradient differs from the padded one by summation order only (~1e-16 x the number
of terms, a few hundred here), and four SGD steps add that up; 1e-10 leaves five orders
of magnitude of margin and fails on any leak between examples (measured 30-50% on such a
leak).
"""

from __future__ import annotations

import math
import sys

import _dist_helpers as dh
import pytest
import torch
from _packing_common import IGNORE, examples, tiny_lm, train

import gradaccum as ga
from gradaccum.workloads.data import Collator
from gradaccum.workloads.packing import PackCollator, confined_attention, leaks, lm_loss

REL = 1e-10


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ------------------------------------------------------------------ ga.pack itself
def test_pack_layout_restarts_positions_and_masks_first_labels() -> None:
    exs = [([5, 6, 7], [IGNORE, 6, 7]), ([8, 9], [8, 9]), ([10, 11, 12, 13], [10, 11, 12, 13])]
    (mb,) = ga.pack(exs, max_tokens=9)
    assert mb["input_ids"].shape == (1, 9)
    assert sorted(mb["input_ids"][0].tolist()) == sorted(sum((e[0] for e in exs), []))
    starts = (mb["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 3
    for s in starts:  # each example's first label is masked: never predicted from the one before
        assert mb["labels"][0, s] == IGNORE
    # every example's position ids count 0..n-1
    assert mb["position_ids"][0].tolist() in ([0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 1, 0, 1, 2])
    allowed = mb["attention_mask"][0, 0] == 0
    assert allowed[4, 3].item() is False and allowed[3, 0].item() is True and allowed[0, 3].item() is False


def test_pack_groups_in_order_within_budget_and_rows_within_cap() -> None:
    exs = [([1] * n, [1] * n) for n in (3, 5, 2, 7, 1, 4, 6)]
    mbs = ga.pack(exs, max_tokens=10, max_row_tokens=7, pad_id=0)
    seen = []
    for mb in mbs:
        real = int((mb["position_ids"] == 0).logical_and(mb["input_ids"] == 1).sum())
        seen.append(real)
        assert int((mb["input_ids"] == 1).sum()) <= 10
        assert mb["input_ids"].shape[1] <= 7
    assert sum(seen) == len(exs)
    assert [int((mb["input_ids"] == 1).sum()) for mb in mbs] == [10, 8, 10]  # runs: 3+5+2, 7+1, 4+6


def test_pack_refuses_what_cannot_be() -> None:
    with pytest.raises(ValueError, match="max_row_tokens 3"):
        ga.pack([([1] * 4, [1] * 4)], max_tokens=8, max_row_tokens=3)
    with pytest.raises(ValueError, match="max_tokens"):
        ga.pack([([1] * 4, [1] * 4)], max_tokens=0)
    with pytest.raises(ValueError, match="attention"):
        ga.pack([([1] * 4, [1] * 4)], max_tokens=8, attention="none")


# ------------------------------------------------------------------ the per-sequence normaliser
def test_causal_lm_per_sequence_is_the_mean_of_sequence_means() -> None:
    g = torch.Generator().manual_seed(0)
    exs = examples(9, seed=1)
    logits_of = {i: torch.randn(len(ids), VOCAB_, generator=g, dtype=torch.float64)
                for i, (ids, _) in enumerate(exs)}
    want_sum, want_n = 0.0, 0
    for i, (_, lab) in enumerate(exs):  # plain loop: one sequence at a time
        t = torch.tensor(lab[1:])
        keep = t != IGNORE
        if keep.any():
            nll = torch.nn.functional.cross_entropy(logits_of[i][:-1][keep], t[keep], reduction="mean")
            want_sum, want_n = want_sum + float(nll), want_n + 1
    # packed: the same logits laid out in one row
    (mb,) = ga.pack(exs, max_tokens=sum(len(e[0]) for e in exs))
    order = _row_order(mb, exs)
    row_logits = torch.cat([logits_of[i] for i in order]).unsqueeze(0)
    got_sum, got_n = ga.losses.causal_lm(row_logits, mb["labels"], per="sequence",
                                         position_ids=mb["position_ids"])
    assert int(got_n) == want_n < len(exs)  # the all-prompt examples count as none
    assert math.isclose(float(got_sum), want_sum, rel_tol=1e-13)


VOCAB_ = 40


def _row_order(mb: dict[str, torch.Tensor], exs: list) -> list[int]:
    """Which example sits where in a one-row packed micro-batch (matched by its tokens)."""
    row, order, used = mb["input_ids"][0].tolist(), [], set()
    starts = (mb["position_ids"][0] == 0).nonzero().flatten().tolist() + [len(row)]
    for a, b in zip(starts, starts[1:], strict=False):
        i = next(i for i, (ids, _) in enumerate(exs) if i not in used and ids == row[a:b])
        used.add(i)
        order.append(i)
    return order


def test_causal_lm_rejects_bad_arguments() -> None:
    logits, labels = torch.zeros(1, 4, 3), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="per"):
        ga.losses.causal_lm(logits, labels, per="example")
    with pytest.raises(ValueError, match="position_ids"):
        ga.losses.causal_lm(logits, labels, position_ids=torch.zeros(1, 4, dtype=torch.long))


# ------------------------------------------------------------------ confinement is verified
def test_confinement_is_verified_on_the_model() -> None:
    model = tiny_lm()
    assert confined_attention(model, 40) == "position_ids"
    assert not leaks(model, 40, "mask")

    class Leaky(torch.nn.Module):  # a running sum over the row: every token sees all before it
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(40, 8), torch.nn.Linear(8, 40)

        def forward(self, input_ids: torch.Tensor, **_: object) -> object:
            return type("Out", (), {"logits": self.out(self.emb(input_ids).cumsum(1))})()

    with pytest.raises(ValueError, match="--packing: the model's attention"):
        confined_attention(Leaky(), 40)


# ------------------------------------------------------------------ packed == padded
def _padded_full_batch_grads(data: list, per: str) -> list[torch.Tensor]:
    """The reference: one padded forward over all examples, the window's mean loss, backward."""
    model = tiny_lm()
    loss, n = lm_loss(model, Collator(0)(data), per=per)
    (loss / n).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("per", ["token", "sequence"])
@pytest.mark.parametrize("budget", [1, 4, 16])
def test_packed_window_equals_padded_full_batch(per: str, budget: int) -> None:
    """Micro-batch budgets of 1, 4 and 16 examples' worth of tokens (20 = the longest), and
    a window whose last micro-batch is partial (flush), against the padded full batch."""
    data = examples(13)  # 13: no budget divides it evenly, so the last micro-batch is partial
    want = _padded_full_batch_grads(data, per)
    model = tiny_lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    grads: list[torch.Tensor] = []
    opt.register_step_pre_hook(lambda *_: grads.extend(p.grad.clone() for p in model.parameters()))
    acc = ga.Accumulator(model, opt, accum_steps=10_000, max_grad_norm=None)
    for mb in ga.pack(data, max_tokens=20 * budget, max_row_tokens=20):
        with acc.micro_step():
            acc.backward(*lm_loss(model, mb, per=per))
    assert acc.flush() is not None
    assert max(rel(g, w) for g, w in zip(grads, want, strict=True)) < REL


@pytest.mark.parametrize("per", ["token", "sequence"])
@pytest.mark.parametrize(("micro", "tokens"), [(1, None), (4, None), (8, None), (8, 20), (8, 80), (8, 320)])
def test_packed_training_equals_padded_training(per: str, micro: int, tokens: int | None) -> None:
    """Trainer runs: per-step loss and final weights, packed (by examples, or by token budgets
    of 1, 4 and 16 longest examples) against padded micro-batches of 4."""
    data = examples()
    want_losses, want_weights = train(data, per, packed=False, micro_batch=4, tokens=None)
    losses, weights = train(data, per, packed=True, micro_batch=micro, tokens=tokens)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, want_losses, strict=True)) < REL
    assert max(rel(w, v) for w, v in zip(weights, want_weights, strict=True)) < REL


@pytest.mark.parametrize("per", ["token", "sequence"])
def test_packed_on_two_ranks_equals_padded_on_one(tmp_path, per: str) -> None:
    """2 gloo ranks, token budgets (so the ranks run different numbers of micro-batches) against
    one padded process: the same examples per step, the same result."""
    data = examples()
    want_losses, want_weights = train(data, per, packed=False, micro_batch=4, tokens=None)
    out = tmp_path / "rank0.pt"
    procs = dh.launch_ranks([str(dh.HERE / "_packing_common.py"), str(out), "tokens", per], timeout=180)
    assert all(p.rc == 0 for p in procs), dh.describe(procs)
    got = torch.load(out, weights_only=True)
    assert max(abs(a - b) / abs(b) for a, b in zip(got["losses"], want_losses, strict=True)) < REL
    assert max(rel(w, v) for w, v in zip(got["weights"], want_weights, strict=True)) < REL


def test_sequence_mode_matches_a_plain_full_batch_loop() -> None:
    """--loss-per sequence: the window's loss is the mean over its sequences of each one's
    token mean, computed here with a plain loop, one example at a time."""
    data = examples(10)
    model = tiny_lm()
    total, n = 0.0, 0
    for ids, lab in data:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        t = torch.tensor(lab[1:])
        if (t != IGNORE).any():
            total = total + torch.nn.functional.cross_entropy(logits, t, ignore_index=IGNORE)
            n += 1
    (total / n).backward()
    want = [p.grad.clone() for p in model.parameters()]
    got = _padded_full_batch_grads(data, "sequence")  # and the packed window agrees with that (above)
    assert max(rel(g, w) for g, w in zip(got, want, strict=True)) < REL
    model2 = tiny_lm()
    loss, k = lm_loss(model2, PackCollator(0)(data), per="sequence")
    (loss / k).backward()
    assert max(rel(p.grad, w) for p, w in zip(model2.parameters(), want, strict=True)) < REL


def test_out_of_memory_replays_the_same_examples_at_half_the_budget() -> None:
    """A loss that 'runs out of memory' above 50 tokens: the window replays at 80 -> 40 tokens,
    with the same examples, and the run equals one that used 40 from the start."""
    from gradaccum import Trainer
    from gradaccum.workloads.packing import PackCollator

    data = examples()

    def capped(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if int((mb["input_ids"] != 0).sum()) > 50:  # real tokens (examples use ids >= 3, padding 0)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return lm_loss(model, mb)

    def run(tokens: int, loss: object) -> list[torch.Tensor]:
        model = tiny_lm()
        t = Trainer(model=model, dataset=data, loss_fn=loss, collate_fn=PackCollator(0, 20),
                    effective_batch=8, micro_batch=8, steps=3, seed=3, micro_batch_tokens=tokens,
                    measure_noise=False,
                    optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.5), max_grad_norm=None,
                    progress=False, handle_signals=False)
        t.fit()
        assert t.micro_batch_tokens == 40
        return [p.detach().clone() for p in model.parameters()]

    got = run(160, capped)
    want = run(40, lm_loss)
    assert max(rel(g, w) for g, w in zip(got, want, strict=True)) < REL


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
