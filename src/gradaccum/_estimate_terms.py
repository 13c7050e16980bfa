"""The terms of the analytic memory estimate, one function per term, all per rank in bytes.

The resident state (weights, gradients, gradaccum's buffers, optimizer state and the
step's temporaries), what FSDP2 gathers and holds, and the activations and transients
of one micro-batch. The formulas are written out in docs/memory.md ("Analytic
estimate"); :func:`gradaccum._analytic.analytic_estimate` adds them up.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from gradaccum._decoder import DecoderShape


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------- the set-up
@dataclasses.dataclass(frozen=True)
class Setup:
    """The estimate's inputs, resolved: the shape, element sizes, LoRA and sharding."""

    shape: DecoderShape
    e: int
    """Bytes per element of the weights and of compute."""
    a_e: int
    """Bytes per element of the LoRA adapters."""
    lora_r: int | None
    fsdp: bool
    world_size: int

    @property
    def lora(self) -> bool:
        return self.lora_r is not None

    @property
    def n_shard(self) -> int:
        return self.world_size if self.fsdp else 1

    @property
    def sharded_fsdp(self) -> bool:
        return self.fsdp and self.world_size > 1

    @property
    def lora_per_layer(self) -> int:
        """Adapter parameters of one decoder layer (0 without LoRA)."""
        return self.lora_r * self.shape.per_layer_lora_in_out if self.lora_r is not None else 0

    @property
    def lora_params(self) -> int:
        return self.lora_per_layer * self.shape.num_layers

    @property
    def trainable(self) -> int:
        return self.lora_params if self.lora else self.shape.total_params

    @property
    def t_bytes(self) -> int:
        """Bytes per element of the trainable parameters (and so of their gradients)."""
        return self.a_e if self.lora else self.e

    @property
    def layer_gathered(self) -> int:
        """One decoder layer's weights, all-gathered (FSDP2)."""
        return self.shape.layer_params * self.e + self.lora_per_layer * self.a_e

    def shard(self, nbytes: float) -> int:
        return math.ceil(nbytes / self.n_shard)


# --------------------------------------------------------------------------- resident state
@dataclasses.dataclass(frozen=True)
class StateTerms:
    params_bytes: int
    grad_bytes: int
    accum_buffer_bytes: int
    optimizer_state_bytes: int
    step_transient_bytes: int


def state_terms(
    setup: Setup, grad_dtype: torch.dtype | None | str, optimizer_state_dtype: torch.dtype | None,
    foreach: bool,
) -> StateTerms:
    """Weights, gradients, gradaccum's buffers, AdamW's state and its step's temporaries."""
    shape, trainable, t_bytes = setup.shape, setup.trainable, setup.t_bytes
    params_bytes = setup.shard(shape.total_params * setup.e + setup.lora_params * setup.a_e)
    grad_bytes = setup.shard(trainable * t_bytes)
    if grad_dtype == "auto":
        grad_dtype = torch.float32 if (t_bytes < 4 and not setup.fsdp) else None
    accum = 0
    if grad_dtype is not None and not setup.fsdp and itemsize(grad_dtype) != t_bytes:
        accum = trainable * itemsize(grad_dtype)
    opt_bytes = t_bytes if optimizer_state_dtype is None else itemsize(optimizer_state_dtype)
    optimizer_state = setup.shard(2 * trainable * opt_bytes)
    # foreach AdamW: one temporary the size of a moment tensor (the sqrt of exp_avg_sq);
    # the per-parameter loop: a few temporaries of the largest parameter
    if setup.lora_r is not None:
        largest_trainable = max((max(i, o) * setup.lora_r for _, i, o in shape.projections), default=0)
    else:
        largest_trainable = shape.largest_param
    if foreach:
        step_transient = setup.shard(trainable * opt_bytes)
    else:
        step_transient = setup.shard(3 * largest_trainable * opt_bytes)
    return StateTerms(params_bytes, grad_bytes, accum, optimizer_state, step_transient)


def fsdp_terms(setup: Setup, sync_every_micro_batch: bool, grad_bytes: int) -> tuple[int, int, int]:
    """FSDP2's ``(unsharded weights, held gradients, resident gradient shards)``.

    Without sharding: nothing gathered or held, and the gradients as they are.
    """
    if not setup.sharded_fsdp:
        return 0, 0, grad_bytes
    layer_trainable = setup.lora_per_layer if setup.lora else setup.shape.layer_params
    # the root stays gathered from forward to backward; one layer computes, one is prefetched
    unsharded = setup.shape.root_params * setup.e + 2 * setup.layer_gathered
    if sync_every_micro_batch:
        # one layer's unsharded gradient before its reduce-scatter
        return unsharded, layer_trainable * setup.t_bytes, grad_bytes
    # every unsharded gradient, kept until the window's last backward; the shards appear
    # only as the held gradients are reduce-scattered and freed (the window's last
    # backward, layer by layer): never on top of them
    return unsharded, setup.trainable * setup.t_bytes, 0


# --------------------------------------------------------------------------- one micro-batch
def activation_terms(
    setup: Setup, micro_batch: int, seq_len: int, padded: bool, ckpt: bool
) -> tuple[int, int]:
    """``(saved activations at the peak, in-flight transients)`` of one micro-batch."""
    shape, e = setup.shape, setup.e
    tokens = micro_batch * seq_len
    per_layer = layer_activation_bytes_per_token(shape, e, setup.lora_r, setup.a_e, padded) * tokens
    h, v = shape.hidden, shape.vocab
    # final norm (+ the LM head's input when the head trains)
    top = (4 * h if shape.rms_norm else e * h) * tokens
    if not setup.lora:
        top += 2 * e * h * tokens
    # logits: log-softmax output, its gradient and the gradient of its input (all fp32),
    # or in the forward the logits, their shifted copy, the fp32 upcast and the log-softmax
    logits = max(12.0, 2 * e + (4 if e != 4 else 0) + 4) * v * tokens
    mask = micro_batch * seq_len * seq_len if padded else 0  # boolean attention mask
    grad_in_flight = (shape.largest_param * e) if not setup.lora else 0
    layer_transient = (2 * e * shape.intermediate + 2 * e * h) * tokens
    layer_phase = (per_layer if ckpt else 0.0) + layer_transient  # a layer's backward (recomputed)
    if ckpt:
        activations = shape.num_layers * e * h * tokens + top  # layer boundaries
    else:
        activations = shape.num_layers * per_layer + top
    if setup.sharded_fsdp:
        # Two phases of the backward under FSDP2: the logits' gradient (only the root and the
        # last, prefetched, layer are gathered: one layer less than ``unsharded``) and a
        # layer's backward (two layers gathered; the weight gradient in flight is that
        # layer's, counted in ``held``). Measured on 2 gloo ranks (docs/memory.md).
        top_phase = logits + grad_in_flight - setup.layer_gathered
        transient = max(top_phase, layer_phase, 0.0) + mask
    else:
        transient = max(logits, layer_phase) + mask + grad_in_flight
    return math.ceil(activations), math.ceil(transient)


# --------------------------------------------------------------------------- per decoder layer
def layer_activation_bytes_per_token(
    shape: DecoderShape, compute_bytes: int, lora_r: int | None, adapter_bytes: int, padded: bool
) -> float:
    """Bytes one decoder layer saves for backward, per token of the micro-batch.

    The count follows what each op keeps (see docs/memory.md, "Analytic estimate"):
    norm inputs (fp32 for RMSNorm), the inputs of every trained projection (or of its
    LoRA adapter, cast to the adapter dtype per adapter), q/k/v and the output of
    scaled-dot-product attention (with its fp32 log-sum-exp per head; k and v are
    repeated to all heads when an attention mask forces the non-GQA path), and the MLP
    intermediates.
    """
    h, f, e = shape.hidden, shape.intermediate, compute_bytes
    kv = shape.kv_heads * shape.head_dim
    lora = lora_r is not None
    total = 0.0
    # two norms per layer: RMSNorm keeps its input in fp32; with a trained weight also the
    # normalised tensor (the weight's gradient needs it). LayerNorm keeps its input.
    norm_in = 4 * h if shape.rms_norm else e * h
    total += 2 * (norm_in + (e * h if (shape.rms_norm and not lora) else 0))
    # inputs of the projections, grouped by the tensor they read
    groups = _projection_groups(shape)
    for size, count in groups:
        if lora and adapter_bytes != e:
            total += count * adapter_bytes * size  # each adapter casts its own copy
        else:
            total += e * size  # one tensor, shared by the projections that read it
    if lora:
        total += sum(1 for _ in shape.projections) * adapter_bytes * lora_r  # lora_A outputs
    # attention
    if shape.gated_mlp or shape.kv_heads != shape.heads:  # separate q, k, v (Llama family)
        kv_saved = h if (padded and shape.kv_heads != shape.heads) else kv
        total += e * (h + 2 * kv_saved)  # q after RoPE, k after RoPE, v
    else:  # fused qkv (GPT-2): q, k, v are views of one (3h) output
        total += e * 3 * h
    total += e * h + 4 * shape.heads  # attention output + fp32 log-sum-exp
    # MLP intermediates (the down projection's input is counted with the projections)
    if shape.gated_mlp:
        total += 3 * e * f  # gate output, activation output, up output
    else:
        total += _GELU_SAVED * e * f
    return total


_GELU_SAVED = 4
"""Tensors of size (tokens x intermediate) GPT-2's tanh-GELU keeps (its python formula)
besides the fc output (calibrated on transformers' GPT2MLP)."""


def _projection_groups(shape: DecoderShape) -> list[tuple[int, int]]:
    """(input size, number of projections reading it) per distinct input tensor of a layer."""
    h, f = shape.hidden, shape.intermediate
    if not shape.projections:
        return []
    by_in: list[tuple[int, int]] = []
    names = [n for n, _, _ in shape.projections]
    if shape.gated_mlp or "q_proj" in names:
        qkv_names = ("q_proj", "k_proj", "v_proj", "qkv_proj", "Wqkv", "query_key_value")
        qkv = sum(1 for n in names if n in qkv_names)
        o = sum(1 for n in names if n in ("o_proj", "dense", "out_proj"))
        up = sum(1 for n in names if n in ("gate_proj", "up_proj", "gate_up_proj", "w1", "w3"))
        down = sum(1 for n in names if n in ("down_proj", "w2"))
        by_in = [(h, max(qkv, 1)), (h, max(o, 1)), (h, max(up, 1)), (f, max(down, 1))]
    else:  # GPT-2: c_attn (h), c_proj of attention (h), c_fc (h), c_proj of the MLP (f)
        by_in = [(h, 1), (h, 1), (h, 1), (f, 1)]
    return by_in
