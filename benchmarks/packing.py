"""Packed vs padded micro-batches, and against TRL's SFTTrainer, on variable-length data.

A tiny Llama (built from a config) on generated token data whose lengths are log-uniform
in 8..512 with a completion-only loss; effective batch 32 = micro-batch 8 x 4.
Contenders, each training its own copy on the same examples in the same order:

- ``padded``: gradaccum's Accumulator on padded micro-batches of 8 examples;
- ``packed``: the same micro-batches packed into one row each (``--packing``);
- ``packed-tokens``: packed by a token budget of 8 mean examples in rows of <= 512
  (``--packing --micro-batch-tokens``);
- ``packed (A/A)``: a second copy of ``packed``, the noise floor of the ratios;
- ``trl padding_free``: TRL's fastest configuration on such data (the same micro-batch,
  flattened into one row with position_ids); ``trl padded`` for reference.

TRL's ``train()`` drives the rounds: after each of its optimizer steps a callback runs one
step of every gradaccum contender in rotating order. Each contender's time is one
optimizer step with data already collated (TRL collates before its step begins). The
figure is the median over steps of real (non-pad) tokens/s relative to ``padded``.
Gradient error: step 1's accumulated gradient against a float64 full batch of the same
32 examples (RMSNorm and rotary embeddings patched to stay float64: transformers computes
them in float32 even in a float64 model).

    python benchmarks/packing.py [--steps 24] [--write-docs]
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from gradaccum import Accumulator  # noqa: E402
from gradaccum.workloads.data import Collator  # noqa: E402
from gradaccum.workloads.packing import PackCollator, lm_loss  # noqa: E402

VOCAB, EFFECTIVE, MICRO, LONGEST = 256, 32, 8, 512
IGNORE = -100


# --------------------------------------------------------------------------- model and data
def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=LONGEST,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def examples(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Lengths log-uniform in 8..512; the first 20-60% is the prompt (not in the loss)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(math.exp(rng.uniform(math.log(8), math.log(LONGEST))))
        ids = [rng.randrange(3, VOCAB) for _ in range(length)]
        prompt = max(1, int(length * rng.uniform(0.2, 0.6)))
        out.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


# --------------------------------------------------------------------------- gradaccum contenders
class Contender:
    """One gradaccum copy of the model, stepping through pre-collated windows."""

    def __init__(self, base: nn.Module, windows: list[list[dict[str, torch.Tensor]]]) -> None:
        self.model = copy.deepcopy(base)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.acc = Accumulator(self.model, self.opt, accum_steps=1, max_grad_norm=None)
        self.windows = windows
        self.times: list[float] = []
        self.first_grads: list[torch.Tensor] = []
        self.opt.register_step_pre_hook(self._keep_first)

    def _keep_first(self, *_: Any) -> None:
        if not self.first_grads:
            self.first_grads = [p.grad.detach().clone() for p in self.model.parameters()]

    def step(self, i: int) -> None:
        t = time.perf_counter()
        self.acc.step(self.windows[i], lm_loss)
        self.times.append(time.perf_counter() - t)


def windows_of(data: list[Any], collate: Any, steps: int, tokens: int | None = None) -> list[list[Any]]:
    """Each step's micro-batches, collated ahead (outside the timing), in data order."""
    from gradaccum.batching import token_groups

    out = []
    for s in range(steps):
        step = data[s * EFFECTIVE:(s + 1) * EFFECTIVE]
        if tokens is None:
            groups = [step[i:i + MICRO] for i in range(0, EFFECTIVE, MICRO)]
        else:
            groups = [[step[i] for i in g] for g in token_groups([len(ids) for ids, _ in step], tokens)]
        out.append([collate(g) for g in groups])
    return out


# --------------------------------------------------------------------------- TRL, which drives the rounds
def trl_trainer(base: nn.Module, data: list[Any], steps: int, padding_free: bool, callback: Any,
                out: Path) -> Any:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = {"input_ids": [ids for ids, _ in data], "labels": [lab for _, lab in data]}
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=MICRO,
                     gradient_accumulation_steps=EFFECTIVE // MICRO, max_steps=steps, learning_rate=1e-3,
                     lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
                     padding_free=padding_free,
                     max_length=None, train_sampling_strategy="sequential", report_to="none",
                     logging_strategy="no", save_strategy="no", use_cpu=True, dataloader_num_workers=0,
                     disable_tqdm=True, weight_decay=0.01, bf16=False, fp16=False)  # fp32, as ours
    return SFTTrainer(model=copy.deepcopy(base), args=args, train_dataset=Dataset.from_dict(rows),
                      processing_class=tokenizer(), callbacks=[callback])


def make_callback(contenders: dict[str, Contender], record: dict[str, Any]) -> Any:
    from transformers import TrainerCallback

    class Rounds(TrainerCallback):
        """Times TRL's steps and runs one step of each gradaccum contender after each."""

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            record["t0"] = time.perf_counter()

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not record["grads"]:
                record["grads"] = [p.grad.detach().clone() for p in kw["model"].parameters()]

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            record["times"].append(time.perf_counter() - record["t0"])
            i = state.global_step - 1
            names = list(contenders)
            shift = i % max(1, len(names))
            for name in names[shift:] + names[:shift]:
                contenders[name].step(i)

    return Rounds()


# --------------------------------------------------------------------------- float64 reference
def float64_reference(base: nn.Module, data: list[Any]) -> list[torch.Tensor]:
    """Step 1's full-batch gradient in float64, norms and rotary embeddings kept in float64."""
    model = copy.deepcopy(base).double()
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            module.forward = types.MethodType(_rmsnorm64, module)
        elif name.endswith("RotaryEmbedding"):
            module.forward = types.MethodType(_rotary64(model.config), module)
    loss, n = lm_loss(model, Collator(0)(data[:EFFECTIVE]))
    (loss / n).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _rmsnorm64(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _rotary64(config: Any) -> Any:
    dim = config.hidden_size // config.num_attention_heads
    theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))

    def forward(self: nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> Any:
        assert torch.allclose(inv.float(), self.inv_freq.float().cpu(), rtol=1e-6)
        freqs = position_ids[..., None].double() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    return forward


def rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    g = torch.cat([t.double().flatten() for t in got])
    w = torch.cat([t.flatten() for t in want])
    return float((g - w).norm() / w.norm())


# --------------------------------------------------------------------------- the run
def measure(steps: int, warmup: int) -> dict[str, Any]:
    """Two TRL runs (padding-free, padded), each driving its own set of gradaccum contenders, so
    every ratio compares steps taken in the same rounds."""
    common.set_threads()
    base = llama()
    data = examples(EFFECTIVE * (steps + 1))
    real = [sum(len(ids) for ids, _ in data[s * EFFECTIVE:(s + 1) * EFFECTIVE]) for s in range(steps)]
    budget = MICRO * round(statistics.mean(len(ids) for ids, _ in data))
    ref = float64_reference(base, data)
    runs = {}
    for name, free in (("trl padding_free", True), ("trl padded", False)):
        contenders = gradaccum_contenders(base, data, steps, budget)
        record: dict[str, Any] = {"times": [], "grads": []}
        tmp = Path(__file__).resolve().parent / ".packing_trl"
        trl_trainer(base, data, steps, free, make_callback(contenders, record), tmp).train()
        runs[name] = _rows(contenders, name, record, real, warmup, ref)
    rows = dict(runs["trl padding_free"]) | {"trl padded": runs["trl padded"]["trl padded"]}
    return {"machine": common.machine_info(), "steps_timed": steps - warmup, "token_budget": budget,
            "mean_real_tokens_per_step": statistics.mean(real), "contenders": rows,
            "second_run": runs["trl padded"]}


def gradaccum_contenders(base: nn.Module, data: list[Any], steps: int, budget: int) -> dict[str, Contender]:
    pad, one_row = Collator(0), PackCollator(0)
    return {
        "padded": Contender(base, windows_of(data, pad, steps)),
        "packed": Contender(base, windows_of(data, one_row, steps)),
        "packed-tokens": Contender(base, windows_of(data, PackCollator(0, LONGEST), steps, budget)),
        "packed (A/A)": Contender(base, windows_of(data, one_row, steps)),
    }


def _rows(contenders: dict[str, Contender], trl_name: str, record: dict[str, Any], real: list[int],
          warmup: int, ref: list[torch.Tensor]) -> dict[str, Any]:
    """Per contender of one run: median real tokens/s, speed vs ``padded`` per step, gradient error."""
    times = {name: c.times for name, c in contenders.items()} | {trl_name: record["times"]}
    grads = {name: c.first_grads for name, c in contenders.items()} | {trl_name: record["grads"]}
    base, trl = times["padded"][warmup:], times[trl_name][warmup:]
    rows = {}
    for name, ts in times.items():
        ts = ts[warmup:]
        per_s = statistics.median(t / s for t, s in zip(real[warmup:], ts, strict=True))
        rows[name] = {"real_tokens_per_s": per_s, "vs_padded": common.summary(common.ratios(base, ts)),
                      f"vs_{trl_name}": common.summary(common.ratios(trl, ts)),
                      "grad_rel_error_vs_float64": rel_error(grads[name], ref)}
    return rows


def describe(res: dict[str, Any]) -> str:
    lines = [f"Tiny Llama (4 layers, hidden 128, sdpa, fp32), lengths log-uniform 8..{LONGEST}, "
             f"completion-only loss, effective batch {EFFECTIVE} = {MICRO} x {EFFECTIVE // MICRO}; "
             f"{res['steps_timed']} timed steps; `packed-tokens`: budget {res['token_budget']} tokens, "
             f"rows <= {LONGEST}. `trl padded` is timed in a second run against that run's `padded`.", "",
             "| contender | real tokens/s | vs padded (median [IQR]) | vs trl padding_free | grad error vs "
             "float64 |", "|---|---:|---:|---:|---:|"]
    for name, r in res["contenders"].items():
        v, t = r["vs_padded"], r.get("vs_trl padding_free")
        vs_trl = f"{t['median']:.2f}x [{t['q1']:.2f}, {t['q3']:.2f}]" if t else "-"
        lines.append(f"| {name} | {r['real_tokens_per_s']:.0f} | {v['median']:.2f}x [{v['q1']:.2f}, "
                     f"{v['q3']:.2f}] | {vs_trl} | {r['grad_rel_error_vs_float64']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per contender")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the figures")
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = ap.parse_args(argv)
    res = measure(args.steps, args.warmup)
    print(describe(res))
    if args.write_docs:
        common.merge_json(common.DOCS / "benchmarks.json", "packing", res)
        common.write_section(common.DOCS / "benchmarks.md", "packing", describe(res))


if __name__ == "__main__":
    main()
