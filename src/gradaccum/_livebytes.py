"""Live-bytes accounting for the memory planner: which storages a step allocates and holds.

:class:`PeakTracker` follows every storage an aten op allocates (a ``TorchDispatchMode``)
and :class:`SavedTensorCounter` the tensors autograd saves for backward, each storage
counted once. Both work the same on CPU and on CUDA. Private: the planner's measurement
(:mod:`gradaccum._memprofile`) is their user; :mod:`gradaccum.memory` re-exports PeakTracker.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def normalize_device(device: torch.device | str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return normalize_device(t.device)
    return torch.device("cpu")


def storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(data_ptr, nbytes) of the tensor's underlying storage; None when it has none."""
    try:
        s = t.untyped_storage()
        ptr = s.data_ptr()  # a DTensor's wrapper storage raises here
    except (RuntimeError, NotImplementedError):  # sparse, mkldnn, DTensor and other subclasses
        return None
    return None if ptr == 0 else (ptr, s.nbytes())


# --------------------------------------------------------------------------- live-bytes tracking
class PeakTracker(TorchDispatchMode):
    """Peak bytes of tensor storages allocated inside the ``with`` block and alive at once.

    Every aten op's outputs are seen; a storage counts from the op that allocated it
    until its last reference dies (checked through a storage weak reference before each
    later op). Views and in-place results alias an input, so they add nothing. Only
    storages on ``device`` count. This mirrors what ``torch.cuda.max_memory_allocated``
    reports for the same code, minus allocator rounding and kernel-internal workspaces,
    and it works on CPU. Memory that existed before the block is not counted.
    """

    def __init__(self, device: torch.device | str = "cpu", record: bool = False) -> None:
        super().__init__()
        self.device = normalize_device(device)
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.record = record
        self.timeline: list[int] = []
        """With ``record``: live bytes after every op."""
        self.ops: list[str] = []
        """With ``record``: the op names, to check that two timelines line up."""

    def _sweep(self) -> None:
        dead = [ptr for ptr, (ref, _) in self._live.items() if ref.expired()]
        for ptr in dead:
            self.live_bytes -= self._live.pop(ptr)[1]

    def current_bytes(self) -> int:
        """Bytes allocated inside the block that are alive right now."""
        self._sweep()
        return self.live_bytes

    def track_storage(self, storage: Any) -> None:
        """Count a storage allocated where the dispatcher does not see it (e.g. FSDP2's resize_)."""
        ptr = storage.data_ptr()
        if ptr != 0 and ptr not in self._live:
            self._live[ptr] = (StorageWeakRef(storage), storage.nbytes())
            self.live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def forget_storage(self, storage: Any) -> None:
        """Stop counting a storage freed where the dispatcher does not see it."""
        entry = self._live.pop(storage.data_ptr(), None)
        if entry is not None:
            self.live_bytes -= entry[1]

    def is_tracked(self, t: torch.Tensor) -> bool:
        """True when ``t``'s storage was allocated inside the block and is still alive."""
        key = storage_key(t)
        entry = self._live.get(key[0]) if key else None
        return entry is not None and not entry[0].expired()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self._sweep()
        inputs = {k[0] for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and (k := storage_key(t)) is not None}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or normalize_device(t.device) != self.device:
                continue
            key = storage_key(t)
            if key is None or key[0] in inputs:
                continue
            ptr, nbytes = key
            old = self._live.get(ptr)
            if old is not None:
                # Same live storage seen again (or resized): keep one entry, latest size.
                self.live_bytes += nbytes - old[1]
                self._live[ptr] = (old[0], nbytes)
                continue
            self._live[ptr] = (StorageWeakRef(t.untyped_storage()), nbytes)
            self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if self.record:
            self.timeline.append(self.live_bytes)
            self.ops.append(str(func))
        return out

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._sweep()


class SavedTensorCounter:
    """Bytes saved for backward, each underlying storage counted once, parameters excluded."""

    def __init__(self, device: torch.device, excluded: set[int], tracker: PeakTracker) -> None:
        self.device = device
        self.excluded = excluded
        self.tracker = tracker
        self._saved: dict[int, tuple[StorageWeakRef, int]] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if normalize_device(t.device) == self.device:
            key = storage_key(t)
            if key is not None and key[0] not in self.excluded:
                ptr, nbytes = key
                if not self.tracker.is_tracked(t):
                    # Allocated before the step (e.g. a view of a dataset already in
                    # memory): only the viewed part is this micro-batch's.
                    nbytes = min(nbytes, t.numel() * t.element_size())
                old = self._saved.get(ptr)
                if old is None or old[0].expired():
                    self._saved[ptr] = (StorageWeakRef(t.untyped_storage()), nbytes)
                elif nbytes > old[1]:
                    self._saved[ptr] = (old[0], nbytes)
        return t  # identity: the measurement must not change what is kept

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def live_bytes(self) -> int:
        return sum(n for ref, n in self._saved.values() if not ref.expired())


def unique_bytes(tensors: Iterable[torch.Tensor], device: torch.device, exclude: set[int]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if normalize_device(t.device) != device:
            continue
        key = storage_key(t)
        if key is not None and key[0] not in exclude:
            seen[key[0]] = max(seen.get(key[0], 0), key[1])
    return sum(seen.values())
