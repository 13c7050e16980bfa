"""Process-group set-up for ``torchrun``: initialise from the environment, tear down after.

torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; we only
read them through torch.distributed's ``env://`` rendezvous. A timeout on the group
makes a dead or hung rank an error on the survivors instead of a hang.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def setup_from_env(timeout_s: float | None = None) -> bool:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); False if not launched so."""
    if not launched_by_torchrun() or dist.is_initialized():
        return dist.is_initialized()
    timeout = float(os.environ.get("GRADACCUM_TIMEOUT_S", timeout_s or DEFAULT_TIMEOUT_S))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return True


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
