"""The memory planner as the commands use it: budgets, measured and analytic plans, the table.

``train --micro-batch auto``, ``train --fsdp``, ``plan`` and ``bench`` all plan; the
rules they share (the default budget, the smallest budget over the ranks, measured vs
analytic) are written here once.
"""

from __future__ import annotations

from typing import Any

from gradaccum import memory, sync
from gradaccum._analytic import model_dtype
from gradaccum.commands import BadInput
from gradaccum.workloads import Workload
from gradaccum.workloads.precision import device
from gradaccum.workloads.prepare import WorkloadSpec, longest_example


def budget_bytes(memory_budget: int | None) -> int:
    """``--memory-budget``, or the default (the CUDA device's free memory; half the RAM on CPU);
    the smallest over the ranks (collective)."""
    return sync.min_over_ranks(memory.budget_or_default(memory_budget, device()))


def estimate_kwargs(spec: WorkloadSpec, model: Any) -> dict[str, Any]:
    """The analytic estimate's arguments for this workload's LoRA / FSDP2 / checkpointing."""
    return {"lora_r": spec.lora_r, "fsdp": spec.fsdp, "gradient_checkpointing": spec.gradient_checkpointing,
            "dtype": model_dtype(model)}


def worst_case_batches(work: Workload) -> Any:
    """Worst-case micro-batches for the planner: n copies of the longest example."""
    longest = max(work.dataset, key=lambda ex: len(ex[0]))
    return lambda n: work.collate_fn([longest] * n)


def plan(spec: WorkloadSpec, work: Workload, effective_batch: int, memory_budget: int | None,
         world_size: int | None = None, measure_noise: bool = True) -> memory.Plan:
    """The memory plan for this workload (collective under torch.distributed): measured, or
    analytic under --fsdp (one process cannot measure a sharded run). ``measure_noise``: train
    measures the noise scale (its default; not under --fsdp), which holds one more gradient."""
    try:
        if spec.fsdp:
            world = world_size or sync.world_size()
            return analytic_plan(spec, work.model, effective_batch, longest_example(work), world,
                                 budget_bytes(memory_budget))[0]
        return memory.plan(work.model, work.loss_fn, worst_case_batches(work), effective_batch,
                           budget_bytes=memory_budget, grad_dtype=work.grad_dtype, world_size=world_size,
                           measure_noise=measure_noise)
    except memory.BudgetTooSmall as e:
        raise BadInput(f"--memory-budget {memory.format_bytes(e.budget_bytes)}: {e}") from None
    except ValueError as e:  # e.g. an effective batch that does not divide over --world-size
        raise BadInput(f"--effective-batch {effective_batch}: {e}") from None


def analytic_plan(spec: WorkloadSpec, model: Any, effective_batch: int, seq_len: int, world: int,
                  budget: int) -> tuple[memory.Plan, Any, bool]:
    """(plan, estimate at its micro-batch, sync_every_micro_batch) from the analytic estimate.

    Under --fsdp the one-reduce-scatter-per-window layout is planned first; when not even
    micro-batch 1 fits that way, reduce-scattering every micro-batch (what train then does).
    """
    kw = estimate_kwargs(spec, model)
    every = False
    try:
        p = memory.analytic_plan(model, effective_batch, seq_len, budget, world_size=world, **kw)
    except memory.BudgetTooSmall:
        if not kw["fsdp"]:
            raise
        every = True
        p = memory.analytic_plan(model, effective_batch, seq_len, budget, world_size=world,
                                 sync_every_micro_batch=True, **kw)
    est = memory.analytic_estimate(model, p.micro_batch, seq_len, world_size=world,
                                   sync_every_micro_batch=every, margin=p.margin, **kw)
    return p, est, every


def fsdp_syncs_every_micro_batch(spec: WorkloadSpec, work: Workload, micro_batch: int,
                                 memory_budget: int | None) -> bool:
    """Whether the window's unsharded gradients are predicted not to fit (collective): then
    FSDP2 reduce-scatters every micro-batch (same result, more communication)."""
    kwargs = estimate_kwargs(spec, work.model)
    kwargs.pop("fsdp")
    budget = budget_bytes(memory_budget)
    every = memory.fsdp_needs_sync_every_micro_batch(work.model, micro_batch, longest_example(work), budget,
                                                     sync.world_size(), **kwargs)
    if every and sync.rank() == 0:
        print(f"gradaccum: --fsdp: a window's unsharded gradients are predicted not to fit "
              f"{memory.format_bytes(budget)}: reduce-scattering on every micro-batch instead of once per "
              f"window (same result, more communication)", flush=True)
    return every


def fastest_that_fits(work: Workload, p: memory.Plan, repeats: int = 1) -> int:
    """The micro-batch with the most examples/s among those the plan says fit, timed over whole
    windows as ``bench`` does (on CPUs the largest is often not the fastest). Rank 0 measures;
    every rank gets its answer."""
    best = 0
    if sync.rank() == 0:
        fits = [r["micro_batch"] for r in p.table if r["predicted_peak_bytes"] <= p.budget_bytes]
        rows = memory.measure_throughput(work.model, work.loss_fn, worst_case_batches(work), fits,
                                         window_batch=p.effective_batch // p.world_size, repeats=repeats)
        best = max(rows, key=lambda r: r["items_per_s"])["micro_batch"] if rows else p.micro_batch
    return sync.max_over_ranks(best)


def print_plan(p: memory.Plan, header: str = "") -> None:
    print(f"effective batch {p.effective_batch}, world size {p.world_size}, "
          f"budget {memory.format_bytes(p.budget_bytes)} ({p.budget_bytes} bytes){header}")
    print(f"{'micro-batch':>11}  {'accum':>5}  {'predicted peak':>14}  fits")
    per_rank = p.effective_batch // p.world_size
    for row in p.table:
        m, peak = row["micro_batch"], row["predicted_peak_bytes"]
        mark = "  <- chosen" if m == p.micro_batch else ""
        fits = "yes" if peak <= p.budget_bytes else "no"
        print(f"{m:>11}  {per_rank // m:>5}  {memory.format_bytes(peak):>14}  {fits:>4}{mark}")
    print(f"plan: micro-batch {p.micro_batch} x accum steps {p.accum_steps} x world size {p.world_size} "
          f"= {p.effective_batch}")
