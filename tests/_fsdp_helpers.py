"""Tiny Llama workloads for the LoRA / FSDP2 / checkpointing tests, and their FSDP2 worker.

The builders are deterministic (seeded) so the pytest process and every rank build the
same model and the same micro-batches. The worker (run as
``python tests/_fsdp_helpers.py SCENARIO OUT_DIR`` by ``_dist_helpers.launch_ranks``)
only records what happened; tests/test_fsdp_workload.py checks it against a plain
single-process run built from the same helpers.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from _dist_helpers import count_reduce_scatter
from torch import nn

VOCAB = 48
SEQ = 12
PAD = 0
WORLD = 2
ACCUM = 2  # micro-batches per window and rank
WINDOWS = 3
MICRO = 2  # examples per micro-batch
LR = 1e-2
LORA_R = 4


def tiny_llama(seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 2-layer Llama (hidden 32, 4 heads, 2 kv heads) built from a config, seeded, in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
    model.train()
    return model


def batch(n: int, seed: int, seq: int = SEQ) -> dict[str, torch.Tensor]:
    """``n`` right-padded sequences of random lengths (>= 3) with labels masked on the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g)
    lengths = torch.randint(3, seq + 1, (n,), generator=g)
    pos = torch.arange(seq).expand(n, seq)
    pad = pos >= lengths.unsqueeze(1)
    ids = ids.masked_fill(pad, PAD)
    return {"input_ids": ids, "attention_mask": (~pad).long(), "labels": ids.masked_fill(pad, -100)}


def window_micro_batches(w: int, r: int) -> list[dict[str, torch.Tensor]]:
    """Rank ``r``'s micro-batches of window ``w``."""
    return [batch(MICRO, seed=1000 * w + 10 * r + i) for i in range(ACCUM)]


def loss_fn(model: nn.Module, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    from gradaccum.workloads import hf

    return hf.loss_fn(model, mb)


def build(variant: str) -> nn.Module:
    """``full`` (every weight trains) or ``lora`` (rank-4 adapters, seed 0)."""
    model = tiny_llama()
    if variant == "lora":
        from gradaccum.workloads.lora import apply_lora

        model = apply_lora(model, r=LORA_R, seed=0)
    return model


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def single_process(variant: str) -> tuple[list[float], nn.Module]:
    """The reference: one process, every rank's micro-batches of a window in one window."""
    import gradaccum as ga

    model = build(variant)
    acc = ga.Accumulator(model, optimizer_for(model), accum_steps=ACCUM * WORLD)
    losses = []
    for w in range(WINDOWS):
        mbs = [mb for r in range(WORLD) for mb in window_micro_batches(w, r)]
        losses.append(acc.step(mbs, loss_fn).loss)
    return losses, model


# ----------------------------------------------------------------------------- worker
def scenario_train(out: Path) -> None:
    """FSDP2 (shard_fsdp2) + Accumulator for the full model and for LoRA; gather and save."""
    import torch.distributed as dist

    import gradaccum as ga
    from gradaccum import distributed
    from gradaccum.workloads.fsdp import full_state_dict, shard_fsdp2
    from gradaccum.workloads.lora import save_model

    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    distributed.setup_from_env()
    r = dist.get_rank()
    counter = [0]
    count_reduce_scatter(counter)
    record: dict[str, Any] = {}
    for variant in ("full", "lora"):
        probe = shard_fsdp2(build(variant))
        start = counter[0]
        loss_fn(probe, batch(2, seed=99 + r))[0].backward()
        plain = counter[0] - start
        del probe

        model = shard_fsdp2(build(variant))
        acc = ga.Accumulator(model, optimizer_for(model), accum_steps=ACCUM)
        log = []
        for w in range(WINDOWS):
            before = counter[0]
            during = []
            res = None
            for mb in window_micro_batches(w, r):
                with acc.micro_step():
                    res = acc.backward(*loss_fn(model, mb))
                if res is None:
                    during.append(counter[0] - before)
            log.append({"loss": res.loss, "comms": counter[0] - before, "during": during})
        sd = full_state_dict(model)
        if r == 0:
            save_model(model, None, out / f"model_{variant}", state_dict=sd)
        record[variant] = {"log": log, "plain_backward_comms": plain,
                           "state_dict": sd if r == 0 else None}
        dist.barrier()
    torch.save(record, out / f"rank{r}.pt")
    distributed.teardown()


def scenario_memory(out: Path) -> None:
    """Per-rank predicted vs measured peak of one FSDP2 window (benchmarks/memory_modes.py's
    measurement: resident shards + PeakTracker over a whole window, optimizer step included),
    deferred reduce-scatter and ``sync_every_micro_batch``, micro-batch 2."""
    import json

    import torch.distributed as dist

    from gradaccum import distributed
    from gradaccum.workloads.fsdp import shard_fsdp2

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import memory_modes as mm

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    distributed.setup_from_env()
    r = dist.get_rank()
    rows = []
    for every in (False, True):
        model = mm.build(lora=False, ckpt=False)
        est = mm.estimate(model, 2, lora=False, ckpt=False, world=WORLD, fsdp=True, sync_every=every)
        shard_fsdp2(model)
        meas = mm.measure_window(model, 2, sync_every=every, fsdp=True, rank=r)
        rows.append({"sync_every": every, "predicted": est.raw_peak_bytes, **meas})
        dist.barrier()
    (out / f"memory{r}.json").write_text(json.dumps(rows))
    distributed.teardown()


SCENARIOS = {"train": scenario_train, "memory": scenario_memory}

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    SCENARIOS[sys.argv[1]](Path(sys.argv[2]))
