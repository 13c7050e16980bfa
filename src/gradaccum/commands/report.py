"""What a command records of its run besides the metrics: ``OUT/config.json`` (the resolved run)
and the ``--report-to`` trackers."""

from __future__ import annotations

import argparse
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from gradaccum import sync
from gradaccum.trackers import Trackers

INTERNAL = ("argv", "trainer_options", "command", "data_note")
"""What the commands keep in ``opts`` that is not a flag."""


def versions() -> dict[str, str | None]:
    """Of gradaccum, torch, transformers (None when not installed) and Python."""
    import torch

    from gradaccum import __version__

    try:
        transformers: str | None = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        transformers = None
    return {"gradaccum": __version__, "torch": torch.__version__, "transformers": transformers,
            "python": platform.python_version()}


def run_record(opts: argparse.Namespace, **resolved: Any) -> dict[str, Any]:
    """config.json: the command line, every flag as resolved (defaults filled in, e.g. --steps from
    --epochs), what the command chose (``resolved``: the planned micro-batch ...), the versions."""
    flags = {k: v for k, v in sorted(vars(opts).items()) if k not in INTERNAL}
    return {"command": opts.command, "argv": list(opts.argv), "flags": flags, **resolved,
            "world_size": sync.world_size(), "versions": versions()}


def trackers(opts: argparse.Namespace, out: Path, record: dict[str, Any]) -> Trackers | None:
    """The --report-to trackers, with the run's record (less the command line) as hyperparameters."""
    if not opts.report_to:
        return None
    return Trackers.named(opts.report_to, out, {k: v for k, v in record.items() if k != "argv"})


def for_trainer(opts: argparse.Namespace, out: Path, micro_batch: int, defining: dict[str, Any]
                ) -> dict[str, Any]:
    """The Trainer's ``run_record`` and ``trackers`` for ``gradaccum train``."""
    world = sync.world_size()
    record = run_record(opts, micro_batch=micro_batch,
                        accum_steps=opts.effective_batch // (micro_batch * world) or 1,
                        defining={"--steps": opts.steps, "--lr": opts.lr, "--seed": opts.seed, **defining})
    return {"run_record": record, "trackers": trackers(opts, out, record)}
