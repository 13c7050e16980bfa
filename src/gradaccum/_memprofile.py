"""Measurement behind the memory planner: what one training step holds at a micro-batch size.

Everything is *measured* on a deep copy of the model, never guessed per layer or per
optimizer type: optimizer state after one real ``optimizer.step()``; activations with
``torch.autograd.graph.saved_tensors_hooks`` (each storage counted once, parameters
excluded); the in-flight peak with a ``TorchDispatchMode`` that follows every storage
the step allocates (:class:`PeakTracker`). The same ops run at every micro-batch size
with tensors whose sizes are affine in n, so the live bytes after each op are a line in
n; measuring two sizes gives every line and the peak is their maximum. This works the
same way on CPU and on CUDA, so plans can be made and tested without a GPU.

:func:`profile_memory` returns a :class:`MemoryProfile`, whose ``predicted_peak_bytes``
evaluates the model of the peak described in :mod:`gradaccum.memory`. This module is
private: that one plans with the profile and re-exports every name defined here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import statistics
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gradaccum import sync

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, int | torch.Tensor]"]
MakeBatch = Callable[[int], Any]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

DEFAULT_MARGIN = 0.10
"""Safety margin on the predicted peak: covers allocator rounding and fragmentation and
kernel workspaces (e.g. cuBLAS) that no Python-level accounting can see."""

DEFAULT_MEASURE_SIZES = (1, 2, 4, 8)
"""Micro-batch sizes measured for the linear fit (capped at the largest candidate)."""


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
