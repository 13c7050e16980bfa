"""The checks of --model / --data / --eval-data that need no torch: run before a command's module
(and with it torch and transformers, seconds of imports) is loaded, so a missing file is said at
once. The commands check the same inputs again, fully, when they build the workload."""

from __future__ import annotations

import argparse
from pathlib import Path

from gradaccum import trackers
from gradaccum.commands import BadInput, pairs
from gradaccum.workloads.errors import WorkloadError
from gradaccum.workloads.files import check_data_file, check_model_dir, is_pairs_file, regular_file

TRAINS = ("train", "plan", "bench", "compare", "check")
"""Commands that build a --model/--data workload (check: without a TARGET)."""


def inputs(opts: argparse.Namespace) -> None:
    """BadInput (one line) for a --model directory or a data file that can never be used, or a
    --report-to tracker that is not installed."""
    for name in opts.report_to if opts.command in ("train", "compare") else ():
        why = trackers.missing(name)
        if why is not None:
            raise BadInput(f"--report-to {name}: {why}")
    if opts.command not in TRAINS or (opts.command == "check" and opts.target is not None):
        return
    demo = opts.model == "demo"
    try:
        if not demo:
            # plan can read a directory with config.json alone (no tokenizer, no weights)
            check_model_dir(opts.model, tokenizer=opts.command != "plan")
        eval_data = opts.eval_data if opts.command == "train" else None  # train's flag alone
        for flag, path in (("--data", opts.data), ("--eval-data", eval_data)):
            if path is not None:
                # The demo reads text its own way (and says so); here only what is never usable.
                regular_file(path, flag, WorkloadError) if demo else check_data_file(path, flag)
    except WorkloadError as e:
        raise BadInput(str(e)) from None
    pairs.check(opts, bool(_pairs(opts.data)), _pairs(eval_data))


def _pairs(path: str | None) -> bool | None:
    """Whether a (checked) data file holds anchor/positive pairs; None without a file."""
    if path is None:
        return None
    return Path(path).suffix.lower() in (".jsonl", ".json") and is_pairs_file(path)
