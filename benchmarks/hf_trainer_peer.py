"""gradaccum's Trainer against the Hugging Face Trainer on a tiny Llama with variable-length data.

Both contenders train the same model (a Llama built from a ``LlamaConfig`` and saved
with ``save_pretrained``, with a word-level tokenizer: nothing is downloaded) on the
same prompt/completion examples (TRL's SFT format, loss on the completion and EOS
only, padding labelled -100), in the same order, with the same micro-batch size and
number of accumulation steps, the same ``torch.optim.AdamW`` (lr, weight_decay=0.01
on every parameter), a constant learning rate and the same gradient clipping:

- **gradaccum**: what ``gradaccum train --model DIR --data FILE.jsonl`` runs:
  ``gradaccum.workloads.build_workload(DIR, FILE)`` (``AutoModelForCausalLM``, the
  tokenized, memory-mapped examples, the exact summed loss and the right-padding
  collator), then ``gradaccum.Trainer(...).fit()`` writing its metrics to a temporary
  ``--out`` directory.
- **transformers**: ``transformers.Trainer`` with ``gradient_accumulation_steps=k``,
  ``per_device_train_batch_size=micro``, logging every step, on the same Arrow-backed
  examples (viewed in gradaccum's data order) and the same collator. Its sampler is a
  ``SequentialSampler`` (``_get_train_sampler`` overridden), so both see the same
  micro-batches; the model computes its own loss, normalised by the Trainer's
  ``num_items_in_batch``.

Measures (see :func:`run`): the relative error of the gradient each contender hands
to ``optimizer.step()`` (captured by an optimizer step pre-hook) against a float64
full-batch reference at the same parameters; the error of the loss each one logs for
a step against the exact token mean of that step's batch; and tokens per second of
training (counted tokens, i.e. labels really predicted after the causal shift). For
speed each trainer runs its own loop in its own thread, and the threads take turns
one optimizer step at a time (:class:`Baton`), in a rotating order, so a busy machine
slows all of them alike; a second copy of the Trainer is the A/A control, and, when
the Trainer measures the gradient noise scale, a gradaccum run without it shows that
measurement's cost.

    python benchmarks/hf_trainer_peer.py           # or: compare_peers.py --sections hf-trainer
    python benchmarks/hf_trainer_peer.py --quick   # rough; prints, writes nothing
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import math
import random
import sys
import tempfile
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import gradaccum as ga  # noqa: E402
from gradaccum.workloads import build_workload  # noqa: E402
from gradaccum.workloads.hf import loss_fn as hf_loss_sum  # noqa: E402

IGNORE = -100
GA, HF, AA = "gradaccum", "transformers", "transformers again (A/A control)"
GA_NN = "gradaccum, noise scale off"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


# --------------------------------------------------------------------------- model, tokenizer, data
@dataclass(frozen=True)
class Size:
    """The model and data of one benchmark run."""

    words: int = 250
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    min_tokens: int = 4
    max_tokens: int = 64
    examples: int = 512

    @property
    def vocab(self) -> int:
        return self.words + len(SPECIALS)

    def describe(self) -> str:
        return (
            f"LlamaForCausalLM from a LlamaConfig (hidden {self.hidden}, {self.layers} layers, "
            f"{self.heads} heads, intermediate {2 * self.hidden}, vocab {self.vocab}, word-level tokenizer); "
            f"{self.examples} prompt/completion examples of {self.min_tokens}-{self.max_tokens} tokens "
            "(BOS and EOS included), loss on the completion and EOS only, right-padded per micro-batch"
        )


def words(n: int) -> list[str]:
    return [f"w{i:03d}" for i in range(n)]


def make_tokenizer(n_words: int) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` (one token per word), BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + words(n_words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_model_dir(path: Path, size: Size, seed: int = 0) -> Path:
    """A Llama and its tokenizer, written with ``save_pretrained`` (what ``--model DIR`` loads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(size.words)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=size.hidden,
        intermediate_size=2 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=max(128, size.max_tokens),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tok.save_pretrained(path)
    return path


def make_records(size: Size, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion pairs of ``min_tokens``-``max_tokens`` tokens in all (BOS and EOS included).

    Each sequence follows its own arithmetic pattern over the words, so later tokens
    are predictable and short and long completions come to have different mean losses.
    """
    rng = random.Random(seed)
    vocab = words(size.words)
    out = []
    for _ in range(size.examples):
        n = rng.randint(size.min_tokens, size.max_tokens) - 2  # words between BOS and EOS
        start, stride = rng.randrange(size.words), rng.randint(1, 7)
        seq = [vocab[(start + stride * t) % size.words] for t in range(n)]
        cut = rng.randint(1, n - 1)  # at least one word of prompt and of completion
        out.append({"prompt": " ".join(seq[:cut]), "completion": " " + " ".join(seq[cut:])})
    return out


@dataclass
class Setup:
    model_dir: Path
    data: Path
    size: Size
    cache_dir: Path


def make_setup(root: Path, size: Size, seed: int = 0) -> Setup:
    root.mkdir(parents=True, exist_ok=True)
    model_dir = make_model_dir(root / "model", size, seed)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(size, seed)))
    return Setup(model_dir, data, size, root / "cache")


# --------------------------------------------------------------------------- float64 that is float64
def float64_rms_norm(model: nn.Module) -> nn.Module:
    """Make Llama's RMSNorm compute in the input's dtype.

    transformers' ``LlamaRMSNorm`` upcasts to float32 and back, which in a float64 model
    rounds every gradient that flows through it to float32; patched, a float64 model is
    float64 from the embedding to the logits (the rotary tables are float32 constants
    with no gradient, the same in every model, so they do not matter).
    """

    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms, "no LlamaRMSNorm to patch"
    for m in norms:
        m.forward = types.MethodType(forward, m)
    return model


def load_model(setup: Setup, dtype: torch.dtype) -> nn.Module:
    from gradaccum.workloads import hf

    model = hf.load_model(setup.model_dir, dtype, progress=False)
    return float64_rms_norm(model) if dtype == torch.float64 else model


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
    return [sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in w) for w in windows]


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
    with _quiet():
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
        with _quiet():
            trainer.train()
        logged = [float(r["loss"]) for r in trainer.state.log_history if "loss" in r]
        return Run(logged, probe, step_tokens(windows))

    return Prepared(name, probe, train, stack)


def run_alone(prepared: Prepared) -> Run:
    with prepared.cleanup:
        return prepared.train()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
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


# --------------------------------------------------------------------------- measures
def exactness(setup: Setup, cfg: Config, dtype: torch.dtype) -> dict[str, Any]:
    """Applied-gradient and logged-loss error of every step, per contender, no clipping."""
    cfg = Config(cfg.micro, cfg.k, cfg.steps, cfg.lr, cfg.weight_decay, None, cfg.seed)
    out: dict[str, Any] = {}
    for name, prepare in PREPARE.items():
        with _quiet():
            r = run_alone(prepare(setup, cfg, dtype, True))
        exact = r.probe.exact_losses
        loss_err = [abs(v - x) / abs(x) for v, x in zip(r.logged, exact, strict=False)]
        out[name] = {
            "grad_rel_err": r.probe.grad_errors,
            "grad_rel_err_max": max(r.probe.grad_errors),
            "logged_loss": r.logged,
            "exact_loss": exact,
            "logged_loss_rel_err": loss_err,
            "logged_loss_rel_err_max": max(loss_err) if len(r.logged) == len(exact) else math.inf,
            "steps_logged": len(r.logged),
            "steps_taken": len(r.probe.grad_errors),
            "tokens_per_step": r.step_tokens,
        }
    return out


class Baton:
    """Lets one contender's training loop (in its own thread) run exactly one optimizer step.

    The loop runs until the end of its next ``optimizer.step()`` (the probe's post-hook),
    then hands the baton back and waits. ``resumed[i]`` to ``ended[i]`` is step i: data
    loading, collation, forward/backward, clipping, the optimizer, the previous step's
    logging and bookkeeping, and never the waiting.
    """

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.go, self.done = threading.Event(), threading.Event()
        self.resumed: list[float] = []
        self.ended: list[float] = []
        self.result: Run | None = None
        self.error: BaseException | None = None
        prepared.probe.after_step = self._step_ended
        self.thread = threading.Thread(target=self._main, name=prepared.name, daemon=True)
        self.thread.start()

    def _wait_turn(self) -> None:
        self.go.wait()
        self.go.clear()
        self.resumed.append(time.perf_counter())

    def _step_ended(self) -> None:
        self.ended.append(time.perf_counter())
        self.done.set()
        self._wait_turn()

    def _main(self) -> None:
        self._wait_turn()
        try:
            self.result = self.prepared.train()
        except BaseException as e:  # re-raised in the main thread
            self.error = e
        finally:
            self.prepared.probe.after_step = None
            self.done.set()

    def turn(self) -> None:
        """Run this contender's next step (or, after its last step, the rest of its run)."""
        self.done.clear()
        self.go.set()
        while not self.done.wait(5.0):
            if not self.thread.is_alive():
                break
        if self.error is not None:
            raise RuntimeError(f"{self.prepared.name} failed") from self.error

    def step_seconds(self) -> list[float]:
        return [e - r for r, e in zip(self.resumed, self.ended, strict=False)]


def throughput(setup: Setup, cfg: Config, runs: int, warmup: int) -> dict[str, Any]:
    """Tokens/s in float32, the contenders' steps interleaved one by one, the order rotating.

    Every run trains each contender (and the Trainer a second time, the A/A control)
    from the same saved weights on the same examples, each in its own thread, taking
    turns step by step: in round s every contender runs its step s, in an order that
    rotates every round, so slow spells of a shared machine hit all alike. Building the
    trainers and the first ``warmup`` steps (start-up included) are not counted. Speed
    ratios are per step (the same examples for every contender), pooled over the runs.
    """
    names = [GA, *([GA_NN] if has_noise_switch() else []), HF, AA]
    prepare: dict[str, Callable[[], Prepared]] = {
        GA: lambda: prepare_gradaccum(setup, cfg, torch.float32, False),
        GA_NN: lambda: prepare_gradaccum(setup, cfg, torch.float32, False, GA_NN, measure_noise=False),
        HF: lambda: prepare_hf(setup, cfg, torch.float32, False),
        AA: lambda: prepare_hf(setup, cfg, torch.float32, False, AA),
    }
    secs: dict[str, list[float]] = {n: [] for n in names}
    toks: list[int] = []
    for run_index in range(runs):
        with contextlib.ExitStack() as stack, _quiet():
            batons = {}
            for name in names:
                prepared = prepare[name]()
                stack.enter_context(prepared.cleanup)
                batons[name] = Baton(prepared)
            gc.collect()
            for step in range(cfg.steps + 1):  # the last turn lets every run finish
                shift = (run_index + step) % len(names)
                for name in names[shift:] + names[:shift]:
                    batons[name].turn()
            for b in batons.values():
                b.thread.join()
                assert b.result is not None and len(b.ended) == cfg.steps, (b.prepared.name, len(b.ended))
            for name in names:
                secs[name] += batons[name].step_seconds()[warmup:]
            toks += batons[GA].result.step_tokens[warmup:]  # type: ignore[union-attr]
    out: dict[str, Any] = {"steps_measured": len(toks), "tokens_measured": sum(toks), "contenders": names}
    for name in names:
        out[name] = {
            "tokens_per_s": sum(toks) / sum(secs[name]),
            "step_ms": common.summary([t * 1e3 for t in secs[name]]),
        }
        if name != HF:
            out[name]["speed_ratio"] = common.summary(common.ratios(secs[HF], secs[name]))
    return out


QUICK = {"runs": 1, "warmup": 2, "steps": 8, "check_steps": 2}
FULL = {"runs": 6, "warmup": 3, "steps": 50, "check_steps": 3}


def run(setup: Setup, cfg: Config, runs: int, warmup: int, check_steps: int,
        progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Everything, on one thread: exactness in float64 and float32, then throughput."""
    threads = torch.get_num_threads()
    res: dict[str, Any] = {
        "machine": common.machine_info(),
        "setting": {
            "model": setup.size.describe(),
            "micro_batch": cfg.micro,
            "k": cfg.k,
            "effective_batch": cfg.effective,
            "optimizer": f"torch.optim.AdamW(lr={cfg.lr}, weight_decay={cfg.weight_decay}), constant lr",
            "max_grad_norm": cfg.max_grad_norm,
            "steps_per_run": cfg.steps,
            "warmup_steps": warmup,
            "runs": runs,
            "check_steps": check_steps,
            "torch_threads": threads,
        },
    }
    res["machine"]["gradaccum_source"] = source_state()
    res["setting"]["noise_scale_measured_by_default"] = has_noise_switch()
    check_cfg = Config(cfg.micro, cfg.k, check_steps, cfg.lr, cfg.weight_decay, None, cfg.seed)
    progress("exactness, float64")
    res["float64"] = exactness(setup, check_cfg, torch.float64)
    progress("exactness, float32")
    res["float32"] = exactness(setup, check_cfg, torch.float32)
    progress("throughput")
    res["throughput"] = throughput(setup, cfg, runs, warmup)
    return res


def source_state() -> str:
    """The gradaccum commit this ran from, and whether src/ had uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"commit {head}" + (" with uncommitted changes in src/" if dirty else "")


# --------------------------------------------------------------------------- reporting
def _err(e: float) -> str:
    if math.isinf(e):
        return "missed"
    return f"{e:.1e}" if e < 1e-3 else f"{100 * e:.2f} %"


def markdown(res: dict[str, Any]) -> str:
    m, s, t = res["machine"], res["setting"], res["throughput"]
    clip = s["max_grad_norm"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {s['torch_threads']} torch thread"
        f"{'s' if s['torch_threads'] != 1 else ''}, 1-min load average {m['load_average_1min']:.1f} at the "
        f"start), Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"gradaccum {m['gradaccum']} ({m.get('gradaccum_source', 'source unknown')}).",
        "",
        f"{s['model']}. Micro-batch {s['micro_batch']} x k = {s['k']} (effective batch "
        f"{s['effective_batch']} examples), {s['optimizer']}. Exactness: {s['check_steps']} optimizer "
        "steps, no clipping, every step checked. Speed: float32, clipping at "
        f"{clip}; {s['runs']} runs of {s['steps_per_run']} steps per contender, their steps interleaved "
        f"one by one in a rotating order, the first {s['warmup_steps']} steps of each run dropped "
        f"({t['steps_measured']} steps and {t['tokens_measured']:,} counted tokens measured per contender).",
        "",
        "| contender | grad error, float64 model | grad error, float32 model | logged-loss error, "
        "float64 | logged-loss error, float32 | tokens/s | step time, median | speed vs transformers "
        "(median, IQR) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in t.get("contenders", (GA, HF, AA)):
        ratio = t[name].get("speed_ratio")
        rtxt = f"{ratio['median']:.3f} ({ratio['q1']:.3f}-{ratio['q3']:.3f})" if ratio else "1 (baseline)"
        if name not in res["float64"]:
            errs = "| | | |"
        else:
            e64, e32 = res["float64"][name], res["float32"][name]
            errs = (f"{_err(e64['grad_rel_err_max'])} | {_err(e32['grad_rel_err_max'])} | "
                    f"{_err(e64['logged_loss_rel_err_max'])} | {_err(e32['logged_loss_rel_err_max'])} |")
        lines.append(
            f"| {name} | {errs} {t[name]['tokens_per_s']:,.0f} | {t[name]['step_ms']['median']:.1f} ms "
            f"| {rtxt} |"
        )
    lines += [
        "",
        "Errors: the largest over the checked steps, against a float64 full-batch reference at the "
        "parameters each step sees (gradient: relative L2 norm of the difference; loss: relative difference "
        "from the exact token mean of the step's batch). Tokens: labels really predicted after the causal "
        "shift. tokens/s: all measured tokens over all measured step time. Speed: the median and quartiles "
        "of the per-step ratio transformers step time / contender step time (above 1: faster than the "
        "Trainer).",
    ]
    return "\n".join(lines)


def measure(quick: bool = False, threads: int = 1, size: Size | None = None,
            progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """The whole benchmark (QUICK or FULL plan) on ``threads`` torch threads, in a temporary directory.

    The thread count is restored afterwards.
    """
    plan = QUICK if quick else FULL
    cfg = Config(steps=plan["steps"])
    before = torch.get_num_threads()
    common.set_threads(threads)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            setup = make_setup(Path(tmp), size or Size())
            res = run(setup, cfg, plan["runs"], plan["warmup"], plan["check_steps"], progress)
    finally:
        torch.set_num_threads(before)
    res["wall_seconds"] = time.perf_counter() - t0
    res["setting"]["quick"] = quick
    return res


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a rough run; prints the table, writes nothing")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--out", type=Path, default=common.DOCS, help="where benchmarks.{md,json} go")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    res = measure(a.quick, a.threads, progress=lambda s: print(
        f"[{time.perf_counter() - t0:6.1f}s] hf-trainer: {s}", file=sys.stderr, flush=True))
    print(markdown(res))
    if not (a.quick or a.no_write):
        write_docs(res, a.out)
    return 0


def write_docs(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    common.merge_json(out / "benchmarks.json", "hf_trainer", res)
    common.write_section(out / "benchmarks.md", "hf_trainer", markdown(res))


if __name__ == "__main__":
    sys.exit(main())
