"""The loop behind ``gradaccum train``: data -> windows -> Accumulator.

Data order depends only on the seed and the position in the stream, counted in
examples: an optimizer step of effective batch E consumes the next E examples of a
stream of per-epoch seeded permutations, split into micro-batches afterwards. So the
micro-batch size changes nothing but float rounding, the effective batch may change
between steps (``--effective-batch auto``), and resuming needs only the position.

What a run leaves on disk (metrics, summary, plot, the output-directory guard and
lock) lives in :mod:`gradaccum.runlog`; atomic checkpoint files in
:mod:`gradaccum.checkpoint`. SIGTERM and SIGINT end the run cleanly after the current
window with a checkpoint (:class:`Stopped`); under torch.distributed every rank
stops after the same step.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradaccum import checkpoint, runlog, sync
from gradaccum.accumulator import Accumulator, LossFn, StepResult
from gradaccum.adaptive import AdaptiveBatch, lr_rule_for
from gradaccum.memory import candidate_micro_batches, next_smaller
from gradaccum.runlog import CHECKPOINT, METRICS, PLOT, SUMMARY, OutDirError, OutputWriteError, plot_losses

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "PLOT",
    "SUMMARY",
    "OutDirError",
    "OutputWriteError",
    "Stopped",
    "Trainer",
    "plot_losses",
]

FORMAT_VERSION = 2  # 2: adds "run" (what defines the run) and "metrics" (the history)
EVALS_PER_RUN = 10  # default --eval-every: this many evaluations per run, and one at the end


def stream_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Dataset indices at stream positions ``[start, start + count)``: per-epoch shuffles
    seeded by ``seed`` and the epoch, so any position is found without replaying."""
    out: list[int] = []
    epoch, perm = -1, []
    for pos in range(start, start + count):
        if pos // n != epoch:
            epoch = pos // n
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=g).tolist()
        out.append(perm[pos % n])
    return out


def _default_collate(examples: list[Any]) -> Any:
    return torch.utils.data.default_collate(examples)


class Stopped(Exception):
    """The run stopped early on SIGTERM/SIGINT after saving a checkpoint.

    ``signum`` is the signal, ``step`` the last completed optimizer step (saved in
    ``checkpoint``, None when the trainer has no output directory), ``steps`` the target.
    """

    def __init__(self, signum: int, step: int, steps: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.steps, self.checkpoint = signum, step, steps, checkpoint
        name = signal.Signals(signum).name
        saved = f"checkpoint saved to {checkpoint}" if checkpoint is not None else "no output directory"
        super().__init__(f"stopped by {name} after step {step} of {steps}; {saved}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: SIGTERM 143, SIGINT 130


class _StopSignals:
    """While active, SIGTERM and SIGINT only ask the loop to stop after the current window.

    A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once; repeated SIGTERMs
    are ignored, so a scheduler's follow-up signal cannot interrupt the final save.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __enter__(self) -> _StopSignals:
        if self.enabled:
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()


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
    overwrite: bool = False
    """Replace a run already in out_dir (without it, such an out_dir is refused)."""
    progress: bool | None = None
    """tqdm bar; None: only when stderr is a terminal (else plain log lines)."""
    log_every: int = 10
    """Steps between plain log lines when there is no progress bar."""
    extra_state: dict[str, Any] = field(default_factory=dict)
    """Plain data saved in the checkpoint (e.g. the vocabulary), checked on resume."""
    run_config: dict[str, Any] = field(default_factory=dict)
    """What else defines the run, keyed by the flag that sets it (e.g. ``{"--data": "sha256:..."}``):
    saved in the checkpoint with ``--steps``, ``--lr``, ``--effective-batch`` and ``--seed``;
    ``resume`` refuses a checkpoint whose value differs, naming the key."""
    items_name: str = "items"
    """What ``num_items`` counts (e.g. "tokens"): names the throughput column ``<items>_per_s``."""
    handle_signals: bool = True
    """On SIGTERM/SIGINT finish the window, save a checkpoint and raise :class:`Stopped`."""
    oom_replay: bool = True
    """On CUDA out-of-memory, drop to the next smaller micro-batch and replay the window."""
    grad_dtype: torch.dtype | None = None
    """Accumulate gradients of low-precision weights in this dtype (fp32 for bf16 weights)."""
    autocast_dtype: torch.dtype | None = None
    """Run forward passes under ``torch.autocast`` in this dtype (bf16, or fp16 with a GradScaler)."""
    eval_dataset: Sequence[Any] | None = None
    """Held-out examples: the exact item-mean loss on them is logged as ``eval_loss``."""
    eval_every: int | None = None
    """Evaluate every N steps and at the end; None: ten times per run; 0: only at the end."""
    measure_noise: bool = True
    """Measure the gradient noise scale (``noise_scale``, ``critical_batch`` in the metrics)."""
    adaptive: AdaptiveBatch | None = None
    """``--effective-batch auto``: grows accum_steps as the critical batch grows (see adaptive.py)."""
    save_model: Callable[..., None] | None = None
    """``save_model(model, path)`` writes the trained model to ``OUT/model`` (rank 0, at every
    checkpoint and at the end). For a model sharded with FSDP2 it is called as
    ``save_model(model, path, state_dict=...)`` with the full state dict gathered to rank 0."""
    sync_every_micro_batch: bool = False
    """Passed to the Accumulator: communicate gradients on every micro-batch (FSDP2 when the
    window's unsharded gradients would not fit); the same result, more communication."""
    final_metrics: Callable[[nn.Module], dict[str, Any]] | None = None
    """Scores the trained model once at the end (e.g. the demo's accuracy per puzzle kind)."""

    def __post_init__(self) -> None:
        self.rank = sync.rank()
        self.world_size = sync.world_size()
        _check_sizes(self.effective_batch, self.micro_batch, self.world_size)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"--steps must be a positive integer, got {self.steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if len(self.dataset) == 0:
            raise ValueError("the dataset is empty")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: give one")
        if self.adaptive is not None:
            self.effective_batch = self.adaptive.effective_batch
        self.per_rank = self.effective_batch // self.world_size
        self.accum_steps = self.per_rank // self.micro_batch
        self.history = runlog.MetricsHistory()
        self._last_saved: int | None = None
        self._position = 0  # examples of the stream consumed before the current step
        if self.eval_every is None:
            self.eval_every = max(1, self.steps // EVALS_PER_RUN)

    def defining_config(self) -> dict[str, Any]:
        """What defines this run (checked on resume), keyed by flag."""
        batch = "auto" if self.adaptive is not None else self.effective_batch
        return {"--steps": self.steps, "--lr": self.lr, "--effective-batch": batch,
                "--seed": self.seed, **self.run_config}

    # ------------------------------------------------------------------ data
    def step_indices(self, step: int) -> list[int]:
        """Dataset indices of optimizer step ``step`` for this rank, at a fixed effective batch."""
        return self._indices(step * self.effective_batch)

    def _indices(self, position: int) -> list[int]:
        """This rank's contiguous shard of the effective batch that starts at ``position``."""
        start = position + self.rank * self.per_rank
        return stream_indices(len(self.dataset), self.seed, start, self.per_rank)

    def micro_batches(self, step: int | None = None) -> Iterator[Any]:
        """This rank's micro-batches of the current step (or of ``step`` at a fixed effective
        batch), collated lazily one at a time."""
        idx = self._indices(self._position if step is None else step * self.effective_batch)
        for i in range(0, len(idx), self.micro_batch):
            yield self.collate_fn([self.dataset[j] for j in idx[i : i + self.micro_batch]])

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Run until ``steps``; returns the summary (also written to summary.json).

        Raises OutDirError / CheckpointError (bad input: nothing in out_dir touched),
        OutputWriteError (a write failed mid-run: disk full ...), or :class:`Stopped`
        (SIGTERM/SIGINT: stopped after a window, checkpoint saved).
        """
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        model = self.model
        if self.world_size > 1 and not (sync.is_ddp(model) or sync.is_fsdp2(model)):
            model = nn.parallel.DistributedDataParallel(model)
        self._train_model = model
        self._oom_possible = _oom_possible(model)
        # Only what trains: frozen weights (a LoRA base model) get no optimizer state.
        params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        opt = (self.optimizer_factory or self._adamw)(params)
        sched = self.scheduler_factory(opt) if self.scheduler_factory else None
        if self.adaptive is not None:
            self.adaptive.lr_rule = lr_rule_for(opt)  # sqrt for Adam-family, linear for SGD
        scaler = None
        if self.autocast_dtype == torch.float16:
            scaler = torch.amp.GradScaler(_device_type(model))  # fp16 needs loss scaling
        acc = Accumulator(
            model, opt, self.accum_steps, scheduler=sched, max_grad_norm=self.max_grad_norm,
            grad_dtype=self.grad_dtype, grad_scaler=scaler,
            measure_noise=self.measure_noise and not sync.is_fsdp2(model),
            sync_every_micro_batch=self.sync_every_micro_batch,
        )
        out = Path(self.out_dir) if self.out_dir is not None else None
        writes = out is not None and self.rank == 0
        if self.resume and out is None:
            raise ValueError("--resume needs an output directory")
        start, elapsed_before = 0, 0.0
        ck_stamp = None
        if self.resume:
            assert out is not None
            ck_stamp = _stamp(out / CHECKPOINT)
            start, elapsed_before = self._restore(out / CHECKPOINT, opt, sched, acc)
            self._last_saved = start
        lock = self._take_out_dir(out, ck_stamp) if out is not None else None
        try:
            if writes:
                assert out is not None
                self._prepare_outputs(out, start)
            self._announce(out, start)
            return self._loop(acc, opt, sched, out, start, elapsed_before)
        finally:
            if lock is not None:
                lock.release()

    def _take_out_dir(self, out: Path, ck_stamp: Any) -> runlog.RunLock | None:
        """Rank 0 checks ``out`` and locks it; every rank learns whether that worked."""
        lock, error = None, None
        if self.rank == 0:
            try:
                runlog.guard(out, self.resume, self.overwrite)
                out.mkdir(parents=True, exist_ok=True)
                lock = runlog.RunLock(out).acquire()
                # Checked again under the lock: another run may have finished meanwhile.
                runlog.guard(out, self.resume, self.overwrite, locked=True)
                if self.resume and _stamp(out / CHECKPOINT) != ck_stamp:
                    raise OutDirError(f"{out / CHECKPOINT}: changed while this run was starting "
                                      "(another run wrote it); try again")
            except OutDirError as e:
                error = e
            except OSError as e:
                error = OutDirError(f"--out {out}: cannot create the directory ({runlog._reason(e)})")
            if error is not None and lock is not None:
                lock.release()
                lock = None
        if self.world_size > 1 and _any_rank(error is not None) and error is None:
            error = OutDirError(f"--out {out}: refused by rank 0 (see its message)")
        if error is not None:
            raise error
        return lock

    def _prepare_outputs(self, out: Path, start: int) -> None:
        try:
            if self.overwrite:
                runlog.clear_outputs(out)
            checkpoint.remove_stale_temps(out, (*runlog.OUTPUTS, runlog.MODEL_DIR))
            if self.resume:
                # The checkpoint is the truth: metrics.jsonl gets exactly its steps 1..start,
                # whatever a kill (or anything else) left in the file.
                runlog.write_metrics(out / METRICS, self.history.rows())
            elif (out / METRICS).exists():
                (out / METRICS).unlink()
        except OSError as e:
            raise self._write_failed(out / METRICS, e, "preparing the output directory") from None

    def _loop(self, acc: Accumulator, opt: Any, sched: Any, out: Path | None, start: int,
              elapsed_before: float) -> dict[str, Any]:
        writes = out is not None and self.rank == 0
        bar = self._progress_bar(start)
        self._items_run: int | float = 0
        self._examples_run = 0
        applied = [r for r in self.history.rows() if not r.get("skipped")]
        self._items_applied: float = sum(float(r.get("num_items", 0)) for r in applied)
        self._examples_applied: float = sum(float(r.get("effective_batch", 0)) for r in applied)
        t0 = time.perf_counter()
        log = None
        try:
            if writes:
                assert out is not None
                try:
                    log = runlog.MetricsLog(out / METRICS)
                except OSError as e:
                    raise self._write_failed(out / METRICS, e, "opening it") from None
            with _StopSignals(self.handle_signals) as signals:
                for step in range(start, self.steps):
                    result = self._run_window(acc, step)
                    self._position += self.effective_batch
                    elapsed = elapsed_before + time.perf_counter() - t0
                    row = self._row(result, step, elapsed, time.perf_counter() - t0, start)
                    if self._eval_due(step + 1):
                        row["eval_loss"] = self.evaluate()
                    if self.adaptive is not None:
                        self._adapt(acc, opt, sched, row.get("critical_batch"))
                    self.history.append(row)
                    # Written in the history's key order, so a rebuild from the checkpoint is identical.
                    row = self.history.row(len(self.history) - 1)
                    if log is not None:
                        try:
                            log.write(row)
                        except OSError as e:
                            raise self._write_failed(out / METRICS, e, f"logging step {step + 1}") from None
                    self._report(bar, row)
                    done = step + 1
                    stop = self._stop_signal(signals.signum)
                    every = self.checkpoint_every and done % self.checkpoint_every == 0
                    if out is not None and (done == self.steps or stop or every):
                        self._save(out / CHECKPOINT, done, opt, sched, acc, elapsed)
                    if stop and done < self.steps:
                        if self.world_size > 1:
                            _any_rank(False)  # every rank leaves after rank 0's checkpoint is on disk
                        raise Stopped(stop, done, self.steps, out / CHECKPOINT if out is not None else None)
        finally:
            if log is not None:
                log.close()
            if bar is not None:
                bar.close()
        return self._finish(out)

    def _stop_signal(self, local: int | None) -> int:
        """The signal every rank stops for after this window (0: none); one tiny all-reduce."""
        if self.world_size == 1:
            return local or 0
        import torch.distributed as dist

        t = torch.tensor([float(local or 0)], device=sync.collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

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
            for i, mb in enumerate(self.micro_batches()):
                if agree and i == self.accum_steps - 1:
                    # Before the last micro-batch (whose backward syncs gradients) every
                    # rank says whether it ran out of memory, so all replay together.
                    agreed = True
                    if _any_rank(False):
                        acc.discard()
                        return None
                with acc.micro_step():
                    with self._autocast():
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

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(_device_type(self._train_model), dtype=self.autocast_dtype)

    def _adamw(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)

    # ------------------------------------------------------------------ eval, noise, adaptive batch
    def _eval_due(self, done: int) -> bool:
        if self.eval_dataset is None or len(self.eval_dataset) == 0:
            return False
        return done == self.steps or bool(self.eval_every and done % self.eval_every == 0)

    def evaluate(self) -> float:
        """Exact item-mean loss over ``eval_dataset`` (Σ loss_sum / Σ num_items, all ranks)."""
        assert self.eval_dataset is not None
        model = self._unwrapped()
        was_training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        mine = range(self.rank, len(self.eval_dataset), self.world_size)
        batches = math.ceil(len(mine) / self.micro_batch)
        if sync.is_fsdp2(model):
            # FSDP2 all-gathers weights in every forward: every rank runs as many as rank 0,
            # a rank out of examples runs one more and adds nothing.
            batches = math.ceil(math.ceil(len(self.eval_dataset) / self.world_size) / self.micro_batch)
        try:
            with torch.no_grad(), self._autocast():
                for b in range(batches):
                    idx = mine[b * self.micro_batch : (b + 1) * self.micro_batch]
                    weight = 1.0 if len(idx) else 0.0
                    batch = self.collate_fn([self.eval_dataset[j] for j in (idx or [0])])
                    loss_sum, n = self.loss_fn(model, batch)
                    pair = [loss_sum.detach().double().cpu(), torch.as_tensor(n).double().cpu()]
                    total += weight * torch.stack(pair)
        finally:
            model.train(was_training)
        if self.world_size > 1:
            total = sync.all_reduce_sum(total.to(sync.collective_device())).cpu()
        loss, items = total.tolist()
        return loss / items if items else math.nan

    def _critical_batch(self, noise_scale: float | None) -> float | None:
        """The noise scale (items) in examples, at the run's mean items per example so far."""
        if noise_scale is None or self._examples_applied <= 0 or self._items_applied <= 0:
            return None
        return noise_scale * self._examples_applied / self._items_applied

    def _adapt(self, acc: Accumulator, opt: torch.optim.Optimizer, sched: Any,
               critical: float | None) -> None:
        """--effective-batch auto: grow accum_steps (and the lr with it) for the next step."""
        assert self.adaptive is not None
        old = self.adaptive.lr_factor()
        if not self.adaptive.update(critical, acc.noise.windows if acc.noise is not None else 0):
            return
        self.effective_batch = self.adaptive.effective_batch
        self.per_rank = self.effective_batch // self.world_size
        self.accum_steps = acc.accum_steps = self.adaptive.accum_steps
        ratio = self.adaptive.lr_factor() / old
        for g in opt.param_groups:
            g["lr"] *= ratio
        if sched is not None and hasattr(sched, "base_lrs"):
            # LambdaLR-style schedules recompute the lr from base_lrs every step.
            sched.base_lrs = [b * ratio for b in sched.base_lrs]
            sched._last_lr = [g["lr"] for g in opt.param_groups]
        if self.rank == 0:
            print(f"gradaccum: effective batch auto: {self.effective_batch // 2} -> {self.effective_batch} "
                  f"(accum steps {self.accum_steps}; measured critical batch {critical:.0f}; "
                  f"lr x{ratio:.3g})", file=sys.stderr, flush=True)

    def _row(self, r: StepResult, step: int, elapsed: float, run_time: float, start: int) -> dict[str, Any]:
        self._items_run += r.num_items
        self._examples_run += self.effective_batch
        if not r.skipped:
            self._items_applied += r.num_items
            self._examples_applied += self.effective_batch
        noise = {}
        if r.noise_scale is not None:
            noise = {"noise_scale": r.noise_scale, "critical_batch": self._critical_batch(r.noise_scale)}
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
            "examples_seen": self._position,
            "elapsed_s": round(elapsed, 4),
            f"{self.items_name}_per_s": round(self._items_run / max(run_time, 1e-9), 2),
            "examples_per_s": round(self._examples_run / max(run_time, 1e-9), 2),
            **noise,
        }

    # ------------------------------------------------------------------ reporting
    def _announce(self, out: Path | None, start: int) -> None:
        if self.rank != 0:
            return
        print(
            f"gradaccum: effective batch {self.effective_batch} = micro-batch {self.micro_batch} "
            f"x accum steps {self.accum_steps} x world size {self.world_size}; "
            f"{self.steps} steps; outputs -> {out if out is not None else '(none)'}",
            flush=True,
        )
        if self.resume:
            print(f"gradaccum: resuming from step {start} of {self.steps}", flush=True)

    def _progress_bar(self, start: int) -> Any:
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        if not show or self.rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.steps, initial=start, unit="step", dynamic_ncols=True)

    def _report(self, bar: Any, row: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        rate = row[f"{self.items_name}_per_s"]
        if bar is not None:
            post = {"loss": f"{row['loss']:.4f}", f"{self.items_name}/s": f"{rate:.0f}"}
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        elif row["step"] % self.log_every == 0 or row["step"] == self.steps:
            print(
                f"step {row['step']}/{self.steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                f"grad_norm {row['grad_norm']:.3f} {self.items_name}/s {rate:.0f} "
                f"examples/s {row['examples_per_s']:.0f}",
                flush=True,
            )

    # ------------------------------------------------------------------ checkpoints
    def _unwrapped(self) -> nn.Module:
        m = self._train_model
        return m.module if sync.is_ddp(m) else m

    def _write_failed(self, path: Path, e: OSError, what: str) -> OutputWriteError:
        err = runlog.write_error(path, e, what)
        last = (f"the last good checkpoint is step {self._last_saved}" if self._last_saved is not None
                else "no checkpoint was saved yet")
        return OutputWriteError(f"{err}; {last}")

    def _save(self, path: Path, step: int, opt: Any, sched: Any, acc: Accumulator, elapsed: float) -> None:
        model = self._unwrapped()
        sharded = sync.is_fsdp2(model)
        if sharded:
            # Collective (every rank takes part): the full weights and optimizer state are
            # gathered to rank 0's CPU, in the layout of an unsharded run, so the checkpoint
            # resumes on any number of ranks, sharded or not.
            from gradaccum.workloads import fsdp

            model_state = fsdp.full_state_dict(model)
            gathered = fsdp.full_optimizer_state_dict(model, opt)
            opt_state = fsdp.indexed_optimizer_state_dict(model, opt, gathered)
        if self.rank != 0:
            return
        if not sharded:
            model_state, opt_state = model.state_dict(), opt.state_dict()
        state = {
            "format": "gradaccum",
            "version": FORMAT_VERSION,
            "step": step,
            "model": model_state,
            "optimizer": opt_state,
            "scheduler": sched.state_dict() if sched is not None else None,
            "accumulator": acc.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "data": {"seed": self.seed, "effective_batch": self._start_batch(), "position": step,
                     "examples": self._position},
            "adaptive": self.adaptive.state_dict() if self.adaptive is not None else None,
            "config": {"micro_batch": self.micro_batch, "steps": self.steps, "lr": self.lr},
            "run": self.defining_config(),
            "metrics": self.history.state_dict(),
            "elapsed_s": elapsed,
            "extra": self.extra_state,
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        try:
            checkpoint.save(state, path)
        except OSError as e:
            raise self._write_failed(path, e, f"saving step {step}") from None
        except RuntimeError as e:  # torch's zip writer may wrap, or mask, the OS error
            cause = checkpoint.os_error_in(e)
            if cause is None and "write" not in str(e).lower():
                raise
            cause = cause or checkpoint.as_os_error(path)
            raise self._write_failed(path, cause, f"saving step {step}") from None
        self._last_saved = step
        if self.save_model is not None:
            target = path.parent / runlog.MODEL_DIR
            try:
                if sharded:
                    self.save_model(model, target, state_dict=model_state)
                else:
                    self.save_model(model, target)
            except OSError as e:
                raise self._write_failed(target, e, f"saving the model of step {step}") from None

    def _restore(self, path: Path, opt: Any, sched: Any, acc: Accumulator) -> tuple[int, float]:
        ck = checkpoint.load(path, required=("step", "model", "optimizer", "accumulator", "rng", "data"))

        def bad(what: str) -> checkpoint.CheckpointError:
            return checkpoint.CheckpointError(f"{path}: malformed checkpoint: {what}")

        step = ck["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise bad(f"step is {step!r}, not a non-negative integer")
        run = ck.get("run")
        if run is not None:
            if not isinstance(run, dict):
                raise bad("'run' is not a dict")
            for key, value in self.defining_config().items():
                if key in run and run[key] != value:
                    raise checkpoint.CheckpointError(
                        f"--resume: {key} {_brief(value)} differs from {_brief(run[key])} in {path}; "
                        f"a resumed run keeps the flags that define it (or start afresh with --overwrite)"
                    )
            mine = self.defining_config()
            for key, value in run.items():
                if key not in mine and value is not None:  # e.g. --lora-r given then, not now
                    raise checkpoint.CheckpointError(
                        f"--resume: {key} {_brief(value)} in {path} is not given now; "
                        f"a resumed run keeps the flags that define it (or start afresh with --overwrite)"
                    )
        data = ck["data"]
        if not isinstance(data, dict):
            raise bad("'data' is not a dict")
        for name, flag, mine in (("seed", "--seed", self.seed),
                                 ("effective_batch", "--effective-batch", self._start_batch())):
            if data.get(name) != mine:
                raise checkpoint.CheckpointError(
                    f"{flag} {mine} does not match the checkpoint's {data.get(name)} "
                    f"({path}); resume needs the same data order"
                )
        position = data.get("examples", step * self._start_batch())
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise bad(f"the data position is {position!r}")
        if self.adaptive is not None:
            try:
                self.adaptive.load_state_dict(ck.get("adaptive") or {})
            except (ValueError, TypeError, KeyError) as e:
                raise bad(f"the adaptive batch state does not fit this run ({e})") from None
        if ck.get("extra", {}) != self.extra_state:
            raise checkpoint.CheckpointError(f"{path}: was made for other data or another model")
        if step > self.steps:
            raise bad(f"step {step} is beyond --steps {self.steps}")
        elapsed = ck.get("elapsed_s", 0.0)
        if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not math.isfinite(elapsed) \
                or elapsed < 0:
            raise bad(f"elapsed_s is {elapsed!r}")
        if "metrics" in ck:
            try:
                history = runlog.MetricsHistory.from_state(ck["metrics"])
            except ValueError as e:
                raise bad(str(e)) from None
            if len(history) != step or history.column("step") != list(range(1, step + 1)):
                raise bad(f"its metrics history does not hold steps 1..{step}")
        else:  # a checkpoint from before the history was kept: salvage the log
            history = runlog.MetricsHistory()
            try:
                rows = runlog.legacy_rows_upto(path.parent / METRICS, step)
            except OSError as e:
                raise checkpoint.CheckpointError(
                    f"{path.parent / METRICS}: unreadable ({e.strerror})"
                ) from None
            for r in rows:
                history.append(r)
        checkpoint.check_optimizer_state(ck["optimizer"], opt, bad)
        saved_sched = ck.get("scheduler")
        if sched is not None and saved_sched is not None and not checkpoint.conforms(sched.state_dict(),
                                                                                     saved_sched):
            raise bad("the scheduler state has the wrong structure")
        acc_state = ck["accumulator"]
        if not isinstance(acc_state, dict):
            raise bad("the accumulator state is not a dict")
        for key in ("step", "skipped_steps", "micro_steps", "items_seen", "accum_steps"):
            low = 1 if key == "accum_steps" else 0
            v = acc_state.get(key, low)
            ok_type = (int, float) if key == "items_seen" else int
            if isinstance(v, bool) or not isinstance(v, ok_type) or not v >= low:
                raise bad(f"the accumulator's {key} is {v!r}")
        try:
            model = self._unwrapped()
            if sync.is_fsdp2(model):  # collective: each rank keeps its shard of the full state
                from gradaccum.workloads import fsdp

                fsdp.load_full_state_dict(model, ck["model"])
                named = fsdp.named_optimizer_state_dict(model, opt, ck["optimizer"])
                fsdp.load_full_optimizer_state_dict(model, opt, named)
            else:
                model.load_state_dict(ck["model"])
                opt.load_state_dict(ck["optimizer"])
            if sched is not None and ck.get("scheduler") is not None:
                sched.load_state_dict(ck["scheduler"])
            acc.load_state_dict(acc_state)
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
            first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise checkpoint.CheckpointError(f"{path}: does not fit this model ({first})") from None
        rng = ck["rng"]
        try:
            if not isinstance(rng, dict):
                raise TypeError("not a dict")
            torch_state = rng["torch"]
            if not (isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8
                    and torch_state.shape == torch.get_rng_state().shape):
                raise TypeError("torch generator state has the wrong type or size")
            python_state = checkpoint.as_random_state(rng["python"])
            state_before = torch.get_rng_state(), random.getstate()
            try:
                torch.set_rng_state(torch_state)
                random.setstate(python_state)
                if "cuda" in rng and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all(rng["cuda"])
            except BaseException:
                torch.set_rng_state(state_before[0])
                random.setstate(state_before[1])
                raise
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, OverflowError) as e:
            raise bad(f"broken RNG state ({str(e).strip()[:100] or type(e).__name__})") from None
        self.history = history
        self._position = position
        if self.adaptive is not None:
            self.effective_batch = self.adaptive.effective_batch
            self.per_rank = self.effective_batch // self.world_size
            self.accum_steps = acc.accum_steps = self.adaptive.accum_steps
        return step, float(elapsed)

    def _start_batch(self) -> int:
        return self.adaptive.start_batch if self.adaptive is not None else self.effective_batch

    # ------------------------------------------------------------------ outputs
    def _finish(self, out: Path | None) -> dict[str, Any]:
        rows = self.history.rows() if self.rank == 0 else []
        losses = [r["loss"] for r in rows if not r.get("skipped")]
        evals = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
        critical = [r["critical_batch"] for r in rows if r.get("critical_batch") is not None]
        extra: dict[str, Any] = {}
        # (not under FSDP2: a forward on rank 0 alone would wait for the others' all-gathers)
        if self.final_metrics is not None and self.rank == 0 and not sync.is_fsdp2(self._unwrapped()):
            extra = self.final_metrics(self._unwrapped())
        summary = {
            "steps": self.steps,
            "effective_batch": self.effective_batch,
            "micro_batch": self.micro_batch,
            "accum_steps": self.accum_steps,
            "world_size": self.world_size,
            "examples_seen": self._position,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "loss_ratio": losses[-1] / losses[0] if losses and losses[0] else None,
            "skipped_steps": sum(1 for r in rows if r.get("skipped")),
            "elapsed_s": rows[-1]["elapsed_s"] if rows else None,
            "final_eval_loss": evals[-1] if evals else None,
            "critical_batch": critical[-1] if critical else None,
            "noise_scale": next((r["noise_scale"] for r in reversed(rows) if r.get("noise_scale")), None),
            "effective_batch_auto": self.adaptive is not None,
            **extra,
            "outputs": [METRICS, CHECKPOINT, SUMMARY, PLOT] + ([runlog.MODEL_DIR] if self.save_model else []),
        }
        if out is not None and self.rank == 0:
            for name, write in ((SUMMARY, lambda p: runlog.write_summary(p, summary)),
                                (PLOT, lambda p: plot_losses(rows, p))):
                try:
                    write(out / name)
                except OSError as e:
                    raise self._write_failed(out / name, e, "writing it at the end of the run") from None
        return summary


def _device_type(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return p.device.type if p is not None else "cpu"


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _brief(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:21] + "..."


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
