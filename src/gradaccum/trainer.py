"""The loop behind ``gradaccum train``: data order -> windows -> Accumulator.

Each optimizer step takes the next effective batch of the seeded example stream
(:mod:`gradaccum.stream`), splits this rank's shard into micro-batches, and hands them
to the :class:`~gradaccum.accumulator.Accumulator`; on a CUDA out-of-memory error it
replays the same examples in smaller micro-batches. Everything else has its own room:
the ``--out`` claim (:mod:`gradaccum.outdir`), the checkpoint's schema and validation
(:mod:`gradaccum.resume`), rows, summary and plot (:mod:`gradaccum.runlog`), what is
printed (:mod:`gradaccum.console`) and clean stops on signals (:mod:`gradaccum.stopping`).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradaccum import adaptive as adaptive_batch
from gradaccum import outdir, resume, runlog, sync
from gradaccum.accumulator import Accumulator
from gradaccum.console import Console
from gradaccum.engine import build_engine
from gradaccum.evaluation import evaluate_loss
from gradaccum.outdir import CHECKPOINT, METRICS, MODEL_DIR, PLOT, SUMMARY, OutDirError
from gradaccum.runlog import OutputWriteError, plot_losses
from gradaccum.schedules import recompute_current_lr
from gradaccum.settings import TrainerSettings
from gradaccum.stopping import Stopped, StopSignals
from gradaccum.stream import BatchShape, WindowShape, rank_indices, stream_indices
from gradaccum.windows import WindowRunner

__all__ = ["CHECKPOINT", "METRICS", "PLOT", "SUMMARY", "OutDirError", "OutputWriteError", "Stopped",
           "Trainer", "plot_losses", "stream_indices"]

FORMAT_VERSION = resume.FORMAT_VERSION
EVALS_PER_RUN = 10  # default eval_every: this many evaluations per run, and one at the end


@dataclass
class Trainer(TrainerSettings):
    """Train ``model`` on ``dataset`` with an exact effective batch made of micro-batches.

    The arguments are :class:`~gradaccum.settings.TrainerSettings`' fields."""

    def __post_init__(self) -> None:
        self.check()
        self.rank = sync.rank()
        self.world_size = sync.world_size()
        if self.adaptive is not None:
            self.effective_batch = self.adaptive.effective_batch
        self.shape = BatchShape(self.effective_batch, self.micro_batch, self.world_size)
        self.run = resume.RunState()
        self.rows = runlog.RowMaker(self.items_name)
        self.console = Console(self.steps, self.items_name, self.progress, self.log_every, self.rank)
        self.windows = WindowRunner(self, self._set_shape, self.console.say)
        self.train_model: nn.Module = self.model
        if self.eval_every is None:
            self.eval_every = max(1, self.steps // EVALS_PER_RUN)

    @property
    def accum_steps(self) -> int:
        return self.shape.accum_steps

    @property
    def history(self) -> runlog.MetricsHistory:
        """Every metrics row of the run so far."""
        return self.run.history

    def defining_config(self) -> dict[str, Any]:
        """What defines this run (checked on resume), keyed as the checkpoint stores it."""
        batch = "auto" if self.adaptive is not None else self.effective_batch
        return {"--steps": self.steps, "--lr": self.lr, "--effective-batch": batch,
                "--seed": self.seed, **self.run_config}

    # ------------------------------------------------------------------ data
    def step_indices(self, step: int) -> list[int]:
        """Dataset indices of optimizer step ``step`` for this rank, at a fixed effective batch."""
        return rank_indices(len(self.dataset), self.seed, step * self.effective_batch, self.shape, self.rank)

    def micro_batches(self, step: int | None = None) -> Iterator[Any]:
        """This rank's micro-batches of the current step (or of ``step`` at a fixed effective
        batch), collated lazily one at a time."""
        position = self.run.position if step is None else step * self.effective_batch
        for group in self.windows.groups(position, self.shape):
            yield self.windows.collate(group)

    def _set_shape(self, shape: BatchShape, acc: Accumulator) -> None:
        self.shape, self.effective_batch, self.micro_batch = shape, shape.effective_batch, shape.micro_batch
        acc.accum_steps = shape.accum_steps

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        """Run until ``steps``; returns the summary (also written to summary.json).

        Raises OutDirError / CheckpointError (bad input: nothing in out_dir touched),
        OutputWriteError (a write failed mid-run: disk full ...), or :class:`Stopped`
        (SIGTERM/SIGINT: stopped after a window, checkpoint saved).
        """
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        self.train_model = sync.data_parallel(self.model)
        opt, sched, acc = build_engine(self, self.train_model)
        out = Path(self.out_dir) if self.out_dir is not None else None
        if self.resume and out is None:
            raise ValueError("resume needs an out_dir")
        stamp = None
        if self.resume:
            assert out is not None
            stamp = outdir.file_stamp(out / CHECKPOINT)
            self._restore(out / CHECKPOINT, opt, sched, acc)
            if self.trackers is not None:  # before the first send: what each already has
                self.trackers.restore(self.run.trackers or {})
        start = self.run.step
        lock = outdir.claim(out, self.resume, self.overwrite, stamp) if out is not None else None
        try:
            if out is not None and self.rank == 0:
                self._prepare_outputs(out)
            self.console.announce(self.shape, out, start if self.resume else None, self.micro_batch_tokens)
            return self._loop(acc, opt, sched, out)
        finally:
            if self.trackers is not None:  # finished, or killed when it stopped or failed
                self.trackers.close(sys.exc_info()[1] is None)
            if lock is not None:
                lock.release()

    def _prepare_outputs(self, out: Path) -> None:
        try:
            outdir.prepare(out)
            if self.resume:
                # The checkpoint is the truth: metrics.jsonl gets exactly its steps 1..start,
                # whatever a kill (or anything else) left in the file.
                runlog.write_metrics(out / METRICS, self.history.rows())
        except OSError as e:
            raise runlog.run_write_error(out / METRICS, e, self.run.last_saved,
                                         "preparing the output directory") from None

    def _loop(self, acc: Accumulator, opt: Any, sched: Any, out: Path | None) -> dict[str, Any]:
        start, elapsed_before = self.run.step, self.run.elapsed_s
        self.rows.resume_from(self.history.rows())
        t0 = time.perf_counter()
        log = self._open_log(out)
        self.console.open(start)
        try:
            with StopSignals(self.handle_signals) as signals:
                for step in range(start, self.steps):
                    result = self.windows.run(acc, self.train_model, self.run.position, self.shape, step)
                    self.run.position += self.effective_batch
                    now = time.perf_counter() - t0
                    elapsed = self.run.elapsed_s = elapsed_before + now
                    ran = self.windows.ran(self.shape, acc)
                    row = self.rows.row(result, step, ran, self.run.position, elapsed, now)
                    if self._eval_due(step + 1):
                        row.update(self.evaluate_row())
                    if self.adaptive is not None:
                        self._adapt(acc, opt, sched, row.get("critical_batch_low"))
                    self._record(row, log, out)
                    done = self.run.step = step + 1
                    stop = signals.agreed()
                    every = self.checkpoint_every and done % self.checkpoint_every == 0
                    if out is not None and (done == self.steps or stop or every):
                        self._save(out / CHECKPOINT, opt, sched, acc)
                    if self.trackers is not None:
                        self.trackers.send(self.history)  # live; trackers.json keeps it exactly once
                    if stop and done < self.steps:
                        sync.any_rank(False)  # every rank leaves after rank 0's checkpoint is on disk
                        raise Stopped(stop, done, self.steps, out / CHECKPOINT if out is not None else None)
                    if self.on_step is not None:
                        self.on_step(row)
        finally:
            if log is not None:
                log.close()
            self.console.close()
        return self._finish(out)

    def _open_log(self, out: Path | None) -> runlog.MetricsLog | None:
        if out is None or self.rank != 0:
            return None
        # --overwrite: the old run stays whole until this one has taken its first step.
        replace_old = (lambda: outdir.clear_outputs(out)) if self.overwrite else None
        return runlog.MetricsLog(out / METRICS, replace_old, (out / outdir.CONFIG, self.run_record))

    def _record(self, row: dict[str, Any], log: runlog.MetricsLog | None, out: Path | None) -> None:
        self.history.append(row)
        # Written in the history's key order, so a rebuild from the checkpoint is identical.
        row = self.history.row(len(self.history) - 1)
        if log is not None:
            assert out is not None
            try:
                log.write(row)
            except OSError as e:
                raise runlog.run_write_error(out / METRICS, e, self.run.last_saved,
                                             f"logging step {row['step']}") from None
        self.console.report(row)

    # ------------------------------------------------------------------ eval, adaptive batch
    def _eval_due(self, done: int) -> bool:
        if self.eval_dataset is None or len(self.eval_dataset) == 0:
            return False
        return done == self.steps or bool(self.eval_every and done % self.eval_every == 0)

    def evaluate(self) -> float:
        """Exact item-mean loss over ``eval_dataset`` (Σ loss_sum / Σ num_items, all ranks)."""
        assert self.eval_dataset is not None
        return evaluate_loss(self._unwrapped(), self.eval_dataset, self.loss_fn, self.collate_fn,
                             self.windows.eval_micro_batch(self.shape, self.eval_dataset),
                             lambda: self.windows.autocast(self.train_model))

    def evaluate_row(self) -> dict[str, Any]:
        """The row's held-out values: ``eval_fn``'s, else ``eval_loss`` (:meth:`evaluate`)."""
        if self.eval_fn is None:
            return {"eval_loss": self.evaluate()}
        assert self.eval_dataset is not None
        with self.windows.autocast(self.train_model):
            return self.eval_fn(self._unwrapped(), self.eval_dataset)

    def _adapt(self, acc: Accumulator, opt: torch.optim.Optimizer, sched: Any, critical_low: float | None
               ) -> None:
        """--effective-batch auto: grow accum_steps (and the lr with it) for the next step, when the
        critical batch's 90% interval lies above twice the batch."""
        assert self.adaptive is not None
        old = self.adaptive.lr_factor()
        if not self.adaptive.update(critical_low, acc.noise.windows if acc.noise is not None else 0):
            return
        self._set_shape(BatchShape(self.adaptive.effective_batch, self.micro_batch, self.world_size), acc)
        ratio = self.adaptive.lr_factor() / old
        adaptive_batch.scale_lr(opt, sched, ratio)
        self.console.say(f"effective batch auto: {self.effective_batch // 2} -> {self.effective_batch} "
                         f"(accum steps {self.accum_steps}; critical batch at least {critical_low:.0f}, 90%; "
                         f"lr x{ratio:.3g})")

    # ------------------------------------------------------------------ checkpoints
    def _unwrapped(self) -> nn.Module:
        m = self.train_model
        return m.module if sync.is_ddp(m) else m

    def _spec(self) -> resume.RunSpec:
        start_batch = self.adaptive.start_batch if self.adaptive is not None else self.effective_batch
        return resume.RunSpec(self.defining_config(), self.seed, start_batch, self.steps, self.extra_state,
                              may_grow=("--steps",))

    def _save(self, path: Path, opt: Any, sched: Any, acc: Accumulator) -> None:
        model, step = self._unwrapped(), self.run.step
        if self.trackers is not None:
            self.run.trackers = self.trackers.state(step, self.run.trackers)
        config = {"micro_batch": self.micro_batch, "steps": self.steps, "lr": self.lr}
        try:
            model_state = resume.save(path, self._spec(), self.run, model, opt, sched, acc, self.adaptive,
                                      config)
        except OSError as e:
            raise runlog.run_write_error(path, e, self.run.last_saved, f"saving step {step}") from None
        if model_state is None or self.save_model is None:
            return
        target = path.parent / MODEL_DIR
        try:
            if sync.is_fsdp2(model):
                self.save_model(model, target, state_dict=model_state)
            else:
                self.save_model(model, target)
        except OSError as e:
            raise runlog.run_write_error(target, e, self.run.last_saved,
                                         f"saving the model of step {step}") from None

    def _restore(self, path: Path, opt: Any, sched: Any, acc: Accumulator) -> None:
        self.run = resume.load(path, self._spec(), self._unwrapped(), opt, sched, acc, self.adaptive)
        self.run.history.complete(self.rows.keys())  # an older run's rows take the one schema
        if "--steps" in self.run.grown:  # extending a finished (or running) run
            self.console.extended(self.run.grown["--steps"], self.run.step)
            recompute_current_lr(sched)
        if self.adaptive is not None:
            self._set_shape(BatchShape(self.adaptive.effective_batch, self.micro_batch, self.world_size), acc)

    # ------------------------------------------------------------------ the end
    def _finish(self, out: Path | None) -> dict[str, Any]:
        rows = self.history.rows() if self.rank == 0 else []
        extra: dict[str, Any] = {}
        # (not under FSDP2: a forward on rank 0 alone would wait for the others' all-gathers)
        if self.final_metrics is not None and self.rank == 0 and not sync.is_fsdp2(self._unwrapped()):
            extra = self.final_metrics(self._unwrapped())
        shape, tokens = self.shape, self.micro_batch_tokens
        if tokens is not None and rows:  # a token budget: the last window as it ran, and the budget
            shape = WindowShape(shape.effective_batch, rows[-1]["micro_batch"], rows[-1]["accum_steps"],
                                shape.world_size)
            extra = {**extra, "micro_batch_tokens": tokens}
        summary = {
            **runlog.summarize(rows, self.steps, shape, self.run.position, self.adaptive is not None,
                              self.run.grown.get("--steps")),
            **extra,
            "outputs": [METRICS, CHECKPOINT, SUMMARY, PLOT] + ([MODEL_DIR] if self.save_model else []),
        }
        if out is not None and self.rank == 0:
            for name, write in ((SUMMARY, lambda p: runlog.write_summary(p, summary)),
                                (PLOT, lambda p: plot_losses(rows, p))):
                try:
                    write(out / name)
                except OSError as e:
                    raise runlog.run_write_error(out / name, e, self.run.last_saved,
                                                 "writing it at the end of the run") from None
        if self.trackers is not None:
            self.trackers.finish(summary, out / PLOT if out is not None else None)
        return summary
