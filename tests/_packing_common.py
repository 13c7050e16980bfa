"""What the packing tests and their 2-rank worker share: a float64 tiny Llama, variable-length
examples with completion-only labels, and one Trainer run (padded or packed).

Run as a script it is the worker: ``python _packing_common.py OUT MODE PER`` under the rank
environment variables trains one packed run on 2 gloo ranks and saves rank 0's result.
"""

from __future__ import annotations

import functools
import random
import sys
from pathlib import Path
from typing import Any

import torch

VOCAB = 40
IGNORE = -100


def tiny_lm(seed: int = 0) -> torch.nn.Module:
    """A 2-layer GPT-2 under sdpa, float64 end to end. (Not a Llama: transformers' Llama RMSNorm
    casts to float32 in a float64 model, so its gradients carry float32 rounding.)"""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).double()


def examples(n: int = 24, seed: int = 0, longest: int = 20) -> list[tuple[list[int], list[int]]]:
    """Lengths 2..longest; the first part of each is a prompt (not in the loss); a few have no
    loss token at all (all prompt), which per-sequence mode must count as no sequence."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(2, longest)
        ids = [rng.randrange(3, VOCAB) for _ in range(length)]
        prompt = length if i % 7 == 3 else rng.randint(1, length - 1)
        out.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def train(data: list[Any], per: str, packed: bool, micro_batch: int, tokens: int | None,
          effective_batch: int = 8, steps: int = 4) -> tuple[list[float], list[torch.Tensor]]:
    """(per-step losses, final weights) of one Trainer run, SGD so weights follow the gradients
    linearly (AdamW would divide rounding noise by tiny second moments)."""
    from gradaccum import Trainer
    from gradaccum.workloads.data import Collator
    from gradaccum.workloads.packing import PackCollator, lm_loss

    model = tiny_lm()
    collate = PackCollator(0, 20 if tokens is not None else None) if packed else Collator(0)
    trainer = Trainer(model=model, dataset=data, loss_fn=functools.partial(lm_loss, per=per),
                      collate_fn=collate, effective_batch=effective_batch, micro_batch=micro_batch,
                      steps=steps, lr=0.5, seed=3, micro_batch_tokens=tokens, measure_noise=False,
                      optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.5),
                      scheduler_factory=None, progress=False, max_grad_norm=None, handle_signals=False)
    trainer.fit()
    losses = [row["loss"] for row in trainer.history.rows()]
    return losses, [p.detach().clone() for p in trainer.model.parameters()]


def main() -> None:
    out, mode, per = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    from gradaccum import distributed, sync

    distributed.setup_from_env()
    tokens = 40 if mode == "tokens" else None
    losses, weights = train(examples(), per, packed=True, micro_batch=4, tokens=tokens)
    if sync.rank() == 0:
        torch.save({"losses": losses, "weights": weights}, out)
    import torch.distributed as dist

    dist.barrier()  # leave together: a rank tearing down mid-collective aborts its peer
    distributed.teardown()


if __name__ == "__main__":
    main()
