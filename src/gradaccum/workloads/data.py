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

Files are read with Hugging Face ``datasets`` (Arrow, memory-mapped: a file larger than
RAM works) and tokenized once with ``.map`` (cached beside the Arrow data, so a second
run on the same file and tokenizer does not tokenize again).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import torch

from gradaccum.workloads.errors import WorkloadError

IGNORE = -100
Example = tuple[list[int], list[int]]
"""(input_ids, labels): labels equal input_ids where counted, IGNORE elsewhere."""

FORMATS = ("text", "prompt-completion", "messages")
EXTENSIONS = (".txt", ".jsonl", ".json")
_KNOWN_FIELDS = "text, prompt+completion or messages"


# ---------------------------------------------------------------------------- files


def file_sha256(path: str | Path) -> str:
    """``"sha256:<hex>"`` of a file's bytes, read in chunks (the file may exceed RAM)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def check_data_file(path: str | Path, flag: str = "--data") -> Path:
    """The path of a usable data file: regular, a known extension, not blank."""
    from gradaccum.demo.task import regular_file

    regular_file(path, flag, WorkloadError)
    p = Path(path)
    if p.suffix.lower() not in EXTENSIONS:
        raise WorkloadError(f"{flag} {path}: unknown extension {p.suffix!r}; use .txt, .jsonl or .json")
    if _is_blank(p):
        raise WorkloadError(f"{flag} {path}: empty file (no examples)")
    return p


def _is_blank(p: Path) -> bool:
    # Stops at the first non-blank chunk, so a huge file costs one read.
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            if chunk.strip():
                return False
    return True


def _starts_with_array(p: Path) -> bool:
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            s = chunk.lstrip()
            if s:
                return s.startswith(b"[")
    return False


@contextlib.contextmanager
def _quiet_datasets(progress: bool) -> Iterator[None]:
    """Silence ``datasets``' own error logging (we raise one line instead); bars optional."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


# -------------------------------------------------------------------------- records


def load_records(
    path: str | Path, flag: str = "--data", cache_dir: str | None = None, progress: bool = True
) -> tuple[Any, str]:
    """A data file as a ``datasets.Dataset`` of raw records, and its format (one of FORMATS).

    For ``.txt`` the records are ``{"text": line}`` for the non-empty lines.
    """
    import datasets

    p = check_data_file(path, flag)
    is_txt = p.suffix.lower() == ".txt"
    with _quiet_datasets(progress):
        try:
            ds = datasets.load_dataset(
                "text" if is_txt else "json", data_files=str(p), split="train", cache_dir=cache_dir
            )
        except Exception as e:  # arrow / datasets raise many types; find the line ourselves
            raise unreadable(p, flag, e) from None
        if is_txt:
            ds = ds.filter(lambda r: bool(r["text"].strip()), desc="non-empty lines")
    if len(ds) == 0:
        raise WorkloadError(f"{flag} {path}: no examples")
    if is_txt:
        return ds, "text"
    fmt = detect_format(ds.column_names)
    if fmt is None:
        raise WorkloadError(
            f"{flag} {path} {record_location(p, 0)}: a record with none of the fields {_KNOWN_FIELDS} "
            f"(fields: {', '.join(ds.column_names)})"
        )
    return ds, fmt


def detect_format(columns: Sequence[str]) -> str | None:
    """The file's format from its columns (TRL's precedence), or None when none is known."""
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    if "text" in columns:
        return "text"
    return None


def unreadable(p: Path, flag: str, error: BaseException) -> WorkloadError:
    """The one-line error for a file ``datasets`` could not read or map: its bad line, if found."""
    where = _locate_problem(p, p.suffix.lower() == ".txt")
    if where is None:
        return WorkloadError(f"{flag} {p}: cannot read ({type(error).__name__}: {error})")
    return WorkloadError(f"{flag} {p} {where}")


def _locate_problem(p: Path, is_txt: bool) -> str | None:
    """``"line N: why"`` for the first bad line or record of a file ``datasets`` refused.

    Only on this error path: two passes over the file, syntax first, then each record
    against the format the file's fields give (Arrow refuses, say, a field that is a
    string on one line and a number on another).
    """
    fields: set[str] = set()
    for where, obj in _json_records(p, is_txt):
        if isinstance(obj, str):
            return f"{where}: {obj}"
        fields.update(obj)
    if is_txt:
        return None
    fmt = detect_format(sorted(fields))
    for i, (where, obj) in enumerate(_json_records(p, is_txt)):
        try:
            check_record(obj, fmt or "text", i)  # type: ignore[arg-type]
        except BadRecord as e:
            return f"{where}: {e.why}"
    return None


def _json_records(p: Path, is_txt: bool) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """``(where, record)`` for each record of a file, or ``(where, why)`` for one that is unreadable."""
    if not is_txt and _starts_with_array(p):
        try:
            items = json.loads(p.read_text("utf-8"))
        except UnicodeDecodeError as e:
            yield f"byte {e.start}", "not UTF-8 text"
            return
        except json.JSONDecodeError as e:
            yield f"line {e.lineno}", f"malformed JSON ({e.msg})"
            return
        for i, item in enumerate(items if isinstance(items, list) else [items]):
            yield f"record {i + 1}", item if isinstance(item, dict) else "not a JSON object"
        return
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"line {lineno}", f"not UTF-8 text (byte {e.start} of the line)"
                return
            if is_txt or not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {lineno}", f"malformed JSON ({e.msg})"
                return
            yield f"line {lineno}", obj if isinstance(obj, dict) else "not a JSON object"


def record_location(p: Path, index: int) -> str:
    """Where record ``index`` (0-based, as ``datasets`` numbers them) is: ``line N`` or ``record N``.

    ``datasets`` skips blank lines, so the line number is found by counting the
    non-blank lines (only on this error path). A JSON array file has no lines per
    record, so its records are numbered instead.
    """
    if p.suffix.lower() != ".txt" and _starts_with_array(p):
        return f"record {index + 1}"
    seen = -1
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                seen += 1
                if seen == index:
                    return f"line {lineno}"
    return f"record {index + 1}"


class BadRecord(Exception):
    """Raised inside ``.map`` for record ``index``; turned into a WorkloadError naming the line."""

    def __init__(self, index: int, why: str) -> None:
        super().__init__(index, why)
        self.index, self.why = index, why


def check_record(record: dict[str, Any], fmt: str, index: int) -> None:
    """Raise BadRecord unless ``record`` holds the fields of ``fmt`` with the right types."""
    if all(record.get(k) is None for k in ("text", "prompt", "completion", "messages")):
        raise BadRecord(index, f"a record with none of the fields {_KNOWN_FIELDS}")
    if fmt == "text":
        if not isinstance(record.get("text"), str):
            raise BadRecord(index, "'text' is missing or not a string (the file's format is text)")
    elif fmt == "prompt-completion":
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise BadRecord(
                    index, f"'{key}' is missing or not a string (the file's format is prompt+completion)"
                )
    else:
        msgs = record.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRecord(index, "'messages' is missing or not a non-empty list")
        for j, m in enumerate(msgs):
            if not (isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content"))):
                raise BadRecord(index, f"messages[{j}] needs string 'role' and 'content'")


def clean_messages(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages without the None fields Arrow adds when messages in a file differ in keys.

    (A template that tests ``message.name is defined`` would otherwise print "None".)
    """
    return [{k: v for k, v in m.items() if v is not None} for m in msgs]


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

    VERSION = 1
    """Bump when the encoding changes: ``datasets`` keys its ``.map`` cache on this object's
    pickled state (tokenizer, max_length, version), not on the code of its methods."""

    def __init__(self, tokenizer: Any, max_length: int | None) -> None:
        self.tok = tokenizer
        self.max_length = max_length
        self.eos = tokenizer.eos_token_id
        self.version = self.VERSION  # an instance attribute, so it is part of the cache key

    def _ids(self, text: str, specials: bool = True) -> list[int]:
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
) -> TokenizedData:
    """Read, check and tokenize a data file for a Hugging Face tokenizer (see the module doc)."""
    import pyarrow.compute as pc

    ds, fmt = load_records(path, flag, cache_dir, progress)
    p = Path(path)
    if fmt == "messages" and not has_chat_template(tokenizer):
        raise WorkloadError(
            f"{flag} {path} {record_location(p, 0)}: 'messages' records need a chat template, "
            "and the model's tokenizer has none"
        )
    encoder = TokenEncoder(tokenizer, max_length)
    with _quiet_datasets(progress):
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
    return TokenizedData(
        examples=ArrowExamples(tokenized),
        format=fmt,
        fingerprint=file_sha256(p),
        truncated=int(pc.sum(table.column("truncated")).as_py() or 0),
        num_items=int(pc.sum(table.column("num_items")).as_py() or 0),
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
