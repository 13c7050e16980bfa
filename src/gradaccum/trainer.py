"""The loop behind ``gradaccum train``: data -> windows -> Accumulator, with outputs.

Data order depends only on the seed and the step: optimizer step ``s`` consumes the
examples at positions ``[s*E, (s+1)*E)`` of a stream of per-epoch seeded
permutations (E = effective batch), split into micro-batches afterwards. So the
micro-batch size changes nothing but float rounding, and resuming needs only the
step number to know where the data stands.
"""

from __future__ import annotations

import gc
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradaccum import checkpoint, sync
from gradaccum.accumulator import Accumulator, LossFn, StepResult
from gradaccum.memory import candidate_micro_batches, next_smaller

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PLOT = "loss.png"


def _default_collate(examples: list[Any]) -> Any:
    return torch.utils.data.default_collate(examples)


@dataclass
class Trainer:
    """Train ``model`` on ``dataset`` with an exact effective batch made of micro-batches."""

    model: nn.Module
    """The module to train. Under torch.distributed it is wrapped in DDP unless already wrapped."""
    dataset: Sequence[Any]
    """Indexable examples (``len`` and ``[i]``); each optimizer step draws ``effective_batch``."""
    loss_fn: LossFn
    """``loss_fn(model, micro_batch) -> (loss_sum, num_items)``, the engine's contract."""
    effective_batch: int = 128
    """Examples per optimizer step over all ranks: micro_batch x accum_steps x world_size."""
    micro_batch: int = 16
    """Examples per forward/backward on one rank; must divide effective_batch / world_size."""
    steps: int = 100
    """Total optimizer steps (a resumed run continues up to this number)."""
    lr: float = 1e-3
    """Learning rate given to the default optimizer and the schedule."""
    optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None
    """``params -> optimizer``; default AdamW(lr, weight_decay=0.01)."""
    scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None = None
    """``optimizer -> scheduler`` stepped once per optimizer step; default none (constant lr)."""
    collate_fn: Callable[[list[Any]], Any] = _default_collate
    """Turns a list of examples into one micro-batch (pad here, per micro-batch)."""
    seed: int = 0
    """Seeds the data order (and torch's RNG at start); same seed, same data every step."""
    max_grad_norm: float | None = 1.0
    """Clip the normalised, accumulated gradient to this norm; None disables."""
    out_dir: str | Path | None = None
    """Where metrics.jsonl, checkpoint.pt, summary.json and loss.png go; None writes nothing."""
    checkpoint_every: int = 0
    """Save checkpoint.pt every N optimizer steps (0: only at the end)."""
    resume: bool = False
    """Continue exactly from out_dir/checkpoint.pt."""
    progress: bool | None = None
    """tqdm bar; None: only when stderr is a terminal (else plain log lines)."""
    log_every: int = 10
    """Steps between plain log lines when there is no progress bar."""
    extra_state: dict[str, Any] = field(default_factory=dict)
    """Plain data saved in the checkpoint (e.g. the vocabulary), checked on resume."""
    oom_replay: bool = True
    """On CUDA out-of-memory, drop to the next smaller micro-batch and replay the window."""

    def __post_init__(self) -> None:
        self.rank = sync.rank()
        self.world_size = sync.world_size()
        _check_sizes(self.effective_batch, self.micro_batch, self.world_size)
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if len(self.dataset) == 0:
            raise ValueError("the dataset is empty")
        self.per_rank = self.effective_batch // self.world_size
        self.accum_steps = self.per_rank // self.micro_batch
        self._perm_epoch = -1
        self._perm: list[int] = []

    # ------------------------------------------------------------------ data
    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.dataset), generator=g).tolist(), epoch
        return self._perm

    def step_indices(self, step: int) -> list[int]:
        """Dataset indices of optimizer step ``step`` for this rank (its contiguous shard)."""
        n = len(self.dataset)
        start = step * self.effective_batch + self.rank * self.per_rank
        return [self._permutation(p // n)[p % n] for p in range(start, start + self.per_rank)]

    def micro_batches(self, step: int) -> Iterator[Any]:
        """This rank's micro-batches of step ``step``, collated lazily one at a time."""
        idx = self.step_indices(step)
        for i in range(0, len(idx), self.micro_batch):
            yield self.collate_fn([self.dataset[j] for j in idx[i : i + self.micro_batch]])

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Run until ``steps``; returns the summary (also written to summary.json)."""
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        model = self.model
        if self.world_size > 1 and not (sync.is_ddp(model) or sync.is_fsdp2(model)):
            model = nn.parallel.DistributedDataParallel(model)
        self._train_model = model
        self._oom_possible = _oom_possible(model)
        params = list(model.parameters())
        opt = (self.optimizer_factory or self._adamw)(params)
        sched = self.scheduler_factory(opt) if self.scheduler_factory else None
        acc = Accumulator(model, opt, self.accum_steps, scheduler=sched, max_grad_norm=self.max_grad_norm)
        out = Path(self.out_dir) if self.out_dir is not None else None
        writes = out is not None and self.rank == 0
        start, elapsed_before = 0, 0.0
        if self.resume:
            if out is None:
                raise ValueError("--resume needs an output directory")
            start, elapsed_before = self._restore(out / CHECKPOINT, opt, sched, acc)
        if writes:
            out.mkdir(parents=True, exist_ok=True)
            checkpoint.remove_stale_temps(out, (CHECKPOINT, METRICS, SUMMARY, PLOT))
            _keep_metrics_upto(out / METRICS, start)
        self._announce(out)
        bar = self._progress_bar(start)
        self._items_run: int | float = 0
        t0 = time.perf_counter()
        metrics_file = open(out / METRICS, "a", encoding="utf-8") if writes else None  # noqa: SIM115
        try:
            for step in range(start, self.steps):
                result = self._run_window(acc, step)
                elapsed = elapsed_before + time.perf_counter() - t0
                row = self._row(result, step, elapsed, time.perf_counter() - t0, start)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                self._report(bar, row)
                done = step + 1
                if out is not None and (
                    done == self.steps or (self.checkpoint_every and done % self.checkpoint_every == 0)
                ):
                    self._save(out / CHECKPOINT, done, opt, sched, acc, elapsed)
        finally:
            if metrics_file is not None:
                metrics_file.close()
            if bar is not None:
                bar.close()
        summary = self._finish(out)
        return summary

    # ------------------------------------------------------------------ windows
    def _run_window(self, acc: Accumulator, step: int) -> StepResult:
        """One optimizer step; after an out-of-memory error, shrink the micro-batch and replay.

        The replay starts again from the window's first micro-batch with the same
        examples, so nothing is lost or counted twice and the effective batch stays.
        """
        while True:
            result = self._window(acc, step)
            if result is not None:
                return result
            self._shrink_micro_batch(acc, step)

    def _window(self, acc: Accumulator, step: int) -> StepResult | None:
        """Run the window; None when this or another rank ran out of memory (window discarded)."""
        agree = self.oom_replay and self.world_size > 1 and self._oom_possible
        result: StepResult | None = None
        agreed = False
        try:
            for i, mb in enumerate(self.micro_batches(step)):
                if agree and i == self.accum_steps - 1:
                    # Before the last micro-batch (whose backward syncs gradients) every
                    # rank says whether it ran out of memory, so all replay together.
                    agreed = True
                    if _any_rank(False):
                        acc.discard()
                        return None
                with acc.micro_step():
                    loss_sum, num_items = self.loss_fn(self._train_model, mb)
                    result = acc.backward(loss_sum, num_items)
        except torch.cuda.OutOfMemoryError:
            if not self.oom_replay or agreed:
                raise  # after the agreement the other ranks are already inside the sync
        else:
            return result
        # Outside the except block: the traceback no longer pins the window's tensors.
        acc.discard()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if agree:
            _any_rank(True)
        return None

    def _shrink_micro_batch(self, acc: Accumulator, step: int) -> None:
        smaller = next_smaller(candidate_micro_batches(self.per_rank), self.micro_batch)
        if smaller is None:
            raise RuntimeError(f"out of memory at step {step + 1} even with micro-batch 1")
        old, self.micro_batch = self.micro_batch, smaller
        self.accum_steps = acc.accum_steps = self.per_rank // self.micro_batch
        if self.rank == 0:
            print(
                f"gradaccum: out of memory with micro-batch {old}; replaying step {step + 1} with "
                f"micro-batch {self.micro_batch} x accum steps {self.accum_steps}",
                file=sys.stderr,
                flush=True,
            )

    def _adamw(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)

    def _row(self, r: StepResult, step: int, elapsed: float, run_time: float, start: int) -> dict[str, Any]:
        self._items_run += r.num_items
        return {
            "step": step + 1,
            "loss": r.loss,
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "num_items": r.num_items,
            "skipped": r.skipped,
            "micro_batch": self.micro_batch,
            "accum_steps": self.accum_steps,
            "world_size": self.world_size,
            "effective_batch": self.effective_batch,
            "examples_seen": (step + 1) * self.effective_batch,
            "elapsed_s": round(elapsed, 4),
            "items_per_s": round(self._items_run / max(run_time, 1e-9), 2),
            "examples_per_s": round((step + 1 - start) * self.effective_batch / max(run_time, 1e-9), 2),
        }

    # ------------------------------------------------------------------ reporting
    def _announce(self, out: Path | None) -> None:
        if self.rank != 0:
            return
        print(
            f"gradaccum: effective batch {self.effective_batch} = micro-batch {self.micro_batch} "
            f"x accum steps {self.accum_steps} x world size {self.world_size}; "
            f"{self.steps} steps; outputs -> {out if out is not None else '(none)'}",
            flush=True,
        )

    def _progress_bar(self, start: int) -> Any:
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        if not show or self.rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.steps, initial=start, unit="step", dynamic_ncols=True)

    def _report(self, bar: Any, row: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.4f}", items_s=f"{row['items_per_s']:.0f}", refresh=False)
            bar.update(1)
        elif row["step"] % self.log_every == 0 or row["step"] == self.steps:
            print(
                f"step {row['step']}/{self.steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                f"grad_norm {row['grad_norm']:.3f} items/s {row['items_per_s']:.0f}",
                flush=True,
            )

    # ------------------------------------------------------------------ checkpoints
    def _unwrapped(self) -> nn.Module:
        m = self._train_model
        return m.module if sync.is_ddp(m) else m

    def _save(self, path: Path, step: int, opt: Any, sched: Any, acc: Accumulator, elapsed: float) -> None:
        if self.rank != 0:
            return
        state = {
            "format": "gradaccum",
            "version": 1,
            "step": step,
            "model": self._unwrapped().state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "accumulator": acc.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "data": {"seed": self.seed, "effective_batch": self.effective_batch, "position": step},
            "config": {"micro_batch": self.micro_batch, "steps": self.steps, "lr": self.lr},
            "elapsed_s": elapsed,
            "extra": self.extra_state,
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint.save(state, path)

    def _restore(self, path: Path, opt: Any, sched: Any, acc: Accumulator) -> tuple[int, float]:
        ck = checkpoint.load(path, required=("step", "model", "optimizer", "accumulator", "rng", "data"))
        data = ck["data"]
        for name, flag in (("seed", "--seed"), ("effective_batch", "--effective-batch")):
            if data.get(name) != getattr(self, name):
                raise checkpoint.CheckpointError(
                    f"{flag} {getattr(self, name)} does not match the checkpoint's {data.get(name)} "
                    f"({path}); resume needs the same data order"
                )
        if ck.get("extra", {}) != self.extra_state:
            raise checkpoint.CheckpointError(f"{path}: was made for other data or another model")
        try:
            self._unwrapped().load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            if sched is not None and ck.get("scheduler") is not None:
                sched.load_state_dict(ck["scheduler"])
            acc.load_state_dict(ck["accumulator"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise checkpoint.CheckpointError(f"{path}: does not fit this model ({first})") from None
        torch.set_rng_state(ck["rng"]["torch"])
        random.setstate(_as_random_state(ck["rng"]["python"]))
        if "cuda" in ck["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        return int(ck["step"]), float(ck.get("elapsed_s", 0.0))

    # ------------------------------------------------------------------ outputs
    def _finish(self, out: Path | None) -> dict[str, Any]:
        rows = _read_metrics(out / METRICS) if out is not None and self.rank == 0 else []
        losses = [r["loss"] for r in rows if not r.get("skipped")]
        summary = {
            "steps": self.steps,
            "effective_batch": self.effective_batch,
            "micro_batch": self.micro_batch,
            "accum_steps": self.accum_steps,
            "world_size": self.world_size,
            "examples_seen": self.steps * self.effective_batch,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "loss_ratio": losses[-1] / losses[0] if losses and losses[0] else None,
            "skipped_steps": sum(1 for r in rows if r.get("skipped")),
            "elapsed_s": rows[-1]["elapsed_s"] if rows else None,
            "outputs": [METRICS, CHECKPOINT, SUMMARY, PLOT],
        }
        if out is not None and self.rank == 0:
            checkpoint.atomic_write_bytes(
                out / SUMMARY, lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode())
            )
            plot_losses(rows, out / PLOT)
        return summary


def _oom_possible(model: nn.Module) -> bool:
    """Only CUDA raises OutOfMemoryError, so only there is an OOM agreement worth a collective."""
    return any(p.is_cuda for p in model.parameters())


def _any_rank(flag: bool) -> bool:
    """True if ``flag`` is True on any rank (one tiny all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=sync.collective_device())
    return bool(sync.all_reduce_sum(t).item() > 0)


def _check_sizes(effective: int, micro: int, world: int) -> None:
    for flag, v in (("--effective-batch", effective), ("--micro-batch", micro)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{flag} must be a positive integer, got {v!r}")
    if effective % world:
        raise ValueError(f"--effective-batch {effective} is not divisible by the world size {world}")
    if micro > effective // world:
        raise ValueError(
            f"--micro-batch {micro} is larger than the per-rank effective batch {effective // world}"
        )
    if (effective // world) % micro:
        raise ValueError(
            f"--effective-batch {effective} is not divisible by --micro-batch {micro}"
            + (f" x world size {world}" if world > 1 else "")
        )


def _as_random_state(state: Any) -> tuple[Any, ...]:
    # weights_only loading may hand tuples back as lists; random.setstate wants tuples.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """Parse metrics.jsonl, dropping a torn last line left by a kill mid-write."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _keep_metrics_upto(path: Path, step: int) -> None:
    """Keep the metrics of steps 1..step exactly once (a resume may have run past the checkpoint)."""
    rows: dict[int, dict[str, Any]] = {}
    for r in _read_metrics(path):
        if r["step"] <= step:
            rows[r["step"]] = r
    text = "".join(json.dumps(rows[s]) + "\n" for s in sorted(rows))
    checkpoint.atomic_write_bytes(path, lambda f: f.write(text.encode()))


def plot_losses(rows: list[dict[str, Any]], path: Path) -> None:
    """loss.png: loss against optimizer step and against examples seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("skipped")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    steps = [r["step"] for r in rows]
    seen = [r["examples_seen"] for r in rows]
    loss = [r["loss"] for r in rows]
    for ax, x, label in ((axes[0], steps, "optimizer step"), (axes[1], seen, "examples seen")):
        ax.plot(x, loss, lw=1.2)
        ax.set_xlabel(label)
        ax.set_ylabel("mean loss per item")
        ax.grid(alpha=0.3)
    eb = rows[0]["effective_batch"] if rows else "?"
    fig.suptitle(f"gradaccum: loss (effective batch {eb})")
    checkpoint.atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
