"""Whether a data set can teach anything: at least one token in the loss, and which ids it uses.

A file whose every example has no label left (a reply role the loss does not know,
user-only conversations, every prompt cut away by --max-length) would run every step
skipped, and eval data like that gives a NaN loss each time: both are refused when the
workload is built, with the reason where it is cheap to find.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from gradaccum.workloads.errors import WorkloadError

REPLY_ROLE = "assistant"
"""The role whose turns are in the loss (TRL's convention)."""

_CUT_PART = {
    "prompt-completion": "prompt",
    "messages": "conversation before its first assistant reply",
}


def roles_of(records: Iterable[dict[str, Any]]) -> set[str]:
    """Every role that occurs in the ``messages`` of ``records`` (only on the error path)."""
    return {m["role"] for r in records for m in (r.get("messages") or []) if isinstance(m, dict)}


def why_no_loss(fmt: str, roles: Callable[[], set[str]], all_cut: bool, limit_name: str) -> str | None:
    """Why no example of a file kept a loss token, where that is cheap to say."""
    if fmt == "messages":
        seen = roles()
        if REPLY_ROLE not in seen:
            listed = ", ".join(repr(r) for r in sorted(seen))
            return f"no message has the role '{REPLY_ROLE}', whose turns are the loss (roles: {listed})"
    if all_cut:
        part = _CUT_PART.get(fmt, "example")
        return f"every {part} is at least {limit_name} long, so nothing in the loss is left"
    return None


def require_loss_tokens(
    items: int, flag: str, path: str | Path, fmt: str,
    roles: Callable[[], set[str]], all_cut: bool, limit_name: str,
) -> None:
    """WorkloadError (one line naming ``flag`` and ``path``) when ``items`` is 0."""
    if items > 0:
        return
    why = why_no_loss(fmt, roles, all_cut, limit_name)
    raise WorkloadError(
        f"{flag} {path}: no example has a token in the loss" + (f" ({why})" if why else "")
        + ("; training would learn nothing" if flag == "--data" else "; its loss would be undefined (NaN)")
    )


def check_embedding_rows(
    model: str | Path, tokenizer_size: int | None, rows: int | None, max_id: int | None = None,
    data_flag: str = "--data",
) -> None:
    """WorkloadError when the tokenizer (or the ids of the data) reach past the model's embedding."""
    if rows is None:
        return
    if tokenizer_size is not None and tokenizer_size > rows:
        raise WorkloadError(
            f"--model {model}: the tokenizer has {tokenizer_size} tokens but the model's input "
            f"embedding only {rows} rows (ids {rows} and above cannot be embedded)"
        )
    if max_id is not None and max_id >= rows:
        raise WorkloadError(
            f"--model {model}: {data_flag} tokenizes to id {max_id}, past the model's input embedding "
            f"of {rows} rows"
        )
