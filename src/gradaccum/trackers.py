"""Where a run is also watched: TensorBoard, Weights & Biases, MLflow, Trackio (``report_to``).

One small class per tool behind one interface (:class:`Tracker`); each imports its client
when it starts, so ``import gradaccum`` stays light, and each takes its usual settings from
the environment (``WANDB_PROJECT``, ``WANDB_MODE``, ``MLFLOW_TRACKING_URI``,
``MLFLOW_EXPERIMENT_NAME``, ``TRACKIO_PROJECT_NAME``, ...). :class:`Trackers` drives them:
every numeric key of every metrics row at its optimizer step, the run's config as
hyperparameters, at the end the summary's numbers and the plot.

Live and exactly once, across kills and ``--resume``: every step is sent as it ends, and just
before each send ``OUT/trackers.json`` records (atomically) each tracker's run id and the
step it is being sent up to; checkpoints keep the same record. A resumed run (bitwise the
same steps again) sends only steps past the later of the two records; a kill between the
record and the send loses that step in the tracker rather than sending it twice
(metrics.jsonl keeps every step). A tracker that raises is reported once on stderr and
dropped; training goes on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gradaccum.errors import one_line

NAMES = ("tensorboard", "wandb", "mlflow", "trackio")
TENSORBOARD_DIR = "tensorboard"  # OUT/tensorboard: the event files (outdir.TENSORBOARD_DIR)
LEDGER = "trackers.json"  # OUT/trackers.json: each tracker's run id and last step sent (outdir.TRACKERS)


def parse_names(text: str) -> list[str]:
    """``"tensorboard,wandb"`` -> the trackers asked for, in order, once each; ``"none"`` -> []."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in (*NAMES, "none")]
    if unknown or not names:
        what = f"unknown tracker {unknown[0][:40]!r}" if unknown else "no tracker named"
        raise ValueError(f"{what} (give none, or a comma list of {', '.join(NAMES)})")
    if "none" in names and len(set(names)) > 1:
        raise ValueError("none cannot be combined with a tracker")
    return list(dict.fromkeys(n for n in names if n != "none"))


def missing(name: str) -> str | None:
    """Why tracker ``name`` cannot run here (its client library is not installed), or None."""
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken install, or a module blocked in sys.modules
        found = False
    return None if found else f'{name} is not installed; pip install "gradaccum[{name}]"'


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level, keys joined by '/' (``{"versions": {"torch": ..}}``: ``versions/torch``)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}/"))
        else:
            out[name] = value
    return out


def numbers(d: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a row or summary (booleans as 0/1; null and text left out), keyed flat."""
    return {k: float(v) for k, v in flat(d).items()
            if isinstance(v, (int, float)) and k != "step"}


def plain(value: Any) -> Any:
    """A hyperparameter value every tool takes: numbers, text and booleans as they are, the rest as text."""
    return value if isinstance(value, (int, float, str, bool)) else json.dumps(value, default=str)


# --------------------------------------------------------------------------- the tools
class Tracker:
    """One tool. ``start`` imports its client and opens (or, given ``run_id``, continues) its run;
    ``log`` takes ``(step, metrics)`` pairs; ``finish`` the summary's numbers and the plot."""

    name = ""

    def __init__(self, out: Path | None = None) -> None:
        self.out = out
        self.run_id: str | None = None
        self.client: Any = None

    def run_name(self) -> str | None:
        return self.out.resolve().name if self.out is not None else None

    def start(self, config: dict[str, Any], run_id: str | None, through: int) -> None:
        raise NotImplementedError

    def log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        raise NotImplementedError

    def finish(self, summary: dict[str, float], plot: Path | None, step: int) -> None:
        raise NotImplementedError

    def close(self, ok: bool) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    name = "tensorboard"

    def start(self, config: dict[str, Any], run_id: str | None, through: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        if self.out is None:
            raise ValueError("tensorboard writes under the output directory: give out_dir")
        # purge_step: readers drop whatever an earlier process wrote past the checkpoint.
        purge = through + 1 if through else None
        self.client = SummaryWriter(str(self.out / TENSORBOARD_DIR), purge_step=purge)
        if not through:
            self.client.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)
            for part in hparams({k: plain(v) for k, v in config.items()}, {}):
                self.client.file_writer.add_summary(part)
        self.client.flush()

    def log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        for step, metrics in rows:
            for key, value in metrics.items():
                self.client.add_scalar(key, value, step)
        self.client.flush()

    def finish(self, summary: dict[str, float], plot: Path | None, step: int) -> None:
        for key, value in summary.items():
            self.client.add_scalar(f"summary/{key}", value, step)
        if plot is not None:
            import matplotlib.image

            self.client.add_image(plot.name, matplotlib.image.imread(plot)[..., :3], step, dataformats="HWC")
        self.client.flush()

    def close(self, ok: bool) -> None:
        self.client.close()


class WandB(Tracker):
    name = "wandb"

    def start(self, config: dict[str, Any], run_id: str | None, through: int) -> None:
        import wandb

        project = None if os.environ.get("WANDB_PROJECT") else "gradaccum"
        name = None if os.environ.get("WANDB_NAME") else self.run_name()
        if run_id is None:
            self.client = wandb.init(project=project, name=name, config=config)
        else:  # the same W&B run; flags such as --resume or a longer --steps may differ now
            self.client = wandb.init(project=project, id=run_id, resume="allow")
            self.client.config.update(config, allow_val_change=True)
        self.run_id = self.client.id

    def log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        for step, metrics in rows:
            self.client.log(metrics, step=step)

    def finish(self, summary: dict[str, float], plot: Path | None, step: int) -> None:
        self.client.summary.update(summary)
        if plot is not None:
            self.client.save(str(plot), base_path=str(plot.parent), policy="now")

    def close(self, ok: bool) -> None:
        self.client.finish(exit_code=0 if ok else 1)


class MLflow(Tracker):
    """Through MlflowClient (no global active run): the experiment from MLFLOW_EXPERIMENT_ID or
    MLFLOW_EXPERIMENT_NAME (created if new), else MLflow's default one."""

    name = "mlflow"
    BATCH = 1000  # MLflow's limit of metrics per log_batch

    def start(self, config: dict[str, Any], run_id: str | None, through: int) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient()
        if run_id is None:
            run = self.client.create_run(self._experiment(), run_name=self.run_name())
            self.run_id, have = run.info.run_id, {}
        else:
            self.run_id = run_id
            have = self.client.get_run(run_id).data.params
            self.client.update_run(run_id, status="RUNNING")
        # A run's parameters cannot change in MLflow: those it already has stay as first logged.
        params = [Param(k, str(plain(v))[:6000]) for k, v in config.items() if k not in have]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _experiment(self) -> str:
        given, name = os.environ.get("MLFLOW_EXPERIMENT_ID"), os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if given or not name:
            return given or "0"
        exp = self.client.get_experiment_by_name(name)
        return exp.experiment_id if exp is not None else self.client.create_experiment(name)

    def _metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for step, m in rows for k, v in m.items()]
        for i in range(0, len(metrics), self.BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + self.BATCH])

    def log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        self._metrics(rows)

    def finish(self, summary: dict[str, float], plot: Path | None, step: int) -> None:
        self._metrics([(step, {f"summary/{k}": v for k, v in summary.items()})])
        if plot is not None:
            self.client.log_artifact(self.run_id, str(plot))

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "KILLED")


class Trackio(Tracker):
    """The project from TRACKIO_PROJECT_NAME (default "gradaccum"); a run is continued by its name."""

    name = "trackio"

    def start(self, config: dict[str, Any], run_id: str | None, through: int) -> None:
        import trackio

        project = os.environ.get("TRACKIO_PROJECT_NAME") or "gradaccum"
        self.client = trackio.init(project=project, name=run_id, config=config, embed=False,
                                   resume="allow" if run_id else "never")
        self.run_id = self.client.name

    def log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        for step, metrics in rows:
            self.client.log(metrics, step=step)

    def finish(self, summary: dict[str, float], plot: Path | None, step: int) -> None:
        import trackio

        media = {plot.name: trackio.Image(str(plot))} if plot is not None else {}
        self.client.log({**{f"summary/{k}": v for k, v in summary.items()}, **media}, step=step)

    def close(self, ok: bool) -> None:
        self.client.finish()


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow,
                                      "trackio": Trackio}


# --------------------------------------------------------------------------- the hub
def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Trackers:
    """The trackers of one run (rank 0): started at the first :meth:`state` or :meth:`send`,
    each sent the rows it has not had yet, dropped (one line on stderr) when it raises."""

    def __init__(self, trackers: Sequence[Tracker], config: dict[str, Any],
                 say: Callable[[str], None] | None = None, ledger: Path | None = None) -> None:
        # Rank 0 only under torchrun (its RANK): the others' rows are the same run's.
        self.live = list(trackers) if os.environ.get("RANK", "0") == "0" else []
        self.config = {k: v for k, v in flat(config).items() if v is not None}
        self.say = say or _stderr
        self.records: dict[str, dict[str, Any]] = {}
        """By tracker name: its run id and the steps it was sent, as the checkpoint keeps them."""
        self.through = {t.name: 0 for t in self.live}
        self.sent: set[str] = set()
        self.started = False
        self.ledger = ledger
        """OUT/trackers.json: what each tracker was (about to be) sent, written before each send."""

    @classmethod
    def named(cls, names: Sequence[str], out: Path | None, config: dict[str, Any]) -> Trackers:
        ledger = out / LEDGER if out is not None else None
        return cls([TRACKERS[n](out) for n in names], config, ledger=ledger)

    def restore(self, state: Any) -> None:
        """A resumed run: the checkpoint's record (:meth:`state`), and the ledger's where it got
        further (steps sent after that checkpoint, before a kill). A malformed entry counts as
        none (a fresh run of that tracker, sent every step)."""
        if not isinstance(state, dict) or self.started:
            return
        for source in (state, self._read_ledger()):
            for name, rec in source.items():
                if isinstance(rec, dict) and isinstance(rec.get("id"), (str, type(None))) \
                        and isinstance(rec.get("through"), int) and rec["through"] >= 0:
                    old = self.records.get(name, {"id": None, "through": -1})
                    if rec["through"] > old["through"]:
                        self.records[name] = {"id": rec["id"] or old["id"], "through": rec["through"]}

    def _read_ledger(self) -> dict[str, Any]:
        try:
            data = json.loads(self.ledger.read_text()) if self.ledger is not None else {}
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_ledger(self) -> None:
        if self.ledger is None:
            return
        from gradaccum.checkpoint import atomic_write_bytes  # here: the command line imports this module

        live = {t.name: {"id": t.run_id, "through": self.through[t.name]} for t in self.live}
        text = json.dumps({**self.records, **live}).encode()
        atomic_write_bytes(self.ledger, lambda f: f.write(text))

    def state(self, step: int, saved: Any = None) -> dict[str, Any]:
        """For the checkpoint of ``step``: each live tracker's run id, and that it is sent steps up
        to ``step`` (right after the checkpoint is written). Trackers not asked for now keep theirs.
        ``saved``: the record of the checkpoint this run resumed from, read at the first call."""
        if not self.started:
            self.restore(saved)
        self._start()
        live = {t.name: {"id": t.run_id, "through": max(step, self.through[t.name])} for t in self.live}
        return {**self.records, **live}

    def send(self, history: Any) -> None:
        """Each live tracker gets the rows of ``history`` (a :class:`~gradaccum.runlog.MetricsHistory`)
        past the steps it already has."""
        self._start()
        todo = {}
        for t in self.live:
            first = self.through[t.name]
            rows = [(r["step"], numbers(r)) for r in history.rows(first) if r["step"] > first]
            if rows:
                todo[t.name] = (first, rows)
                self.through[t.name] = rows[-1][0]  # before the call: one that fails midway is not resent
        if not todo:
            return
        try:
            self._write_ledger()  # before the sends: a kill now loses these steps, never doubles them
        except OSError as e:
            for t in self.live:
                self.through[t.name] = todo.get(t.name, (self.through[t.name],))[0]
            self.say(f"gradaccum: trackers: cannot record what they were sent ({one_line(e)}); will retry")
            return
        for t in [t for t in list(self.live) if t.name in todo]:
            rows = todo[t.name][1]
            if self._call(t, "logging", lambda t=t, rows=rows: t.log(rows), rows[0][0]):
                self.sent.add(t.name)

    def finish(self, summary: dict[str, Any], plot: Path | None) -> None:
        """The summary's numbers (and the plot, if written) to each tracker sent rows in this process."""
        values = {k: v for k, v in numbers(summary).items() if math.isfinite(v)}
        shown = plot if plot is not None and plot.is_file() else None
        for t in [t for t in self.live if t.name in self.sent]:
            step = self.through[t.name]
            self._call(t, "the summary", lambda t=t, step=step: t.finish(values, shown, step), step)

    def close(self, ok: bool) -> None:
        """End every tracker's run (finished, or killed when the run stopped or failed)."""
        for t in list(self.live) if self.started else []:
            self._call(t, "closing", lambda t=t: t.close(ok), None)
        self.live = []

    def _start(self) -> None:
        if self.started:
            return
        self.started = True
        for t in list(self.live):
            rec = self.records.get(t.name, {})
            self.through[t.name] = through = rec.get("through", 0)
            t.run_id = rec.get("id")
            self._call(t, "starting", lambda t=t, n=through: t.start(self.config, t.run_id, n), None)

    def _call(self, t: Tracker, what: str, fn: Callable[[], None], step: int | None) -> bool:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # the tools' chatter; stdout is the command's
                fn()
            return True
        except Exception as e:  # its server gone, its disk full: training goes on without it
            at = f" at step {step}" if step is not None else ""
            why = one_line(e, with_type=True)
            self.say(f"gradaccum: tracker {t.name}: {what}{at} failed ({why}); it gets nothing more from "
                     "this run (metrics.jsonl keeps every step)")
            self.live.remove(t)
            self.records[t.name] = {"id": t.run_id, "through": self.through[t.name]}
            if what != "closing":
                with contextlib.suppress(Exception):
                    t.close(False)
            return False
