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
evaluates the model of the peak described in :mod:`gradaccum.memory`. Private: that
module plans with the profile and re-exports the public measurement API. The live-bytes
accounting is in :mod:`gradaccum._livebytes`, the line fits in :mod:`gradaccum._fits`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from gradaccum import sync
from gradaccum._fits import Line, LinearFit, envelope_value, peak_lines
from gradaccum._livebytes import (
    PeakTracker,
    SavedTensorCounter,
    model_device,
    storage_key,
    unique_bytes,
)

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, int | torch.Tensor]"]
MakeBatch = Callable[[int], Any]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

DEFAULT_MARGIN = 0.10
"""Safety margin on the predicted peak: covers allocator rounding and fragmentation and
kernel workspaces (e.g. cuBLAS) that no Python-level accounting can see."""

DEFAULT_MEASURE_SIZES = (1, 2, 4, 8)
"""Micro-batch sizes measured for the linear fit (capped at the largest candidate)."""


# --------------------------------------------------------------------------- measurement
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
        peak = math.ceil(envelope_value(self.peak_lines, micro_batch))
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


def adamw(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def unwrap(model: nn.Module) -> nn.Module:
    # A DDP wrapper cannot be deep-copied; the module inside is measured and DDP's own
    # gradient buckets are added to the state (see MemoryProfile.ddp_bucket_bytes).
    return model.module if sync.is_ddp(model) else model


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]


@contextlib.contextmanager
def isolated(device: torch.device) -> Iterator[None]:
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
                if (k := storage_key(t)) is not None}
    with PeakTracker(device, record=True) as tracker:
        counter = SavedTensorCounter(device, excluded, tracker)
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


@dataclasses.dataclass(frozen=True)
class _StateBytes:
    """What stays resident for the whole run, measured on the working copy."""

    param_bytes: int
    buffer_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    step_transient_bytes: int


def _measure_state(
    work: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
    loss_fn: LossFn, make_batch: MakeBatch, n: int, device: torch.device,
) -> _StateBytes:
    """Parameters, buffers and gradients, then the optimizer's state after one real step."""
    param_ptrs = {k[0] for t in work.parameters() if (k := storage_key(t)) is not None}
    param_bytes = unique_bytes(work.parameters(), device, set())
    buffer_bytes = unique_bytes(work.buffers(), device, param_ptrs)
    state_ptrs = param_ptrs | {k[0] for t in work.buffers() if (k := storage_key(t)) is not None}

    # One real step: the optimizer creates its state (measured, not assumed).
    _forward_backward(work, loss_fn, make_batch(n))
    grad_bytes = unique_bytes([p.grad for p in params if p.grad is not None], device, state_ptrs)
    with PeakTracker(device) as first:
        optimizer.step()
    walked = unique_bytes(
        [t for s in optimizer.state.values() for t in tree_flatten(s)[0] if isinstance(t, torch.Tensor)],
        device, state_ptrs,
    )
    optimizer_state_bytes = max(walked, first.live_bytes)
    with PeakTracker(device) as second:  # state exists now: what is left is temporaries
        optimizer.step()
    return _StateBytes(param_bytes, buffer_bytes, grad_bytes, optimizer_state_bytes, second.peak_bytes)


def _accum_buffer_bytes(params: list[nn.Parameter], grad_dtype: torch.dtype | None,
                        measure_noise: bool = False) -> int:
    """Bytes of gradaccum's buffers: the grad_dtype buffers (one per parameter not already in
    that dtype) and, with ``measure_noise``, the noise probe's window sums (one more gradient of
    every parameter without such a buffer: its per-micro-batch norms need the sum held apart)."""
    buffered = 0
    if grad_dtype is not None:
        itemsize = torch.empty((), dtype=grad_dtype).element_size()
        buffered = sum(p.numel() * itemsize for p in params if p.dtype != grad_dtype)
    probe = 0
    if measure_noise:
        probe = sum(p.numel() * p.element_size() for p in params
                    if grad_dtype is None or p.dtype == grad_dtype)
    return buffered + probe


def _measure_samples(
    work: nn.Module, loss_fn: LossFn, make_batch: MakeBatch, sizes: Sequence[int], device: torch.device
) -> tuple[list[MicroBatchSample], list[PeakTracker]]:
    """One forward+backward per size, ascending; stops at the first size that runs out of memory."""
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
                          f"fitting on sizes {[s.micro_batch for s in samples]}", stacklevel=3)
            break
    return samples, trackers


def profile_memory(
    model: nn.Module,
    loss_fn: LossFn,
    make_batch: MakeBatch,
    optimizer_factory: OptimizerFactory = adamw,
    grad_dtype: torch.dtype | None = None,
    measure_sizes: Sequence[int] = DEFAULT_MEASURE_SIZES,
    measure_noise: bool = False,
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
    src = unwrap(model)
    device = model_device(src)
    with isolated(device):
        work = copy.deepcopy(src)
        work.train()  # measure training memory (dropout masks) whatever mode the caller left
        for p in work.parameters():
            p.grad = None
        params = _trainable(work)
        optimizer = optimizer_factory(work.parameters())
        state = _measure_state(work, params, optimizer, loss_fn, make_batch, sizes[0], device)
        accum_bytes = _accum_buffer_bytes(params, grad_dtype, measure_noise)
        # Gradients stay populated from the step above: later micro-batches of a window
        # run with gradients present, and that is the peak the plan must cover.
        samples, trackers = _measure_samples(work, loss_fn, make_batch, sizes, device)
        del work, optimizer, params
    xs = [s.micro_batch for s in samples]
    return MemoryProfile(
        device=str(device),
        param_bytes=state.param_bytes,
        buffer_bytes=state.buffer_bytes,
        grad_bytes=state.grad_bytes,
        accum_buffer_bytes=accum_bytes,
        optimizer_state_bytes=state.optimizer_state_bytes,
        step_transient_bytes=state.step_transient_bytes,
        samples=tuple(samples),
        saved_fit=LinearFit.conservative(xs, [s.saved_bytes for s in samples]),
        peak_fit=LinearFit.conservative(xs, [s.peak_bytes for s in samples]),
        peak_lines=peak_lines(trackers, xs, [s.peak_bytes for s in samples]),
        ddp_bucket_bytes=state.grad_bytes if sync.is_ddp(model) and not model.gradient_as_bucket_view else 0,
        batch_fit=LinearFit.conservative(xs, [s.batch_bytes for s in samples]),
    )


def measure_micro_batch(
    model: nn.Module, loss_fn: LossFn, make_batch: MakeBatch, micro_batch: int
) -> MicroBatchSample:
    """Saved-activation and in-flight peak bytes of one forward+backward at ``micro_batch``.

    Runs on a deep copy with gradients already present (as mid-window); the caller's
    model is untouched. Used to check predictions at sizes the fit did not see.
    """
    src = unwrap(model)
    device = model_device(src)
    with isolated(device):
        work = copy.deepcopy(src)
        work.train()
        _forward_backward(work, loss_fn, make_batch(micro_batch))
        return _measure_sample(work, loss_fn, make_batch, micro_batch, device)[0]
