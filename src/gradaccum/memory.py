"""Memory planner: measure what a training step costs, choose the micro-batch for a budget.

The peak memory of training at micro-batch n is modelled as

    raw_peak(n)  = state + max(in_flight(n), step_transient) + batch(n)
    state        = parameters + buffers + gradients + optimizer state
                   (+ gradaccum's grad_dtype buffers, + DDP's gradient buckets)
    in_flight(n) = peak of the bytes a micro-batch's forward+backward allocates and holds
                   at once: the batch, activations saved for backward, logits, gradients
                   in flight
    batch(n)     = one more micro-batch of input: Accumulator.step fetches the next one
                   before running the current one
    predicted(n) = ceil(raw_peak(n) * (1 + margin)),   margin = 10% by default

Gradients are counted as present during the forward, which is the steady state of an
accumulation window (micro-batches 2..k add into gradients that already exist), so one
number covers a whole k-micro-batch window.

Every term is *measured* on a deep copy of the model, never guessed per layer or per
optimizer type, the same way on CPU and on CUDA, so plans can be made and tested without
a GPU. The measurement lives in :mod:`gradaccum._memprofile` (which describes how it
works; its live-bytes accounting in ``_livebytes``, its line fits in ``_fits``), sizes
and the default budget in ``_sizes``, the timing of candidates in ``_throughput`` and
the config-only estimate in ``_analytic``. All are private; their public names are
re-exported here, the module to import from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradaccum import sync
from gradaccum._analytic import (  # noqa: F401 - re-exported: the analytic (config-only) estimate
    AnalyticEstimate,
    DecoderShape,
    analytic_estimate,
    decoder_shape,
)
from gradaccum._fits import LinearFit  # noqa: F401 - re-exported
from gradaccum._livebytes import (
    PeakTracker,  # noqa: F401 - re-exported
    model_device,
)
from gradaccum._memprofile import (  # noqa: F401 - re-exported: the public measurement API
    DEFAULT_MARGIN,
    DEFAULT_MEASURE_SIZES,
    LossFn,
    MakeBatch,
    MemoryProfile,
    OptimizerFactory,
    adamw,
    measure_micro_batch,
    profile_memory,
    unwrap,
)
from gradaccum._sizes import (  # noqa: F401 - re-exported: sizes and the default budget
    CPU_BUDGET_SHARE,
    budget_or_default,
    default_budget_bytes,
    format_bytes,
    parse_size,
)
from gradaccum._throughput import measure_throughput  # noqa: F401 - re-exported
from gradaccum.stream import check_divides_world, micro_batch_candidates


class BudgetTooSmall(ValueError):
    """Even micro-batch 1 is predicted not to fit the memory budget."""

    def __init__(self, needed_bytes: int, budget_bytes: int, margin: float = DEFAULT_MARGIN) -> None:
        self.needed_bytes = int(needed_bytes)
        self.budget_bytes = int(budget_bytes)
        super().__init__(
            f"memory budget {format_bytes(budget_bytes)} is too small: micro-batch 1 needs at least "
            f"{format_bytes(needed_bytes, round_up=True)} ({needed_bytes} bytes, "
            f"including a {margin:.0%} safety margin)"
        )


# --------------------------------------------------------------------------- planning
def candidate_micro_batches(effective_batch: int, world_size: int = 1) -> list[int]:
    """Divisors of the per-rank batch ``effective_batch // world_size``, ascending."""
    for name, v in (("effective_batch", effective_batch), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    check_divides_world(effective_batch, world_size)
    return micro_batch_candidates(effective_batch // world_size)


@dataclasses.dataclass
class Plan:
    """The chosen micro-batch: ``micro_batch * accum_steps * world_size == effective_batch``."""

    micro_batch: int
    accum_steps: int
    effective_batch: int
    world_size: int
    predicted_peak_bytes: int
    budget_bytes: int
    table: list[dict[str, int]]
    """Every candidate, ascending: ``{"micro_batch", "predicted_peak_bytes"}``."""
    margin: float = DEFAULT_MARGIN
    profile: MemoryProfile | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "micro_batch": self.micro_batch,
            "accum_steps": self.accum_steps,
            "effective_batch": self.effective_batch,
            "world_size": self.world_size,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "budget_bytes": self.budget_bytes,
            "table": [dict(row) for row in self.table],
        }

    def with_micro_batch(self, micro_batch: int) -> Plan:
        """The same plan run at another candidate micro-batch (accum_steps recomputed)."""
        row = next((r for r in self.table if r["micro_batch"] == micro_batch), None)
        if row is None:
            raise ValueError(f"{micro_batch} is not a candidate micro-batch of this plan")
        per_rank = self.effective_batch // self.world_size
        return dataclasses.replace(self, micro_batch=micro_batch, accum_steps=per_rank // micro_batch,
                                   predicted_peak_bytes=row["predicted_peak_bytes"])

    def fallback(self) -> Plan | None:
        """The plan at the next smaller candidate (after an out-of-memory), or None at 1."""
        smaller = next_smaller(self, self.micro_batch)
        return None if smaller is None else self.with_micro_batch(smaller)


def next_smaller(candidates: Plan | Sequence[int] | Sequence[dict[str, int]], micro_batch: int) -> int | None:
    """The largest candidate strictly below ``micro_batch`` (a Plan, its table, or ints); None if none."""
    rows = candidates.table if isinstance(candidates, Plan) else candidates
    sizes = [r["micro_batch"] if isinstance(r, dict) else int(r) for r in rows]
    below = [s for s in sizes if s < micro_batch]
    return max(below) if below else None


def plan_from_profile(
    profile: MemoryProfile,
    effective_batch: int,
    budget_bytes: int | str,
    world_size: int = 1,
    margin: float = DEFAULT_MARGIN,
) -> Plan:
    """Choose the largest candidate whose predicted peak fits ``budget_bytes`` (pure, no measuring)."""
    budget = parse_size(budget_bytes)
    if not (margin >= 0):
        raise ValueError(f"margin must be >= 0, got {margin}")
    cands = candidate_micro_batches(effective_batch, world_size)
    table = [{"micro_batch": m, "predicted_peak_bytes": profile.predicted_peak_bytes(m, margin)}
             for m in cands]
    fitting = [r["micro_batch"] for r in table if r["predicted_peak_bytes"] <= budget]
    if not fitting:
        raise BudgetTooSmall(table[0]["predicted_peak_bytes"], budget, margin)
    best = max(fitting)
    per_rank = effective_batch // world_size
    peak = next(r["predicted_peak_bytes"] for r in table if r["micro_batch"] == best)
    return Plan(best, per_rank // best, effective_batch, world_size, peak, budget, table, margin, profile)


def plan(
    model: nn.Module,
    loss_fn: LossFn,
    make_batch: MakeBatch,
    effective_batch: int,
    budget_bytes: int | str | None = None,
    optimizer_factory: OptimizerFactory = adamw,
    world_size: int | None = None,
    grad_dtype: torch.dtype | None = None,
    margin: float = DEFAULT_MARGIN,
    measure_sizes: Sequence[int] = DEFAULT_MEASURE_SIZES,
    broadcast: bool = True,
    measure_noise: bool = False,
) -> Plan:
    """Measure ``model`` and return the largest micro-batch that fits ``budget_bytes``.

    Args:
        model: the model to train, on the device it will train on (not modified).
        loss_fn: ``loss_fn(model, micro_batch) -> (loss_sum, num_items)``.
        make_batch: ``make_batch(n)`` -> a worst-case (longest) micro-batch of n examples.
        effective_batch: examples per optimizer step over all ranks (kept fixed).
        budget_bytes: bytes, a size string such as ``"8GiB"``, or None for
            :func:`default_budget_bytes` of the model's device.
        optimizer_factory: ``params -> optimizer`` (default AdamW); one real step is
            taken on a copy to measure its state.
        world_size: ranks sharing the effective batch (default: torch.distributed's, or 1).
        grad_dtype: as passed to ``Accumulator`` (adds its accumulation buffers).
        measure_noise: as passed to ``Accumulator`` (adds the noise probe's window sums).
        margin: safety margin multiplied onto the predicted peak (default 10%).
        broadcast: under torch.distributed (more than one rank) this call is
            collective: the budget is the minimum over ranks, rank 0 measures and
            decides, and every rank receives the same plan (or the same BudgetTooSmall).

    Raises:
        BudgetTooSmall: micro-batch 1 is predicted not to fit (``.needed_bytes``).
    """
    distributed = broadcast and sync.is_distributed() and sync.world_size() > 1
    if world_size is None:
        world_size = sync.world_size()
    candidate_micro_batches(effective_batch, world_size)  # validate before any work
    device = model_device(unwrap(model))
    budget = budget_or_default(budget_bytes, device)
    if not distributed:
        prof = _profile_for(model, loss_fn, make_batch, optimizer_factory, grad_dtype, measure_sizes,
                            effective_batch, world_size, measure_noise)
        return plan_from_profile(prof, effective_batch, budget, world_size, margin)

    budget = sync.min_over_ranks(budget)
    result: Plan | BaseException | None = None
    if sync.rank() == 0:
        try:
            prof = _profile_for(model, loss_fn, make_batch, optimizer_factory, grad_dtype, measure_sizes,
                                effective_batch, world_size, measure_noise)
            result = plan_from_profile(prof, effective_batch, budget, world_size, margin)
        except Exception as e:  # noqa: BLE001 - every rank must learn that planning failed
            result = e
    return _broadcast(result, src=0, margin=margin)


def _profile_for(
    model: nn.Module, loss_fn: LossFn, make_batch: MakeBatch, optimizer_factory: OptimizerFactory,
    grad_dtype: torch.dtype | None, measure_sizes: Sequence[int], effective_batch: int, world_size: int,
    measure_noise: bool = False,
) -> MemoryProfile:
    # Measuring far beyond the largest candidate would waste time (and on a GPU could
    # run out of memory), so cap the sizes, keeping at least two.
    top = max(2, effective_batch // world_size)
    sizes = [s for s in sorted(set(measure_sizes)) if s <= top]
    if len(sizes) < 2:
        sizes = [1, 2]
    return profile_memory(model, loss_fn, make_batch, optimizer_factory, grad_dtype, sizes, measure_noise)


# --------------------------------------------------------------------------- analytic planning
def analytic_plan(
    model: nn.Module | DecoderShape,
    effective_batch: int,
    seq_len: int,
    budget_bytes: int | str,
    world_size: int = 1,
    margin: float = DEFAULT_MARGIN,
    **estimate_kwargs: Any,
) -> Plan:
    """The largest micro-batch whose *analytic* per-rank peak fits ``budget_bytes``.

    For models too large to measure: ``model`` may live on the meta device (built from
    config.json alone, ``workloads.hf.load_config_only``). ``estimate_kwargs`` go to
    :func:`analytic_estimate` (``lora_r``, ``fsdp``, ``gradient_checkpointing``,
    ``dtype`` ...); ``world_size`` is both the data-parallel size and, with ``fsdp=True``,
    the number of shards. The plan has no ``profile``. Raises :class:`BudgetTooSmall`.
    """
    budget = parse_size(budget_bytes)
    cands = candidate_micro_batches(effective_batch, world_size)
    table = []
    for m in cands:
        est = analytic_estimate(model, m, seq_len, world_size=world_size, margin=margin, **estimate_kwargs)
        table.append({"micro_batch": m, "predicted_peak_bytes": est.predicted_peak_bytes})
    fitting = [r["micro_batch"] for r in table if r["predicted_peak_bytes"] <= budget]
    if not fitting:
        raise BudgetTooSmall(table[0]["predicted_peak_bytes"], budget, margin)
    best = max(fitting)
    peak = next(r["predicted_peak_bytes"] for r in table if r["micro_batch"] == best)
    per_rank = effective_batch // world_size
    return Plan(best, per_rank // best, effective_batch, world_size, peak, budget, table, margin)


def fsdp_needs_sync_every_micro_batch(
    model: nn.Module | DecoderShape,
    micro_batch: int,
    seq_len: int,
    budget_bytes: int | str,
    world_size: int,
    **estimate_kwargs: Any,
) -> bool:
    """Under FSDP2: True when holding a window's unsharded gradients is predicted not to fit
    ``budget_bytes`` but reduce-scattering every micro-batch would (pass the answer to
    ``Accumulator(sync_every_micro_batch=...)`` and say so at start-up). False when the
    deferred (one reduce-scatter per window) layout fits, or when neither fits (the
    caller reports :class:`BudgetTooSmall` from :func:`analytic_plan`)."""
    budget = parse_size(budget_bytes)
    kw = dict(estimate_kwargs, fsdp=True, world_size=world_size)
    deferred = analytic_estimate(model, micro_batch, seq_len, sync_every_micro_batch=False, **kw)
    if deferred.predicted_peak_bytes <= budget:
        return False
    every = analytic_estimate(model, micro_batch, seq_len, sync_every_micro_batch=True, **kw)
    return every.predicted_peak_bytes <= budget


# --------------------------------------------------------------------------- distributed
_OK, _TOO_SMALL, _FAILED = 0, 1, 2


def broadcast_plan(plan: Plan | None, src: int = 0) -> Plan:
    """Give every rank rank ``src``'s plan (other ranks pass None). Collective; gloo and NCCL.

    Without an initialised process group this returns ``plan`` unchanged. The memory
    profile is not sent (only the plan's numbers).
    """
    if not (sync.is_distributed() and sync.world_size() > 1):
        if plan is None:
            raise ValueError("broadcast_plan(None) outside torch.distributed: nothing to broadcast")
        return plan
    return _broadcast(plan, src=src, margin=plan.margin if plan is not None else DEFAULT_MARGIN)


def _broadcast(result: Plan | BaseException | None, src: int, margin: float) -> Plan:
    is_src = sync.rank() == src
    header = sync.broadcast_ints(_header(result) if is_src else None, 9, src=src)
    status, micro, accum, eff, world, peak, budget, n_rows, needed = header
    if status == _TOO_SMALL:
        if is_src and isinstance(result, BaseException):
            raise result
        raise BudgetTooSmall(needed, budget, margin)
    if status == _FAILED:
        if is_src and isinstance(result, BaseException):
            raise result
        raise RuntimeError(f"memory planning failed on rank {src}; see its error")
    mine = None
    if is_src and isinstance(result, Plan):
        mine = [v for r in result.table for v in (r["micro_batch"], r["predicted_peak_bytes"])]
    flat = sync.broadcast_ints(mine, 2 * n_rows, src=src)
    if is_src and isinstance(result, Plan):
        return result
    table = [{"micro_batch": flat[i], "predicted_peak_bytes": flat[i + 1]} for i in range(0, len(flat), 2)]
    return Plan(micro, accum, eff, world, peak, budget, table, margin)


def _header(result: Plan | BaseException | None) -> list[int]:
    """What rank ``src`` sends first: the status and the plan's numbers (or the needed bytes)."""
    if isinstance(result, Plan):
        return [_OK, result.micro_batch, result.accum_steps, result.effective_batch, result.world_size,
                result.predicted_peak_bytes, result.budget_bytes, len(result.table), 0]
    if isinstance(result, BudgetTooSmall):
        return [_TOO_SMALL, 0, 0, 0, 0, 0, result.budget_bytes, 0, result.needed_bytes]
    return [_FAILED, 0, 0, 0, 0, 0, 0, 0, 0]
