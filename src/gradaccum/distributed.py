"""Process-group set-up for ``torchrun``: initialise from the environment, tear down after.

torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; we only
read them through torch.distributed's ``env://`` rendezvous. A timeout on the group
makes a dead or hung rank an error on the survivors instead of a hang:

- a peer that *dies* closes its sockets, so gloo fails the next collective at once
  ("Connection closed by peer");
- a peer that *hangs* keeps them open, so the survivors fail when a collective has
  waited ``GRADACCUM_TIMEOUT_S`` seconds (default 300).

:func:`failure_message` turns either into one line for the command line.
"""

from __future__ import annotations

import datetime
import math
import os

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "GRADACCUM_TIMEOUT_S"

# Phrases in the errors gloo, nccl and the TCP store raise when a peer is gone or
# silent. torch raises plain RuntimeError for several of them, so the type alone is
# not enough; we only look at them while a process group is up (or for DistError).
_PEER_FAILURE_MARKERS = (
    "connection closed",
    "connection reset",
    "connection refused",
    "broken pipe",
    "failed to recv",
    "timed out",
    "timeout",
    "remote worker",
    "communicator was aborted",
    "ncclremoteerror",
    "ncclsystemerror",
)


class DistributedSetupError(ValueError):
    """The environment describes a process group we cannot join (bad timeout, bad world)."""


def _env_int(name: str, low: int, high: int | None = None) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        raise DistributedSetupError(f"{name}={text!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise DistributedSetupError(f"{name}={value} must be {bound}")
    return value


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process group; DistributedSetupError when
    it describes one only half (a variable missing or malformed)."""
    world = _env_int("WORLD_SIZE", 1)
    if world is None or world == 1:
        return False
    rank = _env_int("RANK", 0, world - 1)
    if rank is None:
        raise DistributedSetupError(f"WORLD_SIZE={world} but RANK is not set (launch with torchrun)")
    _env_int("LOCAL_RANK", 0)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name, "").strip():
            raise DistributedSetupError(
                f"WORLD_SIZE={world} but {name} is not set: the ranks cannot find each other "
                "(launch with torchrun)"
            )
    _env_int("MASTER_PORT", 1, 65535)
    return True


def timeout_seconds(timeout_s: float | None = None) -> float:
    """The collective timeout: ``timeout_s`` if given, else $GRADACCUM_TIMEOUT_S, else 300 s."""
    if timeout_s is not None:
        value, source = timeout_s, "timeout_s"
    elif os.environ.get(TIMEOUT_ENV, "").strip():
        text = os.environ[TIMEOUT_ENV].strip()
        try:
            value = float(text)
        except ValueError:
            raise DistributedSetupError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
        source = TIMEOUT_ENV
    else:
        return DEFAULT_TIMEOUT_S
    if not (math.isfinite(value) and value > 0):
        raise DistributedSetupError(f"{source} must be a positive number of seconds, got {value}")
    return float(value)


def backend() -> str:
    """gloo for CPU tensors, and nccl for CUDA tensors when there is a GPU.

    The model may stay on the CPU even on a GPU machine, so a GPU machine gets a group
    that serves both devices rather than nccl alone (which rejects CPU tensors).
    """
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def setup_from_env(timeout_s: float | None = None) -> bool:
    """Join the process group torchrun describes; False if not launched so.

    ``timeout_s`` (else $GRADACCUM_TIMEOUT_S, else 300) bounds the rendezvous and
    every collective, so a rank that never arrives, dies or hangs is an error on the
    others within that time.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return dist.is_initialized()
    timeout = timeout_seconds(timeout_s)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend(), timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError, OSError) as e:
        text = str(e).strip()
        if "timed out" in text.lower() or "timeout" in text.lower():
            raise  # a rank that never arrived: a runtime failure (exit 1), not bad input
        first = _strip_location(text.splitlines()[0]) if text else type(e).__name__
        addr = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise DistributedSetupError(f"cannot join the process group at {addr} ({first[:200]})") from None
    return True


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def failure_message(exc: BaseException) -> str | None:
    """One line describing a lost or silent peer, or None when ``exc`` is something else."""
    if not isinstance(exc, (RuntimeError, OSError)):
        return None
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    low = text.lower()
    dist_error = isinstance(exc, getattr(dist, "DistError", ()))
    group_up = dist.is_available() and dist.is_initialized()
    if not (dist_error or (group_up and any(m in low for m in _PEER_FAILURE_MARKERS))):
        return None
    where = ""
    if group_up:
        where = f"rank {dist.get_rank()} of {dist.get_world_size()}: "
    silent = "timed out" in low or "timeout" in low
    cause = (
        "a peer process did not answer in time (hung, or too slow)"
        if silent
        else "lost contact with a peer process (it crashed or was killed)"
    )
    return f"{where}{cause}; check the other ranks' output ({_strip_location(first)[:200]})"


def _strip_location(line: str) -> str:
    """The backend's first sentence, without gloo's "[.../pair.cc:534] " source prefix."""
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line.split(". ", 1)[0].rstrip(".")
