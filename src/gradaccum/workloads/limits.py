"""Size ceilings of data files, checked before anything parses them.

A --data / --eval-data file is bounded twice before a parser sees it: its size (from
``stat``, nothing read) and the length of each of its lines (one streaming pass in
1 MiB chunks, so memory stays flat whatever the file holds, a 1 GiB run of NUL bytes
included). A JSON array file has no lines per record and is parsed whole, so it has a
ceiling of its own instead of the per-line one.
"""

from __future__ import annotations

import os
from pathlib import Path

from gradaccum.workloads.errors import WorkloadError

MAX_FILE_BYTES = 32 * 2**30
"""--data / --eval-data files larger than this are refused (Hugging Face models).

Large public SFT sets (OpenHermes-2.5 ~2 GB, tulu-3-sft-mixture, SmolTalk: a few GB)
fit with room; beyond it the Arrow cache (records + tokens, ~2-3x the file) alone
would fill a typical disk, so a bigger file is far more likely a mistake."""
MAX_LINE_BYTES = 16 * 2**20
"""One line (one record) larger than this is refused: ~4M tokens of text, four times a
million-token example, while a parser holding it stays small."""
MAX_ARRAY_BYTES = 2 * 2**30
"""A ``.json`` file that is one JSON array is parsed whole in memory: this ceiling instead."""
DEMO_MAX_BYTES = 64 * 2**20
"""The demo model keeps every example in memory as Python lists: its files stay small."""

_CHUNK = 1 << 20


def size_text(n: int) -> str:
    """``16 MiB`` / ``32 GiB``: a ceiling as the messages name it."""
    return f"{n // 2**30} GiB" if n >= 2**30 and n % 2**30 == 0 else f"{n // 2**20} MiB"


def check_file_size(
    path: str | Path, flag: str, size: int, limit: int, what: str = "a data file may be"
) -> None:
    """WorkloadError unless ``size`` (from stat) is at most ``limit``."""
    if size > limit:
        raise WorkloadError(f"{flag} {path}: {size} bytes, larger than the {size_text(limit)} {what}")


def check_line_lengths(path: str | Path, flag: str, limit: int = MAX_LINE_BYTES) -> None:
    """WorkloadError naming the first line longer than ``limit`` bytes; reads in bounded chunks."""
    lineno, current = 1, 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            parts = chunk.split(b"\n")
            for i, part in enumerate(parts):
                current += len(part)
                if current > limit:
                    raise WorkloadError(
                        f"{flag} {path} line {lineno + i}: longer than the {size_text(limit)} "
                        "one line (one record) may be"
                    )
                if i < len(parts) - 1:
                    current = 0
            lineno += len(parts) - 1


def check_sizes(path: str | Path, flag: str, is_array: bool, demo: bool = False) -> None:
    """The file-size ceiling (and, for line-based files, the per-line one) of a data file."""
    size = os.stat(path).st_size
    if demo:
        check_file_size(path, flag, size, DEMO_MAX_BYTES, "the demo model reads")
    elif is_array:
        check_file_size(path, flag, size, MAX_ARRAY_BYTES, "a JSON array file (parsed whole) may be")
    else:
        check_file_size(path, flag, size, MAX_FILE_BYTES)
    if not is_array:
        check_line_lengths(path, flag)
