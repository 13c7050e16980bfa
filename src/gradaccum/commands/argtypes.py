"""The command line's value types: each parses one flag's text or says, in one line, why not.

No torch here: the parser runs before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

MAX_EFFECTIVE_BATCH = 2**20  # examples per optimizer step: far beyond any real run, refused up front
LOSS_PER = ("token", "sequence")  # --loss-per: what one item of the loss mean is
MAX_LR = 1e3  # far above any real learning rate (AdamW ~1e-5..1e-2, large-batch SGD ~10)


def int_at_least(low: int, high: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {short_int(v)}")
        return v

    return parse


def short_int(v: int) -> str:
    text = str(v)
    return text if len(text) <= 20 else f"{text[:6]}...({len(text)} digits)"


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
batch_int = int_at_least(1, MAX_EFFECTIVE_BATCH)


def micro(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else batch_int(text)


effective = micro  # N or "auto"


def positive_float(high: float, zero: bool = False) -> Any:
    """A positive number (or 0, with ``zero``) up to ``high``: beyond it training can only overflow."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(v) and (v > 0 or (zero and v == 0))):
            raise argparse.ArgumentTypeError(f"must be a {'non-negative' if zero else 'positive'} number, "
                                             f"got {text}")
        if v > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g}, got {text}")
        return v

    return parse


lr = positive_float(MAX_LR)
non_negative_float = positive_float(1e6, zero=True)


def dropout(text: str) -> float:
    v = non_negative_float(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


def names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or len(names) > 64 or any(len(n) > 100 or not n.replace("_", "").replace(".", "").isalnum()
                                           for n in names):
        raise argparse.ArgumentTypeError(f"expected module names separated by commas, got {text[:80]!r}")
    return names


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    v = non_negative_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return v


def size(text: str) -> int:
    from gradaccum._sizes import parse_size  # light: no torch at import

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def report_to(text: str) -> list[str]:
    """--report-to: "none" or a comma list of trackers."""
    from gradaccum.trackers import parse_names  # light: each client is imported only when it starts

    try:
        return parse_names(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
