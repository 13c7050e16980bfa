"""The ``--out`` claim: which directory a run may write into, and the lock that keeps it.

- An ``--out`` that already holds a run (``metrics.jsonl`` or ``checkpoint.pt``) is
  refused unless the run is resumed or overwritten; outputs that are not regular files
  are refused; every check here is read-only until the claim succeeds.
- ``.gradaccum.lock``, ``flock``-ed for the life of the run, names its holder and
  keeps two runs out of one directory; it dies with its process.
- Under torch.distributed rank 0 decides and every rank learns the verdict.

Nothing here needs torch beyond the one-flag agreement in :mod:`gradaccum.sync`.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

from gradaccum import sync
from gradaccum.errors import one_line

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PLOT = "loss.png"
CONFIG = "config.json"  # the resolved run
MODEL_DIR = "model"  # OUT/model: save_pretrained form (HF models and LoRA adapters)
TENSORBOARD_DIR = "tensorboard"  # --report-to tensorboard's event files
TRACKERS = "trackers.json"  # --report-to: what each tracker was sent (trackers.LEDGER)
LOCK = ".gradaccum.lock"
OUTPUTS = (METRICS, CHECKPOINT, SUMMARY, PLOT, CONFIG, TRACKERS)
RUN_MARKERS = (METRICS, CHECKPOINT)
"""Files whose presence means the directory already holds a run."""


class OutDirError(ValueError):
    """An output directory that cannot be used: bad input (exit 2), nothing was touched."""


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
        raise OutDirError(f"{flag} {short(text)}: unusable path ({one_line(e)})") from None
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
            why = one_line(e)
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
            raise OutDirError(f"{flag} {out}: cannot use {p} ({one_line(e)})") from None
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise OutDirError(f"{flag} {out}: {p} is {kind}; move it away (the run writes that file)")


def guard(out: str | Path, resume: bool, overwrite: bool, flag: str = "--out", locked: bool = False) -> Path:
    """Refuse an output directory this run must not write into (read-only checks).

    ``locked``: this process already holds the directory's lock (skip that check).
    """
    out = check_out_path(out, flag)
    check_mode(resume, overwrite)
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
    for folder in (MODEL_DIR, TENSORBOARD_DIR):  # the old run's events would mix with the new one's
        if (out / folder).is_dir() and not (out / folder).is_symlink():
            shutil.rmtree(out / folder)


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
                    f"{self.flag} {self.out}: cannot create the lock file ({one_line(e)})"
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
                raise OutDirError(f"{self.flag} {self.out}: cannot lock ({one_line(e)})") from None
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


# --------------------------------------------------------------------------- the claim
def check_mode(resume: bool, overwrite: bool) -> None:
    """Resuming a run and replacing it cannot both be asked."""
    if resume and overwrite:
        raise OutDirError("--resume and --overwrite contradict each other: give one")


def precheck(out: str | Path, resume: bool, overwrite: bool) -> Path:
    """Rank 0 checks ``out`` (read-only: nothing is created); every rank learns the verdict."""
    error = None
    if sync.rank() == 0:
        try:
            guard(out, resume, overwrite)
        except OutDirError as e:
            error = e
    if sync.any_rank(error is not None) and error is None:
        error = OutDirError(f"--out {out}: refused by rank 0 (see its message)")
    if error is not None:
        raise error
    return Path(out)


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """Identity of a file (inode, size, mtime): tells whether another run rewrote it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def claim(out: Path, resume: bool, overwrite: bool, checkpoint_stamp: Any = None) -> RunLock | None:
    """Rank 0 checks ``out`` again, creates and locks it; every rank learns whether that worked.

    ``checkpoint_stamp``: the checkpoint's :func:`file_stamp` when it was read for a resume,
    so a checkpoint rewritten meanwhile by another run is refused.
    """
    lock, error = None, None
    if sync.rank() == 0:
        try:
            guard(out, resume, overwrite)
            out.mkdir(parents=True, exist_ok=True)
            lock = RunLock(out).acquire()
            # Checked again under the lock: another run may have finished meanwhile.
            guard(out, resume, overwrite, locked=True)
            if resume and file_stamp(out / CHECKPOINT) != checkpoint_stamp:
                raise OutDirError(f"{out / CHECKPOINT}: changed while this run was starting "
                                  "(another run wrote it); try again")
        except OutDirError as e:
            error = e
        except OSError as e:
            error = OutDirError(f"--out {out}: cannot create the directory ({one_line(e)})")
        if error is not None and lock is not None:
            lock.release()
            lock = None
    if sync.any_rank(error is not None) and error is None:
        error = OutDirError(f"--out {out}: refused by rank 0 (see its message)")
    if error is not None:
        raise error
    return lock


def check_report_dir(out: str | Path, names: tuple[str, ...], flag: str = "--out") -> Path:
    """A directory for a command's report files (bench, compare): usable, and ``names`` are files."""
    path = check_out_path(out, flag)
    check_writable(path, flag)
    for name in names:
        if (path / name).exists() and not (path / name).is_file():
            raise OutDirError(f"{flag} {path}: {path / name} is not a regular file")
    return path


def short(text: Any) -> str:
    s = str(text)
    return s if len(s) <= 80 else s[:77] + "..."


def prepare(out: Path) -> None:
    """Once claimed: the temporary files a killed save left beside the outputs go."""
    from gradaccum import checkpoint

    checkpoint.remove_stale_temps(out, (*OUTPUTS, MODEL_DIR))
