"""``ga.check``: is this model + loss function accumulation-safe? (behind ``gradaccum check``)

It runs the user's own loss function on their batch and looks for what silently breaks
gradient accumulation:

- ``mean-reduced-loss`` (error): the loss on the batch concatenated with itself must be
  twice the loss on the batch (a SUM), with twice the items. A MEAN stays the same:
  measured, a loop converted with a mean loss trained to 0.768 accuracy instead of 0.899
  and logged a loss 16x too small, so it looked like an improvement.
- ``gradient-mismatch`` (error): the gradient accumulated over micro-batches of
  ``micro_batch_size`` (Σ ∇loss_sum_i / Σ num_items_i) must equal the full-batch
  gradient ∇(loss_sum / num_items) to float rounding.
- ``batchnorm`` (error when, in train mode, the accumulated gradient differs from the
  full-batch one beyond the same float-rounding bar as ``gradient-mismatch``; a warning
  when the layers exist but the measured difference is within it): BatchNorm normalises
  each micro-batch with its own statistics, so accumulation cannot match the full batch.
- ``nondeterministic`` (warning): two forward passes in train mode differ (dropout), so
  runs cannot be compared bit for bit; the gradient comparison runs with it disabled.
- ``unused-parameters`` (warning): trainable parameters that get no gradient (DDP needs
  ``find_unused_parameters=True`` for them; they are otherwise harmless here).
- ``no-items`` (warning, or error when the whole batch has none): micro-batches whose
  num_items is 0 add nothing; a window of them is skipped.
- ``non-additive-loss`` (error): the batch's loss is neither the sum of its micro-batches' losses
  nor a mean (in-batch negatives): ``Accumulator.step_cached`` trains it (``_additive.py``).

The model, its gradients, its train/eval flags and every RNG are restored exactly. The
user's loss function raising (or its backward) is a ValueError naming it, in one line.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradaccum._additive import RATIO_BAR, non_additive
from gradaccum._guards import check_loss, count_items
from gradaccum.accumulator import LossFn
from gradaccum.batching import batch_size, map_tensors, split
from gradaccum.errors import one_line

LEVELS = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    """One thing ``check`` found."""

    level: str
    """``error`` (accumulation will be wrong), ``warning`` (know this) or ``info``."""
    code: str
    """A fixed code: mean-reduced-loss, gradient-mismatch, batchnorm, nondeterministic,
    unused-parameters, no-items, non-additive-loss."""
    message: str
    """One line saying what was measured and what to do."""

    def __str__(self) -> str:
        return f"{self.level}: {self.code}: {self.message}"


@dataclass
class Report:
    """What ``check`` found; ``ok`` when nothing is at error level."""

    findings: list[Finding] = field(default_factory=list)
    """Every finding, errors first."""
    gradient_rel_error: float | None = None
    """||accumulated - full|| / ||full|| over all parameters (None if not compared)."""
    tolerance: float | None = None
    """The float-rounding bar the gradient error was held to."""
    micro_batches: int = 0
    """How many micro-batches the batch was split into."""
    batchnorm_rel_error: float | None = None
    """The same relative error with BatchNorm in train mode (batch statistics); None without
    BatchNorm layers or items. ``gradient_rel_error`` is measured with BatchNorm in eval mode."""

    @property
    def ok(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def __str__(self) -> str:
        lines = [str(f) for f in self.findings]
        if self.ok:
            verdict = "OK: accumulation-safe" + (" (with the warnings above)" if self.findings else "")
        else:
            n = sum(f.level == "error" for f in self.findings)
            verdict = f"NOT OK: {n} error(s): accumulated training will not match the full batch"
        if self.gradient_rel_error is not None:
            verdict += (f"; accumulated vs full-batch gradient: relative error {self.gradient_rel_error:.1e} "
                        f"(bar {self.tolerance:.0e}) over {self.micro_batches} micro-batches")
            if self.batchnorm_rel_error is not None:
                verdict += f", {self.batchnorm_rel_error:.1e} with BatchNorm in train mode"
        return "\n".join([*lines, verdict])


def check(model: nn.Module, loss_fn: LossFn, batch: Any, micro_batch_size: int = 2) -> Report:
    """Check that ``loss_fn(model, micro_batch) -> (loss_sum, num_items)`` accumulates exactly.

    ``batch`` is one ordinary batch (tensors, or dicts/tuples/dataclasses of them, split
    along dim 0); it should hold at least two micro-batches of ``micro_batch_size``.
    Nothing about ``model`` changes: weights, buffers, gradients, train/eval flags and
    the torch / CUDA / Python RNG states are restored afterwards.
    """
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable: loss_fn(model, micro_batch) -> (loss_sum, num_items)")
    micro = split(batch, micro_batch_size)
    if len(micro) < 2:
        raise ValueError(
            f"the batch has {batch_size(batch)} examples: give check() at least two micro-batches "
            f"of micro_batch_size={micro_batch_size}"
        )
    report = Report(micro_batches=len(micro))
    found = report.findings
    with _restored(model):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        if not params:
            raise ValueError("the model has no trainable parameters")
        if _differs_between_forward_passes(model, loss_fn, batch):
            found.append(Finding("warning", "nondeterministic", (
                "two forward passes in train mode gave different losses (dropout or other randomness): "
                "runs cannot match bit for bit; the gradients below were compared with it disabled "
                "(train mode off)")))
        _deterministic_mode(model)
        sums, doubled = _check_sum_reduction(model, loss_fn, batch)
        full, items, whole = _full_batch_grads(model, loss_fn, batch, params)
        accumulated, per_micro, parts = _accumulated_grads(model, loss_fn, micro, params)
        tol = _tolerance(params)
        coupled = non_additive(whole, parts, doubled, tol)
        if coupled:  # the loss_sum-doubling and gradient findings' advice would not fix it
            found.append(Finding("error", "non-additive-loss", coupled))
            sums = [f for f in sums if not f.message.startswith("loss_sum")]
        found += sums + _check_items(per_micro, items)
        unused = [n for (n, _), g in zip(named, full, strict=True) if g is None] if items > 0 else []
        if unused:
            found.append(Finding("warning", "unused-parameters", (
                f"{len(unused)} trainable parameter(s) get no gradient (e.g. '{unused[0]}'): under DDP pass "
                "find_unused_parameters=True, or freeze them")))
        if items > 0:
            report.tolerance = tol
            report.gradient_rel_error = _rel_error(accumulated, full)
            if not report.gradient_rel_error <= report.tolerance and not coupled:
                found.append(Finding("error", "gradient-mismatch", (
                    f"the gradient accumulated over {len(micro)} micro-batches differs from the full-batch "
                    f"gradient by {report.gradient_rel_error:.2e} (relative; float rounding is below "
                    f"{report.tolerance:.0e}): loss_fn must return the SUM over its items and the number of "
                    "items it summed, with no per-micro-batch weighting")))
        found += _check_batchnorm(model, loss_fn, batch, micro, params, report)
    found.sort(key=lambda f: LEVELS.index(f.level))
    return report


def load_target(target: str) -> tuple[nn.Module, LossFn, Any]:
    """``FILE.py:FUNCTION`` or ``module:function``, called with no arguments, must return
    ``(model, loss_fn, batch)``. Anything wrong: ValueError with one line."""
    import importlib
    import importlib.util
    from pathlib import Path

    where, sep, name = target.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"check {target}: expected FILE.py:FUNCTION or module:function")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ValueError(f"check {target}: {where} is not a file")
            spec = importlib.util.spec_from_file_location(f"_gradaccum_check_{path.stem}", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        fn = getattr(module, name, None)
        if not callable(fn):
            raise ValueError(f"check {target}: {where} has no function {name!r}")
        out = fn()
    except ValueError:
        raise
    except BaseException as e:  # the user's code: report it in one line, whatever it raised
        if isinstance(e, KeyboardInterrupt):
            raise
        text = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
        raise ValueError(f"check {target}: {why}") from None
    shaped = isinstance(out, (tuple, list)) and len(out) == 3
    if not (shaped and isinstance(out[0], nn.Module) and callable(out[1])):
        raise ValueError(f"check {target}: {name}() must return (model, loss_fn, batch)")
    return out[0], out[1], out[2]


# ----------------------------------------------------------------------------- the checks
def _name(loss_fn: LossFn) -> str:
    name = getattr(loss_fn, "__qualname__", None) or getattr(loss_fn, "__name__", None)
    return f"{name}()" if isinstance(name, str) else f"{type(loss_fn).__name__} object"


@contextlib.contextmanager
def _blamed(loss_fn: LossFn, what: str = "") -> Iterator[None]:
    """The user's own code raising: one line naming their function (running out of memory is not theirs)."""
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:
        raise ValueError(f"loss_fn {_name(loss_fn)}{what} raised {one_line(e, 300, True)}") from None


def _call(model: nn.Module, loss_fn: LossFn, mb: Any, grad: bool = True) -> tuple[torch.Tensor, float]:
    """``loss_fn(model, mb)``, checked as ``Accumulator.backward`` checks it (``grad``: it must
    require grad, as every call outside ``torch.no_grad()`` here needs)."""
    with _blamed(loss_fn):
        out = loss_fn(model, mb)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        got = type(out).__name__
        raise TypeError(f"loss_fn {_name(loss_fn)} must return (loss_sum, num_items), got {got}")
    loss, n = out
    try:
        check_loss(loss, requires_grad=grad)
        n = count_items(n)
    except TypeError as e:
        raise TypeError(f"loss_fn {_name(loss_fn)}: {e}") from None
    except ValueError as e:
        raise ValueError(f"loss_fn {_name(loss_fn)}: {e}") from None
    return loss, float(n.item() if isinstance(n, torch.Tensor) else n)


def _grads(loss_fn: LossFn, loss: torch.Tensor, params: list[nn.Parameter]) -> tuple[Any, ...]:
    with _blamed(loss_fn, "'s backward"):
        return torch.autograd.grad(loss, params, allow_unused=True)


def _differs_between_forward_passes(model: nn.Module, loss_fn: LossFn, batch: Any) -> bool:
    model.train()
    with torch.no_grad():
        a, _ = _call(model, loss_fn, batch, grad=False)
        b, _ = _call(model, loss_fn, batch, grad=False)
    return not torch.equal(a, b)


def _deterministic_mode(model: nn.Module) -> None:
    """Dropout off (eval), BatchNorm on its running statistics (eval too): only the loss's
    own arithmetic is left to compare; BatchNorm is measured separately in train mode."""
    model.eval()


def _check_sum_reduction(model: nn.Module, loss_fn: LossFn, batch: Any) -> tuple[list[Finding], float | None]:
    """The findings, and the doubled batch's loss over the batch's (None when that is 0 or not finite)."""
    twice = map_tensors(batch, lambda t: torch.cat([t, t]))
    with torch.no_grad():
        once_loss, once_n = _call(model, loss_fn, batch, grad=False)
        twice_loss, twice_n = _call(model, loss_fn, twice, grad=False)
    out = []
    a, b = float(once_loss), float(twice_loss)
    ratio = b / a if math.isfinite(a) and abs(a) > 0 else None
    if ratio is not None and abs(ratio - 2.0) > RATIO_BAR:
        kind = "a MEAN was returned" if abs(ratio - 1.0) < RATIO_BAR else f"it grew {ratio:.3g}x"
        out.append(Finding("error", "mean-reduced-loss", (
            f"loss_sum does not grow with the items (batch doubled: loss {a:.6g} -> {b:.6g}, {kind}): "
            "return the SUM over items, e.g. reduction='sum', and the item count")))
    if once_n > 0 and abs(twice_n / once_n - 2.0) > 1e-9:
        out.append(Finding("error", "mean-reduced-loss", (
            f"num_items does not grow with the batch (doubled: {once_n:g} -> {twice_n:g}): return the "
            "number of items the loss summed over (samples, or non-ignored tokens)")))
    return out, ratio


def _full_batch_grads(
    model: nn.Module, loss_fn: LossFn, batch: Any, params: list[nn.Parameter]
) -> tuple[list[torch.Tensor | None], float, float]:
    loss, n = _call(model, loss_fn, batch)
    if n <= 0:
        return [None] * len(params), n, float(loss.detach())
    grads = _grads(loss_fn, loss / n, params)
    return [None if g is None else g.detach() for g in grads], n, float(loss.detach())


def _accumulated_grads(
    model: nn.Module, loss_fn: LossFn, micro: list[Any], params: list[nn.Parameter]
) -> tuple[list[torch.Tensor | None], list[float], list[float]]:
    """Σ ∇loss_sum_i / Σ num_items_i as gradaccum computes it; the micro-batches' counts and loss_sums."""
    total: list[torch.Tensor | None] = [None] * len(params)
    per_micro, losses = [], []
    for mb in micro:
        loss, n = _call(model, loss_fn, mb)
        per_micro.append(n)
        losses.append(float(loss.detach()))
        grads = _grads(loss_fn, loss, params)
        total = [_add(a, g) for a, g in zip(total, grads, strict=True)]
    items = sum(per_micro)
    return [None if g is None or items == 0 else g / items for g in total], per_micro, losses


def _check_items(per_micro: list[float], items: float) -> list[Finding]:
    empty = sum(1 for n in per_micro if n == 0)
    if items == 0:
        return [Finding("error", "no-items", (
            "num_items is 0 for the whole batch: every window would be skipped (are all labels "
            "ignore_index?)"))]
    if empty:
        return [Finding("warning", "no-items", (
            f"{empty} of {len(per_micro)} micro-batches have num_items 0: they add nothing (fine for "
            "gradaccum; a window made only of them is skipped)"))]
    return []


def _check_batchnorm(
    model: nn.Module, loss_fn: LossFn, batch: Any, micro: list[Any], params: list[nn.Parameter],
    report: Report,
) -> list[Finding]:
    """Measure BatchNorm in train mode: beyond rounding it is an error, whatever else is right."""
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return []
    # Measure what BatchNorm does in train mode (dropout stays off): its running
    # statistics move here, which _restored() puts back.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    full, n, _ = _full_batch_grads(model, loss_fn, batch, params)
    accumulated, _, _ = _accumulated_grads(model, loss_fn, micro, params)
    layers = f"{len(bns)} BatchNorm layer(s) (e.g. '{bns[0]}')"
    if not n:
        return [Finding("warning", "batchnorm", (
            f"{layers} normalise each micro-batch with its own statistics, so accumulation cannot match "
            "the full batch in train mode (not measured: no items): use GroupNorm/LayerNorm"))]
    off, bar = _rel_error(accumulated, full), _tolerance(params)
    report.batchnorm_rel_error = off
    if not off <= bar:
        return [Finding("error", "batchnorm", (
            f"{layers} normalise each micro-batch with its own statistics: in train mode the gradient "
            f"accumulated over {len(micro)} micro-batches is off by {off:.1e} from the full-batch gradient "
            f"(relative; float rounding is below {bar:.0e}), so accumulated training will not match: use "
            "GroupNorm/LayerNorm, or keep the BatchNorm layers in eval mode (frozen statistics)"))]
    return [Finding("warning", "batchnorm", (
        f"{layers}: in train mode the accumulated gradient is off by {off:.1e}, within float rounding "
        f"(below {bar:.0e}) for this model and batch; BatchNorm normalises each micro-batch with its own "
        "statistics, so this can change when they matter: prefer GroupNorm/LayerNorm"))]


# ----------------------------------------------------------------------------- helpers
def _add(total: torch.Tensor | None, g: torch.Tensor | None) -> torch.Tensor | None:
    if g is None:
        return total
    return g.detach() if total is None else total + g


def _tolerance(params: list[nn.Parameter]) -> float:
    """Float rounding for these dtypes: a thousand ulps, which summation order stays far below."""
    eps = max(torch.finfo(p.dtype).eps for p in params)
    return min(1e3 * eps, 1e-2)


def _rel_error(got: list[torch.Tensor | None], want: list[torch.Tensor | None]) -> float:
    num = den = 0.0
    for a, b in zip(got, want, strict=True):
        a64 = None if a is None else a.double()
        b64 = None if b is None else b.double()
        if b64 is not None:
            den += float((b64**2).sum())
        diff = a64 if b64 is None else (b64 if a64 is None else a64 - b64)
        if diff is not None:
            num += float((diff**2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Put back weights, buffers, gradients, train/eval flags and every RNG state."""
    state = copy.deepcopy(model.state_dict())
    grads = {p: (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    cpu_rng, py_rng = torch.get_rng_state(), random.getstate()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        with torch.no_grad():
            model.load_state_dict(state)
        for p, g in grads.items():
            p.grad = g
        for m, training in modes.items():
            m.training = training
        torch.set_rng_state(cpu_rng)
        random.setstate(py_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
