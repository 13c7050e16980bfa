"""What a run leaves in its output directory, and the guard around that directory.

- ``metrics.jsonl``: one JSON object per optimizer step, appended as the run goes. It
  is a log: the checkpoint carries the same rows (:class:`MetricsHistory`), so on
  ``--resume`` the file is rewritten from the checkpoint, whatever happened to it.
- ``summary.json`` and ``loss.png`` (drawn by :mod:`gradaccum.plots`): written at the end of a run.
- ``config.json``: the resolved run, written at its first step.
- The rows themselves: one per optimizer step (:class:`RowMaker`), every row with the keys of
  :data:`ROW_KEYS`, and the summary.

Which directory a run may write into is :mod:`gradaccum.outdir`'s business.

Nothing here needs torch; the trainer feeds it rows and calls it at the right moments.
"""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from gradaccum.errors import one_line
from gradaccum.plots import PANELS as PANELS
from gradaccum.plots import Panel as Panel
from gradaccum.plots import Series as Series
from gradaccum.plots import plot_losses as plot_losses

ROW_KEYS = (
    "step", "loss", "lr", "grad_norm", "num_items", "skipped", "micro_batch", "accum_steps", "world_size",
    "effective_batch", "examples_seen", "elapsed_s", "{items}_per_s", "examples_per_s",
    "noise_scale", "critical_batch", "noise_scale_low", "noise_scale_high", "critical_batch_low",
    "critical_batch_high",
    "eval_loss", "eval_recall_at_1",
)
"""The one schema of a metrics row, in order: every row has every key, null where there is no
value (yet). ``{items}`` is what ``num_items`` counts (e.g. ``tokens_per_s``). The ``_low`` /
``_high`` keys are the 90% interval (``StepResult.noise_scale_low/high``); a high of null with a
low set means no upper bound yet."""


def row_keys(items_name: str = "items") -> tuple[str, ...]:
    return tuple(k.format(items=items_name) for k in ROW_KEYS)


class OutputWriteError(RuntimeError):
    """Writing an output failed mid-run (disk full, I/O error): one line, exit 1."""


# --------------------------------------------------------------------------- metrics
class MetricsHistory:
    """Every metrics row of the run so far, kept column-wise (compact, exact).

    Its :meth:`state_dict` (plain lists of numbers, strings and None) goes into the
    checkpoint, so the checkpoint alone can rebuild metrics.jsonl.
    """

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {}
        self.absent: dict[str, list[int]] = {}
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def append(self, row: dict[str, Any]) -> None:
        n = self.length
        for key, value in row.items():
            if key not in self.columns:
                self.columns[key] = [None] * n
                self.absent[key] = list(range(n))
            self.columns[key].append(value)
        for key, col in self.columns.items():
            if len(col) == n:  # this row lacks the key
                col.append(None)
                self.absent[key].append(n)
        self.length = n + 1

    def row(self, i: int) -> dict[str, Any]:
        return {k: col[i] for k, col in self.columns.items() if not self._is_absent(k, i)}

    def _is_absent(self, key: str, i: int) -> bool:
        absent = self.absent.get(key)
        if not absent:
            return False
        import bisect

        j = bisect.bisect_left(absent, i)
        return j < len(absent) and absent[j] == i

    def rows(self, start: int = 0) -> list[dict[str, Any]]:
        """Rows ``start`` onwards (row i is step i + 1)."""
        return [self.row(i) for i in range(max(0, start), self.length)]

    def complete(self, keys: Sequence[str]) -> None:
        """Give every row every key of ``keys`` (None where it had none): rows of an older
        gradaccum, which left out keys without a value, take the one schema."""
        for key in keys:
            self.columns.setdefault(key, [None] * self.length)
            self.absent[key] = []

    def column(self, key: str) -> list[Any]:
        return list(self.columns.get(key, []))

    def truncate(self, n: int) -> None:
        n = max(0, min(n, self.length))
        for key in self.columns:
            del self.columns[key][n:]
            self.absent[key] = [i for i in self.absent[key] if i < n]
        self.length = n

    def state_dict(self) -> dict[str, Any]:
        return {"length": self.length, "columns": {k: list(v) for k, v in self.columns.items()},
                "absent": {k: list(v) for k, v in self.absent.items() if v}}

    @classmethod
    def from_state(cls, state: Any) -> MetricsHistory:
        """Rebuild from :meth:`state_dict`; ValueError if the structure is not one."""
        if not isinstance(state, dict):
            raise ValueError("metrics history is not a dict")
        length, columns, absent = state.get("length"), state.get("columns"), state.get("absent", {})
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError("metrics history length is not a non-negative integer")
        if not isinstance(columns, dict) or not isinstance(absent, dict):
            raise ValueError("metrics history columns are malformed")
        h = cls()
        for key, col in columns.items():
            if not isinstance(key, str) or not isinstance(col, list) or len(col) != length:
                raise ValueError(f"metrics history column {key!r} is malformed")
            if any(v is not None and not isinstance(v, (int, float, str, bool)) for v in col):
                raise ValueError(f"metrics history column {key!r} holds non-scalar values")
            idx = absent.get(key, [])
            if not isinstance(idx, list) or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < length for i in idx
            ):
                raise ValueError(f"metrics history column {key!r} is malformed")
            h.columns[key] = list(col)
            h.absent[key] = sorted(set(idx))
        h.length = length
        return h


def _dumps(row: dict[str, Any]) -> str:
    return json.dumps(row)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The usable rows of a metrics.jsonl, tolerating damage.

    Skips lines that are not UTF-8, not JSON, not an object, or whose ``step`` is not a
    positive integer (a torn last line after a kill is the common case). A missing file
    gives no rows; one that cannot be read at all raises OSError.
    """
    rows = []
    if not path.exists():
        return rows
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                continue
            if not isinstance(row, dict):
                continue
            step = row.get("step")
            if isinstance(step, bool) or not isinstance(step, int) or step < 1:
                continue
            rows.append(row)
    return rows


def write_metrics(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace metrics.jsonl atomically with exactly ``rows``."""
    from gradaccum.checkpoint import atomic_write_bytes

    text = "".join(_dumps(r) + "\n" for r in rows)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def legacy_rows_upto(path: Path, step: int) -> list[dict[str, Any]]:
    """For checkpoints without a metrics history: the file's valid rows 1..step, once each."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in read_metrics(path):
        if r["step"] <= step:
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


class MetricsLog:
    """Appends one JSON line per step to metrics.jsonl, flushed at once.

    The file is opened at the first row, after ``before_first()`` (``--overwrite`` removes the
    old run's outputs there: only once the new run has taken its first step).
    """

    def __init__(self, path: Path, before_first: Callable[[], None] | None = None,
                 config: tuple[Path, dict[str, Any] | None] | None = None) -> None:
        self.path = path
        self.before_first = before_first
        self.config = config
        """(config.json's path, the resolved run): written at the first row, after ``before_first``."""
        self.file: TextIO | None = None

    def write(self, row: dict[str, Any]) -> None:
        if self.file is None:
            if self.before_first is not None:
                self.before_first()
                self.before_first = None
            if self.config is not None and self.config[1] is not None:
                write_json(*self.config)
            self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self.file.write(_dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None


# --------------------------------------------------------------------------- rows
@dataclass
class RowMaker:
    """Builds one metrics row per optimizer step, with the run's throughput and critical batch.

    Rates count this process's run only (a resumed run starts them afresh); the critical
    batch converts the noise scale (items) to examples at the mean items per example of
    every applied step so far, the resumed ones included.
    """

    items_name: str = "items"
    """What ``num_items`` counts: names the ``<items>_per_s`` column."""
    items_run: float = 0.0
    examples_run: int = 0
    items_applied: float = 0.0
    examples_applied: float = 0.0

    def keys(self) -> tuple[str, ...]:
        """This run's row schema (:data:`ROW_KEYS`)."""
        return row_keys(self.items_name)

    def resume_from(self, rows: Sequence[dict[str, Any]]) -> None:
        applied = [r for r in rows if not r.get("skipped")]
        self.items_applied = sum(float(r.get("num_items", 0)) for r in applied)
        self.examples_applied = sum(float(r.get("effective_batch", 0)) for r in applied)

    def critical_batch(self, noise_scale: float | None) -> float | None:
        """Items to examples; None for none, and for an unbounded (inf) end of an interval."""
        if noise_scale is None or self.examples_applied <= 0 or self.items_applied <= 0:
            return None
        if noise_scale == float("inf"):
            return None
        return noise_scale * self.examples_applied / self.items_applied

    def row(self, result: Any, step: int, shape: Any, position: int, elapsed: float, run_time: float
            ) -> dict[str, Any]:
        """The row of optimizer step ``step + 1`` (``result``: its StepResult; ``shape``: its BatchShape)."""
        self.items_run += result.num_items
        self.examples_run += shape.effective_batch
        if not result.skipped:
            self.items_applied += result.num_items
            self.examples_applied += shape.effective_batch
        per_s = max(run_time, 1e-9)
        values = {
            "step": step + 1, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
            "num_items": result.num_items, "skipped": result.skipped, "micro_batch": shape.micro_batch,
            "accum_steps": shape.accum_steps, "world_size": shape.world_size,
            "effective_batch": shape.effective_batch, "examples_seen": position,
            "elapsed_s": round(elapsed, 4),
            f"{self.items_name}_per_s": round(self.items_run / per_s, 2),
            "examples_per_s": round(self.examples_run / per_s, 2),
            "noise_scale": result.noise_scale, "critical_batch": self.critical_batch(result.noise_scale),
        }
        for end in ("low", "high"):  # the 90% interval, where the StepResult has one
            bound = getattr(result, f"noise_scale_{end}", None)
            values[f"noise_scale_{end}"] = None if bound == float("inf") else bound
            values[f"critical_batch_{end}"] = self.critical_batch(bound)
        return {key: values.get(key) for key in self.keys()}


def summarize(rows: Sequence[dict[str, Any]], steps: int, shape: Any, examples_seen: int,
              auto_batch: bool, extended_from: int | None = None) -> dict[str, Any]:
    """summary.json's numbers from the run's rows (the caller adds its own keys)."""
    losses = [r["loss"] for r in rows if not r.get("skipped")]
    evals = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    measured = [r for r in rows if r.get("critical_batch") is not None]
    critical = [r["critical_batch"] for r in measured]
    return {
        "steps": steps,
        "effective_batch": shape.effective_batch,
        "micro_batch": shape.micro_batch,
        "accum_steps": shape.accum_steps,
        "world_size": shape.world_size,
        "examples_seen": examples_seen,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "loss_ratio": losses[-1] / losses[0] if losses and losses[0] else None,
        "skipped_steps": sum(1 for r in rows if r.get("skipped")),
        "elapsed_s": rows[-1]["elapsed_s"] if rows else None,
        "final_eval_loss": evals[-1] if evals else None,
        "critical_batch": critical[-1] if critical else None,
        # its 90% interval (high None: unbounded, or unknown while low is None too)
        "critical_batch_low": measured[-1].get("critical_batch_low") if measured else None,
        "critical_batch_high": measured[-1].get("critical_batch_high") if measured else None,
        "critical_batch_measured_steps": len(critical),
        "noise_scale": next((r["noise_scale"] for r in reversed(rows) if r.get("noise_scale")), None),
        "effective_batch_auto": auto_batch,
        **({"extended_from_steps": extended_from} if extended_from is not None else {}),
    }


# --------------------------------------------------------------------------- summary
def write_json(path: Path, obj: dict[str, Any]) -> None:
    """summary.json, config.json: indented JSON, replaced atomically."""
    from gradaccum.checkpoint import atomic_write_bytes

    text = json.dumps(obj, indent=2, default=str) + "\n"
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


write_summary = write_json


# --------------------------------------------------------------------------- helpers
def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def write_error(path: Path, e: OSError, what: str) -> OutputWriteError:
    """One line for an OSError while writing ``path``."""
    why = "the disk is full (no space left on device)" if is_disk_full(e) else f"write failed ({one_line(e)})"
    return OutputWriteError(f"{path}: {why} while {what}")


def run_write_error(path: Path, e: OSError, last_saved: int | None, what: str) -> OutputWriteError:
    """:func:`write_error` during a run: names the last good checkpoint's step (None: none yet)."""
    last = f"the last good checkpoint is step {last_saved}" if last_saved is not None else \
        "no checkpoint was saved yet"
    return OutputWriteError(f"{write_error(path, e, what)}; {last}")
