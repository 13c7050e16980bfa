"""The Accumulator's guards: argument checks, the optimizer guard, the BatchNorm warning.

Errors name the parameter at fault (``accum_steps``, ``num_items``, ...): the library
never knows which command-line flag, if any, supplied it.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class AccumulatorStateError(RuntimeError, ValueError):
    """The Accumulator was used out of order (e.g. backward outside micro_step)."""


def check_arguments(
    model: Any,
    optimizer: Any,
    accum_steps: Any,
    max_grad_norm: Any,
    grad_dtype: Any,
    max_skipped_windows: Any,
    grad_scaler: Any,
) -> None:
    """The Accumulator's arguments that can be checked before looking at the model's wrapper."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    check_accum_steps(accum_steps)
    if max_grad_norm is not None and not (max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    if grad_dtype is not None and not (
        isinstance(grad_dtype, torch.dtype) and grad_dtype.is_floating_point
    ):
        raise TypeError(f"grad_dtype must be a floating torch.dtype, got {grad_dtype!r}")
    if max_skipped_windows is not None and (
        isinstance(max_skipped_windows, bool)
        or not isinstance(max_skipped_windows, numbers.Integral)
        or max_skipped_windows < 1
    ):
        raise ValueError(f"max_skipped_windows must be an int >= 1 or None, got {max_skipped_windows!r}")
    if grad_scaler is not None:
        if not all(callable(getattr(grad_scaler, m, None)) for m in ("scale", "unscale_", "update")):
            raise TypeError("grad_scaler must be a torch.amp.GradScaler (scale, unscale_, update)")
        if grad_dtype is not None:
            raise ValueError(
                "grad_scaler with grad_dtype is not supported: fp16 training with a GradScaler "
                "keeps fp32 weights (autocast), whose gradients are fp32 already"
            )


def check_reduction(reduction: str, measure_noise: Any, grad_dtype: torch.dtype | None) -> None:
    """The options a DDP/FSDP2 wrapper (``sync.grad_reduction``) rules out."""
    if measure_noise and reduction == "fsdp":
        raise ValueError("measure_noise is not supported with FSDP2: pass measure_noise=False")
    if grad_dtype is not None and reduction in ("ddp", "fsdp"):
        raise ValueError(
            "grad_dtype is not supported with DDP/FSDP wrappers: keep fp32 master "
            "parameters, or use FSDP2's MixedPrecisionPolicy(reduce_dtype=torch.float32)"
        )


def check_accum_steps(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"accum_steps must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"accum_steps must be >= 1, got {value}")


def check_loss(loss_sum: Any, requires_grad: bool = True) -> None:
    """A 0-dim tensor (that requires grad, unless told it was computed under ``torch.no_grad()``)."""
    if not isinstance(loss_sum, torch.Tensor):
        raise TypeError(f"loss_sum must be a torch.Tensor, got {type(loss_sum).__name__}")
    if loss_sum.dim() != 0:
        raise ValueError(
            f"loss_sum must be a scalar (0-dim) SUM-reduced loss, got shape {tuple(loss_sum.shape)}"
        )
    if requires_grad and not loss_sum.requires_grad:
        raise ValueError("loss_sum does not require grad: was it computed under torch.no_grad()?")


def count_items(num_items: Any) -> int | float | torch.Tensor:
    """Validate a micro-batch's item count; returns it as a Python number or 0-dim tensor."""
    if isinstance(num_items, bool):
        raise TypeError("num_items must be a number or a tensor, not bool")
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a single number, got shape {tuple(num_items.shape)}")
        if num_items.is_complex() or num_items.dtype == torch.bool:
            raise TypeError(f"num_items has unsupported dtype {num_items.dtype}")
        t = num_items.detach().reshape(())
        # A CPU check is free; on an accelerator we check the window total instead so
        # that no micro-batch forces a host sync.
        if t.device.type == "cpu" and not (t >= 0).item():
            raise ValueError(f"num_items must be >= 0, got {t.item()}")
        return t
    if not isinstance(num_items, numbers.Real):
        raise TypeError(f"num_items must be a number or a tensor, got {type(num_items).__name__}")
    if not math.isfinite(num_items) or num_items < 0:
        raise ValueError(f"num_items must be a finite number >= 0, got {num_items}")
    return num_items


def check_skip_limit(consecutive: int, limit: int | None, reasons: dict[str, int]) -> None:
    """``max_skipped_windows``: stop a run whose windows keep being skipped."""
    if limit is not None and consecutive >= limit:
        why = ", ".join(f"{n} x {r}" for r, n in reasons.items())
        raise RuntimeError(
            f"gradaccum: {consecutive} consecutive windows skipped (max_skipped_windows="
            f"{limit}; skips so far: {why}): training is not progressing; check the data, the loss "
            "and the learning rate"
        )


def guard_optimizer(optimizer: torch.optim.Optimizer, refuse_if_open: Callable[[str], None]) -> None:
    """Make the user's own ``optimizer.step()`` / ``zero_grad()`` refuse to run mid-window.

    A leftover ``zero_grad()`` silently drops part of a window, a leftover ``step()``
    applies an unnormalised one (both measured: accuracy 0.899 -> 0.808, and divergence).
    ``step`` has a public pre-hook; ``zero_grad`` has none, so the instance's method is
    wrapped (optimizers pickle without instance attributes, so saving is unaffected).
    Both checks are a few attribute reads, once per optimizer call.
    ``refuse_if_open`` is the Accumulator's bound method; it raises while a window is open.
    """
    # Held weakly: the optimizer must not keep its Accumulator alive.
    ref = weakref.WeakMethod(refuse_if_open)  # type: ignore[arg-type]

    def check(call: str) -> None:
        refuse = ref()
        if refuse is not None:
            refuse(call)

    optimizer.register_step_pre_hook(lambda opt, args, kwargs: check("optimizer.step()"))
    inner = optimizer.zero_grad

    def zero_grad(*args: Any, **kwargs: Any) -> None:
        check("optimizer.zero_grad()")
        inner(*args, **kwargs)

    optimizer.zero_grad = zero_grad  # type: ignore[method-assign]


def warn_batchnorm(model: nn.Module) -> None:
    """Called from ``Accumulator.__init__`` directly: ``stacklevel=3`` points at the user's line."""
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        warnings.warn(
            f"gradaccum: {len(bns)} BatchNorm layer(s) (e.g. '{bns[0]}') compute statistics "
            "per micro-batch, not over the effective batch; accumulation cannot make them "
            "match a full-batch run (consider GroupNorm/LayerNorm or SyncBatchNorm).",
            UserWarning,
            stacklevel=3,
        )
