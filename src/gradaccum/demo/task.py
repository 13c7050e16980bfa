"""The built-in task: generated string puzzles with variable-length answers.

Each example is ``prompt + answer + EOS`` at character level. Only the answer (and
EOS) is in the loss, and answers range from 1 to ~9 tokens, so micro-batches carry
very different target counts: exactly the case where mean-of-means goes wrong.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")
IGNORE = -100

Example = tuple[list[int], list[int]]
"""(input_ids, labels): labels equal input_ids where counted, IGNORE elsewhere."""


class CharTokenizer:
    """Character-level tokenizer over a fixed alphabet, after three special tokens."""

    def __init__(self, alphabet: Sequence[str]) -> None:
        self.alphabet = list(alphabet)
        self.index = {c: i + len(SPECIALS) for i, c in enumerate(self.alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[i - len(SPECIALS)] for i in ids if i >= len(SPECIALS))


TASK_ALPHABET = "0123456789abcdefghij+=<>:"
TASK_TOKENIZER = CharTokenizer(TASK_ALPHABET)
TASK_MAX_LEN = 24  # BOS + longest prompt (12) + longest answer (9) + EOS, with room


def make_puzzle(rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer): reverse a string, or add two numbers."""
    if rng.random() < 0.5:
        s = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 8)))
        return f"<{s}:", s[::-1]
    a, b = rng.randint(0, 10 ** rng.randint(1, 4) - 1), rng.randint(0, 10 ** rng.randint(1, 4) - 1)
    return f"{a}+{b}=", str(a + b)


def make_examples(num_examples: int, seed: int = 0) -> list[Example]:
    """``num_examples`` generated puzzles; a pure function of ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_examples):
        prompt, answer = make_puzzle(rng)
        p, a = TASK_TOKENIZER.encode(prompt), TASK_TOKENIZER.encode(answer) + [EOS]
        ids = [BOS, *p, *a]
        # labels[t] is predicted from position t-1 (causal_lm shifts), so only the
        # answer and EOS positions are counted.
        labels = [IGNORE] * (1 + len(p)) + a
        out.append((ids, labels))
    return out


def collate(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Pad one micro-batch to its own longest example (not the dataset's)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), PAD, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
