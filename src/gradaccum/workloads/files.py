"""Reading and checking every data file (--data, --eval-data): the one place a path is opened.

A path is first checked to be a regular file (devices, pipes and sockets are refused
before anything reads them) within the size ceilings of ``workloads.limits`` (file and
line), then read as its extension says (never sniffed for archives) by one of: the demo's text reader (a size
ceiling, UTF-8, the non-empty lines), ``text_lines`` (a ``.txt`` data file), or
``load_records`` (``.txt``/``.jsonl``/``.json`` through Hugging Face ``datasets``). A
file that fails says why in one line naming the flag, the path and, where it can, the
line (``record_location``, ``unreadable``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gradaccum.workloads.errors import WorkloadError
from gradaccum.workloads.limits import DEMO_MAX_BYTES, check_line_lengths, check_sizes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
"""Any of these makes a directory hold a tokenizer."""

FORMATS = ("text", "prompt-completion", "messages")
EXTENSIONS = (".txt", ".jsonl", ".json")
KNOWN_FIELDS = "text, prompt+completion or messages"


# ---------------------------------------------------------------------------- files
class TextFileError(ValueError):
    """A --data file that cannot be used."""


MAX_DATA_BYTES = DEMO_MAX_BYTES
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


def read_data_file(
    path: str | Path, limit: int = MAX_DATA_BYTES, error: type[Exception] = TextFileError
) -> bytes:
    """The bytes of a --data file: a regular file of at most ``limit`` bytes, else ``error``.

    Devices (``/dev/zero``), pipes and sockets are refused before reading, and no more
    than ``limit + 1`` bytes are ever read, whatever the file claims its size is.
    """
    st = regular_file(path, "--data", error)
    p = Path(path)
    too_big = f"--data {path}: larger than the {limit // 2**20} MiB the demo reads"
    if st.st_size > limit:
        raise error(too_big)
    try:
        with open(p, "rb") as f:
            raw = f.read(limit + 1)
    except IsADirectoryError:
        raise error(f"--data {path}: is a directory, not a file") from None
    except OSError as e:
        raise error(f"--data {path}: cannot read ({e.strerror})") from None
    if len(raw) > limit:
        raise error(too_big)
    return raw


def file_sha256(path: str | Path) -> str:
    """``"sha256:<hex>"`` of a file's bytes, read in chunks (the file may exceed RAM)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def check_model_dir(path: str | Path, flag: str = "--model", tokenizer: bool = True) -> Path:
    """``path`` as a directory with a config.json (and tokenizer files, unless told not to)."""
    p = Path(path)
    if not p.is_dir():
        what = "no such directory" if not p.exists() else "not a directory"
        raise WorkloadError(f"{flag} {path}: {what} (expected a Hugging Face model directory or 'demo')")
    if not (p / "config.json").is_file():
        raise WorkloadError(f"{flag} {path}: no config.json (not a Hugging Face model directory)")
    if tokenizer and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise WorkloadError(f"{flag} {path}: no tokenizer files (tokenizer.json or tokenizer_config.json)")
    return p


def check_data_file(path: str | Path, flag: str = "--data", demo: bool = False) -> Path:
    """The path of a usable data file: regular, a known extension, within the size ceilings
    of ``workloads.limits`` (the demo's when ``demo``), not blank."""
    regular_file(path, flag, WorkloadError)
    p = Path(path)
    if p.suffix.lower() not in EXTENSIONS:
        raise WorkloadError(f"{flag} {path}: unknown extension {p.suffix!r}; use .txt, .jsonl or .json")
    check_sizes(p, flag, p.suffix.lower() != ".txt" and _starts_with_array(p), demo)
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
def quiet_datasets(progress: bool) -> Iterator[None]:
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


# ------------------------------------------------------------------------ text lines
def read_text_lines(path: str | Path, error: type[Exception] = TextFileError) -> list[str]:
    """The non-empty lines of a UTF-8 --data text file the demo holds in memory, else ``error``.

    At most ``MAX_DATA_BYTES`` bytes and ``MAX_EXAMPLES`` lines; ``\\r`` is stripped.
    """
    lines = _nonblank_lines(_decode(read_data_file(path, error=error), path, "--data", error))
    try:
        check_line_lengths(path, "--data")
    except WorkloadError as e:
        raise error(str(e)) from None
    if not lines:
        raise error(f"--data {path}: no non-empty lines")
    if len(lines) > MAX_EXAMPLES:
        raise error(f"--data {path}: {len(lines)} lines, more than the {MAX_EXAMPLES} the demo holds")
    return lines


def text_lines(path: str | Path, flag: str) -> list[str]:
    """The non-empty lines of a UTF-8 ``.txt`` data file (checked by ``check_data_file``)."""
    p = check_data_file(path, flag, demo=True)
    return _nonblank_lines(_decode(p.read_bytes(), path, flag, WorkloadError))


def _decode(raw: bytes, path: str | Path, flag: str, error: type[Exception]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{flag} {path}: not UTF-8 text (byte {e.start})") from None


def _nonblank_lines(text: str) -> list[str]:
    return [ln for ln in (s.strip("\r") for s in text.split("\n")) if ln.strip()]


# --------------------------------------------------------------------- JSON records
def load_records(
    path: str | Path, flag: str = "--data", cache_dir: str | None = None, progress: bool = True,
    demo: bool = False, pairs: bool = False,
) -> tuple[Any, str]:
    """A data file as a ``datasets.Dataset`` of raw records, and its format (one of FORMATS, or
    ``"pairs"``, only when ``pairs``: the file's first record is one, see :func:`is_pairs_file`).

    For ``.txt`` the records are ``{"text": line}`` for the non-empty lines. The file is
    read as its extension says: never sniffed for (nor opened as) an archive.
    """
    import datasets

    p = check_data_file(path, flag, demo)
    is_txt = p.suffix.lower() == ".txt"
    with quiet_datasets(progress):
        try:
            builder = datasets.load_dataset_builder(
                "text" if is_txt else "json", data_files=str(p), cache_dir=cache_dir
            )
            builder.download_and_prepare(dl_manager=_plain_files())
            ds = builder.as_dataset(split="train")
        except Exception as e:  # arrow / datasets raise many types; find the line ourselves
            raise unreadable(p, flag, e) from None
        if is_txt:
            ds = ds.filter(lambda r: bool(r["text"].strip()), desc="non-empty lines")
    if len(ds) == 0:
        raise WorkloadError(f"{flag} {path}: no examples")
    if is_txt:
        return ds, "text"
    fmt = detect_format(ds.column_names)
    if fmt == "pairs" and not pairs:  # the first record is not a pair (is_pairs_file): a later one is
        first = next((i for i, r in enumerate(ds) if r.get("anchor") or r.get("positive")), 0)
        raise WorkloadError(f"{flag} {path} {record_location(p, first)}: an anchor/positive pair among "
                            f"{KNOWN_FIELDS} records (one format per file)")
    if fmt is None:
        raise WorkloadError(
            f"{flag} {path} {record_location(p, 0)}: a record with none of the fields {KNOWN_FIELDS} "
            f"(fields: {', '.join(ds.column_names)})"
        )
    return ds, fmt


def is_pairs_file(path: str | Path) -> bool:
    """Whether a checked data file's first record has an ``anchor`` or ``positive`` (pairs train an
    embedding model). Reads that record only; an unreadable one is False (the full read says why)."""
    if Path(path).suffix.lower() == ".txt":
        return False
    with open(path, "rb") as f:
        text = f.read(1 << 20).decode("utf-8", errors="ignore").lstrip()
    try:
        if text.startswith("["):
            first, _ = json.JSONDecoder().raw_decode(text[1:].lstrip())
        else:
            first = json.loads(text.split("\n", 1)[0])
    except ValueError:
        return False
    return isinstance(first, dict) and ("anchor" in first or "positive" in first)


def _plain_files() -> Any:
    """A ``datasets`` download manager that hands local files over as they are.

    Its default sniffs every data file for archives and compression (a 1 GiB file of
    NUL bytes hangs in ``tarfile``) and would decompress a gzip named ``.jsonl``."""
    import datasets

    class PlainFiles(datasets.DownloadManager):
        def download(self, url_or_urls: Any) -> Any:
            return url_or_urls

        def extract(self, path_or_paths: Any) -> Any:
            return path_or_paths

    return PlainFiles()


def detect_format(columns: Sequence[str]) -> str | None:
    """The file's format from its columns (TRL's precedence), or None when none is known."""
    if "anchor" in columns or "positive" in columns:
        return "pairs"  # checked record by record in workloads.pairs: a file mixing formats is refused
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
        raise BadRecord(index, f"a record with none of the fields {KNOWN_FIELDS}")
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
