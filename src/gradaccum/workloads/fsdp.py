"""FSDP2 for a causal LM: shard per decoder layer, gather a full state dict for saving.

``shard_fsdp2(model)`` applies ``fully_shard`` to every decoder layer and then to the
root, the layout every FSDP2 recipe uses (torchtune, torchtitan, TRL): a layer's
weights are all-gathered just before it runs and freed after, and its gradients are
reduce-scattered as soon as its backward is done. ``gradaccum.Accumulator`` recognises
the sharded model and reduce-scatters only on a window's last micro-batch (the
unsharded gradients are held until then) unless ``sync_every_micro_batch=True``; the
memory planner says which one fits (``memory.analytic_estimate(..., fsdp=True)``,
``held_grad_bytes``).

Checkpoints and ``OUT/model`` use a full (unsharded) state dict gathered to rank 0
(:func:`full_state_dict`), so a run can resume on another number of ranks and the saved
model is a normal ``save_pretrained`` directory. Works on CPU with gloo and on CUDA
with NCCL.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradaccum import sync
from gradaccum._analytic import decoder_layers
from gradaccum.workloads.errors import WorkloadError


def shard_fsdp2(
    model: nn.Module,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
    mesh: Any = None,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2: ``fully_shard`` per decoder layer, then the root.

    Call it under an initialised process group (torchrun), after LoRA and activation
    checkpointing are applied and with the model on the device it trains on (CPU for
    gloo, ``cuda:LOCAL_RANK`` for NCCL); build the optimizer afterwards, on the sharded
    parameters. ``param_dtype`` / ``reduce_dtype`` set FSDP2's ``MixedPrecisionPolicy``
    (e.g. fp32 sharded weights, bf16 compute, fp32 gradient reduction: then gradients
    are held and summed in fp32, which gradaccum's ``grad_dtype`` cannot do under FSDP2).

    The decoder layers are found generically (``model.model.layers`` for Llama,
    ``model.transformer.h`` for GPT-2, through a peft wrapper too). Returns ``model``
    (FSDP2 changes the modules' classes in place). Raises :class:`WorkloadError` with
    one line when there is no process group or no decoder layers.
    """
    if not sync.is_distributed():
        raise WorkloadError("--fsdp: needs torch.distributed (launch with torchrun --nproc-per-node N)")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = decoder_layers(model)
    if layers is None:
        raise WorkloadError(f"--fsdp: {type(model).__name__} has no list of decoder layers to shard")
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if param_dtype is not None or reduce_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if mesh is not None:
        kwargs["mesh"] = mesh
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True for a model sharded with FSDP2 (``fully_shard``)."""
    return sync.is_fsdp2(model)


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict, unsharded, on rank 0's CPU; ``{}`` on the other ranks.

    Collective: every rank must call it. Keys are the module's own (FSDP2 keeps the
    names), so the dict loads into the unsharded model and ``save_pretrained(state_dict=...)``
    accepts it. Without FSDP2 it is the model's state dict on the CPU (every rank).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (held by rank 0; the others may pass ``{}``) into a sharded model.

    Collective. Rank 0's tensors are broadcast and each rank keeps its shard, so a
    checkpoint gathered on N ranks resumes on M ranks.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if not is_sharded(model):
        model.load_state_dict(state_dict)
        return
    set_model_state_dict(model, state_dict,
                         options=_options(full_state_dict=True, broadcast_from_rank0=True))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state with unsharded tensors, keyed by parameter name, on rank 0 (``{}``
    elsewhere). Collective. Load it with :func:`load_full_optimizer_state_dict`."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not is_sharded(model):
        return optimizer.state_dict()
    options = _options(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> None:
    """Load :func:`full_optimizer_state_dict`'s result (rank 0's) into a sharded model's optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not is_sharded(model):
        optimizer.load_state_dict(state_dict)
        return
    set_optimizer_state_dict(model, optimizer, state_dict,
                             options=_options(full_state_dict=True, broadcast_from_rank0=True))


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The fully qualified name of each of the optimizer's parameters, in its own order."""
    name_of = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in name_of:
                raise ValueError("the optimizer holds a parameter that is not the model's")
            names.append(name_of[id(p)])
    return names


def indexed_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> dict[str, Any]:
    """A name-keyed full optimizer state (:func:`full_optimizer_state_dict`) in
    ``optimizer.state_dict()``'s own layout (parameters numbered in the optimizer's order),
    so a checkpoint of a sharded run looks like, and loads into, an unsharded run's."""
    if not state_dict:
        return state_dict
    names = _optimizer_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    state = {index[n]: v for n, v in state_dict["state"].items()}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in state_dict["param_groups"]]
    return {"state": state, "param_groups": groups}


def named_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> dict[str, Any]:
    """The inverse of :func:`indexed_optimizer_state_dict`: ``optimizer.state_dict()`` layout
    -> keyed by parameter name, what :func:`load_full_optimizer_state_dict` takes for a
    sharded model."""
    names = _optimizer_names(model, optimizer)
    state = {names[i]: v for i, v in state_dict["state"].items()}
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in state_dict["param_groups"]]
    return {"state": state, "param_groups": groups}


def is_rank0() -> bool:
    return sync.rank() == 0
