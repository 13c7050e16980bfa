"""Shared test helpers: a tiny per-token "LM", token data with padding, and plain references.

Every numerical test compares gradaccum with a *plain full-batch* computation: the
window's micro-batches concatenated into one batch, a MEAN-reduced loss, one
backward, ``clip_grad_norm_``, one optimizer step. These helpers are that reference,
kept deliberately naive so they can be trusted by reading them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
VOCAB = 13
SEQ_LEN = 6
Batch = dict[str, torch.Tensor]


class TinyLM(nn.Module):
    """Embedding -> tanh MLP -> vocabulary logits: one prediction per token position."""

    def __init__(self, vocab: int = VOCAB, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.emb(ids))))


def make_lm(dtype: torch.dtype = torch.float64, seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM().to(dtype)


def token_batch(gen: torch.Generator, lengths: Sequence[int], seq_len: int = SEQ_LEN) -> Batch:
    """Rows of ``seq_len`` tokens whose first ``lengths[i]`` labels count; the rest are IGNORE."""
    n = len(lengths)
    ids = torch.randint(0, VOCAB, (n, seq_len), generator=gen)
    labels = torch.randint(0, VOCAB, (n, seq_len), generator=gen)
    pos = torch.arange(seq_len).expand(n, seq_len)
    labels = labels.masked_fill(pos >= torch.tensor(list(lengths)).unsqueeze(1), IGNORE)
    return {"ids": ids, "labels": labels}


def random_micro_batches(gen: torch.Generator, sizes: Sequence[int], seq_len: int = SEQ_LEN) -> list[Batch]:
    """Micro-batches of the given sizes with random lengths in 1..seq_len (never empty rows)."""
    out = []
    for s in sizes:
        lengths = torch.randint(1, seq_len + 1, (s,), generator=gen).tolist()
        out.append(token_batch(gen, lengths, seq_len))
    return out


def cat_batches(micro_batches: Sequence[Batch]) -> Batch:
    return {k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}


def lm_loss_fn(model: nn.Module, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """gradaccum's contract: a SUM over counted tokens and how many there were."""
    logits = model(mb["ids"])
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # a low-precision SUM would lose digits before gradaccum sees it
    loss_sum = F.cross_entropy(flat, mb["labels"].reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss_sum, (mb["labels"] != IGNORE).sum()


def reference_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The plain full-batch MEAN loss over non-ignored tokens."""
    logits = model(batch["ids"])
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=IGNORE
    )


def reference_grads(model: nn.Module, micro_batches: Sequence[Batch]) -> list[torch.Tensor]:
    """Full-batch mean gradient of the window, without touching ``model``'s .grad."""
    loss = reference_loss(model, cat_batches(micro_batches))
    return [g.detach() for g in torch.autograd.grad(loss, [p for p in model.parameters()])]


def reference_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Batch],
    scheduler: Any = None,
    max_grad_norm: float | None = None,
) -> dict[str, float]:
    """One plain full-batch optimizer step; returns what gradaccum's StepResult should say."""
    batch = cat_batches(micro_batches)
    optimizer.zero_grad(set_to_none=True)
    loss = reference_loss(model, batch)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), max_grad_norm if max_grad_norm is not None else float("inf")
    )
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {
        "loss": loss.item(),
        "num_items": int((batch["labels"] != IGNORE).sum()),
        "grad_norm": float(norm),
        "lr": lr,
    }


def grad_capture(optimizer: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    """Record, at every ``optimizer.step()``, the gradients it is about to apply."""
    seen: list[list[torch.Tensor]] = []

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        seen.append([
            p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for g in opt.param_groups for p in g["params"]
        ])

    optimizer.register_step_pre_hook(hook)
    return seen


def rel_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """||got - want|| / ||want|| over all tensors, in float64."""
    num = sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(got, want, strict=True))
    den = sum(float((b.double() ** 2).sum()) for b in want)
    return (num / den) ** 0.5


def assert_tensors_close(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], **tol: float) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def twin(model: nn.Module) -> nn.Module:
    """An independent copy with identical weights (for the reference run)."""
    return copy.deepcopy(model)


def pytest_configure(config: pytest.Config) -> None:
    # Every tensor in the suite is tiny, so intra-op threads only add hand-off cost; on a
    # busy 2-core machine OpenMP's spinning made the property tests ~10x slower (36 s vs 3 s).
    torch.set_num_threads(1)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
