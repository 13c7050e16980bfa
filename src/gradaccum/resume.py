"""The run's resumable state: what a checkpoint holds, and its validation on load.

A checkpoint is the truth about a run: weights, optimizer, scheduler and accumulator
state, the RNGs, the position in the data stream (in examples), what defines the run
(checked on ``--resume``) and every metrics row so far. Loading validates one concern
per function, in a fixed order, and restores nothing until every check passed (the
RNGs last, rolled back if they fail). File I/O is :mod:`gradaccum.checkpoint`'s.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradaccum import checkpoint, sync
from gradaccum.checkpoint import CheckpointError
from gradaccum.errors import one_line
from gradaccum.runlog import MetricsHistory, legacy_rows_upto

FORMAT_VERSION = 2
"""1: weights, optimizer, data position; 2: adds "run" (what defines the run) and "metrics"."""
REQUIRED = ("step", "model", "optimizer", "accumulator", "rng", "data")
Bad = Callable[[str], CheckpointError]


@dataclass(frozen=True)
class RunSpec:
    """What the resuming run expects of its checkpoint."""

    defining: dict[str, Any]
    """What defines the run, by the caller's names (e.g. ``{"--steps": 600, "--data": "sha256:..."}``)."""
    seed: int
    """Seeds the data order: must match."""
    start_batch: int
    """The effective batch the data stream started with: must match."""
    steps: int
    """The run's target; a checkpoint beyond it is refused."""
    extra: dict[str, Any]
    """Plain data the caller saved (e.g. the vocabulary): must match."""
    may_grow: tuple[str, ...] = ()
    """Keys of ``defining`` whose value may grow on resume (``--steps``: extending a run)."""


@dataclass
class RunState:
    """The run's own resumable state (the model, optimizer, scheduler and accumulator have theirs)."""

    step: int = 0
    """Optimizer steps done."""
    position: int = 0
    """Examples of the data stream consumed."""
    elapsed_s: float = 0.0
    """Training time so far, over every resumed part of the run."""
    history: MetricsHistory = field(default_factory=MetricsHistory)
    """Every metrics row so far (the checkpoint rebuilds metrics.jsonl from it)."""
    last_saved: int | None = None
    """The step of the last checkpoint on disk (named when a later write fails)."""
    grown: dict[str, Any] = field(default_factory=dict)
    """On resume: the ``may_grow`` values the checkpoint had, where this run asks for more."""
    trackers: dict[str, Any] = field(default_factory=dict)
    """Each tracker's run id and the steps it was sent (:meth:`gradaccum.trackers.Trackers.state`)."""


# --------------------------------------------------------------------------- save
def save(path: Path, spec: RunSpec, run: RunState, model: nn.Module, opt: torch.optim.Optimizer,
         sched: Any, acc: Any, adaptive: Any = None, config: dict[str, Any] | None = None
         ) -> dict[str, Any] | None:
    """Write the run's checkpoint to ``path`` (rank 0; collective under FSDP2).

    Returns the model state written (rank 0), None on other ranks. A failed write raises
    OSError, with the previous checkpoint left intact.
    """
    sharded = sync.is_fsdp2(model)
    if sync.rank() != 0 and not sharded:
        return None
    model_state, opt_state = gather_state(model, opt)
    if sync.rank() != 0:
        return None
    write(build_state(run.step, model_state, opt_state, {
        "scheduler": sched.state_dict() if sched is not None else None,
        "accumulator": acc.state_dict(),
        "data": {"seed": spec.seed, "effective_batch": spec.start_batch, "position": run.step,
                 "examples": run.position},
        "adaptive": adaptive.state_dict() if adaptive is not None else None,
        "config": config or {},
        "run": spec.defining,
        "metrics": run.history.state_dict(),
        "trackers": run.trackers,
        "elapsed_s": run.elapsed_s,
        "extra": spec.extra,
    }), path)
    run.last_saved = run.step
    return model_state


def gather_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state, optimizer state) in an unsharded run's layout.

    Collective under FSDP2 (every rank takes part): the full state is gathered to rank 0's
    CPU, so the checkpoint resumes on any number of ranks, sharded or not.
    """
    if not sync.is_fsdp2(model):
        return model.state_dict(), opt.state_dict()
    from gradaccum.workloads import fsdp

    gathered = fsdp.full_optimizer_state_dict(model, opt)
    return fsdp.full_state_dict(model), fsdp.indexed_optimizer_state_dict(model, opt, gathered)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def build_state(step: int, model_state: dict[str, Any], opt_state: dict[str, Any], parts: dict[str, Any]
                ) -> dict[str, Any]:
    """The checkpoint's dict; ``parts`` holds the rest of the schema (scheduler, accumulator,
    data, adaptive, config, run, metrics, elapsed_s, extra)."""
    return {"format": "gradaccum", "version": FORMAT_VERSION, "step": step, "model": model_state,
            "optimizer": opt_state, "rng": rng_state(), **parts}


def write(state: dict[str, Any], path: Path) -> None:
    """Atomic save; any failure to write comes out as an OSError (torch's writer may mask it)."""
    try:
        checkpoint.save(state, path)
    except RuntimeError as e:
        cause = checkpoint.os_error_in(e)
        if cause is None and "write" not in str(e).lower():
            raise
        raise (cause or checkpoint.as_os_error(path)) from None


# --------------------------------------------------------------------------- load
def load(path: Path, spec: RunSpec, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, acc: Any,
         adaptive: Any = None) -> RunState:
    """Validate ``path`` against ``spec`` and load it into the run's objects (in place).

    Raises CheckpointError (one line) and changes nothing when any check fails.
    """
    ck = checkpoint.load(path, required=REQUIRED)

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: malformed checkpoint: {what}")

    check_version(ck, path)
    step = check_step(ck["step"], spec, bad)
    grown = check_defining(ck.get("run"), spec, path, bad)
    position = check_data_order(ck["data"], spec, step, path, bad)
    if adaptive is not None:
        try:
            adaptive.load_state_dict(ck.get("adaptive") or {})
        except (ValueError, TypeError, KeyError) as e:
            raise bad(f"the adaptive batch state does not fit this run ({e})") from None
    if ck.get("extra", {}) != spec.extra:
        raise CheckpointError(f"{path}: was made for other data or another model")
    if step > spec.steps:
        raise bad(f"step {step} is beyond --steps {spec.steps}")
    elapsed = check_elapsed(ck.get("elapsed_s", 0.0), bad)
    history = load_history(ck, step, path, bad)
    check_optimizer_state(ck["optimizer"], opt, bad)
    saved_sched = ck.get("scheduler")
    if sched is not None and saved_sched is not None and not conforms(sched.state_dict(), saved_sched):
        raise bad("the scheduler state has the wrong structure")
    check_accumulator_state(ck["accumulator"], bad)
    load_weights(ck, model, opt, sched, acc, path)
    restore_rng(ck["rng"], bad)
    return RunState(step, position, float(elapsed), history, last_saved=step, grown=grown,
                    trackers=ck.get("trackers") or {})


def check_version(ck: dict[str, Any], path: Path) -> None:
    """A checkpoint from a newer gradaccum (or of no known version) is refused, not guessed at."""
    version = ck.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: unknown checkpoint format version {_brief(version)}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this gradaccum "
                              f"reads ({FORMAT_VERSION}); upgrade gradaccum to resume it")


def check_step(step: Any, spec: RunSpec, bad: Bad) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad(f"step is {step!r}, not a non-negative integer")
    return step


def check_defining(run: Any, spec: RunSpec, path: Path, bad: Bad) -> dict[str, Any]:
    """Everything that defines the run must be as it was (named by the caller's key), except that
    a ``may_grow`` number may grow; returns those that grew, with their old values."""
    if run is None:
        return {}
    if not isinstance(run, dict):
        raise bad("'run' is not a dict")
    keep = "a resumed run keeps the flags that define it (or start afresh with --overwrite)"
    grown = {}
    for key, value in spec.defining.items():
        if key not in run and value is not None:  # e.g. --lora-r given now, not then
            raise CheckpointError(f"--resume: {key} {_brief(value)} is given now but {path} was made "
                                  f"without it; {keep}")
        if key in run and run[key] != value:
            if key in spec.may_grow and _grows(run[key], value):
                grown[key] = run[key]
                continue
            was = _brief(run[key])
            raise CheckpointError(f"--resume: {key} {_brief(value)} differs from {was} in {path}; {keep}")
    for key, value in run.items():
        if key not in spec.defining and value is not None:  # e.g. --lora-r given then, not now
            raise CheckpointError(f"--resume: {key} {_brief(value)} in {path} is not given now; {keep}")
    return grown


def _grows(old: Any, new: Any) -> bool:
    numbers = all(isinstance(v, int) and not isinstance(v, bool) for v in (old, new))
    return numbers and new > old


def check_data_order(data: Any, spec: RunSpec, step: int, path: Path, bad: Bad) -> int:
    """The same data order (seed, starting batch); returns the stream position in examples."""
    if not isinstance(data, dict):
        raise bad("'data' is not a dict")
    for name, flag, mine in (("seed", "--seed", spec.seed), ("effective_batch", "--effective-batch",
                                                              spec.start_batch)):
        if data.get(name) != mine:
            raise CheckpointError(f"{flag} {mine} does not match the checkpoint's {data.get(name)} ({path}); "
                                  "resume needs the same data order")
    position = data.get("examples", step * spec.start_batch)
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise bad(f"the data position is {position!r}")
    return position


def check_elapsed(elapsed: Any, bad: Bad) -> float:
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not math.isfinite(elapsed) \
            or elapsed < 0:
        raise bad(f"elapsed_s is {elapsed!r}")
    return float(elapsed)


def load_history(ck: dict[str, Any], step: int, path: Path, bad: Bad) -> MetricsHistory:
    """The metrics rows 1..step: from the checkpoint, or (version 1) salvaged from the log."""
    if "metrics" in ck:
        try:
            history = MetricsHistory.from_state(ck["metrics"])
        except ValueError as e:
            raise bad(str(e)) from None
        if len(history) != step or history.column("step") != list(range(1, step + 1)):
            raise bad(f"its metrics history does not hold steps 1..{step}")
        return history
    history = MetricsHistory()
    metrics = path.parent / "metrics.jsonl"
    try:
        rows = legacy_rows_upto(metrics, step)
    except OSError as e:
        raise CheckpointError(f"{metrics}: unreadable ({e.strerror})") from None
    for r in rows:
        history.append(r)
    return history


def check_accumulator_state(state: Any, bad: Bad) -> None:
    if not isinstance(state, dict):
        raise bad("the accumulator state is not a dict")
    for key in ("step", "skipped_steps", "micro_steps", "items_seen", "accum_steps"):
        low = 1 if key == "accum_steps" else 0
        v = state.get(key, low)
        ok_type = (int, float) if key == "items_seen" else int
        if isinstance(v, bool) or not isinstance(v, ok_type) or not v >= low:
            raise bad(f"the accumulator's {key} is {v!r}")


def load_weights(ck: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, sched: Any, acc: Any,
                 path: Path) -> None:
    """Model, optimizer, scheduler and accumulator state, in place (collective under FSDP2)."""
    try:
        if sync.is_fsdp2(model):  # each rank keeps its shard of the full state
            from gradaccum.workloads import fsdp

            fsdp.load_full_state_dict(model, ck["model"])
            named = fsdp.named_optimizer_state_dict(model, opt, ck["optimizer"])
            fsdp.load_full_optimizer_state_dict(model, opt, named)
        else:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
        if sched is not None and ck.get("scheduler") is not None:
            sched.load_state_dict(ck["scheduler"])
        acc.load_state_dict(ck["accumulator"])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: does not fit this model ({one_line(e, 120)})") from None


def restore_rng(rng: Any, bad: Bad) -> None:
    """torch's, Python's (and CUDA's) generators; all or none."""
    try:
        if not isinstance(rng, dict):
            raise TypeError("not a dict")
        torch_state = rng["torch"]
        if not (isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8
                and torch_state.shape == torch.get_rng_state().shape):
            raise TypeError("torch generator state has the wrong type or size")
        python_state = as_random_state(rng["python"])
        before = torch.get_rng_state(), random.getstate()
        try:
            torch.set_rng_state(torch_state)
            random.setstate(python_state)
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        except BaseException:
            torch.set_rng_state(before[0])
            random.setstate(before[1])
            raise
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, OverflowError) as e:
        raise bad(f"broken RNG state ({str(e).strip()[:100] or type(e).__name__})") from None


# --------------------------------------------------------------------------- structure checks
def conforms(fresh: Any, loaded: Any, numbers_interchange: bool = True) -> bool:
    """Whether ``loaded`` has the structure (keys, lengths, types, tensor shapes) of ``fresh``."""
    if fresh is None or isinstance(fresh, bool):
        return loaded is None if fresh is None else isinstance(loaded, bool)
    if isinstance(fresh, (int, float)):
        if isinstance(loaded, bool) or not isinstance(loaded, (int, float)):
            return False
        return numbers_interchange or isinstance(loaded, type(fresh))
    if isinstance(fresh, str):
        return isinstance(loaded, str)
    if isinstance(fresh, torch.Tensor):
        return (isinstance(loaded, torch.Tensor) and loaded.dtype == fresh.dtype
                and loaded.shape == fresh.shape)
    if isinstance(fresh, dict):
        return (isinstance(loaded, dict) and set(loaded) == set(fresh)
                and all(conforms(fresh[k], loaded[k], numbers_interchange) for k in fresh))
    if isinstance(fresh, (list, tuple)):
        return (isinstance(loaded, (list, tuple)) and len(loaded) == len(fresh)
                and all(conforms(a, b, numbers_interchange) for a, b in zip(fresh, loaded, strict=True)))
    return True


PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
                "sum", "ax", "prev")


def check_optimizer_state(state: Any, opt: torch.optim.Optimizer, bad: Bad) -> None:
    """Refuse optimizer state that load_state_dict would accept but step() would choke on."""
    fresh = opt.state_dict()
    if not isinstance(state, dict) or set(state) != set(fresh):
        raise bad("the optimizer state is not a state dict")
    if not conforms(fresh["param_groups"], state["param_groups"]):
        raise bad("the optimizer's parameter groups do not fit this model")
    params = [p for g in opt.param_groups for p in g["params"]]
    if not isinstance(state["state"], dict):
        raise bad("the optimizer state is not a dict")
    for idx, per_param in state["state"].items():
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(params):
            raise bad(f"the optimizer state names parameter {idx!r}, which this model does not have")
        if not isinstance(per_param, dict):
            raise bad(f"the optimizer state of parameter {idx} is not a dict")
        for key, value in per_param.items():
            _check_param_state(idx, key, value, params[idx], bad)


def _check_param_state(idx: int, key: str, value: Any, param: torch.Tensor, bad: Bad) -> None:
    if key in PARAM_SHAPED and not (
        isinstance(value, torch.Tensor) and value.shape == param.shape and value.is_floating_point()
    ):
        raise bad(f"the optimizer's {key} of parameter {idx} does not fit its shape")
    if key == "step" and not (
        (isinstance(value, torch.Tensor) and value.numel() == 1)
        or (isinstance(value, (int, float)) and not isinstance(value, bool))
    ):
        raise bad(f"the optimizer's step of parameter {idx} is {value!r}")


def as_random_state(state: Any) -> tuple[Any, ...]:
    # weights_only loading may hand tuples back as lists; random.setstate wants tuples.
    if not isinstance(state, (list, tuple)) or len(state) != 3:
        raise TypeError("python generator state is not a 3-tuple")
    version, internal, gauss = state
    if not isinstance(internal, (list, tuple)) or not all(
        isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32 for x in internal
    ):
        raise TypeError("python generator state is malformed")
    return (version, tuple(internal), gauss)


def _brief(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:21] + "..."
