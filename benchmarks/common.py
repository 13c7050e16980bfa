"""Shared workloads and helpers for the benchmark scripts.

A *workload* is a model, a generator of examples, a collate function and two losses:
``loss_sum`` in gradaccum's contract (``(sum-reduced loss, item count)``) and
``mean_loss``, the per-micro-batch mean that peer libraries are fed (for the language
models that is Hugging Face's own ``model(..., labels=...).loss``). Everything is
generated from seeds; nothing is downloaded.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import random
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gradaccum as ga

Batch = Any
Example = Any
IGNORE = -100


# --------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    """One benchmark task; every callable is deterministic given its seed."""

    name: str
    description: str
    build_model: Callable[[int], nn.Module]
    make_examples: Callable[[int, int], list[Example]]
    collate: Callable[[Sequence[Example]], Batch]
    loss_sum: Callable[[nn.Module, Batch], tuple[torch.Tensor, int | torch.Tensor]]
    mean_loss: Callable[[nn.Module, Batch], torch.Tensor]
    count: Callable[[Batch], int]
    lr: float = 1e-3

    def micro_batches(self, examples: Sequence[Example], micro_batch: int) -> list[Batch]:
        """Consecutive micro-batches of ``micro_batch`` examples (the last may be smaller)."""
        return [self.collate(examples[i : i + micro_batch]) for i in range(0, len(examples), micro_batch)]


def _hf_quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _lm_mean_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # What a Hugging Face user writes: the model's own loss, a mean over this
    # micro-batch's counted (shifted, non-ignored) tokens.
    return model(**batch).loss


def _lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return ga.losses.causal_lm(out.logits, batch["labels"])


def _lm_count(batch: dict[str, torch.Tensor]) -> int:
    # The shifted labels: position t is predicted from t-1, so column 0 never counts.
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def _pad_collate(examples: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    from gradaccum.demo import collate

    return collate(examples)


def demo_workload() -> Workload:
    """The built-in demo model and task (variable-length answers, prompts not counted)."""
    from gradaccum import demo

    def build(seed: int) -> nn.Module:
        _hf_quiet()
        return demo.build_model(
            vocab_size=demo.TASK_TOKENIZER.vocab_size, max_len=demo.TASK_MAX_LEN, seed=seed
        )

    return Workload(
        name="demo",
        description="gradaccum.demo: tiny GPT-2, generated puzzles, only the 1-9 answer tokens counted",
        build_model=build,
        make_examples=lambda n, seed: demo.make_examples(n, seed=seed),
        collate=demo.collate,
        loss_sum=demo.loss_fn,
        mean_loss=_lm_mean_loss,
        count=_lm_count,
        lr=3e-3,
    )


def lm_examples(n: int, seed: int, vocab: int = 64, max_len: int = 64, min_len: int = 4) -> list[Example]:
    """Sequences of random length following a per-sequence arithmetic pattern.

    The pattern makes later tokens predictable, so once trained the per-token loss
    depends on position and short and long sequences have different mean losses.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        start, stride = rng.randrange(vocab - 3), rng.randint(1, 5)
        ids = [3 + (start + stride * t) % (vocab - 3) for t in range(length)]
        out.append((ids, list(ids)))
    return out


def gpt2_workload(n_layer: int = 2, n_embd: int = 128, vocab: int = 64, max_len: int = 64) -> Workload:
    """A tiny ``transformers`` GPT2LMHeadModel from a config, padded variable-length sequences."""

    def build(seed: int) -> nn.Module:
        from gradaccum.demo import build_model

        return build_model(vocab, max_len, seed=seed, n_layer=n_layer, n_embd=n_embd)

    return Workload(
        name="gpt2",
        description=f"transformers GPT2LMHeadModel ({n_layer} layers, width {n_embd}, vocab {vocab}), "
        f"sequences of 4-{max_len} tokens padded per micro-batch",
        build_model=build,
        make_examples=lambda n, seed: lm_examples(n, seed, vocab=vocab, max_len=max_len),
        collate=_pad_collate,
        loss_sum=_lm_loss_sum,
        mean_loss=_lm_mean_loss,
        count=_lm_count,
        lr=1e-3,
    )


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp_workload(d_in: int = 64) -> Workload:
    """Plain MLP regression: equal-sized micro-batches, one item per sample."""

    def build(seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MLP(d_in)

    def make(n: int, seed: int) -> list[Example]:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d_in, generator=g) / d_in**0.5
        x = torch.randn(n, d_in, generator=g)
        y = torch.sin(3 * x @ w).unsqueeze(1) + 0.1 * torch.randn(n, 1, generator=g)
        return list(zip(x, y, strict=True))

    def collate(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return {"x": torch.stack([e[0] for e in examples]), "y": torch.stack([e[1] for e in examples])}

    def loss_sum(model: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return F.mse_loss(model(b["x"]), b["y"], reduction="sum"), b["x"].shape[0]

    return Workload(
        name="mlp",
        description=f"MLP regression ({d_in}-256-256-1, GELU), MSE, equal-sized micro-batches",
        build_model=build,
        make_examples=make,
        collate=collate,
        loss_sum=loss_sum,
        mean_loss=lambda model, b: F.mse_loss(model(b["x"]), b["y"]),
        count=lambda b: int(b["x"].shape[0]),
        lr=1e-3,
    )



# --------------------------------------------------------------------------- the contenders' loops
def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def hand_window(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    window: Sequence[Batch],
    total: int,
    loss_sum: Callable[[nn.Module, Batch], tuple[torch.Tensor, Any]],
    max_grad_norm: float | None = None,
) -> float:
    """The hand-written exact loop: each micro-batch's summed loss / the window's known total.

    Returns the window's exact mean loss (what this loop would log).
    """
    logged = torch.zeros((), dtype=torch.float64)
    for mb in window:
        s, _ = loss_sum(model, mb)
        (s / total).backward()
        logged += s.detach()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(logged) / total


def gradaccum_window(
    acc: ga.Accumulator, window: Sequence[Batch], loss_sum: Callable[..., Any]
) -> ga.StepResult:
    """gradaccum shape (a): the caller's loop, micro_step + backward (+ flush for a short window)."""
    result = None
    for mb in window:
        with acc.micro_step():
            s, n = loss_sum(acc.model, mb)
            result = acc.backward(s, num_items=n)
    if result is None:
        result = acc.flush()
    assert result is not None
    return result


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# --------------------------------------------------------------------------- gradients
def flat_grad(params: Any) -> torch.Tensor:
    """All gradients as one float64 vector (a missing gradient counts as zeros)."""
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double()
            for p in params
        ]
    )


def rel_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    return float((g - ref).norm() / ref.norm())


# --------------------------------------------------------------------------- timing, statistics, ports
def cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(threads: int | None = None) -> int:
    """torch intra-op threads: ``threads``, or every core this process may run on."""
    n = threads or cores()
    torch.set_num_threads(n)
    return n


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleave(
    contenders: dict[str, Callable[[int], Any]], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Run one window of each contender per round, rotating the order every round.

    Rotation means each contender runs first, second, ... equally often, so machine
    drift and cache effects hit all alike. Returns seconds per round (warm-up dropped).
    """
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        for name in order:
            t = timed(lambda name=name, r=r: contenders[name](r))
            if r >= warmup:
                times[name].append(t)
    return times


def ratios(base: Sequence[float], other: Sequence[float]) -> list[float]:
    """Per-round speed ratio base_time / other_time (> 1 means ``other`` is faster)."""
    return [b / o for b, o in zip(base, other, strict=True)]


def summary(xs: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and range of a sample."""
    if len(xs) >= 2:
        q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = med = q3 = xs[0]
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "min": min(xs), "max": max(xs), "n": len(xs)}


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



# --------------------------------------------------------------------------- docs output
DOCS = Path(__file__).resolve().parent.parent / "docs"


def write_section(md_path: Path, name: str, body: str) -> None:
    """Replace the generated section ``name`` of a Markdown file (appended when absent).

    The section sits between ``<!-- name:begin -->`` and ``<!-- name:end -->``, so the
    hand-written prose around it survives a re-run.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = md_path.read_text() if md_path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    md_path.write_text(text)


def merge_json(path: Path, key: str, value: Any) -> None:
    """Store ``value`` under ``key`` in the JSON file, keeping the other keys."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=1) + "\n")


# --------------------------------------------------------------------------- machine description
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def machine_info() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": cores(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gradaccum": ga.__version__,
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "lightning": _version("lightning"),
        "sentence_transformers": _version("sentence-transformers"),
    }
