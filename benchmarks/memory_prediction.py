"""How close is gradaccum's predicted peak memory to what a training step really uses?

For several models (an MLP, a tiny GPT-2, a small conv net) the planner measures
micro-batches 1, 2 and 4 and predicts larger ones. This script checks those predictions:

1. prediction table: at each micro-batch, the predicted saved activations + state
   against a fresh saved-tensor measurement, and the predicted peak (without the
   safety margin) against state + the measured in-flight peak. On CPU both
   measurements use gradaccum's own accounting (saved_tensors_hooks and the
   live-storage tracker), so this checks the fit's extrapolation; on CUDA a third
   column compares with ``torch.cuda.max_memory_allocated`` over one real training
   step (a 2-micro-batch window through ``Accumulator.step``).
2. window table: the peak of a whole k-micro-batch window against a single-micro-batch
   step, from the state between optimizer steps. The difference should be at most the
   accumulation buffers (the gradients held from one micro-batch to the next).

    python benchmarks/memory_prediction.py            # table
    python benchmarks/memory_prediction.py --json     # one JSON object
    python benchmarks/memory_prediction.py --device cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gradaccum as ga
from gradaccum import memory

FIT_SIZES = (1, 2, 4)


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, Any]]
    make_batch: Callable[[int], Any]
    micro_batches: tuple[int, ...]


def _cases(device: torch.device) -> list[Case]:
    big = device.type == "cuda"  # on a GPU, models large enough that kernel workspaces are noise
    micro = (1, 2, 4, 8, 16, 32, 64)
    return [
        # on CPU the MLP's activations pass AdamW's step temporaries only at a few hundred examples
        Case("mlp", *_mlp(device, big), micro if big else (1, 2, 4, 16, 64, 256, 512)),
        Case("gpt2", *_gpt2(device, big), micro if big else (1, 2, 4, 8, 16, 32)),
        Case("convnet", *_conv(device, big), micro if big else (1, 2, 4, 8, 16, 32)),
    ]


def _class_loss(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    return F.cross_entropy(model(b[0]), b[1], reduction="sum"), b[1].numel()


def _mlp(dev: torch.device, big: bool) -> tuple[Callable[[], nn.Module], Any, Callable[[int], Any]]:
    d_in, hidden = (1024, 4096) if big else (256, 512)

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 10)
        ).to(dev)

    def mlp_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(n)
        return torch.randn(n, d_in, generator=g).to(dev), torch.randint(0, 10, (n,), generator=g).to(dev)

    return mlp, _class_loss, mlp_batch


def _gpt2(dev: torch.device, big: bool) -> tuple[Callable[[], nn.Module], Any, Callable[[int], Any]]:
    layers, embd, vocab, seq = (4, 256, 8192, 256) if big else (2, 64, 256, 64)

    def gpt2() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        torch.manual_seed(0)
        cfg = GPT2Config(
            n_layer=layers,
            n_embd=embd,
            n_head=4,
            vocab_size=vocab,
            n_positions=seq,
            bos_token_id=1,
            eos_token_id=2,
        )
        return GPT2LMHeadModel(cfg).to(dev)

    def lm_batch(n: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(0, vocab, (n, seq), generator=g).to(dev)
        return {"input_ids": ids, "labels": ids}

    def lm_loss(model: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return ga.losses.causal_lm(model(input_ids=b["input_ids"]).logits, b["labels"])

    return gpt2, lm_loss, lm_batch


def _conv(dev: torch.device, big: bool) -> tuple[Callable[[], nn.Module], Any, Callable[[int], Any]]:
    ch, side = (64, 64) if big else (16, 32)

    def conv() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, ch, 3, padding=1),
            nn.GroupNorm(4, ch),
            nn.ReLU(),
            nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1),
            nn.GroupNorm(4, 2 * ch),
            nn.ReLU(),
            nn.Conv2d(2 * ch, 2 * ch, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * ch, 10),
        ).to(dev)

    def img_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, 3, side, side, generator=g).to(dev)
        return x, torch.randint(0, 10, (n,), generator=g).to(dev)

    return conv, _class_loss, img_batch


def _pct(got: float, want: float) -> float:
    return 100.0 * (got - want) / want if want else float("nan")


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _one_step(acc: ga.Accumulator, case: Case, m: int, k: int, shape: str) -> None:
    """One optimizer step over k micro-batches of m, built lazily as a data loader would."""
    micro_batches = (case.make_batch(m) for _ in range(k))
    if shape == "step":
        acc.step(micro_batches, case.loss_fn)
        return
    acc.accum_steps = k
    for mb in micro_batches:
        with acc.micro_step():
            loss_sum, n = case.loss_fn(acc.model, mb)
            acc.backward(loss_sum, n)
        del mb, loss_sum  # a loop that keeps its last batch would hold one more


def _window_peak(
    acc: ga.Accumulator, case: Case, m: int, k: int, device: torch.device, resident: int, shape: str = "step"
) -> int:
    """Peak bytes of one optimizer step from the between-steps state (gradients freed).

    CUDA: ``torch.cuda.max_memory_allocated`` (everything the process holds). CPU: the
    bytes resident before the step (parameters, buffers, optimizer state) plus the
    live-storage tracker's peak over the step.
    """
    _cleanup(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        _one_step(acc, case, m, k, shape)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    with memory.PeakTracker(device) as tracker:
        _one_step(acc, case, m, k, shape)
    return resident + tracker.peak_bytes


def run(device: torch.device) -> dict[str, Any]:
    prediction: list[dict[str, Any]] = []
    window: list[dict[str, Any]] = []
    for case in _cases(device):
        model = case.build()
        prof = memory.profile_memory(model, case.loss_fn, case.make_batch, measure_sizes=FIT_SIZES)
        resident = prof.param_bytes + prof.buffer_bytes + prof.optimizer_state_bytes
        # the real training loop, for the CUDA step peak and the window comparison
        acc = ga.Accumulator(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        acc.step([case.make_batch(1)], case.loss_fn)  # optimizer state and lazy workspaces exist
        for m in case.micro_batches:
            try:
                sample = memory.measure_micro_batch(model, case.loss_fn, case.make_batch, m)
                step_peak = _window_peak(acc, case, m, 2, device, resident) if device.type == "cuda" else None
            except torch.OutOfMemoryError:
                sample = None
            if sample is None:  # out of memory: handled outside the except block
                _cleanup(device)
                break
            # the same terms as the prediction, each measured at this size: state, the in-flight
            # peak (or the optimizer's temporaries) and the one micro-batch fetched ahead
            measured_peak = (
                prof.state_bytes + max(sample.peak_bytes, prof.step_transient_bytes) + sample.batch_bytes
            )
            row = {
                "model": case.name,
                "micro_batch": m,
                "in_fit": m in FIT_SIZES,
                "state_bytes": prof.state_bytes,
                "predicted_saved_plus_state": prof.activation_bytes(m) + prof.state_bytes,
                "measured_saved_plus_state": sample.saved_bytes + prof.state_bytes,
                "predicted_peak_raw": prof.raw_peak_bytes(m),
                "measured_peak_tracked": measured_peak,
                "predicted_peak_with_margin": prof.predicted_peak_bytes(m),
            }
            row["saved_err_pct"] = _pct(row["predicted_saved_plus_state"], row["measured_saved_plus_state"])
            row["peak_err_pct"] = _pct(row["predicted_peak_raw"], measured_peak)
            if step_peak is not None:
                row["cuda_max_memory_allocated"] = step_peak
                row["cuda_err_pct"] = _pct(row["predicted_peak_raw"], step_peak)
            prediction.append(row)
        window += _window_rows(acc, case, device, resident, prof)
        del model, acc
        _cleanup(device)
    return {
        "device": str(device),
        "torch": torch.__version__,
        "fit_sizes": list(FIT_SIZES),
        "margin": memory.DEFAULT_MARGIN,
        "prediction": prediction,
        "window": window,
    }


def _window_rows(acc: ga.Accumulator, case: Case, device: torch.device, resident: int,
                 prof: Any) -> list[dict[str, Any]]:
    """Peak of one optimizer step over k micro-batches against over one, for both loop shapes."""
    rows = []
    m, k = 8, 4
    buffers = prof.grad_bytes + prof.accum_buffer_bytes
    for shape in ("loop", "step"):
        single = _window_peak(acc, case, m, 1, device, resident, shape)
        whole = _window_peak(acc, case, m, k, device, resident, shape)
        rows.append(
            {
                "model": case.name,
                "shape": shape,
                "micro_batch": m,
                "accum_steps": k,
                "single_step_peak": single,
                "window_peak": whole,
                "difference": whole - single,
                "accumulation_buffer_bytes": buffers,
                "batch_bytes": prof.batch_bytes(m),
                "within_buffers": whole - single <= buffers,
                "within_buffers_plus_batch": whole - single <= buffers + prof.batch_bytes(m),
                "predicted_peak_raw": prof.raw_peak_bytes(m),
            }
        )
    return rows


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f}"


def format_tables(result: dict[str, Any]) -> str:
    cuda = result["device"].startswith("cuda")
    lines = [
        f"device {result['device']}, torch {result['torch']}; fitted on micro-batches "
        f"{result['fit_sizes']}; sizes in KiB; peak predictions without the {result['margin']:.0%} margin",
        "",
        "model    micro fit  pred saved+state  meas saved+state   err%   pred peak   meas peak    err%"
        + ("  cuda max_alloc   err%" if cuda else ""),
    ]
    for r in result["prediction"]:
        line = (
            f"{r['model']:<8} {r['micro_batch']:>5} {'yes' if r['in_fit'] else 'no':>3} "
            f"{_kib(r['predicted_saved_plus_state']):>17} {_kib(r['measured_saved_plus_state']):>17} "
            f"{r['saved_err_pct']:>+6.2f} {_kib(r['predicted_peak_raw']):>11} "
            f"{_kib(r['measured_peak_tracked']):>11} {r['peak_err_pct']:>+7.2f}"
        )
        if cuda:
            line += f" {_kib(r['cuda_max_memory_allocated']):>15} {r['cuda_err_pct']:>+6.2f}"
        lines.append(line)
    lines += [
        "",
        "window: peak of one optimizer step over k micro-batches vs over 1 (KiB); loop = micro_step()/",
        "backward(), step = Accumulator.step() (fetches the next micro-batch one ahead)",
        "model    shape micro  k  single step  k-window  difference  accum buffers  one batch  pred peak",
    ]
    for w in result["window"]:
        lines.append(
            f"{w['model']:<8} {w['shape']:>5} {w['micro_batch']:>5} {w['accum_steps']:>2} "
            f"{_kib(w['single_step_peak']):>12} {_kib(w['window_peak']):>9} "
            f"{_kib(w['difference']):>11} "
            f"{_kib(w['accumulation_buffer_bytes']):>14} {_kib(w['batch_bytes']):>10} "
            f"{_kib(w['predicted_peak_raw']):>10}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = run(device)
    print(json.dumps(result, indent=1) if args.json else format_tables(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
