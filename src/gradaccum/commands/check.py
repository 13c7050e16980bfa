"""``gradaccum check``: is a model + loss function accumulation-safe? (exit 1 if not)."""

from __future__ import annotations

import argparse

from gradaccum.check import check, load_target
from gradaccum.commands import BadInput
from gradaccum.commands.common import load, workload_spec
from gradaccum.errors import one_line
from gradaccum.workloads.packing import PackedLoss


def run(opts: argparse.Namespace) -> int:
    if opts.target is not None:
        try:
            model, loss_fn, batch = load_target(opts.target)
        except ValueError as e:
            raise BadInput(str(e)) from None
    else:
        work, _ = load(workload_spec(opts, large=False), to_device=False)
        if len(work.dataset) < 2:
            raise BadInput("check: the data has fewer than two examples")
        examples = [work.dataset[i] for i in range(min(opts.batch, len(work.dataset)))]
        model, loss_fn, batch = work.model, work.loss_fn, work.collate_fn(examples)
        if work.padded_collate_fn is not None:  # --packing: split by examples, run packed
            loss_fn, batch = PackedLoss(work.collate_fn, work.loss_fn), work.padded_collate_fn(examples)
    try:
        report = check(model, loss_fn, batch, micro_batch_size=opts.micro_batch)
    except (ValueError, TypeError) as e:  # the user's loss raising included: check names it
        where = f"check {opts.target}" if opts.target is not None else "check"
        raise BadInput(f"{where}: {one_line(e, 500)}") from None
    print(report, flush=True)
    return 0 if report.ok else 1
