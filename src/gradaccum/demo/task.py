"""The built-in task: generated string puzzles with variable-length answers.

Each example is ``prompt + answer + EOS`` at character level. Only the answer (and
EOS) is in the loss, and answers range from 1 to ~9 tokens, so micro-batches carry
very different target counts: exactly the case where mean-of-means goes wrong.
"""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Sequence
from pathlib import Path

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


def _puzzle(rng: random.Random) -> tuple[str, str]:
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
        prompt, answer = _puzzle(rng)
        p, a = TASK_TOKENIZER.encode(prompt), TASK_TOKENIZER.encode(answer) + [EOS]
        ids = [BOS, *p, *a]
        # labels[t] is predicted from position t-1 (causal_lm shifts), so only the
        # answer and EOS positions are counted.
        labels = [IGNORE] * (1 + len(p)) + a
        out.append((ids, labels))
    return out


class TextFileError(ValueError):
    """A --data file that cannot be used."""


MAX_DATA_BYTES = 64 * 2**20
"""--data files larger than this are refused (the demo keeps every example in memory)."""
MAX_EXAMPLES = 2_000_000
"""--data files with more non-empty lines than this are refused."""


def regular_file(path: str | Path, flag: str, error: type[Exception]) -> os.stat_result:
    """``os.stat`` of ``path`` if it is a regular file; else ``error`` with one line naming ``flag``.

    Devices (``/dev/zero``), pipes and sockets are refused here, before anything reads them.
    """
    text = str(path)
    if not text.strip():
        raise error(f"{flag}: empty path")
    if "\0" in text:
        raise error(f"{flag} {text!r}: the path contains a NUL byte")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{flag} {path}: no such file") from None
    except OSError as e:
        raise error(f"{flag} {path}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{flag} {path}: is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{flag} {path}: not a regular file (a device, pipe or socket)")
    return st


def read_data_file(path: str | Path, limit: int = MAX_DATA_BYTES) -> bytes:
    """The bytes of a --data file: a regular file of at most ``limit`` bytes, else TextFileError.

    Devices (``/dev/zero``), pipes and sockets are refused before reading, and no more
    than ``limit + 1`` bytes are ever read, whatever the file claims its size is.
    """
    st = regular_file(path, "--data", TextFileError)
    p = Path(path)
    too_big = f"--data {path}: larger than the {limit // 2**20} MiB the demo reads"
    if st.st_size > limit:
        raise TextFileError(too_big)
    try:
        with open(p, "rb") as f:
            raw = f.read(limit + 1)
    except IsADirectoryError:
        raise TextFileError(f"--data {path}: is a directory, not a file") from None
    except OSError as e:
        raise TextFileError(f"--data {path}: cannot read ({e.strerror})") from None
    if len(raw) > limit:
        raise TextFileError(too_big)
    return raw


def load_text_examples(path: str | Path, max_len: int = 128) -> tuple[list[Example], CharTokenizer]:
    """Every non-empty line of a UTF-8 text file is one example, all tokens counted.

    Lines longer than ``max_len - 2`` characters are cut to fit the model's context.
    """
    raw = read_data_file(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextFileError(f"--data {path}: not UTF-8 text (byte {e.start})") from None
    lines = [ln.strip("\r") for ln in text.split("\n")]
    lines = [ln[: max_len - 2] for ln in lines if ln.strip()]
    if not lines:
        raise TextFileError(f"--data {path}: no non-empty lines")
    if len(lines) > MAX_EXAMPLES:
        raise TextFileError(f"--data {path}: {len(lines)} lines, more than the {MAX_EXAMPLES} the demo holds")
    tok = CharTokenizer(sorted({c for ln in lines for c in ln}))
    examples = []
    for ln in lines:
        ids = [BOS, *tok.encode(ln), EOS]
        examples.append((ids, [IGNORE, *ids[1:]]))
    return examples, tok


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
