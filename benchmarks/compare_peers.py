"""gradaccum side by side with a hand-written loop, Hugging Face Accelerate and Lightning.

Workloads (benchmarks/common.py): the built-in demo model and task, a plain MLP
regression, and a tiny transformers GPT-2 with padded variable-length sequences.
Contenders, at the same micro-batch size and k:

- hand:       an exact hand-written loop (summed loss / the window's known item total);
- gradaccum:  Accumulator, shape (a) (micro_step + backward, flush for a short window);
- accelerate: ``with accelerator.accumulate(model)`` + ``accelerator.backward(mean loss)``,
              as its documentation shows;
- lightning:  ``Trainer(accumulate_grad_batches=k)`` on a LightningModule whose
              training_step returns the mean loss, as its documentation shows.

Measures: step-time ratio against the hand loop (median of per-round ratios), peak
memory (RSS growth of a fresh process per contender), relative error of the gradient
handed to ``optimizer.step()`` against a float64 full-batch reference (complete
windows, and a partial last window), and how much the logged loss moves when k
changes at a fixed effective batch.

A second part (``--sections hf-trainer``, in benchmarks/hf_trainer_peer.py) puts
gradaccum's ``Trainer``, as ``gradaccum train --model DIR`` uses it, next to the Hugging
Face ``transformers.Trainer`` with ``gradient_accumulation_steps`` on a tiny Llama with
variable-length prompt/completion data: applied-gradient error against float64,
logged-loss error, and tokens/s (one torch thread, A/A control).

    python benchmarks/compare_peers.py            # full run, writes docs/benchmarks.{md,json,png}
    python benchmarks/compare_peers.py --quick    # a fast, rougher run; prints, writes nothing
    python benchmarks/compare_peers.py --sections hf-trainer   # only the transformers.Trainer part
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import json
import logging
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import hf_trainer_peer  # noqa: E402
from common import Batch, Workload  # noqa: E402

import gradaccum as ga  # noqa: E402

PEERS = ("hand", "gradaccum", "accelerate", "lightning")
SECTIONS = ("peers", "hf-trainer")
AA = "hand (A/A control)"
DOCS = common.DOCS
# Micro-batch size per workload (k is shared). demo: 16 x 8 = 128, the demo's default effective batch.
MICRO = {"demo": 16, "mlp": 64, "gpt2": 8}


@functools.cache
def available(peer: str) -> bool:
    """hand and gradaccum always run; a peer only when its library imports."""
    if peer in ("hand", "gradaccum"):
        return True
    try:
        importlib.import_module("lightning.pytorch" if peer == "lightning" else peer)
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- Accelerate
def accelerate_setup(model: nn.Module, lr: float, k: int, loader: Any = None) -> tuple[Any, ...]:
    """A fresh Accelerator for k, with the model, optimizer (and loader) prepared.

    Accelerate keeps its accumulation state in a process-wide singleton, so only one
    k may be in use at a time: callers finish one run before starting another.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=k, cpu=True)
    opt = common.make_optimizer(model, lr)
    if loader is None:
        return (accelerator, *accelerator.prepare(model, opt))
    return (accelerator, *accelerator.prepare(model, opt, loader))


def accelerate_micro(
    accelerator: Any,
    model: nn.Module,
    opt: Any,
    mean_loss: Callable[..., torch.Tensor],
    mb: Batch,
    max_grad_norm: float | None,
) -> torch.Tensor:
    """One micro-batch exactly as Accelerate's gradient-accumulation guide writes it."""
    with accelerator.accumulate(model):
        loss = mean_loss(model, mb)
        accelerator.backward(loss)  # divides by gradient_accumulation_steps
        if max_grad_norm is not None and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()  # a no-op until the window's last micro-batch
        opt.zero_grad()
    return loss


# --------------------------------------------------------------------------- Lightning
def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*(GPU|TPU|HPU|LitLogger|litlogger).*")


def lightning_module(
    model: nn.Module, mean_loss: Callable[..., torch.Tensor], lr: float, log: bool = False
) -> Any:
    """The LightningModule a user writes: training_step returns the mean loss."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
            loss = mean_loss(self.model, batch)
            if log:
                self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return common.make_optimizer(self.model, lr)

    return Module()


def lightning_fit(
    module: Any,
    loader: Any,
    k: int,
    callbacks: Sequence[Any] = (),
    logger: Any = False,
    max_grad_norm: float | None = None,
) -> None:
    """One epoch of Lightning's own loop on CPU, logging/checkpointing/progress bar off."""
    import lightning.pytorch as pl

    _quiet_lightning()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            accumulate_grad_batches=k,
            gradient_clip_val=max_grad_norm,
            logger=logger,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=list(callbacks),
            default_root_dir=tmp,
        )
        trainer.fit(module, train_dataloaders=loader)


def _lightning_classes() -> tuple[type, type]:
    """Callback and Logger base classes (imported lazily: Lightning is optional)."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger

    return pl.Callback, Logger


def batches_loader(batches: Sequence[Batch]) -> torch.utils.data.DataLoader:
    """A DataLoader over already-collated micro-batches (so collation is never timed)."""
    return torch.utils.data.DataLoader(list(batches), batch_size=None, collate_fn=lambda b: b)


def examples_loader(work: Workload, examples: Sequence[Any], micro_batch: int) -> torch.utils.data.DataLoader:
    """The DataLoader a peer user writes: examples, batch size, the collate function, no shuffle."""
    return torch.utils.data.DataLoader(list(examples), batch_size=micro_batch, collate_fn=work.collate)


# --------------------------------------------------------------------------- speed
def speed(
    work: Workload,
    k: int,
    micro_batch: int,
    rounds: int,
    warmup: int,
    seed: int = 0,
    max_grad_norm: float = 1.0,
) -> dict[str, Any]:
    """Window times of every contender and their per-round speed ratio against the hand loop.

    hand, gradaccum and Accelerate run one window each per round in a rotating order.
    Lightning owns its loop, so it runs in its own fit(); a callback runs one hand-loop
    window (on a separate model copy) next to every Lightning window, before it on odd
    windows and after it on even ones, which pairs every Lightning window with a hand
    window taken at the same moment.
    """
    n = warmup + rounds
    micro = work.micro_batches(work.make_examples(n * k * micro_batch, seed), micro_batch)
    windows = [micro[w * k : (w + 1) * k] for w in range(n)]
    totals = [sum(work.count(mb) for mb in win) for win in windows]
    base = work.build_model(seed)

    def hand_loop() -> Callable[[int], Any]:
        model = common.clone(base)
        opt = common.make_optimizer(model, work.lr)
        return lambda r: common.hand_window(model, opt, windows[r], totals[r], work.loss_sum, max_grad_norm)

    ga_model = common.clone(base)
    acc = ga.Accumulator(
        ga_model, common.make_optimizer(ga_model, work.lr), accum_steps=k, max_grad_norm=max_grad_norm
    )
    contenders: dict[str, Callable[[int], Any]] = {
        "hand": hand_loop(),
        # A second, identical hand loop: its ratio to the first is the noise floor.
        AA: hand_loop(),
        "gradaccum": lambda r: common.gradaccum_window(acc, windows[r], work.loss_sum),
    }
    if available("accelerate"):
        accelerator, acc_model, acc_opt = accelerate_setup(common.clone(base), work.lr, k)

        def accel(r: int) -> None:
            for mb in windows[r]:
                accelerate_micro(accelerator, acc_model, acc_opt, work.mean_loss, mb, max_grad_norm)

        contenders["accelerate"] = accel
    times = common.interleave(contenders, rounds=rounds, warmup=warmup)
    out: dict[str, Any] = {}
    for name, ts in times.items():
        out[name] = {"window_ms": common.summary([t * 1e3 for t in ts]), "interleaved": "rotating order"}
        if name != "hand":
            out[name]["speed_ratio"] = common.summary(common.ratios(times["hand"], ts))
    if available("lightning"):
        out["lightning"] = _lightning_speed(work, base, windows, totals, k, warmup, max_grad_norm)
    return out


def _lightning_speed(
    work: Workload,
    base: nn.Module,
    windows: list[list[Batch]],
    totals: list[int],
    k: int,
    warmup: int,
    max_grad_norm: float,
) -> dict[str, Any]:
    callback_cls, _ = _lightning_classes()
    pair_model = common.clone(base)
    pair_opt = common.make_optimizer(pair_model, work.lr)

    def hand(w: int) -> float:
        with torch.enable_grad():
            return common.timed(
                lambda: common.hand_window(
                    pair_model, pair_opt, windows[w], totals[w], work.loss_sum, max_grad_norm
                )
            )

    class PairedTimer(callback_cls):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            self.lit: list[float] = []
            self.hand: list[float] = []
            self.mark: float | None = None
            self.pending = 0.0  # hand time spent inside the current Lightning window

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if self.mark is None:
                self.mark = time.perf_counter()
            w = batch_idx // k
            if batch_idx % k == 0 and w % 2 == 1:
                t = hand(w)
                self.hand.append(t)
                self.pending += t

        def on_train_batch_end(
            self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            if (batch_idx + 1) % k:
                return
            assert self.mark is not None
            self.lit.append(time.perf_counter() - self.mark - self.pending)
            self.pending = 0.0
            w = batch_idx // k
            if w % 2 == 0:
                self.hand.append(hand(w))
            self.mark = time.perf_counter()

    timer = PairedTimer()
    module = lightning_module(common.clone(base), work.mean_loss, work.lr)
    flat = [mb for win in windows for mb in win]
    lightning_fit(module, batches_loader(flat), k, callbacks=[timer], max_grad_norm=max_grad_norm)
    lit, hand_t = timer.lit[warmup:], timer.hand[warmup:]
    return {
        "window_ms": common.summary([t * 1e3 for t in lit]),
        "hand_window_ms": common.summary([t * 1e3 for t in hand_t]),
        "speed_ratio": common.summary(common.ratios(hand_t, lit)),
        "interleaved": "own fit(); paired with a hand window run from a callback",
    }


# --------------------------------------------------------------------------- gradient error
class GradCheck:
    """Compares each gradient handed to optimizer.step() with the float64 full-batch gradient.

    Optimizer step j is checked against window j (micro-batches j*k .. j*k+k-1, cut
    short at the end), at the parameters the step sees, so later windows are checked
    fairly even after the contenders' parameters have drifted apart.
    """

    def __init__(self, work: Workload, model: nn.Module, windows: list[list[Batch]]) -> None:
        self.ref = common.Reference(model, work)
        self.windows = windows
        self.errors: list[float] = []

    def check(self, params: Sequence[torch.Tensor]) -> None:
        j = len(self.errors)
        if j >= len(self.windows):  # more steps than windows: record as a total miss
            self.errors.append(math.inf)
            return
        self.errors.append(common.rel_err(common.flat_grad(params), self.ref.grad(params, self.windows[j])))

    def pre_hook(self, params: Sequence[torch.Tensor]) -> Callable[..., None]:
        return lambda optimizer, args, kwargs: self.check(params)


def grad_error(
    work: Workload, peer: str, k: int, n_micro: int, micro_batch: int, seed: int = 1
) -> dict[str, Any]:
    """Applied-gradient error of one contender over n_micro micro-batches at k (AdamW, no clipping)."""
    examples = work.make_examples(n_micro * micro_batch, seed)
    micro = work.micro_batches(examples, micro_batch)
    windows = [micro[i : i + k] for i in range(0, len(micro), k)]
    model = work.build_model(seed)
    check = GradCheck(work, model, windows)
    params = list(model.parameters())
    if peer == "hand":
        opt = common.make_optimizer(model, work.lr)
        opt.register_step_pre_hook(check.pre_hook(params))
        for win in windows:
            common.hand_window(model, opt, win, sum(work.count(mb) for mb in win), work.loss_sum)
    elif peer == "gradaccum":
        opt = common.make_optimizer(model, work.lr)
        opt.register_step_pre_hook(check.pre_hook(params))
        acc = ga.Accumulator(model, opt, accum_steps=k)
        for mb in micro:
            with acc.micro_step():
                acc.backward(*work.loss_sum(model, mb))
        acc.flush()
    elif peer == "accelerate":
        # The prepared DataLoader is what lets Accelerate step on a short last window.
        accelerator, pmodel, popt, loader = accelerate_setup(
            model, work.lr, k, examples_loader(work, examples, micro_batch)
        )
        popt.optimizer.register_step_pre_hook(check.pre_hook(params))
        for mb in loader:
            accelerate_micro(accelerator, pmodel, popt, work.mean_loss, mb, None)
    elif peer == "lightning":
        callback_cls, _ = _lightning_classes()

        class Capture(callback_cls):  # type: ignore[misc,valid-type]
            # Lightning runs the last backward inside optimizer.step(closure), so a torch
            # pre-hook would fire too early; this hook fires after it, before clipping.
            def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
                check.check(params)

        lightning_fit(
            lightning_module(model, work.mean_loss, work.lr),
            examples_loader(work, examples, micro_batch),
            k,
            callbacks=[Capture()],
        )
    else:
        raise ValueError(peer)
    full = [e for e, w in zip(check.errors, windows, strict=False) if len(w) == k]
    partial = [e for e, w in zip(check.errors, windows, strict=False) if len(w) < k]
    return {
        "windows": [len(w) for w in windows],
        "steps_taken": len(check.errors),
        "rel_err_full": max(full) if full else None,
        "rel_err_partial": partial[0] if partial else None,
        "rel_err_per_step": check.errors,
    }


# --------------------------------------------------------------------------- logged loss vs k
def pretrain(work: Workload, seed: int, steps: int, eff_batch: int) -> nn.Module:
    """A model trained a little (exactly), so per-token losses differ by position and length."""
    model = work.build_model(seed)
    opt = common.make_optimizer(model, work.lr)
    micro = work.micro_batches(work.make_examples(steps * eff_batch, seed + 100), eff_batch)
    for mb in micro:
        common.hand_window(model, opt, [mb], work.count(mb), work.loss_sum)
    return model


def logged_losses(
    work: Workload, peer: str, trained: nn.Module, examples: Sequence[Any], k: int, micro_batch: int
) -> list[float]:
    """What each contender logs per optimizer step, with lr=0 so only the logging differs.

    hand: Σ loss_sum / Σ items; gradaccum: StepResult.loss; Accelerate: the mean of the
    window's micro-batch mean losses (its examples sum ``loss`` per batch and divide by
    the number of batches); Lightning: what its logger receives from
    ``self.log("train_loss", loss)`` in training_step.
    """
    model = common.clone(trained)
    micro = work.micro_batches(examples, micro_batch)
    windows = [micro[i : i + k] for i in range(0, len(micro), k)]
    if peer == "hand":
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)
        return [
            common.hand_window(model, opt, w, sum(work.count(mb) for mb in w), work.loss_sum) for w in windows
        ]
    if peer == "gradaccum":
        acc = ga.Accumulator(model, torch.optim.AdamW(model.parameters(), lr=0.0), accum_steps=k)
        return [common.gradaccum_window(acc, w, work.loss_sum).loss for w in windows]
    if peer == "accelerate":
        accelerator, pmodel, popt = accelerate_setup(model, 0.0, k)
        out = []
        for w in windows:
            per_micro = [
                accelerate_micro(accelerator, pmodel, popt, work.mean_loss, mb, None).item() for mb in w
            ]
            out.append(sum(per_micro) / len(per_micro))
        return out
    if peer == "lightning":
        _, logger_cls = _lightning_classes()

        class Recorder(logger_cls):  # type: ignore[misc,valid-type]
            def __init__(self) -> None:
                super().__init__()
                self.values: list[float] = []

            @property
            def name(self) -> str:
                return "recorder"

            @property
            def version(self) -> int:
                return 0

            def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
                pass

            def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
                if "train_loss" in metrics:
                    self.values.append(float(metrics["train_loss"]))

        rec = Recorder()
        lightning_fit(
            lightning_module(model, work.mean_loss, 0.0, log=True), batches_loader(micro), k, logger=rec
        )
        return rec.values
    raise ValueError(peer)


def logged_loss_vs_k(
    work: Workload,
    peers: Sequence[str],
    ks: Sequence[int],
    eff_batch: int,
    windows: int,
    pretrain_steps: int,
    seed: int = 2,
) -> dict[str, Any]:
    """Each contender's logged loss for the same data at each k (effective batch fixed)."""
    trained = pretrain(work, seed, pretrain_steps, eff_batch)
    examples = work.make_examples(windows * eff_batch, seed)
    exact = logged_losses(work, "hand", trained, examples, 1, eff_batch)
    out: dict[str, Any] = {"exact": exact, "eff_batch": eff_batch}
    for peer in peers:
        by_k = {k: logged_losses(work, peer, trained, examples, k, eff_batch // k) for k in ks}
        base = by_k[ks[0]]
        change = max(abs(v - b) / abs(b) for k in ks[1:] for v, b in zip(by_k[k], base, strict=True))
        off = max(abs(v - x) / abs(x) for k in ks for v, x in zip(by_k[k], exact, strict=True))
        out[peer] = {
            "by_k": {str(k): v for k, v in by_k.items()},
            "max_rel_change_vs_k1": change,
            "max_rel_err_vs_exact": off,
        }
    return out


# --------------------------------------------------------------------------- memory
def memory(work: Workload, peer: str, k: int, micro_batch: int, windows: int) -> dict[str, float]:
    """Peak bytes of tensors one contender allocates over ``windows`` windows (clipping on).

    Counted with common.LiveTensorBytes: activations, gradients, optimizer state and
    temporaries, not the parameters themselves.
    """
    micro = work.micro_batches(work.make_examples(windows * k * micro_batch, 3), micro_batch)
    wins = [micro[w * k : (w + 1) * k] for w in range(windows)]
    model = work.build_model(3)
    run: Callable[[], Any]
    if peer == "hand":
        opt = common.make_optimizer(model, work.lr)

        def run() -> None:
            for w in wins:
                common.hand_window(model, opt, w, sum(work.count(mb) for mb in w), work.loss_sum, 1.0)
    elif peer == "gradaccum":
        acc = ga.Accumulator(model, common.make_optimizer(model, work.lr), accum_steps=k, max_grad_norm=1.0)

        def run() -> None:
            for w in wins:
                common.gradaccum_window(acc, w, work.loss_sum)
    elif peer == "accelerate":
        accelerator, pmodel, popt = accelerate_setup(model, work.lr, k)

        def run() -> None:
            for mb in micro:
                accelerate_micro(accelerator, pmodel, popt, work.mean_loss, mb, 1.0)
    elif peer == "lightning":
        module = lightning_module(model, work.mean_loss, work.lr)

        def run() -> None:
            lightning_fit(module, batches_loader(micro), k, max_grad_norm=1.0)
    else:
        raise ValueError(peer)
    gc.collect()
    with common.LiveTensorBytes() as counter:
        run()
    return {
        "peak_mib": counter.peak / 2**20,
        "params_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
    }


# --------------------------------------------------------------------------- the whole run
QUICK = {"rounds": 6, "warmup": 2, "pretrain_steps": 5, "loss_windows": 2, "mem_windows": 2}
FULL = {"rounds": 30, "warmup": 3, "pretrain_steps": 30, "loss_windows": 4, "mem_windows": 2}


def run_all(
    workloads: dict[str, tuple[Workload, int]],
    cfg: dict[str, int],
    k: int = 8,
    measure_memory: bool = True,
    peers: Sequence[str] | None = None,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Every measure on every workload; ``workloads`` maps a name to (workload, micro-batch size)."""
    peers = [p for p in (peers or PEERS) if available(p)]
    common.set_threads()
    res: dict[str, Any] = {
        "machine": common.machine_info(),
        "setting": {
            "k": k,
            "micro_batch": {name: mb for name, (_, mb) in workloads.items()},
            **cfg,
            "quick": cfg != FULL,
            "peers": peers,
            "missing_peers": [p for p in PEERS if p not in peers],
            "optimizer": "AdamW(lr per workload, weight_decay=0.01)",
            "speed_clip_norm": 1.0,
            "grad_error_windows": "10 micro-batches at k=4: windows of 4, 4 and a partial 2",
            "logged_loss_ks": [1, 4, 8],
        },
        "workloads": {},
    }
    for name, (work, mb) in workloads.items():
        entry: dict[str, Any] = {"description": work.description, "micro_batch": mb}
        progress(f"{name}: speed")
        entry["speed"] = speed(work, k, mb, cfg["rounds"], cfg["warmup"])
        progress(f"{name}: gradient error")
        entry["grad_error"] = {p: grad_error(work, p, 4, 10, mb) for p in peers}
        progress(f"{name}: logged loss vs k")
        entry["logged_loss"] = logged_loss_vs_k(
            work,
            peers,
            [1, 4, 8],
            eff_batch=8 * mb,
            windows=cfg["loss_windows"],
            pretrain_steps=cfg["pretrain_steps"],
        )
        if measure_memory:
            progress(f"{name}: memory")
            entry["memory"] = {p: memory(work, p, k, mb, cfg["mem_windows"]) for p in peers}
        res["workloads"][name] = entry
    return res


# --------------------------------------------------------------------------- reporting
def _fmt_ratio(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    return f"{s['median']:.2f} ({s['q1']:.2f}-{s['q3']:.2f})"


def _fmt_err(e: float | None) -> str:
    if e is None:
        return "-"
    if math.isinf(e):
        return "missed"
    return f"{e:.1e}" if e < 1e-3 else f"{100 * e:.1f} %"


def markdown(res: dict[str, Any]) -> str:
    """The results table (one row per workload and contender) plus the setting."""
    m, s = res["machine"], res["setting"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, "
        f"1-min load average {m['load_average_1min']:.1f} at the start), "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"accelerate {m['accelerate']}, lightning {m['lightning']}, gradaccum {m['gradaccum']}"
        + (" (quick run)" if s["quick"] else "")
        + ".",
        "",
        f"k = {s['k']} for speed and memory; speed: {s['rounds']} measured rounds after "
        f"{s['warmup']} warm-up, "
        f"clipping at norm {s['speed_clip_norm']} everywhere, {s['optimizer']}. "
        f"Gradient error: {s['grad_error_windows']}, no clipping. Logged loss: the same "
        f"{s['loss_windows']} effective batches of 8 micro-batches' worth, at k = 1, 4, 8, lr = 0.",
        "",
        "| workload | contender | window time, median | speed vs hand (median, IQR) | peak tensor memory | "
        "grad error, full windows | grad error, partial window | logged loss change k=1→4,8 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for wname, w in res["workloads"].items():
        for peer in PEERS:
            if peer not in w["grad_error"]:
                continue
            sp = w["speed"].get(peer, {})
            ms = sp.get("window_ms", {}).get("median")
            mem = w.get("memory", {}).get(peer, {})
            ge = w["grad_error"][peer]
            ll = w["logged_loss"][peer]
            ratio = "1 (baseline)" if peer == "hand" else _fmt_ratio(sp.get("speed_ratio"))
            if peer == "lightning":
                ratio += " †"
            time_ms = f"{ms:.1f} ms" if ms is not None else "-"
            rss = f"{mem['peak_mib']:.1f} MiB" if "peak_mib" in mem else "-"
            lines.append(
                f"| {wname} (micro-batch {w['micro_batch']}) | {peer} | {time_ms} | {ratio} | {rss} | "
                f"{_fmt_err(ge['rel_err_full'])} | {_fmt_err(ge['rel_err_partial'])} | "
                f"{100 * ll['max_rel_change_vs_k1']:.2f} % |"
            )
    noise = ", ".join(
        f"{wname} {_fmt_ratio(w['speed'][AA]['speed_ratio'])}"
        for wname, w in res["workloads"].items()
        if AA in w["speed"]
    )
    lines += ["", f"Noise floor: the hand loop against a second copy of itself in the same rounds: {noise}."]
    if s["missing_peers"]:
        lines += ["", f"Not installed, so not measured: {', '.join(s['missing_peers'])}."]
    lines += [
        "",
        "† Lightning owns its loop, so it runs in its own `Trainer.fit()`; a callback runs one hand-loop "
        "window (on its own model copy) right before or after each Lightning window, so each ratio still "
        "compares two windows measured at the same moment. Its window time includes Lightning's per-batch "
        "hooks.",
    ]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    """Three panels: speed ratio, applied-gradient error, logged-loss change with k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wnames = list(res["workloads"])
    peers = [p for p in PEERS if p in res["setting"]["peers"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(peers)
    for i, peer in enumerate(peers):
        xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(wnames))]
        speed_med, speed_lo, speed_hi, gfull, gpart, lchange = [], [], [], [], [], []
        for wn in wnames:
            w = res["workloads"][wn]
            sr = w["speed"].get(peer, {}).get("speed_ratio")
            med = 1.0 if peer == "hand" else (sr["median"] if sr else float("nan"))
            speed_med.append(med)
            speed_lo.append(0 if peer == "hand" or not sr else med - sr["q1"])
            speed_hi.append(0 if peer == "hand" or not sr else sr["q3"] - med)
            ge = w["grad_error"][peer]
            gfull.append(max(ge["rel_err_full"] or 0, 1e-9))
            gpart.append(max(ge["rel_err_partial"] or 0, 1e-9))
            lchange.append(100 * w["logged_loss"][peer]["max_rel_change_vs_k1"])
        axes[0].bar(xs, speed_med, width, yerr=[speed_lo, speed_hi], label=peer, capsize=2)
        axes[1].bar(xs, gfull, width, label=f"{peer}", color=f"C{i}")
        axes[1].scatter(xs, gpart, marker="v", color=f"C{i}", edgecolor="k", zorder=3)
        bars = axes[2].bar(xs, lchange, width, label=peer)
        axes[2].bar_label(bars, labels=[f"{v:.2g}" if v >= 0.01 else "0" for v in lchange], fontsize=7)
    titles = [
        "speed vs hand loop (median, IQR; >1 = faster)",
        "applied-gradient error vs fp64 (bars: full windows, ▼: partial)",
        "logged loss change when k changes (%)",
    ]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks(range(len(wnames)), wnames)
        ax.set_title(title, fontsize=10)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(res: dict[str, Any], out: Path) -> None:
    """The generated section of benchmarks.md and the plot benchmarks.png."""
    out.mkdir(parents=True, exist_ok=True)
    common.write_section(
        out / "benchmarks.md", "compare_peers", markdown(res) + "\n\n![benchmarks](benchmarks.png)"
    )
    plot(res, out / "benchmarks.png")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    # Libraries print banners; keep stdout clean for --json and the memory probe.
    with contextlib.redirect_stdout(sys.stderr):
        yield


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="fewer rounds and windows; prints the table, writes nothing"
    )
    p.add_argument("--workloads", default="demo,mlp,gpt2", help="comma-separated subset of demo,mlp,gpt2")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--out", type=Path, default=DOCS, help="where benchmarks.{md,json,png} go (default docs/)")
    p.add_argument("--no-write", action="store_true", help="print the table only; write nothing")
    p.add_argument("--json", action="store_true", help="print the JSON result")
    p.add_argument("--k", type=int, default=8, help="micro-batches per optimizer step for speed/memory (8)")
    p.add_argument(
        "--render", action="store_true", help="only redraw the table and plot from <out>/benchmarks.json"
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated: peers (Accelerate, Lightning on demo/mlp/gpt2), hf-trainer "
        "(transformers.Trainer on a tiny Llama); default both",
    )
    p.add_argument(
        "--hf-threads", type=int, default=1, help="torch threads for the hf-trainer part (default 1)"
    )
    a = p.parse_args(argv)
    sections = [x for x in a.sections.split(",") if x]
    if not sections or any(x not in SECTIONS for x in sections):
        p.error(f"--sections: choose from {', '.join(SECTIONS)}")
    if a.render:
        stored = json.loads((a.out / "benchmarks.json").read_text())
        if "peers" in sections and "compare_peers" in stored:
            write_docs(stored["compare_peers"], a.out)
        if "hf-trainer" in sections and "hf_trainer" in stored:
            hf_trainer_peer.write_docs(stored["hf_trainer"], a.out)
        return 0
    names = [w for w in a.workloads.split(",") if w]
    bad = [w for w in names if w not in common.WORKLOADS]
    if bad:
        p.error(f"--workloads: unknown {bad}; choose from {sorted(common.WORKLOADS)}")
    t0 = time.perf_counter()
    write = not (a.no_write or a.quick)  # a rough run must not replace the published numbers
    out: dict[str, Any] = {}
    if "peers" in sections:
        with _stdout_to_stderr():
            res = run_all(
                {w: (common.WORKLOADS[w](), MICRO[w]) for w in names},
                QUICK if a.quick else FULL,
                k=a.k,
                measure_memory=not a.no_memory,
                progress=lambda s: print(f"[{time.perf_counter() - t0:6.1f}s] {s}", flush=True),
            )
        res["wall_seconds"] = time.perf_counter() - t0
        out["compare_peers"] = res
        if not a.json:
            print(markdown(res))
        if write:
            a.out.mkdir(parents=True, exist_ok=True)
            common.merge_json(a.out / "benchmarks.json", "compare_peers", res)
            write_docs(res, a.out)
    if "hf-trainer" in sections:
        with _stdout_to_stderr():
            hf = hf_trainer_peer.measure(
                a.quick,
                a.hf_threads,
                progress=lambda s: print(f"[{time.perf_counter() - t0:6.1f}s] hf-trainer: {s}", flush=True),
            )
        out["hf_trainer"] = hf
        if not a.json:
            print("\n" + hf_trainer_peer.markdown(hf))
        if write:
            hf_trainer_peer.write_docs(hf, a.out)
    if a.json:
        print(json.dumps(out if len(out) > 1 else next(iter(out.values())), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
