"""Analytic memory estimate for a decoder-only transformer, from its shape alone.

The measured planner (:mod:`gradaccum._memprofile`) trains a copy of the model, which
is exact but needs the weights in memory. A 70B model does not fit on the machine that
plans it, so this module predicts the same peak from the config: parameter counts
come from the model built on the meta device (``workloads.hf.load_config_only``; no
memory), activations from a count of what each op of a Llama-style (or GPT-2-style)
decoder layer saves for backward. The formulas are written out in docs/memory.md
("Analytic estimate") and checked against the measured planner on a tiny Llama on CPU.

The shape is read in :mod:`gradaccum._decoder` (re-exported here), each term computed in
:mod:`gradaccum._estimate_terms`. Everything is per rank and in bytes. Nothing here
reads weights, imports peft, or needs torch.distributed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from gradaccum._decoder import (  # noqa: F401 - re-exported: the model's shape
    DecoderShape,
    checkpointing_enabled,
    decoder_layers,
    decoder_shape,
    model_dtype,
    projection_names,
)
from gradaccum._estimate_terms import (  # noqa: F401 - re-exported: the per-layer count
    Setup,
    activation_terms,
    fsdp_terms,
    itemsize,
    layer_activation_bytes_per_token,
    state_terms,
)

DEFAULT_MARGIN = 0.10

LOW_PRECISION = (torch.bfloat16, torch.float16)



@dataclasses.dataclass(frozen=True)
class AnalyticEstimate:
    """Per-rank memory of one training step at ``micro_batch`` x ``seq_len``, in bytes."""

    micro_batch: int
    seq_len: int
    world_size: int
    fsdp: bool
    lora_r: int | None
    gradient_checkpointing: bool
    sync_every_micro_batch: bool
    total_params: int
    trainable_params: int
    params_bytes: int
    """Resident weights on this rank (its shard under FSDP2)."""
    unsharded_params_bytes: int
    """FSDP2 only: all-gathered weights alive during forward/backward (the root module's
    stay gathered; two decoder layers: the one computing and the one prefetched)."""
    grad_bytes: int
    """Gradients of the trainable parameters (their shard under FSDP2; 0 under FSDP2's deferred
    sync, where the shards only replace the held unsharded gradients layer by layer in the
    window's last backward, so they are never resident on top of them)."""
    accum_buffer_bytes: int
    """gradaccum's fp32 ``grad_dtype`` buffers for low-precision trainable weights."""
    held_grad_bytes: int
    """FSDP2: unsharded gradients held through a no-sync window (deferred reduce-scatter),
    or one layer's unsharded gradient in flight with ``sync_every_micro_batch``."""
    optimizer_state_bytes: int
    step_transient_bytes: int
    activation_bytes: int
    """Saved for backward at the peak (all layers, or layer boundaries plus one recomputed layer)."""
    transient_bytes: int
    """In flight besides the saved activations: logits and their gradients, gradients in flight."""
    margin: float = DEFAULT_MARGIN

    @property
    def state_bytes(self) -> int:
        return (self.params_bytes + self.grad_bytes + self.accum_buffer_bytes + self.held_grad_bytes
                + self.optimizer_state_bytes)

    @property
    def in_flight_bytes(self) -> int:
        return self.unsharded_params_bytes + self.activation_bytes + self.transient_bytes

    @property
    def raw_peak_bytes(self) -> int:
        """``state + max(in_flight, step_transient)``, as the measured planner models it."""
        return self.state_bytes + max(self.in_flight_bytes, self.step_transient_bytes)

    @property
    def predicted_peak_bytes(self) -> int:
        return math.ceil(self.raw_peak_bytes * (1.0 + self.margin))

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(state_bytes=self.state_bytes, in_flight_bytes=self.in_flight_bytes,
                 raw_peak_bytes=self.raw_peak_bytes, predicted_peak_bytes=self.predicted_peak_bytes)
        return d


def analytic_estimate(
    model: nn.Module | DecoderShape, micro_batch: int, seq_len: int, *,
    dtype: torch.dtype | None = None, lora_r: int | None = None, world_size: int = 1, fsdp: bool = False,
    gradient_checkpointing: bool | None = None, sync_every_micro_batch: bool = False,
    optimizer_state_dtype: torch.dtype | None = None, grad_dtype: torch.dtype | None | str = "auto",
    adapter_dtype: torch.dtype = torch.float32, padded: bool | None = None, foreach: bool = True,
    margin: float = DEFAULT_MARGIN,
) -> AnalyticEstimate:
    """Predict the per-rank peak of training ``model`` with AdamW at ``micro_batch`` x ``seq_len``.

    Args:
        model: a transformers causal LM (on the meta device is enough: see
            ``workloads.hf.load_config_only``), a peft model, or a :class:`DecoderShape`.
        dtype: weights and compute dtype (default: the model's). bf16/fp16 weights get
            gradaccum's fp32 accumulation buffers (``grad_dtype="auto"``) unless under FSDP2.
        lora_r: plan LoRA adapters of this rank on every projection of every layer, base
            weights frozen (the adapters in ``adapter_dtype``, fp32 as peft makes them).
            For a model that already has adapters, pass the same rank.
        world_size, fsdp: under FSDP2 weights, gradients and optimizer state are divided
            by ``world_size``; without it every rank holds everything (DDP).
        gradient_checkpointing: None reads the model's ``is_gradient_checkpointing``.
        sync_every_micro_batch: FSDP2 only: reduce-scatter every micro-batch instead of
            holding the window's unsharded gradients (see ``held_grad_bytes``).
        optimizer_state_dtype: AdamW keeps 2 tensors per trainable parameter; torch makes
            them in the parameter's dtype (the default, None); pass torch.float32 for a
            setup that keeps fp32 moments for bf16 weights.
        padded: whether micro-batches carry a padding mask (k and v are then repeated to
            every head, the non-GQA attention path). Default: ``micro_batch > 1``.
        foreach: AdamW's multi-tensor implementation (torch's default for CUDA tensors)
            allocates a temporary the size of one moment tensor; the per-tensor loop (the
            default on CPU) three times the largest parameter.
    """
    _check_arguments(micro_batch, seq_len, lora_r, world_size)
    shape, dtype, ckpt = _resolve(model, dtype, gradient_checkpointing)
    if lora_r is None and shape.lora_params:
        raise ValueError("the model has LoRA adapters: pass their rank as lora_r")
    padded = micro_batch > 1 if padded is None else padded
    setup = Setup(shape, itemsize(dtype), itemsize(adapter_dtype), lora_r, fsdp, world_size)
    state = state_terms(setup, grad_dtype, optimizer_state_dtype, foreach)
    unsharded, held, grad_bytes = fsdp_terms(setup, sync_every_micro_batch, state.grad_bytes)
    activations, transient = activation_terms(setup, micro_batch, seq_len, padded, ckpt)
    return AnalyticEstimate(
        micro_batch=micro_batch, seq_len=seq_len, world_size=world_size, fsdp=fsdp, lora_r=lora_r,
        gradient_checkpointing=ckpt, sync_every_micro_batch=sync_every_micro_batch,
        total_params=shape.total_params + setup.lora_params, trainable_params=setup.trainable,
        params_bytes=state.params_bytes, unsharded_params_bytes=int(unsharded), grad_bytes=grad_bytes,
        accum_buffer_bytes=int(state.accum_buffer_bytes), held_grad_bytes=int(held),
        optimizer_state_bytes=state.optimizer_state_bytes, step_transient_bytes=state.step_transient_bytes,
        activation_bytes=activations, transient_bytes=transient, margin=margin,
    )


def _check_arguments(micro_batch: int, seq_len: int, lora_r: int | None, world_size: int) -> None:
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch and seq_len must be >= 1, got {micro_batch} and {seq_len}")
    if lora_r is not None and lora_r < 1:
        raise ValueError(f"lora_r must be >= 1, got {lora_r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")


def _resolve(
    model: nn.Module | DecoderShape, dtype: torch.dtype | None, gradient_checkpointing: bool | None
) -> tuple[DecoderShape, torch.dtype, bool]:
    """The shape, the compute dtype and whether checkpointing is on (read off a model when not given)."""
    if isinstance(model, DecoderShape):
        return model, torch.float32 if dtype is None else dtype, bool(gradient_checkpointing)
    shape = decoder_shape(model)
    if dtype is None:
        dtype = model_dtype(model)
    ckpt = bool(gradient_checkpointing)
    if gradient_checkpointing is None:
        ckpt = checkpointing_enabled(model)
    return shape, dtype, ckpt
