"""What the analytic memory estimate reads off a decoder-only transformer: its shape.

Works on a model built on the meta device (``workloads.hf.load_config_only``), real or
peft-wrapped or FSDP2-sharded: the decoder layers, their projections, the parameter
counts and dtypes, and whether activation checkpointing is on. Private: re-exported by
:mod:`gradaccum._analytic` (and the estimate's names by :mod:`gradaccum.memory`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

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


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point weight that is not a LoRA adapter (else fp32)."""
    for n, p in model.named_parameters():
        if "lora_" not in n and p.is_floating_point():
            return p.dtype
    return torch.float32
