"""The first N tokens of a long text, read from a prefix of it: memory follows N, not the text.

Tokenizing a whole 5 MB line takes over a gigabyte when only ``--max-length`` tokens are
kept. A token covers at most as many characters as the longest token string of the
vocabulary (byte-level and SentencePiece strings are at least as long as the text they
stand for), so the first N tokens lie within ``N x longest + margin`` characters. That
bound can fail (an unknown word that becomes one ``<unk>``, a normalizer that merges
characters, a merge decided by the characters after the cut), so a cut is only trusted
when it yields N tokens and a second, longer cut agrees on them; otherwise the cut
doubles, up to the whole text. The result is always the first N tokens of the whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MARGIN_CHARS = 64
"""Characters added past ``N x longest token``: room for the pre-tokenizer's look-ahead."""
SLACK_TOKENS = 4
"""A cut must yield this many tokens past N: the last ones may change with what follows."""


def longest_token_chars(tokenizer: Any) -> int:
    """The longest token string of ``tokenizer``'s vocabulary, in characters (at least 1)."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary view: no cut, tokenize the whole
        return 0
    return max((len(t) for t in vocab), default=1)


def first_tokens(
    encode: Callable[[str], list[int]], text: str, need: int | None, token_chars: int
) -> list[int]:
    """``encode(text)``, or at least its first ``need`` ids exactly, from a prefix of ``text``."""
    if need is None or token_chars <= 0:
        return encode(text)
    cut = need * token_chars + MARGIN_CHARS
    while cut < len(text):
        ids = encode(text[:cut])
        if len(ids) >= need + SLACK_TOKENS and encode(text[: 2 * cut])[:need] == ids[:need]:
            return ids[:need]
        cut *= 2
    return encode(text)
