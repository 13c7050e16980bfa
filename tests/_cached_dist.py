"""Ranks of test_cached.py's distributed test: step_cached on 2 gloo ranks, negatives over both.

Run by the test through ``_dist_helpers.launch_ranks``: ``python tests/_cached_dist.py OUT_DIR``.
Each rank trains the same encoder on its own micro-batches (ranks differ in sizes and in
micro-batch counts) and records the gradients handed to the optimizer, the StepResults,
the final weights and the DDP all-reduce calls; the parent checks them against its plain
full-batch loop over both ranks' examples.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Per window, per rank: micro-batch sizes (different counts and a short last one).
WINDOWS = [[[3, 2, 4], [5, 1]], [[4], [2, 2, 3]]]
LR, MOMENTUM = 0.05, 0.9


def window_micros(w: int, r: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from test_cached import pairs

    sizes = WINDOWS[w][r]
    q, k = pairs(sum(sizes), seed=100 * w + r)
    return [(qq, kk) for qq, kk in zip(q.split(sizes), k.split(sizes), strict=True)]


def rng_seed(w: int, r: int) -> int:
    return 1000 * w + 17 * r


class Dual(nn.Module):
    """The encoder with the temperature inside the module (DDP then owns it)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.temp = nn.Parameter(torch.tensor(0.1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def run_variant(variant: str, counter: list[int]) -> dict[str, Any]:
    import torch.distributed as dist
    from test_cached import encode, make_encoder
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    import gradaccum as ga

    r = dist.get_rank()
    plain = 0  # all-reduce calls of one ordinary backward (DDP)
    dual = Dual(make_encoder())
    params = [*dual.encoder.parameters(), dual.temp]
    if variant == "manual":
        model: nn.Module = dual
    else:  # tiny buckets: several all-reduces per synced backward
        inside = variant == "ddp_temp_inside"
        model = DDP(dual if inside else dual.encoder, bucket_cap_mb=0.0005, find_unused_parameters=inside)

        def counting(state, bucket):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
            counter[0] += 1
            return default_hooks.allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting)
        for _ in range(2):  # DDP settles its buckets after the first backward: count the second
            start = counter[0]
            sum(x.sum() for x in encode(model, window_micros(0, r)[0])).backward()
            plain = counter[0] - start
            model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    grads: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, a, k: grads.append(
        [None if p.grad is None else p.grad.detach().clone() for p in params]))
    acc = ga.Accumulator(model, opt)
    results, comms = [], []
    for w in range(len(WINDOWS)):
        torch.manual_seed(rng_seed(w, r))
        before = counter[0]
        res = acc.step_cached(window_micros(w, r), encode,
                              lambda reps: ga.losses.info_nce(reps[0], reps[1], dual.temp))
        comms.append(counter[0] - before)
        results.append({"loss": res.loss, "num_items": res.num_items, "step": res.step,
                        "grad_norm": res.grad_norm, "skipped": res.skipped})
    return {"grads": grads, "results": results, "comms": comms, "plain_backward_comms": plain,
            "params": [p.detach().clone() for p in params]}


def main(out: Path) -> None:
    import _dist_helpers as dh
    import torch.distributed as dist

    from gradaccum import distributed

    distributed.setup_from_env()
    counter = [0]
    record = {v: run_variant(v, counter) for v in ("manual", "ddp", "ddp_temp_inside")}
    torch.save(record, out / f"rank{dist.get_rank()}.pt")
    dh.finish_together()
    # gloo's threads still abort interpreter shutdown now and then ("terminate called without an
    # active exception") after everything is saved: leave without C++ static destructors.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
