"""Examples and optimizer steps to reach a target loss: fixed effective batches vs ``auto``.

On the built-in demo task (tiny GPT-2, variable-length answers) or a small Llama on
generated text (``--workload llama``: sentences of a random 4-successor Markov chain over
60 words, lengths 8-48, every token in the loss), each contender trains
from the same initial weights on the same example stream with AdamW, micro-batch 8, and
a learning rate scaled with the square root of the batch (``--lr`` at batch 16, the
rule ``--effective-batch auto`` uses), until an EMA of the training loss reaches the
target or the example budget runs out. ``auto`` starts at 2 micro-batches (16) and
doubles as the measured critical batch grows (gradaccum.adaptive).

    python benchmarks/noise_batch.py                 # table + docs/noise_batch.png
    python benchmarks/noise_batch.py --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

import gradaccum as ga
from gradaccum import demo
from gradaccum.adaptive import AdaptiveBatch
from gradaccum.stream import stream_indices

DOCS = Path(__file__).resolve().parent.parent / "docs"
FIXED = (16, 32, 64, 128, 256, 512)


def demo_workload(seed: int) -> tuple[list[Any], torch.nn.Module, Any, Any]:
    examples = demo.make_examples(20_000, seed)
    model = demo.build_model(demo.TASK_TOKENIZER.vocab_size, demo.TASK_MAX_LEN, seed=seed)
    return examples, model, demo.loss_fn, demo.collate


def llama_workload(seed: int, vocab: int = 64, n: int = 20_000
                   ) -> tuple[list[Any], torch.nn.Module, Any, Any]:
    """A Llama (hidden 64, 2 layers) from a config, on text from a random Markov chain."""
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    from gradaccum.workloads import hf
    from gradaccum.workloads.data import Collator

    rng = random.Random(seed)
    words = range(4, vocab)  # 0 pad, 1 bos, 2 eos, 3 unused
    successors = {w: rng.sample(list(words), 4) for w in words}
    examples = []
    for _ in range(n):
        seq, w = [1], rng.choice(list(words))
        for _ in range(rng.randint(8, 48)):
            seq.append(w)
            w = rng.choices(successors[w], weights=(8, 4, 2, 1))[0]
        seq.append(2)
        examples.append((seq, list(seq)))
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return examples, LlamaForCausalLM(config), hf.loss_fn, Collator(0)


WORKLOADS = {"demo": demo_workload, "llama": llama_workload}


def train_until(batch: int | str, target: float, budget: int, lr: float, micro: int = 8, seed: int = 0,
                ema: float = 0.9, workload: str = "demo") -> dict[str, Any]:
    examples, model, loss_fn, collate = WORKLOADS[workload](seed)
    adaptive = AdaptiveBatch(micro_batch=micro) if batch == "auto" else None
    size = adaptive.effective_batch if adaptive else int(batch)
    base = lr if adaptive else lr * math.sqrt(size / 16)
    opt = torch.optim.AdamW(model.parameters(), lr=base, weight_decay=0.01)
    acc = ga.Accumulator(model, opt, accum_steps=size // micro, max_grad_norm=1.0, measure_noise=True)
    seen, steps, smooth, t0 = 0, 0, None, time.perf_counter()
    trace = []
    while seen < budget:
        idx = stream_indices(len(examples), seed, seen, size)
        res = acc.step([collate([examples[i] for i in idx[j:j + micro]]) for j in range(0, size, micro)],
                       loss_fn)
        seen, steps = seen + size, steps + 1
        smooth = res.loss if smooth is None else ema * smooth + (1 - ema) * res.loss
        trace.append((seen, steps, smooth, size))
        if smooth <= target:
            break
        if adaptive is not None and res.noise_scale is not None:
            critical = res.noise_scale * seen / max(acc.items_seen, 1)
            old = adaptive.lr_factor()
            if adaptive.update(critical, acc.noise.windows):
                size = adaptive.effective_batch
                acc.accum_steps = adaptive.accum_steps
                for g in opt.param_groups:
                    g["lr"] *= adaptive.lr_factor() / old
    return {"batch": batch, "reached": smooth is not None and smooth <= target, "examples": seen,
            "steps": steps, "final_batch": size, "seconds": round(time.perf_counter() - t0, 1),
            "trace": trace}


def run(target: float, budget: int, lr: float, workload: str = "demo") -> dict[str, Any]:
    torch.set_num_threads(1)
    rows = [train_until(b, target, budget, lr, workload=workload) for b in (*FIXED, "auto")]
    return {"benchmark": "noise_batch", "workload": workload, "target_loss": target,
            "budget_examples": budget, "lr_at_16": lr,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows}


def table(res: dict[str, Any]) -> str:
    lines = [f"Target: EMA(0.9) of the training loss <= {res['target_loss']} "
             f"(budget {res['budget_examples']} examples); {res['workload']}, micro-batch 8, AdamW, "
             f"lr {res['lr_at_16']} x sqrt(batch/16).", "",
             "| effective batch | reached | examples | optimizer steps | final batch | seconds |",
             "|---|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['batch']} | {'yes' if r['reached'] else 'no'} | {r['examples']} | {r['steps']} | "
                     f"{r['final_batch']} | {r['seconds']} |")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for r in res["rows"]:
        seen, steps, smooth, _ = zip(*r["trace"], strict=True)
        style = {"lw": 2.2, "color": "black"} if r["batch"] == "auto" else {"lw": 1}
        axes[0].plot(seen, smooth, label=str(r["batch"]), **style)
        axes[1].plot(steps, smooth, label=str(r["batch"]), **style)
    for ax, x in zip(axes, ("examples seen", "optimizer steps"), strict=True):
        ax.axhline(res["target_loss"], color="gray", ls=":")
        ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel("training loss (EMA)")
        ax.grid(alpha=0.3)
    axes[0].legend(title="effective batch", fontsize=8)
    fig.suptitle("examples and optimizer steps to a target loss: fixed batches vs --effective-batch auto")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="demo")
    p.add_argument("--target", type=float, default=2.0)
    p.add_argument("--budget", type=int, default=40_000, help="examples per contender at most")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate at batch 16")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=str(DOCS / "noise_batch.png"))
    a = p.parse_args(argv)
    res = run(a.target, a.budget, a.lr, a.workload)
    if a.plot:
        plot(res, Path(a.plot))
    for r in res["rows"]:
        r.pop("trace")
    print(json.dumps(res, indent=1) if a.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
