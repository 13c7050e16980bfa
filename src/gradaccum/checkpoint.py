"""Atomic save and safe load of training checkpoints.

Saves go to a temporary file in the same directory, are fsynced, then renamed over
the target: a kill at any moment leaves either the old checkpoint or the new one.
Loads use ``weights_only=True``, so a file that would run code when unpickled is
refused, never executed.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from gradaccum.errors import one_line


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, unsafe or not gradaccum's."""


def atomic_write_bytes(path: str | Path, write: Any) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable.
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_dir(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_dir)`` on a fresh directory beside ``path``, then swap it into place.

    A kill at any moment leaves the old directory or the new one under ``path`` (during
    the two renames, at worst the old one under ``.NAME.old``, which the next save removes).
    """
    import shutil

    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = path.parent / f".{path.name}.old"
    try:
        write(tmp)
        _follow_umask(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)  # put the previous one back
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(folder: str | Path, names: tuple[str, ...]) -> None:
    """Delete temp files that a kill in the middle of ``atomic_write_bytes`` left behind."""
    import shutil

    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            if tmp.is_dir() and not tmp.is_symlink():  # an atomic_write_dir cut short
                shutil.rmtree(tmp, ignore_errors=True)
                continue
            with contextlib.suppress(OSError):
                tmp.unlink()


def _follow_umask(root: Path) -> None:
    """mkdtemp makes 0700 and some writers (safetensors) 0600: give the directory and what is in
    it the modes the user's umask asks for, so others on a shared machine can load the model."""
    mask = _umask()
    for d, _, files in os.walk(root):
        os.chmod(d, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(d, f), 0o666 & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(obj: dict[str, Any], path: str | Path) -> None:
    """Atomically ``torch.save`` ``obj`` to ``path``."""
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def load(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; CheckpointError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        with warnings.catch_warnings():  # torch warns about a pickle it then refuses: one line is ours
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: not a plain weights file (it would run code when unpickled)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({one_line(e, 120)})") from None
    if not isinstance(obj, dict) or obj.get("format") != "gradaccum" or not set(required) <= set(obj):
        raise CheckpointError(f"{path}: not a gradaccum checkpoint")
    return obj


# --------------------------------------------------------------------------- errors
def os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (its context or cause chain), if any."""
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def as_os_error(path: Path) -> OSError:
    """torch's writer reports "file write failed": find out whether the disk is full."""
    import errno
    import shutil

    try:
        full = shutil.disk_usage(path.parent).free < 1 << 20
    except OSError:
        full = False
    return OSError(errno.ENOSPC if full else errno.EIO, os.strerror(errno.ENOSPC if full else errno.EIO))
