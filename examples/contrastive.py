"""A dual encoder trained with in-batch negatives over an effective batch of 256, 32 pairs at a time.

Run: python examples/contrastive.py   (CPU, well under a minute)

Every query has one matching document; each of the 256 pairs in a window is scored
against all 256 documents (InfoNCE, a learnable temperature). That loss is not a sum over
examples, so ordinary accumulation of micro-batch losses would give each query only the
31 documents of its own micro-batch as negatives: ``ga.check`` says so (non-additive-loss).
``acc.step_cached`` trains the full 256-way objective exactly while holding only one
micro-batch's activations at a time (plus the 256 embeddings and their gradients).
"""

from __future__ import annotations

import torch
from torch import nn

import gradaccum as ga

WORDS, TOPICS, TOPIC_WORDS, DRAWN = 300, 4000, 8, 8
EFFECTIVE, MICRO, STEPS = 256, 32, 150
torch.manual_seed(0)
keywords = torch.randint(0, WORDS, (TOPICS, TOPIC_WORDS))  # each topic's own words
translation = torch.randperm(WORDS) + WORDS  # documents are written in a second vocabulary


def pairs(topics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A query (first vocabulary) and a document (its words translated) per topic: different draws
    of the topic's words, a fifth replaced by noise. Nothing is shared until the model learns the
    translation, so retrieval starts at chance."""

    def draw() -> torch.Tensor:
        words = keywords[topics].gather(1, torch.randint(0, TOPIC_WORDS, (len(topics), DRAWN)))
        return torch.where(torch.rand(words.shape) < 0.2, torch.randint(0, WORDS, words.shape), words)

    return draw(), translation[draw()]


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(2 * WORDS, 128, mode="mean")
        nn.init.normal_(self.bag.weight, std=0.02)  # small: AdamW's steps move them quickly
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(128, 64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(ids))


class DualEncoder(nn.Module):
    """Queries and documents through one shared tower (a bi-encoder, as sentence-transformers trains)."""

    def __init__(self) -> None:
        super().__init__()
        self.tower = Tower()
        self.log_temperature = nn.Parameter(torch.tensor(0.05).log())  # learnable, starts at 0.05


def encode(model: DualEncoder, micro: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return model.tower(micro[0]), model.tower(micro[1])


model = DualEncoder()


def window_loss(reps: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    # Called once per window on all 256 query and document embeddings: 255 negatives per query.
    return ga.losses.info_nce(reps[0], reps[1], temperature=model.log_temperature.exp())


# The naive way (this loss per micro-batch, accumulated) is flagged before any training:
naive = lambda m, mb: window_loss(encode(m, mb))  # noqa: E731
report = ga.check(model, naive, pairs(torch.arange(64)), micro_batch_size=16)
print(report.findings[0].code, "->", "use step_cached" if "step_cached" in str(report) else "?")


@torch.no_grad()
def recall_at_1(topics: torch.Tensor) -> float:
    """Share of held-out queries whose nearest document (cosine) among all of them is their own."""
    model.eval()
    q, d = encode(model, pairs(topics))
    model.train()
    sims = nn.functional.normalize(q, dim=-1) @ nn.functional.normalize(d, dim=-1).T
    return (sims.argmax(1) == torch.arange(len(topics))).float().mean().item()


held_out = torch.arange(TOPICS - 512, TOPICS)
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
acc = ga.Accumulator(model, optimizer, max_grad_norm=5.0)
print(f"before training: recall@1 {recall_at_1(held_out):.3f} among {len(held_out)} held-out documents")
for step in range(1, STEPS + 1):
    window = pairs(torch.randint(0, TOPICS - 512, (EFFECTIVE,)))
    result = acc.step_cached(ga.split(window, MICRO), encode, window_loss)  # 8 micro-batches, one exact step
    if step % 25 == 0:
        print(f"step {result.step}: loss {result.loss:.3f} over {result.num_items} pairs, temperature "
              f"{model.log_temperature.exp().item():.3f}, held-out recall@1 {recall_at_1(held_out):.3f}")
