"""LoRA adapters (through peft), activation checkpointing, and saving a trained model.

- :func:`apply_lora` wraps every attention and MLP projection of a causal LM's decoder
  layers with a LoRA adapter, freezes the base weights and seeds the adapters' random
  initialisation, so two runs with the same seed start bit for bit the same whatever
  else used the global RNG. Dropout is 0 by default: then the micro-batch size
  changes nothing but float rounding, which is what exact accumulation needs.
- :func:`enable_gradient_checkpointing` turns on the model's own activation
  checkpointing (non-reentrant): the same gradients, less activation memory.
- :func:`save_model` writes ``OUT/model``: a normal ``save_pretrained`` directory, or
  the adapter alone for a LoRA model (``PeftModel.from_pretrained(base, dir)`` loads it),
  plus the tokenizer, atomically.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradaccum._analytic import projection_names
from gradaccum.errors import one_line
from gradaccum.workloads.errors import WorkloadError

LORA_INSTALL = 'pip install "gradaccum[lora]"'

DEFAULT_ALPHA_PER_R = 2.0
"""``alpha`` defaults to ``2 * r`` (scaling alpha / r = 2), the choice of most LoRA recipes
(QLoRA, axolotl and torchtune examples: r 8/16 with alpha 16/32). It is a learning-rate
multiplier for the adapters: with a fixed alpha, changing r changes the update size."""


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise WorkloadError(f"--lora-r needs the peft package: {LORA_INSTALL}") from None
    return peft


def is_lora(model: nn.Module) -> bool:
    """True for a peft model (adapters on a frozen base)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def lora_targets(model: nn.Module) -> list[str]:
    """The projection names :func:`apply_lora` adapts: every Linear / Conv1D inside the
    decoder layers (``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`` for Llama,
    ``c_attn c_proj c_fc`` for GPT-2). Embeddings and the LM head are never adapted."""
    return projection_names(model)


def apply_lora(
    model: nn.Module, r: int, alpha: float | None = None, seed: int = 0, dropout: float = 0.0,
    targets: list[str] | None = None,
) -> nn.Module:
    """Wrap ``model`` with LoRA adapters of rank ``r`` on its attention and MLP projections.

    Base weights are frozen (``requires_grad=False``); only the adapters train, in fp32
    (peft's default, whatever the base dtype). ``alpha`` defaults to ``2 * r``. The
    adapters' ``A`` matrices are initialised from ``seed`` alone (``B`` is zero, so the
    wrapped model starts equal to the base model); the global RNG is left as it was.

    ``targets``: the projection names to adapt (default :func:`lora_targets`: all of them); each
    must be one of those (``--lora-target-modules``).

    Returns the ``PeftModel``. Raises :class:`WorkloadError` (one line) for ``r < 1``, a
    negative alpha, dropout outside [0, 1), unknown targets, peft missing, or a model without
    projections.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise WorkloadError(f"--lora-r {r}: must be an integer >= 1")
    if alpha is None:
        alpha = DEFAULT_ALPHA_PER_R * r
    if not (isinstance(alpha, (int, float)) and alpha > 0 and alpha == alpha and alpha != float("inf")):
        raise WorkloadError(f"--lora-alpha {alpha}: must be a positive number")
    if not (0.0 <= dropout < 1.0):
        raise WorkloadError(f"--lora-dropout {dropout}: must be in [0, 1)")
    if is_lora(model):
        raise WorkloadError("--lora-r: the model already has LoRA adapters")
    peft = _peft()
    available = lora_targets(model)
    if not available:
        raise WorkloadError(
            f"--lora-r: {type(model).__name__} has no Linear projections in decoder layers to adapt"
        )
    unknown = sorted(set(targets or ()) - set(available))
    if unknown:
        raise WorkloadError(f"--lora-target-modules: {', '.join(unknown)} not among {type(model).__name__}'s "
                            f"projections ({', '.join(available)})")
    targets = list(targets) if targets else available
    conv1d = _has_conv1d(model, targets)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=targets,
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores weights transposed
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _seeded(seed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", category=FutureWarning)  # peft reads a renamed transformers flag
        try:
            wrapped = peft.get_peft_model(model, config)
        except (ValueError, TypeError, RuntimeError) as e:
            why = one_line(e, 300)
            raise WorkloadError(f"--lora-r: peft cannot wrap {type(model).__name__} ({why})") from None
    if not any(p.requires_grad for p in wrapped.parameters()):
        raise WorkloadError(f"--lora-r: no adapter parameters were created on {type(model).__name__}")
    return wrapped


def _has_conv1d(model: nn.Module, targets: list[str]) -> bool:
    wanted = set(targets)
    return any(type(m).__name__ == "Conv1D" for n, m in model.named_modules() if n.split(".")[-1] in wanted)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """The adapters' init depends on ``seed`` only; the caller's RNG streams are restored after.

    peft creates the adapter layers on the CPU and moves them to the base weights'
    device afterwards, so the init is also the same on every device. All CUDA devices'
    generators are forked too, in case an adapter is initialised on one.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should get (the adapters, for a LoRA model)."""
    return [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]


# --------------------------------------------------------------------------- checkpointing
def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Turn on the model's activation checkpointing (non-reentrant), in place; returns ``model``.

    Each decoder layer then keeps only its input during the forward and recomputes its
    activations in the backward: the same gradients (bit for bit on CPU; up to
    nondeterministic kernels on CUDA), about one hidden-state tensor per layer instead
    of all activations. Non-reentrant checkpointing needs no ``requires_grad`` inputs,
    so frozen embeddings under LoRA are fine; transformers also makes the embedding
    output require grad when the model is a peft model.

    Raises :class:`WorkloadError` for a model that does not support it.
    """
    base = model.get_base_model() if is_lora(model) else model
    kwargs = {"use_reentrant": False}
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise WorkloadError(f"--gradient-checkpointing: {type(base).__name__} does not support it")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if is_lora(model) and hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()
    if getattr(base, "config", None) is not None and hasattr(base.config, "use_cache"):
        base.config.use_cache = False  # a KV cache is useless in training and clashes with recompute
    return model


def gradient_checkpointing_enabled(model: nn.Module) -> bool:
    """Whether activation checkpointing is on (what the planner needs to know)."""
    from gradaccum._analytic import checkpointing_enabled

    return checkpointing_enabled(model)


# --------------------------------------------------------------------------- saving
def save_model(
    model: nn.Module, tokenizer: Any, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``out_dir`` in ``save_pretrained`` form, atomically.

    A LoRA model writes its adapter only (``adapter_config.json`` and
    ``adapter_model.safetensors``: load with ``PeftModel.from_pretrained(base, out_dir)``);
    any other transformers model writes a full model directory. ``state_dict`` is the
    full state dict to save instead of the model's own, e.g. one gathered to rank 0
    from an FSDP2-sharded model (``workloads.fsdp.full_state_dict``).

    Written with :func:`gradaccum.checkpoint.atomic_write_dir`: into a temporary directory
    beside ``out_dir``, then swapped into place, so a crash leaves either the old
    directory or the new one, never half of one.
    """
    from gradaccum.checkpoint import atomic_write_dir

    out = Path(out_dir)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise WorkloadError(f"{out}: exists and is not a directory")
    if not hasattr(model, "save_pretrained"):
        raise WorkloadError(f"{type(model).__name__}: cannot be saved with save_pretrained")
    out.parent.mkdir(parents=True, exist_ok=True)

    if is_lora(model):
        # The adapter names its base; a relative path would only load from this directory.
        for config in model.peft_config.values():
            base = config.base_model_name_or_path
            if base and Path(base).exists():
                config.base_model_name_or_path = str(Path(base).resolve())

    def write(tmp: Path) -> None:
        kwargs: dict[str, Any] = {"safe_serialization": True}
        if state_dict is not None:
            kwargs["state_dict"] = dict(state_dict)  # save_pretrained pops entries as it writes them
        model.save_pretrained(str(tmp), **kwargs)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))

    atomic_write_dir(out, write)
    return out
