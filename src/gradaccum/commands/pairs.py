"""The flags anchor/positive pair data refuses (an embedding model through ``step_cached``), checked
before torch is imported: one line naming the flag, nothing touched."""

from __future__ import annotations

import argparse

from gradaccum.commands import BadInput


def check(opts: argparse.Namespace, data_pairs: bool, eval_pairs: bool | None) -> None:
    """BadInput for a flag that means nothing, or is not supported, with pairs in --data (or a
    --eval-data whose format differs from --data's). ``eval_pairs``: None without --eval-data."""
    if eval_pairs is not None and eval_pairs != data_pairs:
        what = "anchor/positive pairs" if eval_pairs else "not anchor/positive pairs"
        raise BadInput(f"--eval-data {opts.eval_data}: {what}, unlike --data {opts.data}")
    if not data_pairs:
        return
    data = f"anchor/positive pairs (--data {opts.data})"
    if opts.model == "demo":
        raise BadInput(f"--data {opts.data}: anchor/positive pairs train an embedding model: give "
                       "--model DIR (an encoder such as BERT), not the demo")
    if opts.command in ("plan", "bench"):
        raise BadInput(f"{opts.command}: not for {data}: its plans measure a per-micro-batch loss; train "
                       "runs step_cached, which holds one micro-batch's activations at a time: give "
                       "train --micro-batch N")
    refused = {"--packing": (opts.packing, "each text is its own row"),
               "--loss-per sequence": (opts.loss_per != "token", "the loss is InfoNCE over the pairs")}
    if opts.command == "train":
        refused.update({
            "--lora-r": (opts.lora_r is not None, "embedding models train their full weights here"),
            "--fsdp": (opts.fsdp, "train with DDP under torchrun (the negatives are gathered over ranks)"),
            "--effective-batch auto": (opts.effective_batch == "auto",
                                       "the noise scale it grows with is not measured for a loss that "
                                       "couples the window's examples"),
            "--micro-batch auto": (opts.micro_batch == "auto", "the planner measures a per-micro-batch loss; "
                                   "give --micro-batch N"),
            "--memory-budget": (opts.memory_budget is not None, "the planner measures a per-micro-batch "
                                "loss; give --micro-batch N"),
        })
    for flag, (given, why) in refused.items():
        if given:
            raise BadInput(f"{flag}: not with {data}: {why}")
