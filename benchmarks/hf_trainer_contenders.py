"""The two contenders of the HF Trainer comparison (hf_trainer_peer.py), built and ready to train.

gradaccum's ``Trainer`` as ``gradaccum train --model DIR --data FILE`` builds it, and
``transformers.Trainer`` with ``gradient_accumulation_steps``, on the same examples in
the same order with the same collator. A :class:`Probe` on each optimizer checks the
applied gradient against float64 and tells the throughput baton when a step ends.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import torch
from hf_trainer_setup import Setup, float64_rms_norm, load_model
from torch import nn

import gradaccum as ga
from gradaccum.workloads import build_workload
from gradaccum.workloads.hf import loss_fn as hf_loss_sum

GA, HF, AA = "gradaccum", "transformers", "transformers again (A/A control)"
GA_NN = "gradaccum, noise scale off"


# --------------------------------------------------------------------------- the probe
class Probe:
    """Optimizer hooks: the applied gradient against float64 (pre), the end of every step (post).

    ``windows[j]`` are step j's micro-batches. The pre-hook copies the parameters the
    step sees into a float64 twin and computes the full-batch mean gradient and loss of
    the same micro-batches there: ``∇ Σ loss_sum_i / Σ items_i`` with
    ``gradaccum.losses.causal_lm`` in float64 (the twin's RMSNorm patched, see
    :func:`float64_rms_norm`).
    """

    def __init__(self, model: nn.Module | None, windows: Sequence[Sequence[Any]] | None = None) -> None:
        self.windows = windows
        self.twin = float64_rms_norm(copy.deepcopy(model).double()) if windows is not None else None
        self.grad_errors: list[float] = []
        self.exact_losses: list[float] = []
        self.after_step: Callable[[], None] | None = None
        """Called at the end of every optimizer step (the throughput baton)."""

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if self.twin is not None:
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._check(params))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after_step and self.after_step())
        return optimizer

    def _check(self, params: Sequence[torch.Tensor]) -> None:
        assert self.twin is not None and self.windows is not None
        j = len(self.grad_errors)
        if j >= len(self.windows):  # more steps than windows: a total miss
            self.grad_errors.append(math.inf)
            return
        twin_params = list(self.twin.parameters())
        with torch.no_grad():
            for t, p in zip(twin_params, params, strict=True):
                t.copy_(p)
        self.twin.zero_grad(set_to_none=True)
        total, count = torch.zeros((), dtype=torch.float64), 0
        with torch.enable_grad():
            for mb in self.windows[j]:
                s, n = hf_loss_sum(self.twin, mb)
                total = total + s
                count += int(n)
            loss = total / count
            loss.backward()
        self.exact_losses.append(float(loss))
        self.grad_errors.append(common.rel_err(common.flat_grad(params), common.flat_grad(twin_params)))


# --------------------------------------------------------------------------- the two contenders
@dataclass(frozen=True)
class Config:
    micro: int = 4
    k: int = 8
    steps: int = 12
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    seed: int = 0

    @property
    def effective(self) -> int:
        return self.micro * self.k


@dataclass
class Run:
    """What one contender's training run left: per-step logged losses and counted tokens."""

    logged: list[float]
    probe: Probe
    step_tokens: list[int] = field(default_factory=list)


@dataclass
class Prepared:
    """A contender built and ready: ``train()`` runs the whole training and returns its Run.

    Everything before ``train()`` (loading the model, tokenizing, building the trainer)
    is set-up, not training.
    """

    name: str
    probe: Probe
    train: Callable[[], Run]
    cleanup: contextlib.ExitStack


def adamw(params: Any, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def has_noise_switch() -> bool:
    """Whether this gradaccum's Trainer measures the gradient noise scale (and can be told not to)."""
    import dataclasses

    return "measure_noise" in {f.name for f in dataclasses.fields(ga.Trainer)}


def gradaccum_trainer(setup: Setup, cfg: Config, dtype: torch.dtype, out: Path | None,
                      **trainer_kwargs: Any) -> tuple[Any, Any, Probe]:
    """The workload and Trainer of ``gradaccum train --model DIR --data FILE`` (constant lr).

    ``out`` is its ``--out`` (None: write nothing). ``trainer_kwargs`` go to
    ``gradaccum.Trainer`` (e.g. ``measure_noise=False``, what ``--no-noise-scale`` sets).
    Returns (workload, trainer, probe); ``trainer.fit()`` has not run yet.
    """
    work = build_workload(
        str(setup.model_dir), data=str(setup.data), seed=cfg.seed, dtype=dtype,
        cache_dir=str(setup.cache_dir), progress=False,
    )
    if dtype == torch.float64:
        float64_rms_norm(work.model)
    probe = Probe(work.model, None)
    trainer = ga.Trainer(
        model=work.model,
        dataset=work.dataset,
        loss_fn=work.loss_fn,
        collate_fn=work.collate_fn,
        effective_batch=cfg.effective,
        micro_batch=cfg.micro,
        steps=cfg.steps,
        lr=cfg.lr,
        seed=cfg.seed,
        optimizer_factory=lambda params: probe.attach(adamw(params, cfg)),
        max_grad_norm=cfg.max_grad_norm,
        out_dir=out,
        progress=False,
        log_every=10**9,
        extra_state=work.extra_state,
        items_name="tokens",
        handle_signals=False,
        **trainer_kwargs,
    )
    return work, trainer, probe


def data_order(trainer: Any, cfg: Config) -> list[int]:
    """The dataset indices gradaccum's Trainer trains on, step after step."""
    return [i for s in range(cfg.steps) for i in trainer.step_indices(s)]


def windows_of(work: Any, trainer: Any, cfg: Config) -> list[list[dict[str, torch.Tensor]]]:
    """Each step's micro-batches, collated as both contenders collate them."""
    order = data_order(trainer, cfg)
    out = []
    for s in range(cfg.steps):
        idx = order[s * cfg.effective : (s + 1) * cfg.effective]
        out.append([work.collate_fn([work.dataset[i] for i in idx[m : m + cfg.micro]])
                    for m in range(0, len(idx), cfg.micro)])
    return out


def step_tokens(windows: Sequence[Sequence[dict[str, torch.Tensor]]]) -> list[int]:
    """Counted tokens (labels really predicted after the shift) per step."""
    return [sum(int((mb["labels"][:, 1:] != common.IGNORE).sum()) for mb in w) for w in windows]


def prepare_gradaccum(setup: Setup, cfg: Config, dtype: torch.dtype, check: bool, name: str = GA,
                      **trainer_kwargs: Any) -> Prepared:
    stack = contextlib.ExitStack()
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    # Timed runs write metrics.jsonl, the checkpoint and the plot as the CLI does; exactness
    # runs write nothing (the plot alone takes a second).
    out = None if check else tmp / "out"
    work, trainer, probe = gradaccum_trainer(setup, cfg, dtype, out, **trainer_kwargs)
    windows = windows_of(work, trainer, cfg)
    if check:
        probe.windows = windows
        probe.twin = float64_rms_norm(copy.deepcopy(work.model).double())

    def train() -> Run:
        trainer.fit()
        logged = [float(v) for v in trainer.history.columns["loss"]]
        return Run(logged, probe, step_tokens(windows))

    return Prepared(name, probe, train, stack)


class OrderedExamples(torch.utils.data.Dataset):
    """``examples`` seen through a fixed list of indices (the Arrow rows are not copied)."""

    def __init__(self, examples: Sequence[Any], order: Sequence[int]) -> None:
        self.examples, self.order = examples, list(order)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> Any:
        return self.examples[self.order[i]]


def hf_trainer(model: nn.Module, dataset: torch.utils.data.Dataset, collate: Callable[..., Any],
               cfg: Config, out: Path, probe: Probe) -> Any:
    """``transformers.Trainer`` with gradient accumulation, in the data's own order."""
    import transformers
    from transformers.trainer_callback import PrinterCallback

    class SequentialTrainer(transformers.Trainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.micro,
        gradient_accumulation_steps=cfg.k,
        max_steps=cfg.steps,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=cfg.max_grad_norm or 0.0,  # 0 disables clipping
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=cfg.seed,
    )
    with quiet():
        trainer = SequentialTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=collate,
            optimizers=(probe.attach(adamw(model.parameters(), cfg)), None),
        )
    trainer.remove_callback(PrinterCallback)  # it prints every log line to stdout
    return trainer


def prepare_hf(setup: Setup, cfg: Config, dtype: torch.dtype, check: bool, name: str = HF) -> Prepared:
    # The data, its order and the collator come from gradaccum's own workload for the
    # same files, so both contenders see identical micro-batches.
    stack = contextlib.ExitStack()
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    work, ga_tr, _ = gradaccum_trainer(setup, cfg, dtype, None)
    windows = windows_of(work, ga_tr, cfg)
    model = load_model(setup, dtype)
    probe = Probe(model, windows if check else None)
    dataset = OrderedExamples(work.dataset, data_order(ga_tr, cfg))
    trainer = hf_trainer(model, dataset, work.collate_fn, cfg, tmp / "hf", probe)

    def train() -> Run:
        with quiet():
            trainer.train()
        logged = [float(r["loss"]) for r in trainer.state.log_history if "loss" in r]
        return Run(logged, probe, step_tokens(windows))

    return Prepared(name, probe, train, stack)


def run_alone(prepared: Prepared) -> Run:
    with prepared.cleanup:
        return prepared.train()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


PREPARE: dict[str, Callable[[Setup, Config, torch.dtype, bool], Prepared]] = {
    GA: prepare_gradaccum,
    HF: prepare_hf,
}
