"""The built-in demo as a workload: the generated task (with a held-out set and a per-kind
exact-match score), or the demo model at character level on a --data file.

The demo model and task themselves live in ``gradaccum.demo``; this module only
builds workloads from them, keeping what ``gradaccum train`` did before workloads
existed bit for bit (same examples, same model init, same checkpoint ``extra`` keys).
"""

from __future__ import annotations

import inspect
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradaccum import demo
from gradaccum.demo.task import BOS, EOS, IGNORE, TASK_MAX_LEN, TASK_TOKENIZER, CharTokenizer, make_puzzle
from gradaccum.demo.text import text_examples
from gradaccum.workloads.data import Example, count_items
from gradaccum.workloads.errors import WorkloadError
from gradaccum.workloads.files import (
    BadRecord,
    check_record,
    file_sha256,
    load_records,
    read_text_lines,
    record_location,
    text_lines,
    unreadable,
)
from gradaccum.workloads.learnable import require_loss_tokens

TASK_SIZE = 20_000
"""Generated training examples in the default task (several epochs over a default run)."""
EVAL_SIZE = 1_000
"""Held-out generated examples of the default task."""
TEXT_MAX_LEN = 128
"""Default context of the demo model on a --data file (``load_text_examples``' default)."""
KINDS = ("reversal", "addition")

Segments = tuple[list[tuple[str, bool]], bool]
Scores = dict[str, dict[str, float]]
"""Per puzzle kind: ``{"exact_match": ..., "per_char": ...}`` (see ``score_answers``)."""


# ------------------------------------------------------------------ the generated task


@dataclass(frozen=True)
class Puzzle:
    prompt: str
    answer: str

    @property
    def kind(self) -> str:
        return puzzle_kind(self.prompt)


def puzzle_kind(prompt: str) -> str:
    """``"reversal"`` (``<abc:``) or ``"addition"`` (``12+34=``), as ``task.make_puzzle`` makes them."""
    return "reversal" if prompt.startswith("<") else "addition"


def encode_puzzle(p: Puzzle) -> Example:
    """The same encoding as ``demo.make_examples``: only the answer and EOS counted."""
    prompt, answer = TASK_TOKENIZER.encode(p.prompt), TASK_TOKENIZER.encode(p.answer) + [EOS]
    return [BOS, *prompt, *answer], [IGNORE] * (1 + len(prompt)) + answer


def prompt_of(example: Example) -> str:
    """The prompt text of a task example: the tokens after BOS before the first counted label."""
    ids, labels = example
    start = next(i for i, x in enumerate(labels) if x != IGNORE)
    return TASK_TOKENIZER.decode(ids[1:start])


def heldout_puzzles(train: Sequence[Example], size: int = EVAL_SIZE, seed: int = 0) -> list[Puzzle]:
    """``size`` puzzles whose prompts are not in ``train`` (nor repeated), from their own seed stream.

    Short prompts are all seen in training (there are only 10 one-letter reversals), so
    the held-out set leans to longer ones: a test of generalisation, not recall.
    """
    seen = {prompt_of(ex) for ex in train}
    rng = random.Random(f"gradaccum-heldout:{seed}")  # a str seed: a stream apart from make_examples'
    out: list[Puzzle] = []
    for _ in range(1000 * size):  # bounded, though in practice ~1.1 draws per puzzle
        if len(out) == size:
            break
        prompt, answer = make_puzzle(rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append(Puzzle(prompt, answer))
    return out


@torch.no_grad()
def greedy_answers(model: nn.Module, puzzles: Sequence[Puzzle], batch_size: int = 256) -> list[list[int]]:
    """For each puzzle (in order), the first ``len(answer) + 1`` tokens greedy decoding writes.

    Prompts are batched by length, so no padding (and no position shift) is involved;
    the tokens are what greedy generation up to EOS would print (fewer where the model's
    context runs out).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    limit = getattr(getattr(model, "config", None), "n_positions", None) or TASK_MAX_LEN
    # transformers 5.2x renamed the KV-cache argument (and output) past_key_values -> cache
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(puzzles):
        by_len[len(p.prompt)].append(i)
    answers: list[list[int]] = [[] for _ in puzzles]
    try:
        for length, group in sorted(by_len.items()):
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                prompts = [[BOS, *TASK_TOKENIZER.encode(puzzles[j].prompt)] for j in chunk]
                ids = torch.tensor(prompts, device=device)
                steps = min(max(len(puzzles[j].answer) + 1 for j in chunk), limit - ids.shape[1])
                out = model(input_ids=ids, use_cache=True)  # then one token at a time, with the KV cache
                for _ in range(steps):
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                    ids = torch.cat([ids, nxt], dim=1)
                    out = model(input_ids=nxt, use_cache=True, **{cache_kw: out[cache_kw]})
                for j, generated in zip(chunk, ids[:, 1 + length :].tolist(), strict=True):
                    answers[j] = generated[: len(puzzles[j].answer) + 1]
    finally:
        model.train(was_training)
    return answers


def score_answers(puzzles: Sequence[Puzzle], answers: Sequence[Sequence[int]]) -> Scores:
    """Per puzzle kind: ``exact_match``, the share of puzzles answered exactly (answer, then
    EOS), and ``per_char``, the share of answer characters written right in their place.

    ``per_char`` shows partial progress (most digits of a sum right) that exact match hides.
    """
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    chars_right: Counter[str] = Counter()
    chars: Counter[str] = Counter()
    for p, got in zip(puzzles, answers, strict=True):
        want = TASK_TOKENIZER.encode(p.answer)
        total[p.kind] += 1
        right[p.kind] += list(got[: len(want) + 1]) == [*want, EOS]
        chars[p.kind] += len(want)
        chars_right[p.kind] += sum(g == w for g, w in zip(got, want, strict=False))
    return {
        k: {"exact_match": right[k] / total[k], "per_char": chars_right[k] / chars[k]}
        for k in KINDS if total[k]
    }


def puzzle_scores(model: nn.Module, puzzles: Sequence[Puzzle], batch_size: int = 256) -> Scores:
    """Exact-match and per-character accuracy per puzzle kind under greedy decoding."""
    return score_answers(puzzles, greedy_answers(model, puzzles, batch_size))


def puzzle_accuracy(model: nn.Module, puzzles: Sequence[Puzzle], batch_size: int = 256) -> dict[str, float]:
    """Exact-match accuracy per puzzle kind under greedy decoding: answer then EOS, nothing else."""
    return {k: v["exact_match"] for k, v in puzzle_scores(model, puzzles, batch_size).items()}


# ------------------------------------------------------------ --data at character level


def segments(record: dict[str, Any], fmt: str) -> tuple[list[tuple[str, bool]], bool]:
    """A record as text pieces ``(text, in_loss)`` and whether EOS is in the loss.

    The tokenizer-free rendering used by the character-level demo model: ``messages``
    become ``"role: content\\n"`` per turn, the assistant's content and newline in the
    loss (its ``"assistant: "`` header not), EOS counted when the last turn is the
    assistant's.
    """
    if fmt == "text":
        return [(record["text"], True)], True
    if fmt == "prompt-completion":
        return [(record["prompt"], False), (record["completion"], True)], True
    out: list[tuple[str, bool]] = []
    msgs = record["messages"]
    for m in msgs:
        out.append((f"{m['role']}: ", False))
        out.append((m["content"] + "\n", m["role"] == "assistant"))
    return out, msgs[-1]["role"] == "assistant"


def file_segments(
    path: str | Path, flag: str, cache_dir: str | None, progress: bool
) -> tuple[list[Segments], str]:
    """Every example of a data file as text segments ``(text, in_loss)``, and the file's format."""
    if Path(path).suffix.lower() == ".txt":
        return [([(ln, True)], True) for ln in text_lines(path, flag)], "text"
    ds, fmt = load_records(path, flag, cache_dir, progress, demo=True)
    out = []
    try:
        for i, record in enumerate(ds):  # the demo holds its data in memory anyway
            check_record(record, fmt, i)
            out.append(segments(record, fmt))
    except BadRecord as e:
        raise WorkloadError(f"{flag} {path} {record_location(Path(path), e.index)}: {e.why}") from None
    except Exception as e:  # Arrow lets some bad bytes through to here (invalid UTF-8)
        raise unreadable(Path(path), flag, e) from None
    return out, fmt


def char_examples(items: Sequence[Segments], tok: CharTokenizer, max_len: int) -> tuple[list[Example], int]:
    """Encode at character level; a body longer than ``max_len - 2`` is cut (EOS kept), counted.

    For a ``.txt`` line this is exactly ``load_text_examples``' encoding.
    """
    out, cut = [], 0
    for segs, eos_in_loss in items:
        ids: list[int] = []
        labels: list[int] = []
        for text, in_loss in segs:
            # One character, one token: encoding only what can be kept (plus one, to tell a
            # cut) keeps memory to max_len whatever the length of the line.
            enc = tok.encode(text[: max(0, max_len - 1 - len(ids))])
            ids += enc
            labels += enc if in_loss else [IGNORE] * len(enc)
        if len(ids) > max_len - 2:
            cut += 1
            ids, labels = ids[: max_len - 2], labels[: max_len - 2]
        out.append(([BOS, *ids, EOS], [IGNORE, *labels, EOS if eos_in_loss else IGNORE]))
    return out, cut


def check_vocabulary(items: Sequence[Segments], tok: CharTokenizer, path: str | Path, flag: str) -> None:
    """Eval text must use the training data's characters: the demo model's vocabulary.

    (Growing the vocabulary for eval data would change the model's initialisation, so
    the training run would depend on the eval file.)
    """
    known = set(tok.alphabet)
    for i, (segs, _) in enumerate(items):
        for text, _in_loss in segs:
            new = sorted(set(text) - known)
            if new:
                where = record_location(Path(path), i)
                raise WorkloadError(
                    f"{flag} {path} {where}: character {new[0]!r} does not occur in --data "
                    "(the demo model's vocabulary is the training data's characters)"
                )


def require_items(
    examples: Sequence[Example], cut: int, flag: str, path: str | Path, fmt: str,
    items: Sequence[Segments], limit_name: str,
) -> None:
    """At least one example with a label in the loss (see ``workloads.learnable``)."""
    n = sum(count_items(labels) for _, labels in examples)
    roles = _roles_of(items) if fmt == "messages" else set
    require_loss_tokens(n, flag, path, fmt, roles, cut == len(examples), limit_name)


def _roles_of(items: Sequence[Segments]) -> Callable[[], set[str]]:
    # segments() renders each turn as "role: " (not in the loss) then its content.
    return lambda: {text[:-2] for segs, _ in items for i, (text, _) in enumerate(segs) if i % 2 == 0}


@dataclass
class DemoParts:
    """What ``build_workload`` needs from the demo side."""

    model: nn.Module
    examples: list[Example]
    tokenizer: CharTokenizer
    extra_state: dict[str, Any]
    fingerprint: str
    format: str
    truncated: int = 0
    eval_examples: list[Example] | None = None
    eval_truncated: int = 0
    eval_fingerprint: str | None = None
    puzzles: list[Puzzle] | None = None


def build_demo(
    data: str | None,
    eval_data: str | None,
    max_length: int | None,
    seed: int,
    task_size: int = TASK_SIZE,
    eval_size: int = EVAL_SIZE,
    cache_dir: str | None = None,
    progress: bool = True,
) -> DemoParts:
    """The demo model on the generated task (``data is None``) or on a data file."""
    if data is None:
        if eval_data is not None:
            raise WorkloadError("--eval-data: the built-in task has its own held-out set; give --data too")
        examples, tok, max_len = demo.make_examples(task_size, seed), TASK_TOKENIZER, TASK_MAX_LEN
        puzzles = heldout_puzzles(examples, eval_size, seed)
        model = demo.build_model(tok.vocab_size, max_len, seed=seed)
        extra = {"task": "demo", "vocab": "".join(tok.alphabet), "max_len": max_len}
        return DemoParts(
            model, examples, tok, extra, "demo", "demo",
            eval_examples=[encode_puzzle(p) for p in puzzles], puzzles=puzzles,
        )

    limit = max_length if max_length is not None else TEXT_MAX_LEN
    if Path(data).suffix.lower() == ".txt":
        # Exactly what `gradaccum train --data FILE.txt` always did (examples, vocab, extra).
        lines = read_text_lines(data, WorkloadError)
        examples, tok = text_examples(lines, limit)
        truncated = sum(len(ln) > limit - 2 for ln in lines)
        fmt = "text"
        extra: dict[str, Any] = {"task": "text", "vocab": "".join(tok.alphabet)}
    else:
        items, fmt = file_segments(data, "--data", cache_dir, progress)
        tok = CharTokenizer(sorted({c for segs, _ in items for text, _ in segs for c in text}))
        examples, truncated = char_examples(items, tok, limit)
        require_items(examples, truncated, "--data", data, fmt, items, f"--max-length {limit} characters")
        extra = {"task": "jsonl", "format": fmt, "data": file_sha256(data), "vocab": "".join(tok.alphabet)}
    max_len = max(len(ids) for ids, _ in examples)
    extra["max_len"] = max_len
    model = demo.build_model(tok.vocab_size, max_len, seed=seed)
    parts = DemoParts(model, examples, tok, extra, file_sha256(data), fmt, truncated)
    if eval_data is not None:
        eval_items, eval_fmt = file_segments(eval_data, "--eval-data", cache_dir, progress)
        check_vocabulary(eval_items, tok, eval_data, "--eval-data")
        # Cut to the training context: the model has max_len positions and no more.
        parts.eval_examples, parts.eval_truncated = char_examples(eval_items, tok, max_len)
        require_items(parts.eval_examples, parts.eval_truncated, "--eval-data", eval_data, eval_fmt,
                      eval_items, f"the training context of {max_len} characters")
        parts.eval_fingerprint = file_sha256(eval_data)
    return parts
