"""Analytic memory estimate for a decoder-only transformer, from its shape alone.

The measured planner (:mod:`gradaccum._memprofile`) trains a copy of the model, which
is exact but needs the weights in memory. A 70B model does not fit on the machine that
plans it, so this module predicts the same peak from the config: parameter counts
come from the model built on the meta device (``workloads.hf.load_config_only``; no
memory), activations from a count of what each op of a Llama-style (or GPT-2-style)
decoder layer saves for backward. The formulas are written out in docs/memory.md
("Analytic estimate") and checked against the measured planner on a tiny Llama on CPU.

Everything here is per rank and in bytes. Nothing in this module reads weights,
imports peft, or needs torch.distributed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

DEFAULT_MARGIN = 0.10

LOW_PRECISION = (torch.bfloat16, torch.float16)

# Leaf names (last component) of the projections LoRA wraps, by architecture family.
# Anything else that is a Linear / Conv1D inside a decoder layer is found generically.
_GATE_NAMES = ("gate_proj", "gate_up_proj", "w1", "w3", "gate")


# --------------------------------------------------------------------------- model structure
def _is_projection(module: nn.Module) -> bool:
    """A Linear, or transformers' Conv1D (GPT-2's transposed Linear)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight") and module.weight.dim() == 2


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in dict.fromkeys(module.parameters()))


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The list of repeated decoder blocks: ``model.model.layers`` (Llama, Mistral, Qwen ...),
    ``model.transformer.h`` (GPT-2), or generically the ``ModuleList`` of same-class
    blocks that holds the most parameters. None when there is none (not a transformer).

    Works through wrappers (a peft ``PeftModel``, FSDP2-sharded modules).
    """
    best: tuple[int, nn.ModuleList] | None = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) != 1:
            continue
        n = _param_count(module)
        if n > 0 and (best is None or n > best[0]):
            best = (n, module)
    return None if best is None else best[1]


def projection_names(model: nn.Module) -> list[str]:
    """Leaf names of the Linear/Conv1D modules inside the decoder layers, in first-seen order
    (``q_proj``, ``k_proj`` ... for Llama; ``c_attn``, ``c_proj``, ``c_fc`` for GPT-2).

    These are the attention and MLP projections: embeddings and the LM head live outside
    the layers and are never included. LoRA adapters (``lora_A``/``lora_B``) and peft's
    wrapped ``base_layer`` are skipped, so this also works on a model that has adapters.
    """
    layers = decoder_layers(model)
    if layers is None:
        return []
    names: dict[str, None] = {}
    for name, module in layers.named_modules():
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts) or "base_layer" in parts:
            continue
        if _is_projection(module) or _is_peft_lora_layer(module):
            names[parts[-1]] = None
    return list(names)


def _is_peft_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _projection_shapes(layer: nn.Module, targets: Iterable[str]) -> list[tuple[str, int, int]]:
    """(leaf name, in_features, out_features) of every targeted projection of one layer."""
    wanted = set(targets)
    out = []
    for name, module in layer.named_modules():
        parts = name.split(".")
        if not name or parts[-1] not in wanted:
            continue
        if any(p.startswith("lora_") for p in parts) or "base_layer" in parts:
            continue
        base = module.base_layer if _is_peft_lora_layer(module) else module
        if not _is_projection(base):
            continue
        w = base.weight
        if isinstance(base, nn.Linear):
            fan_in, fan_out = w.shape[1], w.shape[0]
        else:  # Conv1D stores (in, out)
            fan_in, fan_out = w.shape[0], w.shape[1]
        out.append((parts[-1], int(fan_in), int(fan_out)))
    return out


def _config_int(config: Any, *keys: str) -> int | None:
    for k in keys:
        v = getattr(config, k, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """What the estimate needs to know about a decoder-only transformer."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool
    """SwiGLU-style MLP (gate and up projections: Llama, Mistral, Qwen) vs one fc + GELU (GPT-2)."""
    rms_norm: bool
    """RMSNorm computed in fp32 (Llama family) vs LayerNorm."""
    layer_params: int
    """Parameters of one decoder layer (the largest, if they differ)."""
    root_params: int
    """Parameters outside the decoder layers: embeddings, final norm, LM head (tied once)."""
    total_params: int
    largest_param: int
    """Elements of the largest single parameter (an embedding, usually)."""
    projections: tuple[tuple[str, int, int], ...]
    """(name, in, out) of each Linear/Conv1D of one layer: what LoRA adapts."""
    param_bytes: int
    """Bytes of all parameters in their current dtypes (unique storages)."""
    lora_params: int = 0
    """Adapter parameters already on the model (a peft model), 0 otherwise."""

    @property
    def per_layer_lora_in_out(self) -> int:
        return sum(i + o for _, i, o in self.projections)


def decoder_shape(model: nn.Module) -> DecoderShape:
    """Read a :class:`DecoderShape` off a model (real or on the meta device, peft-wrapped or not)."""
    config = getattr(model, "config", None)
    inner = model
    # peft: PeftModel.base_model (LoraModel).model is the transformers model with the config
    for attr in ("base_model", "model"):
        cand = getattr(inner, attr, None)
        if config is None and isinstance(cand, nn.Module):
            inner = cand
            config = getattr(inner, "config", None)
    if config is None:
        raise ValueError("the analytic estimate needs a transformers model (a .config): pass one, "
                         "or plan the model with the measured planner (memory.plan)")
    layers = decoder_layers(model)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no list of decoder layers found")
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    heads = _config_int(config, "num_attention_heads", "n_head", "num_heads")
    vocab = _config_int(config, "vocab_size")
    if hidden is None or heads is None or vocab is None:
        raise ValueError(f"{type(config).__name__}: hidden size, heads and vocabulary are required")
    kv_heads = _config_int(config, "num_key_value_heads", "n_head_kv", "num_kv_heads") or heads
    head_dim = _config_int(config, "head_dim") or hidden // heads
    intermediate = _config_int(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden

    params = {id(p): p for p in model.parameters()}
    lora_ids = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    layer_ids: set[int] = set()
    layer_params = 0
    for layer in layers:
        ids = {id(p) for p in layer.parameters()} - lora_ids
        layer_ids |= ids
        layer_params = max(layer_params, sum(params[i].numel() for i in ids))
    total = sum(p.numel() for i, p in params.items() if i not in lora_ids)
    root = sum(p.numel() for i, p in params.items() if i not in lora_ids and i not in layer_ids)
    names = projection_names(model)
    first = layers[0]
    leafs = {n.split(".")[-1] for n, _ in first.named_modules()}
    gated = any(g in leafs for g in _GATE_NAMES)
    rms = any("RMSNorm" in type(m).__name__ for m in first.modules())
    return DecoderShape(
        num_layers=len(layers),
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        gated_mlp=gated,
        rms_norm=rms,
        layer_params=layer_params,
        root_params=root,
        total_params=total,
        largest_param=max((p.numel() for i, p in params.items() if i not in lora_ids), default=0),
        projections=tuple(_projection_shapes(first, names)),
        param_bytes=sum(p.numel() * p.element_size() for i, p in params.items() if i not in lora_ids),
        lora_params=sum(params[i].numel() for i in lora_ids),
    )


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether a transformers model (or a peft model around one) has activation checkpointing on."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new name first
        if hasattr(type(base), attr) or attr in getattr(base, "__dict__", {}):
            return bool(getattr(base, attr))
    return False


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _model_dtype(model: nn.Module) -> torch.dtype:
    for n, p in model.named_parameters():
        if "lora_" not in n and p.is_floating_point():
            return p.dtype
    return torch.float32


# --------------------------------------------------------------------------- activations
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


# --------------------------------------------------------------------------- the estimate
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
    model: nn.Module | DecoderShape,
    micro_batch: int,
    seq_len: int,
    *,
    dtype: torch.dtype | None = None,
    lora_r: int | None = None,
    world_size: int = 1,
    fsdp: bool = False,
    gradient_checkpointing: bool | None = None,
    sync_every_micro_batch: bool = False,
    optimizer_state_dtype: torch.dtype | None = None,
    grad_dtype: torch.dtype | None | str = "auto",
    adapter_dtype: torch.dtype = torch.float32,
    padded: bool | None = None,
    foreach: bool = True,
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
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch and seq_len must be >= 1, got {micro_batch} and {seq_len}")
    if lora_r is not None and lora_r < 1:
        raise ValueError(f"lora_r must be >= 1, got {lora_r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if isinstance(model, DecoderShape):
        shape = model
        if dtype is None:
            dtype = torch.float32
        ckpt = bool(gradient_checkpointing)
    else:
        shape = decoder_shape(model)
        if dtype is None:
            dtype = _model_dtype(model)
        ckpt = bool(gradient_checkpointing)
        if gradient_checkpointing is None:
            ckpt = checkpointing_enabled(model)
    if lora_r is None and shape.lora_params:
        raise ValueError("the model has LoRA adapters: pass their rank as lora_r")
    if padded is None:
        padded = micro_batch > 1
    e = _itemsize(dtype)
    a_e = _itemsize(adapter_dtype)
    n_shard = world_size if fsdp else 1
    lora = lora_r is not None

    def shard(nbytes: float) -> int:
        return math.ceil(nbytes / n_shard)

    # --- parameters, gradients, optimizer state
    lora_per_layer = lora_r * shape.per_layer_lora_in_out if lora else 0
    lora_params = lora_per_layer * shape.num_layers
    if lora:
        trainable, t_bytes = lora_params, a_e
    else:
        trainable, t_bytes = shape.total_params, e
    base_bytes = shape.total_params * e
    params_bytes = shard(base_bytes + lora_params * a_e)
    grad_bytes = shard(trainable * t_bytes)
    if grad_dtype == "auto":
        grad_dtype = torch.float32 if (t_bytes < 4 and not fsdp) else None
    accum = 0
    if grad_dtype is not None and not fsdp and _itemsize(grad_dtype) != t_bytes:
        accum = trainable * _itemsize(grad_dtype)
    opt_bytes = t_bytes if optimizer_state_dtype is None else _itemsize(optimizer_state_dtype)
    optimizer_state = shard(2 * trainable * opt_bytes)
    # foreach AdamW: one temporary the size of a moment tensor (the sqrt of exp_avg_sq);
    # the per-parameter loop: a few temporaries of the largest parameter
    if lora:
        largest_trainable = max((max(i, o) * lora_r for _, i, o in shape.projections), default=0)
    else:
        largest_trainable = shape.largest_param
    step_transient = shard(trainable * opt_bytes) if foreach else shard(3 * largest_trainable * opt_bytes)

    unsharded = held = 0
    sharded_fsdp = fsdp and world_size > 1
    layer_gathered = shape.layer_params * e + lora_per_layer * a_e
    if sharded_fsdp:
        layer_trainable = lora_per_layer if lora else shape.layer_params
        # the root stays gathered from forward to backward; one layer computes, one is prefetched
        unsharded = shape.root_params * e + 2 * layer_gathered
        if sync_every_micro_batch:
            held = layer_trainable * t_bytes  # one layer's unsharded gradient before its reduce-scatter
        else:
            held = trainable * t_bytes  # every unsharded gradient, kept until the window's last backward
            # the shards appear only as the held gradients are reduce-scattered and freed
            # (the window's last backward, layer by layer): never on top of them
            grad_bytes = 0
    # --- activations
    tokens = micro_batch * seq_len
    per_layer = layer_activation_bytes_per_token(shape, e, lora_r, a_e, padded) * tokens
    h, v = shape.hidden, shape.vocab
    # final norm (+ the LM head's input when the head trains)
    top = (4 * h if shape.rms_norm else e * h) * tokens
    if not lora:
        top += 2 * e * h * tokens
    # logits: log-softmax output, its gradient and the gradient of its input (all fp32),
    # or in the forward the logits, their shifted copy, the fp32 upcast and the log-softmax
    logits = max(12.0, 2 * e + (4 if e != 4 else 0) + 4) * v * tokens
    mask = micro_batch * seq_len * seq_len if padded else 0  # boolean attention mask
    grad_in_flight = (shape.largest_param * e) if not lora else 0
    layer_transient = (2 * e * shape.intermediate + 2 * e * h) * tokens
    layer_phase = (per_layer if ckpt else 0.0) + layer_transient  # a layer's backward (recomputed)
    if ckpt:
        activations = shape.num_layers * e * h * tokens + top  # layer boundaries
    else:
        activations = shape.num_layers * per_layer + top
    if sharded_fsdp:
        # Two phases of the backward under FSDP2: the logits' gradient (only the root and the
        # last, prefetched, layer are gathered: one layer less than ``unsharded``) and a
        # layer's backward (two layers gathered; the weight gradient in flight is that
        # layer's, counted in ``held``). Measured on 2 gloo ranks (docs/memory.md).
        top_phase = logits + grad_in_flight - layer_gathered
        transient = max(top_phase, layer_phase, 0.0) + mask
    else:
        transient = max(logits, layer_phase) + mask + grad_in_flight
    return AnalyticEstimate(
        micro_batch=micro_batch,
        seq_len=seq_len,
        world_size=world_size,
        fsdp=fsdp,
        lora_r=lora_r,
        gradient_checkpointing=ckpt,
        sync_every_micro_batch=sync_every_micro_batch,
        total_params=shape.total_params + lora_params,
        trainable_params=trainable,
        params_bytes=params_bytes,
        unsharded_params_bytes=int(unsharded),
        grad_bytes=grad_bytes,
        accum_buffer_bytes=int(accum),
        held_grad_bytes=int(held),
        optimizer_state_bytes=optimizer_state,
        step_transient_bytes=step_transient,
        activation_bytes=math.ceil(activations),
        transient_bytes=math.ceil(transient),
        margin=margin,
    )
