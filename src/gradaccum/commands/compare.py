"""``gradaccum compare``: full batch vs accumulated vs mean-of-means vs small batch, one picture
(pairs data, an embedding model: full batch vs step_cached vs plain accumulation)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gradaccum import compare, outdir, runlog, sync
from gradaccum.commands import BadInput, RunFailed, bad_input, report
from gradaccum.commands.common import load, workload_spec
from gradaccum.stream import BatchShape
from gradaccum.trackers import Trackers


def run(opts: argparse.Namespace) -> int:
    if sync.world_size() > 1:
        raise BadInput("compare runs in one process: start it without torchrun")
    try:
        BatchShape(opts.effective_batch, opts.micro_batch)
    except ValueError as e:
        raise bad_input(e) from None
    try:
        out = outdir.check_report_dir(opts.out, (compare.COMPARE_JSON, compare.COMPARE_PNG))
    except outdir.OutDirError as e:
        raise BadInput(str(e)) from None
    work, _ = load(workload_spec(opts, seed=opts.seed, large=False))
    record = report.run_record(opts, micro_batch=opts.micro_batch,
                               accum_steps=opts.effective_batch // opts.micro_batch)
    try:
        out.mkdir(parents=True, exist_ok=True)
        runlog.write_json(out / outdir.CONFIG, record)
    except OSError as e:
        raise RunFailed(str(runlog.write_error(out / outdir.CONFIG, e, "writing the run's config"))) from None
    trackers = report.trackers(opts, out, record)
    try:
        return _run(opts, work, out, trackers)
    finally:
        if trackers is not None:
            trackers.close(sys.exc_info()[1] is None)


def _run(opts: argparse.Namespace, work: Any, out: Path, trackers: Trackers | None) -> int:
    fits, note = compare.full_batch_fits(work.model, work.dataset, work.loss_fn, work.collate_fn,
                                         opts.effective_batch, opts.memory_budget)
    print(f"gradaccum compare: full batch of {opts.effective_batch}: {note}", flush=True)
    result = compare.run(
        work.model, work.dataset, work.loss_fn, work.collate_fn, opts.effective_batch, opts.micro_batch,
        opts.steps, opts.lr, opts.seed, full_fits=fits, full_note=note,
        progress=lambda name: print(f"gradaccum compare: training '{name}' ...", file=sys.stderr, flush=True),
        encode=work.encode, window_loss=work.window_loss,
    )
    try:
        compare.write(result, out)
    except OSError as e:
        raise RunFailed(str(runlog.write_error(out, e, "writing compare.json / compare.png"))) from None
    if trackers is not None:
        history = runlog.MetricsHistory()
        for row in compare.tracker_rows(result):
            history.append(row)
        trackers.send(history)
        trackers.finish(compare.tracker_summary(result), out / compare.COMPARE_PNG)
    if opts.json:
        print(json.dumps(result))
    else:
        print(compare.table(result))
        print(f"gradaccum compare: {out / compare.COMPARE_PNG}, {out / compare.COMPARE_JSON}")
    return 0
