"""--report-to (issue 23): what each tracker wrote, read back through the tool's own reader, offline
and with no server: TensorBoard's EventAccumulator, MLflow's client on a sqlite store in tmp, W&B's
offline run files (its Record protos), Trackio's local SQLite store. The same values as
metrics.jsonl, every step exactly once, also across a crash, a SIGTERM and two --resume; a missing
extra is one line and exit 2; a failing tracker is one line and training goes on."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradaccum import trackers
from gradaccum.cli import main
from gradaccum.runlog import MetricsHistory, read_metrics
from gradaccum.trackers import TensorBoard, Tracker, Trackers

TINY = ["train", "--steps", "8", "--effective-batch", "8", "--micro-batch", "4", "--checkpoint-every", "3",
        "--eval-every", "4"]
ALL = ["--report-to", "tensorboard,wandb,mlflow,trackio"]


@pytest.fixture(scope="module")
def trackio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trackio reads TRACKIO_DIR once, at import: one folder for this module's runs."""
    path = tmp_path_factory.mktemp("trackio")
    os.environ.setdefault("TRACKIO_DIR", str(path))
    return Path(os.environ["TRACKIO_DIR"])


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trackio_dir: Path) -> Path:
    """Every tool offline, writing under tmp_path only."""
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_PROJECT", "gradaccum-test")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "gradaccum-test")
    monkeypatch.setenv("TRACKIO_PROJECT_NAME", f"gradaccum-test-{tmp_path.name}")
    return tmp_path


# --------------------------------------------------------------------------- the tools' readers
def tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_metrics(out: Path) -> tuple[dict[str, list[tuple[int, float]]], Any]:
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("gradaccum-test")
    (run,) = client.search_runs([exp.experiment_id])
    keys = run.data.metrics
    return {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in keys}, run


def wandb_records(root: Path) -> list[Any]:
    """Every Record of every offline run file under ``root``, in order (W&B's own protobuf; the file is
    a LevelDB-style log: 7-byte header, 32 KiB blocks of checksummed, typed chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted(root.rglob("run-*.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:  # the rest of the block is padding
                pos += left
                continue
            buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # FULL or LAST
                record = pb.Record()
                record.ParseFromString(buf)
                records.append(record)
                buf = b""
    return records


def wandb_history(root: Path) -> tuple[dict[str, list[tuple[int, float]]], set[str]]:
    out: dict[str, list[tuple[int, float]]] = {}
    ids = set()
    for r in wandb_records(root):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            ids.add(r.run.run_id)
        if kind == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    out.setdefault(key, []).append((r.history.step.num, json.loads(item.value_json)))
    return out, ids


def trackio_metrics(project: str) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    from trackio.sqlite_storage import SQLiteStorage

    runs = SQLiteStorage.get_runs(project)
    out: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        for log in SQLiteStorage.get_logs(project, run):
            for key, value in log.items():
                if key not in ("step", "timestamp") and isinstance(value, (int, float)):
                    out.setdefault(key, []).append((log["step"], value))
    return out, runs


TIMING = ("elapsed_s", "tokens_per_s", "items_per_s", "examples_per_s")


def check_every_step_once(got: dict[str, list[tuple[int, float]]], rows: list[dict[str, Any]], tool: str,
                          rel: float = 1e-12, rerun: tuple[int, ...] = ()) -> None:
    """Each numeric key of each row, at its step, exactly once, with the row's value. Steps in
    ``rerun`` were sent live before a crash and computed again after --resume: the same
    numbers bitwise, but their timings are the first attempt's."""
    for key in rows[0]:
        want = [(r["step"], float(r[key])) for r in rows
                if isinstance(r[key], (int, float)) and key != "step"]
        if not want:
            continue
        have = sorted(got.get(key, []))
        assert [s for s, _ in have] == [s for s, _ in want], (tool, key)
        for (step, a), (_, b) in zip(have, want, strict=True):
            if key in TIMING and step in rerun:
                continue
            assert a == pytest.approx(b, rel=rel, abs=1e-30), (tool, key)


# --------------------------------------------------------------------------- the run
def test_every_tool_has_every_step_once_across_a_crash_a_sigterm_and_two_resumes(offline: Path) -> None:
    out = offline / "run"

    def crash(row: dict[str, Any]) -> None:
        if row["step"] == 5:  # steps 4, 5 were sent live; only step 3 has a checkpoint
            raise RuntimeError("injected crash")

    def sigterm(row: dict[str, Any]) -> None:
        if row["step"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # the run stops after step 7, checkpointed

    with pytest.raises(RuntimeError, match="injected crash"):
        main([*TINY, *ALL, "--out", str(out)], trainer_options={"on_step": crash})
    assert main([*TINY, *ALL, "--out", str(out), "--resume"], trainer_options={"on_step": sigterm}) == 143
    assert main([*TINY, *ALL, "--out", str(out), "--resume"]) == 0

    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(list(r) == list(rows[0]) for r in rows) and rows[0]["noise_scale"] is None  # one schema
    rerun = (4, 5)  # sent before the crash, computed again after it: never sent twice
    check_every_step_once(tensorboard_scalars(out), rows, "tensorboard", rel=1e-6, rerun=rerun)  # float32
    metrics, run = mlflow_metrics(out)
    check_every_step_once(metrics, rows, "mlflow", rerun=rerun)
    assert run.info.status == "FINISHED" and run.data.params["micro_batch"] == "4"
    assert "summary/final_loss" in metrics
    from mlflow import MlflowClient

    assert "loss.png" in [a.path for a in MlflowClient().list_artifacts(run.info.run_id)]
    history, ids = wandb_history(offline / "WANDB_DIR")
    check_every_step_once(history, rows, "wandb", rerun=rerun)
    assert len(ids) == 1  # three processes, one W&B run
    project = os.environ["TRACKIO_PROJECT_NAME"]
    logged, runs = trackio_metrics(project)
    check_every_step_once(logged, rows, "trackio", rerun=rerun)
    assert len(runs) == 1

    config = json.loads((out / "config.json").read_text())
    assert config["micro_batch"] == 4 and config["world_size"] == 1 and config["flags"]["steps"] == 8
    assert config["flags"]["report_to"] == ["tensorboard", "wandb", "mlflow", "trackio"]
    assert {"torch", "transformers", "gradaccum"} <= set(config["versions"])


def test_compare_reports_each_contender_per_step(offline: Path) -> None:
    out = offline / "cmp"
    assert main(["compare", "--steps", "3", "--effective-batch", "8", "--micro-batch", "4", "--out", str(out),
                 "--report-to", "tensorboard"]) == 0
    result = json.loads((out / "compare.json").read_text())
    scalars = tensorboard_scalars(out)
    for name in ("accumulated", "small"):
        got = scalars[f"{name}/loss"]
        assert [s for s, _ in got] == [1, 2, 3]
        assert [v for _, v in got] == pytest.approx(result["contenders"][name]["window_loss"], rel=1e-6)
    assert json.loads((out / "config.json").read_text())["command"] == "compare"


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_missing_extra_is_one_line_and_exit_2_before_anything(tmp_path: Path, command: str) -> None:
    out = tmp_path / "run"
    code = ("import sys; sys.modules['wandb'] = None; from gradaccum.cli import main; "
            f"sys.exit(main([{command!r}, '--report-to', 'tensorboard,wandb', '--out', {str(out)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f'gradaccum {command}: error: --report-to wandb: wandb is not installed; '
                                'pip install "gradaccum[wandb]"')
    assert not out.exists()


@pytest.mark.parametrize("value", ["wandbb", "none,wandb", ","])
def test_an_unknown_tracker_names_the_flag(tmp_path: Path, value: str, capsys: Any) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--report-to", value, "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--report-to" in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- failures
class Failing(Tracker):
    """Its log raises at the second call (a disk filling up)."""

    name = "failing"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def start(self, config: dict[str, Any], run_id: str | None, through: int) -> None:
        self.calls.append("start")

    def log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        self.calls.append("log")
        if self.calls.count("log") == 2:
            raise OSError(28, "No space left on device")

    def finish(self, summary: dict[str, float], plot: Path | None, step: int) -> None:
        self.calls.append("finish")

    def close(self, ok: bool) -> None:
        self.calls.append("close")


def test_a_failing_tracker_is_one_line_and_training_goes_on(offline: Path, capsys: Any) -> None:
    out = offline / "run"
    bad = Failing()
    hub = Trackers([bad, TensorBoard(out)], {"lr": 0.1})
    assert main([*TINY, "--out", str(out)], trainer_options={"trackers": hub}) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "tracker" in line]
    assert len(err) == 1 and "tracker failing: logging at step 2 failed" in err[0], err  # sent live
    assert "No space left on device" in err[0] and "metrics.jsonl keeps every step" in err[0]
    assert bad.calls == ["start", "log", "log", "close"]  # dropped: nothing more, not even the summary
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 8
    check_every_step_once(tensorboard_scalars(out), rows, "tensorboard", rel=1e-6)  # the other one goes on


def test_a_tracker_server_gone_is_one_line_and_training_goes_on(offline: Path, capsys: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    out = offline / "run"
    assert main([*TINY, "--steps", "4", "--report-to", "mlflow", "--out", str(out)]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "tracker" in line]
    assert len(err) == 1 and err[0].startswith("gradaccum: tracker mlflow: starting failed"), err
    assert len(read_metrics(out / "metrics.jsonl")) == 4


# --------------------------------------------------------------------------- the hub alone
class Recording(Tracker):
    name = "recording"

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []
        self.started: list[tuple[str | None, int]] = []

    def start(self, config: dict[str, Any], run_id: str | None, through: int) -> None:
        self.started.append((run_id, through))
        self.run_id = run_id or "run-1"

    def log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        self.steps += [s for s, _ in rows]

    def finish(self, summary: dict[str, float], plot: Path | None, step: int) -> None:
        pass

    def close(self, ok: bool) -> None:
        pass


def _history(n: int) -> MetricsHistory:
    h = MetricsHistory()
    for s in range(1, n + 1):
        h.append({"step": s, "loss": 1.0 / s, "skipped": False, "noise_scale": None})
    return h


def test_the_hub_sends_only_what_the_checkpoint_record_has_not(monkeypatch: pytest.MonkeyPatch) -> None:
    first = Recording()
    hub = Trackers([first], {"a": {"b": 1}})
    saved = hub.state(3)
    hub.send(_history(3))
    assert saved == {"recording": {"id": "run-1", "through": 3}} and first.steps == [1, 2, 3]
    # killed after the checkpoint of step 6, before its rows were sent: those are lost, never doubled
    saved = hub.state(6)
    again = Recording()
    hub = Trackers([again], {})
    assert hub.state(7, saved)["recording"] == {"id": "run-1", "through": 7}
    hub.send(_history(7))
    assert again.started == [("run-1", 6)] and again.steps == [7]
    # a tracker not asked for on this resume keeps its record; one not there before gets every step
    hub = Trackers([Recording()], {})
    assert hub.state(2, {"wandb": {"id": "x", "through": 1}, "bad": "junk"}) == {
        "wandb": {"id": "x", "through": 1}, "recording": {"id": "run-1", "through": 2}}
    monkeypatch.setenv("RANK", "1")  # under torchrun: rank 0 only
    other = Recording()
    Trackers([other], {}).send(_history(2))
    assert other.steps == [] and other.started == []


def test_names_and_numbers() -> None:
    assert trackers.parse_names("none") == []
    assert trackers.parse_names(" TensorBoard, wandb,tensorboard") == ["tensorboard", "wandb"]
    assert trackers.numbers({"step": 3, "loss": 2.0, "skipped": True, "noise_scale": None, "kind": "x",
                             "accuracy": {"add": 0.5}}) == {"loss": 2.0, "skipped": 1.0, "accuracy/add": 0.5}
    assert trackers.missing("tensorboard") is None
    assert trackers.missing("no_such_module_here") == ('no_such_module_here is not installed; '
                                                       'pip install "gradaccum[no_such_module_here]"')


@pytest.mark.slow  # ~30 s: a real SIGKILL between checkpoints, then --resume in a fresh process
def test_sigkill_then_resume_never_sends_a_step_twice(offline: Path) -> None:
    import time

    import torch

    out = offline / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "gradaccum", "train", "--steps", "40", "--effective-batch", "8",
            "--micro-batch", "4", "--checkpoint-every", "5", "--eval-every", "0",
            "--report-to", "tensorboard,mlflow", "--out", str(out)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and len(read_metrics(out / "metrics.jsonl")) >= 8):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=60)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 5 <= saved < 40
    r = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = read_metrics(out / "metrics.jsonl")
    assert [x["step"] for x in rows] == list(range(1, 41))
    metrics, _ = mlflow_metrics(out)
    for tool, got in (("tensorboard", tensorboard_scalars(out)), ("mlflow", metrics)):
        steps = [s for s, _ in got["loss"]]
        assert len(steps) == len(set(steps)), tool  # never twice
        # sent live: a kill between trackers.json's record and the send loses that one step
        # (never sends it twice); every other step is there
        assert len(set(range(1, 41)) - set(steps)) <= 1, tool
        kept = [{"step": x["step"], "loss": x["loss"]} for x in rows if x["step"] in steps]
        check_every_step_once(got, kept, tool, rel=1e-6)
