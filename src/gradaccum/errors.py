"""One line of an exception: the CLI promises one line, whatever a library told us."""

from __future__ import annotations


def one_line(e: BaseException, limit: int = 160, with_type: bool = False) -> str:
    """The first line of ``e`` (an OSError's strerror), cut to ``limit``; the type name if empty."""
    if isinstance(e, OSError) and e.strerror and not with_type:
        text = e.strerror
    else:
        lines = str(e).strip().splitlines()
        text = lines[0].strip() if lines else ""
    if not text:
        return type(e).__name__
    text = text[:limit]
    return f"{type(e).__name__}: {text}" if with_type else text
