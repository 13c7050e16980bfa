"""Memory planner: measure what a training step costs, choose the micro-batch for a budget.

The peak memory of training at micro-batch n is modelled as

    raw_peak(n)  = state + max(in_flight(n), step_transient) + batch(n)
    state        = parameters + buffers + gradients + optimizer state
                   (+ gradaccum's grad_dtype buffers, + DDP's gradient buckets)
    in_flight(n) = peak of the bytes a micro-batch's forward+backward allocates and holds
                   at once: the batch, activations saved for backward, logits, gradients
                   in flight
    batch(n)     = one more micro-batch of input: Accumulator.step fetches the next one
                   before running the current one
    predicted(n) = ceil(raw_peak(n) * (1 + margin)),   margin = 10% by default

Gradients are counted as present during the forward, which is the steady state of an
accumulation window (micro-batches 2..k add into gradients that already exist), so one
number covers a whole k-micro-batch window.

Everything is *measured* on a deep copy of the model, never guessed per layer or per
optimizer type: optimizer state after one real ``optimizer.step()``; activations with
``torch.autograd.graph.saved_tensors_hooks`` (each storage counted once, parameters
excluded); the in-flight peak with a ``TorchDispatchMode`` that follows every storage
the step allocates (:class:`PeakTracker`). The same ops run at every micro-batch size
with tensors whose sizes are affine in n, so the live bytes after each op are a line in
n; measuring two sizes gives every line and the peak is their maximum. This works the
same way on CPU and on CUDA, so plans can be made and tested without a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import decimal
import math
import os
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gradaccum import sync
from gradaccum.accumulator import Accumulator

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, int | torch.Tensor]"]
MakeBatch = Callable[[int], Any]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

DEFAULT_MARGIN = 0.10
"""Safety margin on the predicted peak: covers allocator rounding and fragmentation and
kernel workspaces (e.g. cuBLAS) that no Python-level accounting can see."""

CPU_BUDGET_SHARE = 0.5
"""Share of the available RAM (``MemAvailable``) used as the default budget on CPU."""

DEFAULT_MEASURE_SIZES = (1, 2, 4, 8)
"""Micro-batch sizes measured for the linear fit (capped at the largest candidate)."""


class BudgetTooSmall(ValueError):
    """Even micro-batch 1 is predicted not to fit the memory budget."""

    def __init__(self, needed_bytes: int, budget_bytes: int, margin: float = DEFAULT_MARGIN) -> None:
        self.needed_bytes = int(needed_bytes)
        self.budget_bytes = int(budget_bytes)
        super().__init__(
            f"memory budget {format_bytes(budget_bytes)} is too small: micro-batch 1 needs at least "
            f"{format_bytes(needed_bytes, round_up=True)} ({needed_bytes} bytes, "
            f"including a {margin:.0%} safety margin)"
        )


# --------------------------------------------------------------------------- sizes
_UNITS = {
    "": 1, "b": 1,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*([+-]?)\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in a size like ``"1048576"``, ``"512MiB"``, ``"1.5 GiB"`` or ``"2GB"``.

    Binary units B, KiB, MiB, GiB, TiB and decimal units KB, MB, GB, TB are accepted,
    case-insensitive, with an optional space. A fractional size is rounded down to
    whole bytes. Raises ValueError (one line) for anything else, and for sizes < 1 byte.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}: expected e.g. 512MiB, 2GB or 1048576")
    if isinstance(text, int):
        if text < 1:
            raise ValueError(f"invalid size {text}: must be at least 1 byte")
        return text
    if not isinstance(text, str):
        raise ValueError(f"invalid size {text!r}: expected a string such as 512MiB")
    m = _SIZE_RE.match(text)
    if m is None:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional unit, e.g. 512MiB")
    sign, number, unit = m.groups()
    if unit.lower() not in _UNITS:
        raise ValueError(
            f"invalid size {text!r}: unknown unit {unit!r} (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
        )
    value = decimal.Decimal(number) * _UNITS[unit.lower()]
    if sign == "-":
        raise ValueError(f"invalid size {text!r}: must be positive")
    if unit.lower() in ("", "b") and value != value.to_integral_value():
        raise ValueError(f"invalid size {text!r}: a byte count must be a whole number")
    out = int(value)  # floor: a budget is a ceiling, never round it up
    if out < 1:
        raise ValueError(f"invalid size {text!r}: must be at least 1 byte")
    return out


def format_bytes(n: int | float, round_up: bool = False) -> str:
    """``n`` bytes as a short human-readable string: ``"512 B"``, ``"12.3 MiB"``, ``"1.5 GiB"``.

    With ``round_up`` the one decimal shown is rounded up, for "needs at least" messages.
    """
    n = float(n)
    if abs(n) < 1024:
        return f"{int(math.ceil(n) if round_up else n)} B"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            v = n / scale
            if round_up:
                v = math.ceil(v * 10 - 1e-9) / 10
            return f"{v:.1f} {unit}"
    raise AssertionError("unreachable")


def default_budget_bytes(device: torch.device | str | None = None) -> int:
    """The memory budget used when none is given.

    - CUDA: memory this process can still use on the device: the driver's free bytes
      (``torch.cuda.mem_get_info``) plus what PyTorch's caching allocator already holds
      (``memory_reserved``), because the plan's prediction counts the model that is
      already resident there.
    - CPU (and any other device): ``CPU_BUDGET_SHARE`` = 50% of the available RAM,
      read from ``MemAvailable`` in /proc/meminfo (falling back to ``os.sysconf``), so
      that the rest of the system keeps room.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = _normalize_device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free + torch.cuda.memory_reserved(dev))
    return int(_available_ram_bytes() * CPU_BUDGET_SHARE)


def _available_ram_bytes() -> int:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB (= KiB)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError) as e:
        raise RuntimeError("cannot determine available RAM: pass a memory budget explicitly") from e


def _normalize_device(device: torch.device | str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return _normalize_device(t.device)
    return torch.device("cpu")


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(data_ptr, nbytes) of the tensor's underlying storage; None when it has none."""
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, mkldnn, some subclasses
        return None
    ptr = s.data_ptr()
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
        self.device = _normalize_device(device)
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

    def is_tracked(self, t: torch.Tensor) -> bool:
        """True when ``t``'s storage was allocated inside the block and is still alive."""
        key = _storage_key(t)
        entry = self._live.get(key[0]) if key else None
        return entry is not None and not entry[0].expired()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self._sweep()
        inputs = {k[0] for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and (k := _storage_key(t)) is not None}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or _normalize_device(t.device) != self.device:
                continue
            key = _storage_key(t)
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


class _SavedTensorCounter:
    """Bytes saved for backward, each underlying storage counted once, parameters excluded."""

    def __init__(self, device: torch.device, excluded: set[int], tracker: PeakTracker) -> None:
        self.device = device
        self.excluded = excluded
        self.tracker = tracker
        self._saved: dict[int, tuple[StorageWeakRef, int]] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if _normalize_device(t.device) == self.device:
            key = _storage_key(t)
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


# --------------------------------------------------------------------------- measurement
Line = tuple[float, float]
"""``(intercept, slope)``: bytes = intercept + slope * micro_batch."""


@dataclasses.dataclass(frozen=True)
class LinearFit:
    """``bytes(n) = intercept + slope * n``, fitted so it is never below a measured point."""

    intercept: float
    slope: float
    max_rel_residual: float
    """Largest |measured - least-squares line| / measured over the points: linearity check."""

    def __call__(self, n: int | float) -> float:
        return self.intercept + self.slope * n

    @classmethod
    def conservative(cls, xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
        """Least-squares slope (or the last segment's, if steeper), then the intercept raised
        until the line covers every point: extrapolation to larger n never undershoots a
        cost that grows faster at the top of the measured range."""
        if len(xs) < 2 or len(set(xs)) < 2:
            raise ValueError("a linear fit needs at least two distinct micro-batch sizes")
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        b_ls = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
        a_ls = my - b_ls * mx
        resid = max(abs(y - (a_ls + b_ls * x)) / max(abs(y), 1.0) for x, y in zip(xs, ys, strict=True))
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        i, j = order[-2], order[-1]
        b_last = (ys[j] - ys[i]) / (xs[j] - xs[i])
        slope = max(b_ls, b_last, 0.0)
        intercept = max(y - slope * x for x, y in zip(xs, ys, strict=True))
        return cls(intercept, slope, resid)


@dataclasses.dataclass(frozen=True)
class MicroBatchSample:
    """One measured forward+backward at a micro-batch size (gradients already present)."""

    micro_batch: int
    saved_bytes: int
    """Activations saved for backward, alive when backward starts (parameters excluded)."""
    peak_bytes: int
    """Peak of everything the forward+backward allocated and held at once (saved included)."""
    batch_bytes: int = 0
    """The micro-batch ``make_batch`` returned, on the model's device (0 if it stays on the CPU)."""


@dataclasses.dataclass(frozen=True)
class MemoryProfile:
    """Measured memory costs of training one model; ``predicted_peak_bytes(n)`` uses them."""

    device: str
    param_bytes: int
    buffer_bytes: int
    grad_bytes: int
    accum_buffer_bytes: int
    """gradaccum's grad_dtype buffers (0 without grad_dtype)."""
    optimizer_state_bytes: int
    step_transient_bytes: int
    """Temporaries of ``optimizer.step()`` (e.g. foreach implementations)."""
    samples: tuple[MicroBatchSample, ...]
    saved_fit: LinearFit
    """Saved activations, fitted linearly over the samples."""
    peak_fit: LinearFit
    """The samples' in-flight peaks fitted with one line (reported; its residual shows how far
    the peak is from linear)."""
    peak_lines: tuple[Line, ...]
    """The in-flight peak used for prediction: the maximum of these (intercept, slope) lines."""
    ddp_bucket_bytes: int = 0
    """DDP's gradient buckets: one more copy of the gradients unless ``gradient_as_bucket_view``."""
    batch_fit: LinearFit = LinearFit(0.0, 0.0, 0.0)
    """One micro-batch of input on the device. ``Accumulator.step`` fetches the next
    micro-batch before running the current one, and the last one is still referenced
    during ``optimizer.step()``, so one more batch is alive at either peak."""

    @property
    def state_bytes(self) -> int:
        """Resident for the whole run: parameters, buffers, gradients, optimizer and accumulation state."""
        return (self.param_bytes + self.buffer_bytes + self.grad_bytes + self.accum_buffer_bytes
                + self.optimizer_state_bytes + self.ddp_bucket_bytes)

    def activation_bytes(self, micro_batch: int) -> int:
        """Predicted bytes saved for backward at ``micro_batch`` (the fitted per-example cost)."""
        return max(0, math.ceil(self.saved_fit(micro_batch)))

    def transient_bytes(self, micro_batch: int) -> int:
        """In-flight bytes beyond the saved activations: batch, logits, gradients in flight."""
        peak = math.ceil(_envelope_value(self.peak_lines, micro_batch))
        return max(0, peak - self.activation_bytes(micro_batch))

    def batch_bytes(self, micro_batch: int) -> int:
        """Predicted size of one micro-batch of input on the device."""
        return max(0, math.ceil(self.batch_fit(micro_batch)))

    def raw_peak_bytes(self, micro_batch: int) -> int:
        """Predicted peak without the safety margin."""
        in_flight = self.activation_bytes(micro_batch) + self.transient_bytes(micro_batch)
        extra_batch = self.batch_bytes(micro_batch)
        return self.state_bytes + max(in_flight, self.step_transient_bytes) + extra_batch

    def predicted_peak_bytes(self, micro_batch: int, margin: float = DEFAULT_MARGIN) -> int:
        """Predicted peak including the safety margin; non-decreasing in ``micro_batch``."""
        return math.ceil(self.raw_peak_bytes(micro_batch) * (1.0 + margin))

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state_bytes"] = self.state_bytes
        return d


def _adamw(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def _unwrap(model: nn.Module) -> nn.Module:
    # A DDP wrapper cannot be deep-copied; the module inside is measured and DDP's own
    # gradient buckets are added to the state (see MemoryProfile.ddp_bucket_bytes).
    return model.module if sync.is_ddp(model) else model


def _unique_bytes(tensors: Iterable[torch.Tensor], device: torch.device, exclude: set[int]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if _normalize_device(t.device) != device:
            continue
        key = _storage_key(t)
        if key is not None and key[0] not in exclude:
            seen[key[0]] = max(seen.get(key[0], 0), key[1])
    return sum(seen.values())


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]


@contextlib.contextmanager
def _isolated(device: torch.device) -> Iterator[None]:
    """Measurement must not change the caller's random streams (dropout, data)."""
    devices = [device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        yield


def _forward_backward(model: nn.Module, loss_fn: LossFn, batch: Any) -> None:
    out = loss_fn(model, batch)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("loss_fn must return (loss_sum, num_items)")
    out[0].backward()


def _measure_sample(
    model: nn.Module, loss_fn: LossFn, make_batch: MakeBatch, n: int, device: torch.device
) -> tuple[MicroBatchSample, PeakTracker]:
    """One forward+backward at micro-batch ``n`` on ``model`` (a private copy)."""
    excluded = {k[0] for t in list(model.parameters()) + list(model.buffers())
                if (k := _storage_key(t)) is not None}
    with PeakTracker(device, record=True) as tracker:
        counter = _SavedTensorCounter(device, excluded, tracker)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            batch = make_batch(n)  # inside: the batch itself is per-micro-batch memory
            batch_bytes = tracker.current_bytes()
            out = loss_fn(model, batch)
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise TypeError("loss_fn must return (loss_sum, num_items)")
            loss = out[0]
            del out
            saved = counter.live_bytes()
            loss.backward()
            del loss, batch
    return MicroBatchSample(n, saved, tracker.peak_bytes, batch_bytes), tracker


def _envelope_value(lines: Sequence[Line], n: float) -> float:
    return max(c + d * n for c, d in lines)


def _upper_envelope(lines: Iterable[Line], start: float = 1.0) -> tuple[Line, ...]:
    """The few lines that are the maximum somewhere on ``[start, inf)``, by increasing slope."""
    best: dict[float, float] = {}
    for c, d in lines:
        best[d] = max(best.get(d, -math.inf), c)
    hull: list[Line] = []
    for d in sorted(best):
        c = best[d]
        while hull:
            c2, d2 = hull[-1]
            if c2 + d2 * start <= c + d * start:  # steeper and not lower at start: dominates
                hull.pop()
                continue
            if len(hull) >= 2:
                c1, d1 = hull[-2]
                # the new line overtakes hull[-2] before hull[-1] does: hull[-1] is never the max
                if (c1 - c) * (d2 - d1) <= (c1 - c2) * (d - d1):
                    hull.pop()
                    continue
            break
        hull.append((c, d))
    return tuple(hull)


def _peak_lines(trackers: Sequence[PeakTracker], samples: Sequence[MicroBatchSample]) -> tuple[Line, ...]:
    """The in-flight peak as a function of the micro-batch size, from the measured timelines.

    Running the same code at another micro-batch size runs the same ops with tensors
    whose sizes are affine in n, so the live bytes after op t are ``c_t + d_t * n`` and
    the peak is the maximum of those lines. Two aligned timelines give every line; the
    peak then follows the step's real profile (where in the step it occurs may move as
    n grows) instead of one straight line through a few peaks. Falls back to a linear
    fit of the peaks when the op sequences differ (size-dependent kernels).
    """
    xs = [s.micro_batch for s in samples]
    peaks = [s.peak_bytes for s in samples]
    top = trackers[-1].ops
    same = [i for i, t in enumerate(trackers) if t.ops == top]
    if len(same) >= 2:
        i, j = same[-2], same[-1]
        n1, n2 = xs[i], xs[j]
        lines = []
        for y1, y2 in zip(trackers[i].timeline, trackers[j].timeline, strict=True):
            d = (y2 - y1) / (n2 - n1)
            lines.append((float(y2 - d * n2), d) if d >= 0 else (float(max(y1, y2)), 0.0))
        env = _upper_envelope(lines)
    else:
        fit = LinearFit.conservative(xs, peaks)
        env = ((fit.intercept, fit.slope),)
    # never below any measured point (e.g. a size whose op sequence differed)
    short = max(0.0, max(p - _envelope_value(env, x) for x, p in zip(xs, peaks, strict=True)))
    return tuple((c + short, d) for c, d in env)


def profile_memory(
    model: nn.Module,
    loss_fn: LossFn,
    make_batch: MakeBatch,
    optimizer_factory: OptimizerFactory = _adamw,
    grad_dtype: torch.dtype | None = None,
    measure_sizes: Sequence[int] = DEFAULT_MEASURE_SIZES,
) -> MemoryProfile:
    """Measure state and per-micro-batch costs on a deep copy of ``model`` (on its device).

    ``make_batch(n)`` must return a micro-batch of ``n`` examples as long as the longest
    ones in the data (the planner budgets for the worst case). Run autocast inside
    ``loss_fn`` if training uses it, so the measurement sees the same dtypes.
    The caller's model, its gradients and the global RNG state are left untouched.
    """
    sizes = sorted({int(s) for s in measure_sizes})
    if len(sizes) < 2 or sizes[0] < 1:
        raise ValueError(f"measure_sizes needs two or more distinct sizes >= 1, got {list(measure_sizes)}")
    src = _unwrap(model)
    device = _model_device(src)
    with _isolated(device):
        work = copy.deepcopy(src)
        work.train()  # measure training memory (dropout masks) whatever mode the caller left
        for p in work.parameters():
            p.grad = None
        params = _trainable(work)
        optimizer = optimizer_factory(work.parameters())

        param_ptrs = {k[0] for t in work.parameters() if (k := _storage_key(t)) is not None}
        param_bytes = _unique_bytes(work.parameters(), device, set())
        buffer_bytes = _unique_bytes(work.buffers(), device, param_ptrs)
        state_ptrs = param_ptrs | {k[0] for t in work.buffers() if (k := _storage_key(t)) is not None}

        # One real step: the optimizer creates its state (measured, not assumed).
        _forward_backward(work, loss_fn, make_batch(sizes[0]))
        grad_bytes = _unique_bytes([p.grad for p in params if p.grad is not None], device, state_ptrs)
        with PeakTracker(device) as first:
            optimizer.step()
        walked = _unique_bytes(
            [t for s in optimizer.state.values() for t in tree_flatten(s)[0] if isinstance(t, torch.Tensor)],
            device, state_ptrs,
        )
        optimizer_state_bytes = max(walked, first.live_bytes)
        with PeakTracker(device) as second:  # state exists now: what is left is temporaries
            optimizer.step()
        step_transient = second.peak_bytes

        accum_bytes = 0
        if grad_dtype is not None:
            itemsize = torch.empty((), dtype=grad_dtype).element_size()
            accum_bytes = sum(p.numel() * itemsize for p in params if p.dtype != grad_dtype)

        # Gradients stay populated from the step above: later micro-batches of a window
        # run with gradients present, and that is the peak the plan must cover.
        samples: list[MicroBatchSample] = []
        trackers: list[PeakTracker] = []
        for n in sizes:
            try:
                sample, tracker = _measure_sample(work, loss_fn, make_batch, n, device)
                samples.append(sample)
                trackers.append(tracker)
                oom = False
            except torch.OutOfMemoryError:
                oom = True
            if oom:  # outside the except block, so the traceback does not pin tensors
                if len(samples) < 2:
                    raise RuntimeError(
                        f"out of memory while measuring micro-batch {n}: the model cannot train "
                        "on this device even at tiny micro-batches"
                    )
                warnings.warn(f"gradaccum.memory: out of memory measuring micro-batch {n}; "
                              f"fitting on sizes {[s.micro_batch for s in samples]}", stacklevel=2)
                break
        del work, optimizer, params
    xs = [s.micro_batch for s in samples]
    return MemoryProfile(
        device=str(device),
        param_bytes=param_bytes,
        buffer_bytes=buffer_bytes,
        grad_bytes=grad_bytes,
        accum_buffer_bytes=accum_bytes,
        optimizer_state_bytes=optimizer_state_bytes,
        step_transient_bytes=step_transient,
        samples=tuple(samples),
        saved_fit=LinearFit.conservative(xs, [s.saved_bytes for s in samples]),
        peak_fit=LinearFit.conservative(xs, [s.peak_bytes for s in samples]),
        peak_lines=_peak_lines(trackers, samples),
        ddp_bucket_bytes=grad_bytes if sync.is_ddp(model) and not model.gradient_as_bucket_view else 0,
        batch_fit=LinearFit.conservative(xs, [s.batch_bytes for s in samples]),
    )


def measure_micro_batch(
    model: nn.Module, loss_fn: LossFn, make_batch: MakeBatch, micro_batch: int
) -> MicroBatchSample:
    """Saved-activation and in-flight peak bytes of one forward+backward at ``micro_batch``.

    Runs on a deep copy with gradients already present (as mid-window); the caller's
    model is untouched. Used to check predictions at sizes the fit did not see.
    """
    src = _unwrap(model)
    device = _model_device(src)
    with _isolated(device):
        work = copy.deepcopy(src)
        work.train()
        _forward_backward(work, loss_fn, make_batch(micro_batch))
        return _measure_sample(work, loss_fn, make_batch, micro_batch, device)[0]


# --------------------------------------------------------------------------- planning
def candidate_micro_batches(effective_batch: int, world_size: int = 1) -> list[int]:
    """Divisors of the per-rank batch ``effective_batch // world_size``, ascending."""
    for name, v in (("effective_batch", effective_batch), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if effective_batch % world_size:
        raise ValueError(
            f"effective batch {effective_batch} is not divisible by world size {world_size}: "
            "every rank must process the same number of examples per step"
        )
    per_rank = effective_batch // world_size
    return [d for d in range(1, per_rank + 1) if per_rank % d == 0]


@dataclasses.dataclass
class Plan:
    """The chosen micro-batch: ``micro_batch * accum_steps * world_size == effective_batch``."""

    micro_batch: int
    accum_steps: int
    effective_batch: int
    world_size: int
    predicted_peak_bytes: int
    budget_bytes: int
    table: list[dict[str, int]]
    """Every candidate, ascending: ``{"micro_batch", "predicted_peak_bytes"}``."""
    margin: float = DEFAULT_MARGIN
    profile: MemoryProfile | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "micro_batch": self.micro_batch,
            "accum_steps": self.accum_steps,
            "effective_batch": self.effective_batch,
            "world_size": self.world_size,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "budget_bytes": self.budget_bytes,
            "table": [dict(row) for row in self.table],
        }

    def with_micro_batch(self, micro_batch: int) -> Plan:
        """The same plan run at another candidate micro-batch (accum_steps recomputed)."""
        row = next((r for r in self.table if r["micro_batch"] == micro_batch), None)
        if row is None:
            raise ValueError(f"{micro_batch} is not a candidate micro-batch of this plan")
        per_rank = self.effective_batch // self.world_size
        return dataclasses.replace(self, micro_batch=micro_batch, accum_steps=per_rank // micro_batch,
                                   predicted_peak_bytes=row["predicted_peak_bytes"])

    def fallback(self) -> Plan | None:
        """The plan at the next smaller candidate (after an out-of-memory), or None at 1."""
        smaller = next_smaller(self, self.micro_batch)
        return None if smaller is None else self.with_micro_batch(smaller)


def next_smaller(candidates: Plan | Sequence[int] | Sequence[dict[str, int]], micro_batch: int) -> int | None:
    """The largest candidate strictly below ``micro_batch`` (a Plan, its table, or ints); None if none."""
    rows = candidates.table if isinstance(candidates, Plan) else candidates
    sizes = [r["micro_batch"] if isinstance(r, dict) else int(r) for r in rows]
    below = [s for s in sizes if s < micro_batch]
    return max(below) if below else None


def plan_from_profile(
    profile: MemoryProfile,
    effective_batch: int,
    budget_bytes: int | str,
    world_size: int = 1,
    margin: float = DEFAULT_MARGIN,
) -> Plan:
    """Choose the largest candidate whose predicted peak fits ``budget_bytes`` (pure, no measuring)."""
    budget = parse_size(budget_bytes)
    if not (margin >= 0):
        raise ValueError(f"margin must be >= 0, got {margin}")
    cands = candidate_micro_batches(effective_batch, world_size)
    table = [{"micro_batch": m, "predicted_peak_bytes": profile.predicted_peak_bytes(m, margin)}
             for m in cands]
    fitting = [r["micro_batch"] for r in table if r["predicted_peak_bytes"] <= budget]
    if not fitting:
        raise BudgetTooSmall(table[0]["predicted_peak_bytes"], budget, margin)
    best = max(fitting)
    per_rank = effective_batch // world_size
    peak = next(r["predicted_peak_bytes"] for r in table if r["micro_batch"] == best)
    return Plan(best, per_rank // best, effective_batch, world_size, peak, budget, table, margin, profile)


def plan(
    model: nn.Module,
    loss_fn: LossFn,
    make_batch: MakeBatch,
    effective_batch: int,
    budget_bytes: int | str | None = None,
    optimizer_factory: OptimizerFactory = _adamw,
    world_size: int | None = None,
    grad_dtype: torch.dtype | None = None,
    margin: float = DEFAULT_MARGIN,
    measure_sizes: Sequence[int] = DEFAULT_MEASURE_SIZES,
    broadcast: bool = True,
) -> Plan:
    """Measure ``model`` and return the largest micro-batch that fits ``budget_bytes``.

    Args:
        model: the model to train, on the device it will train on (not modified).
        loss_fn: ``loss_fn(model, micro_batch) -> (loss_sum, num_items)``.
        make_batch: ``make_batch(n)`` -> a worst-case (longest) micro-batch of n examples.
        effective_batch: examples per optimizer step over all ranks (kept fixed).
        budget_bytes: bytes, a size string such as ``"8GiB"``, or None for
            :func:`default_budget_bytes` of the model's device.
        optimizer_factory: ``params -> optimizer`` (default AdamW); one real step is
            taken on a copy to measure its state.
        world_size: ranks sharing the effective batch (default: torch.distributed's, or 1).
        grad_dtype: as passed to ``Accumulator`` (adds its accumulation buffers).
        margin: safety margin multiplied onto the predicted peak (default 10%).
        broadcast: under torch.distributed (more than one rank) this call is
            collective: the budget is the minimum over ranks, rank 0 measures and
            decides, and every rank receives the same plan (or the same BudgetTooSmall).

    Raises:
        BudgetTooSmall: micro-batch 1 is predicted not to fit (``.needed_bytes``).
    """
    distributed = broadcast and sync.is_distributed() and sync.world_size() > 1
    if world_size is None:
        world_size = sync.world_size()
    candidate_micro_batches(effective_batch, world_size)  # validate before any work
    device = _model_device(_unwrap(model))
    budget = parse_size(budget_bytes) if budget_bytes is not None else default_budget_bytes(device)
    if not distributed:
        prof = _profile_for(model, loss_fn, make_batch, optimizer_factory, grad_dtype, measure_sizes,
                            effective_batch, world_size)
        return plan_from_profile(prof, effective_batch, budget, world_size, margin)

    cdev = sync.collective_device()
    b = torch.tensor([budget], dtype=torch.int64, device=cdev)
    dist.all_reduce(b, op=dist.ReduceOp.MIN)
    budget = int(b.item())
    result: Plan | BaseException | None = None
    if dist.get_rank() == 0:
        try:
            prof = _profile_for(model, loss_fn, make_batch, optimizer_factory, grad_dtype, measure_sizes,
                                effective_batch, world_size)
            result = plan_from_profile(prof, effective_batch, budget, world_size, margin)
        except Exception as e:  # noqa: BLE001 - every rank must learn that planning failed
            result = e
    return _broadcast(result, src=0, margin=margin)


def _profile_for(
    model: nn.Module, loss_fn: LossFn, make_batch: MakeBatch, optimizer_factory: OptimizerFactory,
    grad_dtype: torch.dtype | None, measure_sizes: Sequence[int], effective_batch: int, world_size: int,
) -> MemoryProfile:
    # Measuring far beyond the largest candidate would waste time (and on a GPU could
    # run out of memory), so cap the sizes, keeping at least two.
    top = max(2, effective_batch // world_size)
    sizes = [s for s in sorted(set(measure_sizes)) if s <= top]
    if len(sizes) < 2:
        sizes = [1, 2]
    return profile_memory(model, loss_fn, make_batch, optimizer_factory, grad_dtype, sizes)


# --------------------------------------------------------------------------- distributed
_OK, _TOO_SMALL, _FAILED = 0, 1, 2


def broadcast_plan(plan: Plan | None, src: int = 0) -> Plan:
    """Give every rank rank ``src``'s plan (other ranks pass None). Collective; gloo and NCCL.

    Without an initialised process group this returns ``plan`` unchanged. The memory
    profile is not sent (only the plan's numbers).
    """
    if not (sync.is_distributed() and sync.world_size() > 1):
        if plan is None:
            raise ValueError("broadcast_plan(None) outside torch.distributed: nothing to broadcast")
        return plan
    return _broadcast(plan, src=src, margin=plan.margin if plan is not None else DEFAULT_MARGIN)


def _broadcast(result: Plan | BaseException | None, src: int, margin: float) -> Plan:
    cdev = sync.collective_device()
    header = torch.zeros(9, dtype=torch.int64, device=cdev)
    is_src = dist.get_rank() == src
    if is_src:
        if isinstance(result, Plan):
            header = torch.tensor([_OK, result.micro_batch, result.accum_steps, result.effective_batch,
                                   result.world_size, result.predicted_peak_bytes, result.budget_bytes,
                                   len(result.table), 0], dtype=torch.int64, device=cdev)
        elif isinstance(result, BudgetTooSmall):
            header[0], header[6], header[8] = _TOO_SMALL, result.budget_bytes, result.needed_bytes
        else:
            header[0] = _FAILED
    dist.broadcast(header, src=src)
    status, micro, accum, eff, world, peak, budget, n_rows, needed = header.tolist()
    if status == _TOO_SMALL:
        if is_src and isinstance(result, BaseException):
            raise result
        raise BudgetTooSmall(needed, budget, margin)
    if status == _FAILED:
        if is_src and isinstance(result, BaseException):
            raise result
        raise RuntimeError(f"memory planning failed on rank {src}; see its error")
    rows = torch.zeros(2 * n_rows, dtype=torch.int64, device=cdev)
    if is_src and isinstance(result, Plan):
        rows = torch.tensor([v for r in result.table for v in (r["micro_batch"], r["predicted_peak_bytes"])],
                            dtype=torch.int64, device=cdev)
    dist.broadcast(rows, src=src)
    if is_src and isinstance(result, Plan):
        return result
    flat = rows.tolist()
    table = [{"micro_batch": flat[i], "predicted_peak_bytes": flat[i + 1]} for i in range(0, len(flat), 2)]
    return Plan(micro, accum, eff, world, peak, budget, table, margin)


# --------------------------------------------------------------------------- throughput
def measure_throughput(
    model: nn.Module,
    loss_fn: LossFn,
    make_batch: MakeBatch,
    candidates: Sequence[int],
    optimizer_factory: OptimizerFactory = _adamw,
    repeats: int = 3,
    warmup: int = 1,
    window_batch: int | None = None,
) -> list[dict[str, float]]:
    """Time real training steps at each candidate micro-batch on the model's device.

    Without ``window_batch`` one timed step is one micro-batch forward+backward plus an
    optimizer step. With ``window_batch`` (examples per optimizer step on this process,
    a multiple of every candidate) one timed step is a whole gradaccum window of
    ``window_batch // micro_batch`` micro-batches through ``Accumulator.step``, which is
    what decides the speed of training at a fixed effective batch.

    Returns ``[{"micro_batch", "items_per_s", "seconds_per_step"}, ...]`` where items are
    examples (rows of the micro-batch) and seconds are the median over ``repeats`` after
    ``warmup`` untimed steps. Runs on a deep copy per candidate (the model is untouched);
    a candidate that runs out of CUDA memory is left out with a warning.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    src = _unwrap(model)
    device = _model_device(src)
    rows: list[dict[str, float]] = []
    for m in candidates:
        if window_batch is not None and window_batch % m:
            raise ValueError(f"window_batch {window_batch} is not a multiple of micro-batch {m}")
        k = 1 if window_batch is None else window_batch // m
        try:
            seconds = _time_candidate(src, loss_fn, make_batch, m, k, optimizer_factory, repeats, warmup,
                                      device)
            oom = False
        except torch.OutOfMemoryError:
            oom = True
        if oom:  # cleaned up outside the except block so the traceback frees the tensors
            if device.type == "cuda":
                torch.cuda.empty_cache()
            warnings.warn(f"gradaccum.memory: micro-batch {m} ran out of memory; left out", stacklevel=2)
            continue
        rows.append({"micro_batch": m, "items_per_s": m * k / seconds, "seconds_per_step": seconds})
    return rows


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_candidate(
    src: nn.Module, loss_fn: LossFn, make_batch: MakeBatch, m: int, k: int,
    optimizer_factory: OptimizerFactory, repeats: int, warmup: int, device: torch.device,
) -> float:
    with _isolated(device):
        work = copy.deepcopy(src)
        work.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the BatchNorm warning belongs to the real run
            acc = Accumulator(work, optimizer_factory(work.parameters()), accum_steps=k)
        batch = make_batch(m)
        window = [batch] * k  # one batch reused: timing, not data, is measured here
        times = []
        for i in range(warmup + repeats):
            _sync_device(device)
            t0 = time.perf_counter()
            acc.step(window, loss_fn)
            _sync_device(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
