"""The demo model on a text file: each non-empty line one example, at character level.

The file is read and checked by ``gradaccum.workloads.files`` (the one reader of data
files); this module only encodes its lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gradaccum.demo.task import BOS, EOS, IGNORE, CharTokenizer, Example
from gradaccum.workloads.files import read_text_lines


def text_examples(lines: Sequence[str], max_len: int = 128) -> tuple[list[Example], CharTokenizer]:
    """Every line one example, all tokens counted; the vocabulary is the kept characters.

    Lines longer than ``max_len - 2`` characters are cut to fit the model's context.
    """
    cut = [ln[: max_len - 2] for ln in lines]
    tok = CharTokenizer(sorted({c for ln in cut for c in ln}))
    examples = []
    for ln in cut:
        ids = [BOS, *tok.encode(ln), EOS]
        examples.append((ids, [IGNORE, *ids[1:]]))
    return examples, tok


def load_text_examples(path: str | Path, max_len: int = 128) -> tuple[list[Example], CharTokenizer]:
    """Every non-empty line of a UTF-8 text file is one example, all tokens counted.

    Lines longer than ``max_len - 2`` characters are cut to fit the model's context.
    A file that cannot be used raises ``TextFileError`` (one line).
    """
    return text_examples(read_text_lines(path), max_len)
