"""The demo's closing scores: exact match and per-character accuracy per puzzle kind."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch import nn

from gradaccum.demo.task import EOS, TASK_TOKENIZER, make_puzzle
from gradaccum.workloads.demo import Puzzle, puzzle_accuracy, puzzle_scores, score_answers


def enc(text: str) -> list[int]:
    return TASK_TOKENIZER.encode(text)


# -------------------------------------------------------------------------- the scores


def test_scores_on_a_hand_made_example() -> None:
    puzzles = [
        Puzzle("<abc:", "cba"),
        Puzzle("<ab:", "ba"),
        Puzzle("019+003=", "22"),  # 19 + 3 = 22, written "22"
        Puzzle("123+456=", "975"),  # 579
    ]
    answers = [
        enc("cba") + [EOS],  # right
        enc("ba") + [enc("a")[0]],  # every character right, but no EOS: not an exact match
        enc("23") + [EOS],  # 1 of 2 characters
        enc("579") + [EOS],  # the sum written the usual way round: only the 7 in its place
    ]
    assert score_answers(puzzles, answers) == {
        "reversal": {"exact_match": 0.5, "per_char": 1.0},  # 5 of 5 characters
        "addition": {"exact_match": 0.0, "per_char": 0.4},  # 2 of 5 characters
    }
    assert score_answers(puzzles[:2], answers[:2]) == {"reversal": {"exact_match": 0.5, "per_char": 1.0}}
    # Generation cut short (the model's context ran out): the missing characters are wrong.
    assert score_answers([Puzzle("<abcd:", "dcba")], [enc("dc")]) == {
        "reversal": {"exact_match": 0.0, "per_char": 0.5}
    }


class Out(dict):
    @property
    def logits(self) -> torch.Tensor:
        return self["logits"]


class OffByOne(nn.Module):
    """Knows every answer (KV cache = the ids so far), but writes each sum's first digit one too high."""

    def __init__(self, puzzles: list[Puzzle]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.answers = {p.prompt: p.answer for p in puzzles}

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, cache: Any = None) -> Out:
        full = input_ids if cache is None else torch.cat([cache, input_ids], dim=1)
        logits = torch.zeros(full.shape[0], input_ids.shape[1], TASK_TOKENIZER.vocab_size)
        for r, row in enumerate(full.tolist()):
            text = TASK_TOKENIZER.decode(row)
            cut = max(text.find(":"), text.find("=")) + 1
            answer = self.answers[text[:cut]]
            if not text.startswith("<"):
                answer = str((int(answer[0]) + 1) % 10) + answer[1:]
            done = len(text) - cut
            logits[r, -1, EOS if done >= len(answer) else enc(answer[done])[0]] = 1.0
        return Out(logits=logits, cache=full)


def test_scores_under_greedy_decoding() -> None:
    puzzles = [Puzzle(p, a) for p, a in (make_puzzle(random.Random(s)) for s in range(60))]
    kinds = {p.kind for p in puzzles}
    assert kinds == {"reversal", "addition"}
    chars = sum(len(p.answer) for p in puzzles if p.kind == "addition")
    sums = sum(p.kind == "addition" for p in puzzles)
    model = OffByOne(puzzles).train()
    scores = puzzle_scores(model, puzzles, batch_size=7)
    assert scores["reversal"] == {"exact_match": 1.0, "per_char": 1.0}
    assert scores["addition"]["exact_match"] == 0.0
    assert scores["addition"]["per_char"] == pytest.approx((chars - sums) / chars)
    assert puzzle_accuracy(model, puzzles) == {"reversal": 1.0, "addition": 0.0} and model.training
