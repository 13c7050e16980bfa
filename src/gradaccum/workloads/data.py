"""Data files -> examples with loss masks (the conventions of TRL's SFT data), and collate.

By extension:

- ``.txt``: one example per non-empty line; every token in the loss.
- ``.jsonl`` / ``.json``: one JSON object per line (a ``.json`` file may instead be one
  JSON array of objects). The file's columns pick one format for the whole file:
  ``messages`` (rendered with the tokenizer's chat template; only the assistant turns,
  their content and the template's end-of-turn tokens, in the loss), else ``prompt`` +
  ``completion`` (only the completion tokens and EOS in the loss), else ``text``
  (every token in the loss, EOS appended).

An example is ``(input_ids, labels)``: two int lists of one length, labels ``-100``
where a token is not in the loss (the demo's shape, so one collate serves both). The
causal shift happens in the loss (``gradaccum.losses.causal_lm``), so an example's
item count is the number of counted labels after position 0.

Files are read and checked by ``workloads.files`` (with Hugging Face ``datasets``:
Arrow, memory-mapped, so a file larger than RAM works) and tokenized here once with
``.map`` (cached beside the Arrow data, so a second run on the same file and tokenizer
does not tokenize again).
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
    check_record,
    file_sha256,
    load_records,
    quiet_datasets,
    record_location,
    unreadable,
)
from gradaccum.workloads.learnable import require_loss_tokens, roles_of
from gradaccum.workloads.prefix import first_tokens, longest_token_chars

IGNORE = -100
Example = tuple[list[int], list[int]]
"""(input_ids, labels): labels equal input_ids where counted, IGNORE elsewhere."""


def clean_messages(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages without the None fields Arrow adds when messages in a file differ in keys.

    (A template that tests ``message.name is defined`` would otherwise print "None".)
    """
    return [{k: v for k, v in m.items() if v is not None} for m in msgs]


# ----------------------------------------------------------------------- tokenizing


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class TokenEncoder:
    """Records -> ``(input_ids, labels)`` with a Hugging Face tokenizer.

    Boundaries between the parts not in the loss and the parts in it are found on
    tokens, never assumed from text lengths: a part's tokens are the tokens of the
    whole rendering from where the tokens of the rendering before it stop matching.
    So a BPE merge across a boundary puts the merged token in the loss (never a prompt
    token), and the counts match what the model really sees.
    """

    VERSION = 2
    """Bump when the encoding changes: ``datasets`` keys its ``.map`` cache on this object's
    pickled state (tokenizer, max_length, version), not on the code of its methods."""

    def __init__(self, tokenizer: Any, max_length: int | None) -> None:
        self.tok = tokenizer
        self.max_length = max_length
        self.eos = tokenizer.eos_token_id
        self.version = self.VERSION  # an instance attribute, so it is part of the cache key
        self.token_chars = longest_token_chars(tokenizer)

    def _ids(self, text: str, specials: bool = True) -> list[int]:
        """The ids of ``text``; with a max_length only the first max_length + 2 of them, exactly
        (the two past it decide truncation and a prompt's trailing EOS), read from a prefix."""
        need = None if self.max_length is None else self.max_length + 2
        return first_tokens(lambda t: self._encode(t, specials), text, need, self.token_chars)

    def _encode(self, text: str, specials: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=specials, verbose=False)["input_ids"])

    def _with_eos(self, ids: list[int]) -> list[int]:
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            return [*ids, self.eos]
        return ids

    def text(self, text: str) -> Example:
        ids = self._with_eos(self._ids(text))
        return ids, list(ids)

    def prompt_completion(self, prompt: str, completion: str) -> Example:
        # TRL: tokenize prompt and prompt+completion, the completion mask starts where the
        # prompt's tokens end (here: where they stop matching, so never past a merge).
        prompt_ids = self._ids(prompt)
        full = self._ids(prompt + completion)
        if self.eos is not None and prompt_ids and prompt_ids[-1] == self.eos:
            prompt_ids = prompt_ids[:-1]  # a tokenizer that appends EOS itself
        start = _common_prefix(prompt_ids, full)
        ids = self._with_eos(full)
        return ids, [IGNORE] * start + ids[start:]

    def messages(self, msgs: list[dict[str, Any]]) -> Example:
        msgs = clean_messages(msgs)
        ids = self._ids(self._render(msgs), specials=False)  # the template writes BOS itself
        labels = [IGNORE] * len(ids)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            # The turn's tokens: from the end of the conversation before it plus the
            # assistant header (the generation prompt), to the end of the conversation
            # including it (its end-of-turn tokens), each as a token prefix of the whole.
            try:
                before = self._ids(self._render(msgs[:i], generation_prompt=True), specials=False)
            except Exception:  # some templates cannot render an empty conversation
                before = []
            after = self._ids(self._render(msgs[: i + 1]), specials=False)
            start, end = _common_prefix(before, ids), _common_prefix(after, ids)
            labels[start:end] = ids[start:end]
        return ids, labels

    def _render(self, msgs: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        return str(text)

    def encode(self, record: dict[str, Any], fmt: str) -> Example:
        if fmt == "text":
            return self.text(record["text"])
        if fmt == "prompt-completion":
            return self.prompt_completion(record["prompt"], record["completion"])
        return self.messages(record["messages"])

    def __call__(self, record: dict[str, Any], index: int, fmt: str) -> dict[str, Any]:
        """The ``.map`` function: one record -> input_ids, labels, num_items, truncated."""
        check_record(record, fmt, index)
        try:
            ids, labels = self.encode(record, fmt)
        except BadRecord:
            raise
        except Exception as e:  # a chat template that refuses the conversation, say
            raise BadRecord(index, f"cannot render ({type(e).__name__}: {e})") from None
        cut = self.max_length is not None and len(ids) > self.max_length
        if cut:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return {"input_ids": ids, "labels": labels, "num_items": count_items(labels), "truncated": cut}


def count_items(labels: Sequence[int]) -> int:
    """Labels really predicted: counted ones after position 0 (the causal shift drops it)."""
    return sum(1 for x in labels[1:] if x != IGNORE)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


class ArrowExamples(Sequence[Example]):
    """Tokenized examples kept in Arrow (memory-mapped); ``[i]`` is ``(input_ids, labels)``."""

    def __init__(self, ds: Any) -> None:
        self._ds = ds.select_columns(["input_ids", "labels"])

    def __len__(self) -> int:
        return int(self._ds.num_rows)

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> list[Example]: ...
    def __getitem__(self, i: int | slice) -> Example | list[Example]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        row = self._ds[int(i) % n]
        return row["input_ids"], row["labels"]


@dataclass
class TokenizedData:
    """A data file, tokenized: the examples and the figures a run reports about them."""

    examples: Sequence[Example]
    format: str
    fingerprint: str
    """``"sha256:<hex>"`` of the file's bytes."""
    truncated: int
    """Examples cut to ``max_length``."""
    num_items: int
    """Counted labels after the causal shift, over all examples."""
    max_id: int | None = None
    """The largest token id in the examples (checked against the model's embedding)."""

    @property
    def mean_items(self) -> float:
        return self.num_items / max(1, len(self.examples))


def tokenize_file(
    path: str | Path,
    tokenizer: Any,
    max_length: int | None,
    flag: str = "--data",
    cache_dir: str | None = None,
    progress: bool = True,
    limit_name: str | None = None,
) -> TokenizedData:
    """Read, check and tokenize a data file for a Hugging Face tokenizer (see the module doc).

    A file in which no example keeps a token in the loss is refused (``limit_name``: how a
    message names ``max_length``, by default ``--max-length N tokens``).
    """
    import pyarrow.compute as pc

    ds, fmt = load_records(path, flag, cache_dir, progress)
    p = Path(path)
    if fmt == "messages" and not has_chat_template(tokenizer):
        raise WorkloadError(
            f"{flag} {path} {record_location(p, 0)}: 'messages' records need a chat template, "
            "and the model's tokenizer has none"
        )
    encoder = TokenEncoder(tokenizer, max_length)
    with quiet_datasets(progress):
        try:
            tokenized = ds.map(
                encoder,
                with_indices=True,
                fn_kwargs={"fmt": fmt},
                remove_columns=ds.column_names,
                desc=f"tokenizing {p.name}",
            )
        except BadRecord as e:
            raise WorkloadError(f"{flag} {path} {record_location(p, e.index)}: {e.why}") from None
        except Exception as e:  # Arrow lets some bad bytes through to here (invalid UTF-8)
            raise unreadable(p, flag, e) from None
    table = tokenized.data
    truncated = int(pc.sum(table.column("truncated")).as_py() or 0)
    num_items = int(pc.sum(table.column("num_items")).as_py() or 0)
    require_loss_tokens(
        num_items, flag, path, fmt, lambda: roles_of(ds), truncated == len(tokenized),
        limit_name or f"--max-length {max_length} tokens",
    )
    max_id = pc.max(pc.list_flatten(table.column("input_ids"))).as_py()
    return TokenizedData(
        examples=ArrowExamples(tokenized),
        format=fmt,
        fingerprint=file_sha256(p),
        truncated=truncated,
        num_items=num_items,
        max_id=None if max_id is None else int(max_id),
    )


# -------------------------------------------------------------------------- collate


class Collator:
    """Pad one micro-batch to its own longest example, on the right.

    Picklable (DataLoader workers). The pad id only fills positions that are masked out
    of attention and labelled IGNORE, so its value never reaches the loss.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = int(pad_id)

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in examples)
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(examples):
            input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            labels[i, : len(lab)] = torch.as_tensor(lab, dtype=torch.long)
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (the tokenizer itself is left unchanged)."""
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(tid, int):
            return tid
    return 0
