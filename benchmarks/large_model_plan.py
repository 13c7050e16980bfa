"""Per-GPU memory of a Llama-3-70B-class fine-tune, from the config alone (docs/large-models.md).

Writes a config-only model directory with Llama-3-70B's published shape (no weights,
no tokenizer), builds the model on the meta device and runs gradaccum's analytic
planner for: a full fine-tune under FSDP2, LoRA r=16 without FSDP (DDP), and LoRA
r=16 under FSDP2, each with and without activation checkpointing, at micro-batch 1
and 2, sequence length 4096, on 4 ranks. Prints a table (or ``--json``).

    python benchmarks/large_model_plan.py [--world 4] [--seq 4096] [--budget 78GiB] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from gradaccum import memory
from gradaccum.workloads import hf

LLAMA3_70B = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
GiB = 2**30


def write_config_dir(path: Path, **overrides: Any) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(**{**LLAMA3_70B, **overrides}).save_pretrained(path)
    return path


MODES = [
    # (label, estimate kwargs)
    ("full FT, FSDP2, deferred sync", dict(fsdp=True, optimizer_state_dtype=torch.float32)),
    ("full FT, FSDP2, sync every micro-batch",
     dict(fsdp=True, optimizer_state_dtype=torch.float32, sync_every_micro_batch=True)),
    ("LoRA r=16, no FSDP (DDP)", dict(lora_r=16)),
    ("LoRA r=16, FSDP2", dict(lora_r=16, fsdp=True)),
]


def rows(model: torch.nn.Module, world: int, seq: int, budget: int) -> list[dict[str, Any]]:
    out = []
    for label, kw in MODES:
        for ckpt in (False, True):
            for micro in (1, 2):
                est = memory.analytic_estimate(model, micro, seq, world_size=world,
                                               gradient_checkpointing=ckpt, dtype=torch.bfloat16, **kw)
                d = est.to_json()
                d.update(mode=label, fits=est.predicted_peak_bytes <= budget)
                out.append(d)
    return out


def min_world_for_full_ft(model: torch.nn.Module, seq: int, budget: int) -> int | None:
    for world in (4, 8, 16, 32, 64, 128):
        est = memory.analytic_estimate(model, 1, seq, world_size=world, fsdp=True, dtype=torch.bfloat16,
                                       optimizer_state_dtype=torch.float32, gradient_checkpointing=True,
                                       sync_every_micro_batch=True)
        if est.predicted_peak_bytes <= budget:
            return world
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--budget", default="78GiB", help="usable memory per GPU (an 80 GB H100: about 78 GiB)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    budget = memory.parse_size(args.budget)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        d = write_config_dir(Path(tmp) / "llama-70b-config")
        model = hf.load_config_only(d, dtype="bf16")  # meta device: no memory, no weights
    table = rows(model, args.world, args.seq, budget)
    need = min_world_for_full_ft(model, args.seq, budget)
    params = sum(p.numel() for p in model.parameters())
    if args.json:
        print(json.dumps({"params": params, "world": args.world, "seq": args.seq, "budget_bytes": budget,
                          "rows": table, "full_ft_min_gpus": need}, indent=1))
        return 0
    print(f"Llama-3-70B shape ({params / 1e9:.2f} B parameters), bf16 weights, AdamW, seq {args.seq}, "
          f"{args.world} GPUs, budget {memory.format_bytes(budget)} per GPU; GiB per GPU, raw (no margin)")
    head = (f"{'mode':40s} {'ckpt':>4s} {'mb':>2s} {'weights':>8s} {'gathered':>8s} {'grads':>7s} "
            f"{'held':>7s} {'optim':>7s} {'activ':>7s} {'transient':>9s} {'peak':>7s} {'+10%':>7s}  fits")
    print(head)
    for r in table:
        print(f"{r['mode']:40s} {'on' if r['gradient_checkpointing'] else 'off':>4s} {r['micro_batch']:>2d} "
              f"{r['params_bytes'] / GiB:8.1f} {r['unsharded_params_bytes'] / GiB:8.1f} "
              f"{(r['grad_bytes'] + r['accum_buffer_bytes']) / GiB:7.1f} {r['held_grad_bytes'] / GiB:7.1f} "
              f"{r['optimizer_state_bytes'] / GiB:7.1f} {r['activation_bytes'] / GiB:7.1f} "
              f"{r['transient_bytes'] / GiB:9.1f} {r['raw_peak_bytes'] / GiB:7.1f} "
              f"{r['predicted_peak_bytes'] / GiB:7.1f}  {'yes' if r['fits'] else 'no'}")
    print(f"full fine-tune (FSDP2, checkpointing, sync every micro-batch, micro-batch 1) fits from "
          f"{need} GPUs" if need else "full fine-tune does not fit on up to 128 GPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
