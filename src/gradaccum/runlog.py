"""What a run leaves in its output directory, and the guard around that directory.

- ``metrics.jsonl``: one JSON object per optimizer step, appended as the run goes. It
  is a log: the checkpoint carries the same rows (:class:`MetricsHistory`), so on
  ``--resume`` the file is rewritten from the checkpoint, whatever happened to it.
- ``summary.json`` and ``loss.png``: written at the end of a run.
- The guard: an ``--out`` that already holds a run is refused unless the run is
  resumed or overwritten, outputs that are not regular files are refused, and a lock
  file (``.gradaccum.lock``, ``flock``-ed for the life of the run, naming its holder)
  keeps two runs out of one directory.

Nothing here needs torch; the trainer feeds it rows and calls it at the right moments.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import stat
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PLOT = "loss.png"
MODEL_DIR = "model"  # OUT/model: save_pretrained form (HF models and LoRA adapters)
LOCK = ".gradaccum.lock"
OUTPUTS = (METRICS, CHECKPOINT, SUMMARY, PLOT)
RUN_MARKERS = (METRICS, CHECKPOINT)
"""Files whose presence means the directory already holds a run."""


class OutDirError(ValueError):
    """An output directory that cannot be used: bad input (exit 2), nothing was touched."""


class OutputWriteError(RuntimeError):
    """Writing an output failed mid-run (disk full, I/O error): one line, exit 1."""


# --------------------------------------------------------------------------- the guard
def check_out_path(out: str | Path, flag: str = "--out") -> Path:
    """The output directory as a Path, or OutDirError if it can never be one.

    Read-only: refuses the empty string, a path under a regular file, a path that
    exists and is not a directory, and names the OS cannot take (NUL bytes, too long).
    """
    text = os.fspath(out)
    if not str(text).strip():
        raise OutDirError(f"{flag}: empty path (give a directory, e.g. {flag} runs/my-run)")
    path = Path(text)
    try:
        if path.exists() and not path.is_dir():
            raise OutDirError(f"{flag} {path}: exists and is not a directory")
        if path.is_symlink() and not path.exists():
            raise OutDirError(f"{flag} {path}: is a broken symbolic link")
        for parent in path.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise OutDirError(f"{flag} {path}: {parent} is a file, not a directory")
                break
            if parent.is_symlink():  # a dangling link on the way
                raise OutDirError(f"{flag} {path}: {parent} is a broken symbolic link")
    except (OSError, ValueError) as e:
        if isinstance(e, OutDirError):
            raise
        raise OutDirError(f"{flag} {_show(text)}: unusable path ({_reason(e)})") from None
    return path


def nearest_existing(path: Path) -> Path:
    for p in (path.absolute(), *path.absolute().parents):
        if p.exists():
            return p
    return Path("/")


def check_writable(out: Path, flag: str = "--out") -> None:
    """OutDirError unless files can be created in ``out`` (or where it will be created).

    Probes by creating and removing a temporary directory: this catches read-only file
    systems, immutable directories and permissions, even for root, where os.access lies.
    """
    where = nearest_existing(out)
    try:
        probe = tempfile.mkdtemp(prefix=".gradaccum-probe-", dir=where)
        os.rmdir(probe)
    except OSError as e:
        if e.errno == errno.EROFS:
            why = "read-only file system"
        elif e.errno in (errno.ENOSPC, errno.EDQUOT):
            why = "the disk is full"
        elif e.errno in (errno.EACCES, errno.EPERM):
            why = "permission denied (or an immutable directory)"
        else:
            why = _reason(e)
        where_txt = "" if where == out.absolute() else f" (in {where})"
        raise OutDirError(f"{flag} {out}: cannot write there{where_txt}: {why}") from None


def holds_run(out: Path) -> bool:
    return any(os.path.lexists(out / name) for name in RUN_MARKERS)


def check_outputs_are_files(out: Path, flag: str = "--out") -> None:
    """Every output name that exists must be a regular file (or a link to one)."""
    for name in OUTPUTS:
        p = out / name
        try:
            st = os.stat(p)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise OutDirError(f"{flag} {out}: cannot use {p} ({_reason(e)})") from None
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise OutDirError(f"{flag} {out}: {p} is {kind}; move it away (the run writes that file)")


def guard(out: str | Path, resume: bool, overwrite: bool, flag: str = "--out", locked: bool = False) -> Path:
    """Refuse an output directory this run must not write into (read-only checks).

    ``locked``: this process already holds the directory's lock (skip that check).
    """
    out = check_out_path(out, flag)
    if resume and overwrite:
        raise OutDirError("--resume and --overwrite contradict each other: give one")
    holder = None if locked else lock_holder(out)
    if holder is not None:
        raise OutDirError(f"{flag} {out}: in use by another gradaccum run ({holder}); wait for it or "
                          f"choose another {flag}")
    if out.is_dir():
        check_outputs_are_files(out, flag)
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise OutDirError(f"--resume: no checkpoint at {out / CHECKPOINT}")
    elif holds_run(out) and not overwrite:
        raise OutDirError(
            f"{flag} {out}: already holds a run ({', '.join(n for n in RUN_MARKERS if (out / n).exists())}); "
            "add --resume to continue it or --overwrite to replace it"
        )
    check_writable(out, flag)
    return out


def clear_outputs(out: Path) -> None:
    """--overwrite: remove the previous run's outputs (only the files gradaccum writes)."""
    import shutil

    for name in OUTPUTS:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    if (out / MODEL_DIR).is_dir() and not (out / MODEL_DIR).is_symlink():
        shutil.rmtree(out / MODEL_DIR)


# --------------------------------------------------------------------------- the lock
def lock_holder(out: Path) -> str | None:
    """Who holds ``out``'s lock, or None when nobody does. Read-only."""
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_text(fd)
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _holder_text(fd: int) -> str:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 500, 0).decode("utf-8", "replace").strip()
        if text:
            return text.splitlines()[0]
    return "holder unknown"


class RunLock:
    """An exclusive ``flock`` on ``OUT/.gradaccum.lock`` for the life of a run.

    The file names its holder (pid, host, start time). It is removed on release; a
    process that locked a file another one had just removed notices (the path no
    longer points at its file) and tries again, so two runs never both hold it. A
    killed run's lock dies with its process (the kernel drops flock locks).
    """

    def __init__(self, out: Path, flag: str = "--out") -> None:
        self.out, self.flag = Path(out), flag
        self.path = self.out / LOCK
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise OutDirError(
                    f"{self.flag} {self.out}: cannot create the lock file ({_reason(e)})"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_text(fd)
                os.close(fd)
                raise OutDirError(
                    f"{self.flag} {self.out}: in use by another gradaccum run ({holder}); wait for it or "
                    f"choose another {self.flag}"
                ) from None
            except OSError as e:
                os.close(fd)
                raise OutDirError(f"{self.flag} {self.out}: cannot lock ({_reason(e)})") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released and removed by its previous holder under our feet
                os.close(fd)
                continue
            self.fd = fd
            when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            text = f"pid {os.getpid()} on host {socket.gethostname()} since {when}\n"
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, text.encode(), 0)
            return self
        raise OutDirError(f"{self.flag} {self.out}: could not take the lock (it keeps changing)")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: see the class docstring
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------- metrics
class MetricsHistory:
    """Every metrics row of the run so far, kept column-wise (compact, exact).

    Its :meth:`state_dict` (plain lists of numbers, strings and None) goes into the
    checkpoint, so the checkpoint alone can rebuild metrics.jsonl.
    """

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {}
        self.absent: dict[str, list[int]] = {}
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def append(self, row: dict[str, Any]) -> None:
        n = self.length
        for key, value in row.items():
            if key not in self.columns:
                self.columns[key] = [None] * n
                self.absent[key] = list(range(n))
            self.columns[key].append(value)
        for key, col in self.columns.items():
            if len(col) == n:  # this row lacks the key
                col.append(None)
                self.absent[key].append(n)
        self.length = n + 1

    def row(self, i: int) -> dict[str, Any]:
        return {k: col[i] for k, col in self.columns.items() if not self._is_absent(k, i)}

    def _is_absent(self, key: str, i: int) -> bool:
        absent = self.absent.get(key)
        if not absent:
            return False
        import bisect

        j = bisect.bisect_left(absent, i)
        return j < len(absent) and absent[j] == i

    def rows(self) -> list[dict[str, Any]]:
        return [self.row(i) for i in range(self.length)]

    def column(self, key: str) -> list[Any]:
        return list(self.columns.get(key, []))

    def truncate(self, n: int) -> None:
        n = max(0, min(n, self.length))
        for key in self.columns:
            del self.columns[key][n:]
            self.absent[key] = [i for i in self.absent[key] if i < n]
        self.length = n

    def state_dict(self) -> dict[str, Any]:
        return {"length": self.length, "columns": {k: list(v) for k, v in self.columns.items()},
                "absent": {k: list(v) for k, v in self.absent.items() if v}}

    @classmethod
    def from_state(cls, state: Any) -> MetricsHistory:
        """Rebuild from :meth:`state_dict`; ValueError if the structure is not one."""
        if not isinstance(state, dict):
            raise ValueError("metrics history is not a dict")
        length, columns, absent = state.get("length"), state.get("columns"), state.get("absent", {})
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError("metrics history length is not a non-negative integer")
        if not isinstance(columns, dict) or not isinstance(absent, dict):
            raise ValueError("metrics history columns are malformed")
        h = cls()
        for key, col in columns.items():
            if not isinstance(key, str) or not isinstance(col, list) or len(col) != length:
                raise ValueError(f"metrics history column {key!r} is malformed")
            if any(v is not None and not isinstance(v, (int, float, str, bool)) for v in col):
                raise ValueError(f"metrics history column {key!r} holds non-scalar values")
            idx = absent.get(key, [])
            if not isinstance(idx, list) or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < length for i in idx
            ):
                raise ValueError(f"metrics history column {key!r} is malformed")
            h.columns[key] = list(col)
            h.absent[key] = sorted(set(idx))
        h.length = length
        return h


def _dumps(row: dict[str, Any]) -> str:
    return json.dumps(row)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The usable rows of a metrics.jsonl, tolerating damage.

    Skips lines that are not UTF-8, not JSON, not an object, or whose ``step`` is not a
    positive integer (a torn last line after a kill is the common case). A missing file
    gives no rows; one that cannot be read at all raises OSError.
    """
    rows = []
    if not path.exists():
        return rows
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                continue
            if not isinstance(row, dict):
                continue
            step = row.get("step")
            if isinstance(step, bool) or not isinstance(step, int) or step < 1:
                continue
            rows.append(row)
    return rows


def write_metrics(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace metrics.jsonl atomically with exactly ``rows``."""
    from gradaccum.checkpoint import atomic_write_bytes

    text = "".join(_dumps(r) + "\n" for r in rows)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def legacy_rows_upto(path: Path, step: int) -> list[dict[str, Any]]:
    """For checkpoints without a metrics history: the file's valid rows 1..step, once each."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in read_metrics(path):
        if r["step"] <= step:
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


class MetricsLog:
    """Appends one JSON line per step to metrics.jsonl, flushed at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: TextIO | None = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, row: dict[str, Any]) -> None:
        assert self.file is not None
        self.file.write(_dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None


# --------------------------------------------------------------------------- summary
def write_summary(path: Path, summary: dict[str, Any]) -> None:
    from gradaccum.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))


# --------------------------------------------------------------------------- plots
@dataclass(frozen=True)
class Series:
    key: str
    label: str
    axis: str = "left"  # "left" or "right" (a twin y axis)
    log: bool = False
    style: str = "-"


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: tuple[Series, ...]
    right_ylabel: str = ""
    always: bool = False  # drawn even when none of its series has data
    needs: str = ""  # drawn only when some row has this key


PANELS: tuple[Panel, ...] = (
    Panel("loss", "mean loss per item",
          (Series("loss", "train loss"), Series("eval_loss", "eval loss", style="o-")), always=True),
    Panel("optimiser", "learning rate", (Series("lr", "learning rate"),
                                         Series("grad_norm", "gradient norm (before clipping)", axis="right",
                                                log=True)),
          right_ylabel="gradient norm", always=True),
    Panel("critical batch (gradient noise scale)", "examples",
          (Series("critical_batch", "measured critical batch", log=True),
           Series("effective_batch", "effective batch in use", style="--")), needs="critical_batch"),
)
"""loss.png's panels, left to right. A series is drawn when some row has its key, so
new metrics (eval loss, noise scale) only need an entry here."""


def _points(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot_losses(rows: Sequence[dict[str, Any]], path: Path, panels: Sequence[Panel] = PANELS) -> None:
    """loss.png: the loss, then learning rate and gradient norm, then any optional panel with data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradaccum.checkpoint import atomic_write_bytes

    rows = [r for r in rows if not r.get("skipped") and isinstance(r.get("step"), int)]
    shown = [p for p in panels
             if p.always or (_points(rows, p.needs)[0] if p.needs else any(_points(rows, s.key)[0]
                                                                          for s in p.series))]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), constrained_layout=True,
                             squeeze=False)
    for ax, panel in zip(axes[0], shown, strict=True):
        right = None
        handles = []
        for i, s in enumerate(panel.series):
            xs, ys = _points(rows, s.key)
            if not xs:
                continue
            if s.axis == "right":
                right = right or ax.twinx()
                target = right
            else:
                target = ax
            (line,) = target.plot(xs, ys, s.style, lw=1.2, ms=3, color=f"C{i}", label=s.label)
            if s.log and min(ys) > 0:
                target.set_yscale("log")
            handles.append(line)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(panel.ylabel)
        if right is not None:
            right.set_ylabel(panel.right_ylabel)
        ax.set_title(panel.title)
        ax.grid(alpha=0.3)
        if len(handles) > 1:
            ax.legend(handles=handles, loc="best", fontsize="small")
    batches = [r["effective_batch"] for r in rows if isinstance(r.get("effective_batch"), int)]
    eb = "?" if not batches else (str(batches[0]) if min(batches) == max(batches)
                                  else f"{batches[0]} -> {batches[-1]}, auto")
    fig.suptitle(f"gradaccum (effective batch {eb})")
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# --------------------------------------------------------------------------- helpers
def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def write_error(path: Path, e: OSError, what: str) -> OutputWriteError:
    """One line for an OSError while writing ``path``."""
    why = "the disk is full (no space left on device)" if is_disk_full(e) else f"write failed ({_reason(e)})"
    return OutputWriteError(f"{path}: {why} while {what}")


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def _show(text: Any) -> str:
    s = str(text)
    return s if len(s) <= 80 else s[:77] + "..."
