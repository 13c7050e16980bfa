"""Pair files (sentence-transformers' convention) -> token ids, and their collate.

A ``.jsonl`` / ``.json`` file whose records are ``{"anchor": ..., "positive": ...}``, or
``{"anchor", "positive", "negative"}`` triplets (every record or none: the hard negative),
trains an embedding model (:mod:`gradaccum.workloads.embedding`). Each text is tokenized on its
own (the tokenizer's special tokens added, cut to the length limit); a micro-batch pads each
role to its own longest text. Read and checked like every data file (``workloads.files``:
the size ceilings, one line naming the flag, the file and the line).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import torch

from gradaccum.workloads.errors import WorkloadError
from gradaccum.workloads.files import (
    BadRecord,
    file_sha256,
    load_records,
    quiet_datasets,
    record_location,
    unreadable,
)

ROLES = ("anchor", "positive", "negative")
OTHER_FIELDS = ("text", "prompt", "completion", "messages")
Pair = tuple[list[int], ...]
"""A record's token ids by role: (anchor, positive) or (anchor, positive, negative)."""


class PairEncoder:
    """The ``.map`` function: one record -> the ids of each role, checked (BadRecord names the record)."""

    VERSION = 1
    """Bump when the encoding changes (``datasets`` keys its cache on this object's pickled state)."""

    def __init__(self, tokenizer: Any, max_length: int | None, roles: tuple[str, ...]) -> None:
        self.tok = tokenizer
        self.max_length = max_length
        self.roles = roles
        self.version = self.VERSION

    def ids(self, text: str) -> tuple[list[int], bool]:
        """The text's ids with the tokenizer's special tokens, cut to max_length; whether it was cut."""
        if self.max_length is None:
            return list(self.tok(text, verbose=False)["input_ids"]), False
        # One more than allowed tells whether the text was longer (truncation keeps the specials).
        longer = self.tok(text, truncation=True, max_length=self.max_length + 1, verbose=False)["input_ids"]
        if len(longer) <= self.max_length:
            return list(longer), False
        cut = self.tok(text, truncation=True, max_length=self.max_length, verbose=False)["input_ids"]
        return list(cut), True

    def __call__(self, record: dict[str, Any], index: int) -> dict[str, Any]:
        for name in OTHER_FIELDS:
            if record.get(name) is not None:
                raise BadRecord(index, f"a '{name}' record among anchor/positive pairs (one format per file)")
        out: dict[str, Any] = {"truncated": False}
        for role in self.roles:
            text = record.get(role)
            if text is None:
                other = " (other records have one: give every record a negative, or none)"
                raise BadRecord(index, f"no '{role}'" + (other if role == "negative" else ""))
            if not isinstance(text, str):
                raise BadRecord(index, f"'{role}' is not a string")
            if not text.strip():
                raise BadRecord(index, f"'{role}' is an empty string")
            out[f"{role}_ids"], cut = self.ids(text)
            out["truncated"] = out["truncated"] or cut
        return out


class ArrowPairs(Sequence[Pair]):
    """Tokenized pairs kept in Arrow (memory-mapped); ``[i]`` is the ids of each role."""

    def __init__(self, ds: Any, roles: tuple[str, ...]) -> None:
        self.columns = [f"{role}_ids" for role in roles]
        self.ds = ds.select_columns(self.columns)

    def __len__(self) -> int:
        return int(self.ds.num_rows)

    @overload
    def __getitem__(self, i: int) -> Pair: ...
    @overload
    def __getitem__(self, i: slice) -> list[Pair]: ...
    def __getitem__(self, i: int | slice) -> Pair | list[Pair]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        row = self.ds[int(i) % n]
        return tuple(row[c] for c in self.columns)


@dataclass
class PairData:
    """A pair file, tokenized."""

    examples: Sequence[Pair]
    roles: tuple[str, ...]
    fingerprint: str
    truncated: int
    """Records with a text cut to the length limit."""
    max_id: int | None
    num_tokens: int

    @property
    def format(self) -> str:
        return "triplets" if len(self.roles) == 3 else "pairs"


def read_pairs(path: str | Path, tokenizer: Any, max_length: int | None, flag: str = "--data",
               cache_dir: str | None = None, progress: bool = True) -> PairData:
    """Read, check and tokenize a pair file (see the module doc); at least two records."""
    import pyarrow.compute as pc

    ds, fmt = load_records(path, flag, cache_dir, progress, pairs=True)
    p = Path(path)
    if fmt != "pairs":  # is_pairs_file saw a pair first, so the columns hold one: cannot be
        raise WorkloadError(f"{flag} {path}: not anchor/positive pairs")
    if len(ds) < 2:
        raise WorkloadError(f"{flag} {path}: {len(ds)} record; in-batch negatives need at least 2 pairs")
    roles = tuple(r for r in ROLES if r in ds.column_names or r != "negative")
    with quiet_datasets(progress):
        try:
            tokenized = ds.map(PairEncoder(tokenizer, max_length, roles), with_indices=True,
                               remove_columns=ds.column_names, desc=f"tokenizing {p.name}")
        except BadRecord as e:
            raise WorkloadError(f"{flag} {path} {record_location(p, e.index)}: {e.why}") from None
        except Exception as e:  # Arrow lets some bad bytes through to here (invalid UTF-8)
            raise unreadable(p, flag, e) from None
    table = tokenized.data
    ids = [pc.list_flatten(table.column(f"{r}_ids")) for r in roles]
    top = [pc.max(c).as_py() for c in ids]
    return PairData(
        examples=ArrowPairs(tokenized, roles), roles=roles, fingerprint=file_sha256(p),
        truncated=int(pc.sum(table.column("truncated")).as_py() or 0),
        max_id=max((int(t) for t in top if t is not None), default=None),
        num_tokens=sum(len(c) for c in ids),
    )


class PairCollator:
    """Pairs -> ``{"<role>_input_ids", "<role>_attention_mask"}`` per role, each padded on the right
    to its own longest text (rows along dim 0, so ``check`` can split a batch)."""

    def __init__(self, pad_id: int, roles: tuple[str, ...]) -> None:
        self.pad_id = int(pad_id)
        self.roles = roles

    def __call__(self, examples: Sequence[Pair]) -> dict[str, torch.Tensor]:
        out = {}
        for j, role in enumerate(self.roles):
            rows = [ex[j] for ex in examples]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
                mask[i, : len(r)] = 1
            out[f"{role}_input_ids"], out[f"{role}_attention_mask"] = ids, mask
        return out
