"""torch.distributed: DDP, FSDP2, an unwrapped model, torchrun, dead and hung ranks.

Every scenario runs 2 CPU processes on loopback with gloo (free ports, hard
deadlines) through ``_dist_helpers``. The workers only record what happened; the
checks here compare it with a plain float64 full-batch reference built in this file
over ALL ranks' data (``conftest.reference_step``: concatenate, MEAN loss, one
backward, clip, one optimizer step).
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _dist_helpers as dh
import pytest
import torch
import torch.distributed as dist
from conftest import grad_capture, make_lm, params_of, reference_step, rel_err

from gradaccum import distributed

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

Phases = dh.Phases
DDP_PHASES, FSDP_PHASES, EVERY_PHASES = dh.DDP_PHASES, dh.FSDP_PHASES, dh.EVERY_PHASES
TIGHT = 1e-12  # float64 end to end: only summation order differs


def run_scenario(name: str, out: Path, timeout: float = 90.0) -> list[dict[str, Any]]:
    procs = dh.launch_ranks([str(dh.HERE / "_dist_helpers.py"), name, str(out)], timeout)
    assert all(p.rc == 0 for p in procs), dh.describe(procs)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(dh.WORLD)]


@pytest.fixture(scope="module")
def ddp_records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_scenario("ddp", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def fsdp_records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_scenario("fsdp", tmp_path_factory.mktemp("fsdp"))


def reference(phases: Phases) -> tuple[list[dict[str, float]], list[list[torch.Tensor]], list[torch.Tensor]]:
    """Plain full-batch float64 run over every rank's micro-batches of each window."""
    model = make_lm(torch.float64, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=dh.LR, momentum=dh.MOMENTUM)
    grads = grad_capture(opt)
    results = []
    for phase, windows in phases:
        for w, per_rank in enumerate(windows):
            mbs = [mb for r in range(dh.WORLD) for mb in dh.window_data(phase, w, r, per_rank[r])]
            results.append(reference_step(model, opt, mbs, max_grad_norm=dh.MAX_NORM))
    return results, grads, params_of(model)


def check_against_reference(records: list[dict[str, Any]], variant: str, phases: Phases) -> None:
    ref_results, ref_grads, ref_params = reference(phases)
    for r, rec in enumerate(records):
        got = rec[variant]
        assert len(got["log"]) == len(ref_results) == len(got["grads"])
        for w, (entry, want) in enumerate(zip(got["log"], ref_results, strict=True)):
            res = entry["result"]
            assert res is not None and not res["skipped"], (r, w)
            assert res["num_items"] == want["num_items"], (r, w)
            assert res["loss"] == pytest.approx(want["loss"], rel=TIGHT), (r, w)
            assert res["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-10), (r, w)
            assert res["step"] == w + 1
            assert rel_err(got["grads"][w], ref_grads[w]) < 1e-10, (r, w)
        for a, b in zip(got["params"], ref_params, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def window_lengths(phases: Phases, r: int) -> list[tuple[str, int]]:
    return [(phase, len(per_rank[r])) for phase, windows in phases for per_rank in windows]


# ----------------------------------------------------------------------------- DDP
def test_ddp_equals_full_batch_reference_over_all_ranks(ddp_records: list[dict[str, Any]]) -> None:
    """Different micro-batch sizes, token counts and counts per rank; partial windows
    (one where rank 1 has no micro-batch at all) through flush(); step() windows."""
    check_against_reference(ddp_records, "ddp", DDP_PHASES)


def test_unwrapped_model_under_distributed_equals_reference(ddp_records: list[dict[str, Any]]) -> None:
    """No DDP wrapper: gradaccum sums the gradients itself, once per window."""
    check_against_reference(ddp_records, "manual", DDP_PHASES)


def test_ddp_communicates_once_per_window(ddp_records: list[dict[str, Any]]) -> None:
    for r, rec in enumerate(ddp_records):
        plain = rec["plain_backward_comms"]
        assert plain >= 2  # tiny buckets: one sync is several bucket all-reduces
        for (phase, n), entry in zip(window_lengths(DDP_PHASES, r), rec["ddp"]["log"], strict=True):
            assert all(c == 0 for c in entry["during"]), "gradient traffic before the last micro-batch"
            if phase == "micro" and n < dh.ACCUM:
                # flush(): the last micro-batch could not know it was last, so DDP stayed
                # silent and gradaccum reduced the gradients in one flat all-reduce.
                assert entry["comms"] == 0
            else:
                assert entry["comms"] == plain, "exactly the buckets of one plain backward"


# ----------------------------------------------------------------------------- FSDP2
def test_fsdp2_equals_full_batch_reference(fsdp_records: list[dict[str, Any]]) -> None:
    """Deferred reduce-scatter, a partial window flushed from FSDP2's held-back
    gradients, a step() window; grad_norm/clipping use the global norm of DTensor grads."""
    check_against_reference(fsdp_records, "fsdp", FSDP_PHASES)


def test_fsdp2_reduce_scatters_only_on_the_last_micro_batch(fsdp_records: list[dict[str, Any]]) -> None:
    for r, rec in enumerate(fsdp_records):
        plain = rec["plain_backward_comms"]
        assert plain >= 2
        got = rec["fsdp"]
        # Before the last micro-batch the sharded .grad does not exist yet.
        assert got["grad_none"] and all(got["grad_none"])
        for (phase, n), entry in zip(window_lengths(FSDP_PHASES, r), got["log"], strict=True):
            assert all(c == 0 for c in entry["during"])
            assert entry["comms"] == (0 if phase == "micro" and n < dh.ACCUM else plain)


@pytest.mark.parametrize(
    ("records", "variant"), [("ddp_records", "ddp_every"), ("fsdp_records", "fsdp_every")]
)
def test_sync_every_micro_batch(request: pytest.FixtureRequest, records: str, variant: str) -> None:
    """The option that trades traffic for memory: the wrapper communicates after every
    micro-batch (FSDP2 keeps only sharded grads), with the same exact result."""
    recs = request.getfixturevalue(records)
    check_against_reference(recs, variant, EVERY_PHASES)
    for r, rec in enumerate(recs):
        plain = rec["plain_backward_comms"]
        got = rec[variant]
        assert got["grad_none"] and not any(got["grad_none"])  # reduced grads exist all along
        for (_, n), entry in zip(window_lengths(EVERY_PHASES, r), got["log"], strict=True):
            assert entry["during"] == [plain * (i + 1) for i in range(len(entry["during"]))]
            assert entry["comms"] == plain * n


# ----------------------------------------------------------------------------- every parameter
def test_ddp_reduces_parameters_outside_the_model_and_unfrozen_later(tmp_path: Path) -> None:
    """A temperature the model does not own, and ``out`` unfrozen after DDP was built (DDP
    does not reduce either): both are summed over ranks and normalised like the rest."""
    from conftest import cat_batches

    records = run_scenario("ddp_params", tmp_path)
    lm = make_lm(torch.float64, seed=0)
    lm.out.requires_grad_(False)
    temperature = torch.nn.Parameter(torch.tensor(1.3, dtype=torch.float64))
    opt = torch.optim.SGD([*(p for p in lm.parameters() if p.requires_grad), temperature], lr=dh.PARAM_LR)
    for w, per_rank in enumerate(dh.PARAM_WINDOWS):
        if w == 1:
            lm.out.requires_grad_(True)
            opt.add_param_group({"params": list(lm.out.parameters())})
        micro = [mb for r in range(dh.WORLD) for mb in dh.window_data("params", w, r, per_rank[r])]
        batch = cat_batches(micro)
        opt.zero_grad(set_to_none=True)
        loss, n = dh.tempered_loss(lm, temperature, batch)
        (loss / n).backward()
        opt.step()
    want = [*params_of(lm), temperature.detach()]
    for rec in records:
        for a, b in zip(rec["params"], want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_ranks_that_disagree_on_a_window_boundary_fail_with_one_line(tmp_path: Path) -> None:
    """One rank completes a window (DDP's synchronising backward, or step()) while another
    flushes a partial one: a gradaccum error on every rank instead of a gloo abort."""
    records = run_scenario("mismatch", tmp_path)
    for rec in records:
        assert len(rec["messages"]) == 2
        for msg in rec["messages"]:
            assert msg is not None and "ranks disagree on the window boundary" in msg
            assert "\n" not in msg
        assert rec["after_step"] == 1  # the windows were dropped on both ranks; training goes on


def test_noise_scale_pools_every_ranks_micro_batches(tmp_path: Path) -> None:
    """measure_noise on 2 ranks (DDP and unwrapped): within 10% of the closed-form B_simple,
    and the same value on every rank (it rides in the window's one all-reduce)."""
    from test_accumulator_noise import least_squares

    truth = least_squares()[3]
    records = run_scenario("noise", tmp_path)
    for variant in ("ddp", "manual"):
        values = [rec[variant] for rec in records]
        assert values[0] is not None and values[0] == values[1]
        assert values[0] == pytest.approx(truth, rel=0.10)


# ----------------------------------------------------------------------------- failures
def test_hung_rank_fails_the_others_within_the_timeout(tmp_path: Path) -> None:
    timeout_s = 3
    procs = dh.launch_ranks(
        [str(dh.HERE / "_dist_helpers.py"), "hang", str(tmp_path)], 60,
        {distributed.TIMEOUT_ENV: str(timeout_s)}, stop_when_rank0_exits=True,
    )
    rank0 = procs[0]
    assert rank0.rc == 3, dh.describe(procs)
    waited = float(rank0.out.split("FAILED_AFTER ")[1].split()[0])
    assert timeout_s - 0.5 <= waited <= timeout_s + 5, rank0.out
    assert "did not answer in time" in rank0.out


def test_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.timeout_seconds() == 12.5
    assert distributed.timeout_seconds(7) == 7
    for bad in ("soon", "0", "-3", "nan"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(distributed.DistributedSetupError, match=distributed.TIMEOUT_ENV):
            distributed.timeout_seconds()


def test_failure_message_only_claims_peer_failures() -> None:
    # No process group: a RuntimeError mentioning a timeout is not a peer failure...
    assert distributed.failure_message(RuntimeError("read timed out")) is None
    assert distributed.failure_message(ValueError("x")) is None
    # ...but torch's own distributed errors always are.
    msg = distributed.failure_message(dist.DistNetworkError("[a.cc:1] Connection reset by peer. more"))
    assert msg is not None and "\n" not in msg and "Connection reset by peer" in msg and "a.cc" not in msg


# ----------------------------------------------------------------------------- CLI under torchrun
TRAIN_ARGS = ["train", "--steps", "3", "--effective-batch", "16", "--micro-batch", "4",
              "--checkpoint-every", "1", "--seed", "3"]


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(state)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same command in one process (in this one, to save a start-up)."""
    from gradaccum import cli

    out = tmp_path_factory.mktemp("single") / "run"
    with _rng_untouched():
        assert cli.main([*TRAIN_ARGS, "--out", str(out)]) == 0
    return out


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(got: Path, want: Path) -> None:
    g, w = metrics(got), metrics(want)
    assert [r["step"] for r in g] == [r["step"] for r in w] == [1, 2, 3]
    for a, b in zip(g, w, strict=True):
        assert a["world_size"] == 2 and b["world_size"] == 1
        assert a["num_items"] == b["num_items"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    ga = torch.load(got / "checkpoint.pt", weights_only=True)
    wa = torch.load(want / "checkpoint.pt", weights_only=True)
    assert ga["step"] == wa["step"] == 3
    assert ga["model"].keys() == wa["model"].keys()
    for k in wa["model"]:
        torch.testing.assert_close(ga["model"][k], wa["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert (got / "summary.json").is_file() and (got / "loss.png").is_file()


def test_the_rank_write_guard_catches_writes(tmp_path: Path) -> None:
    """The guard the CLI scenarios put on rank != 0 can fail: each way of writing is caught."""
    import subprocess
    import sys

    argv = [sys.executable, str(dh.HERE / "_dist_helpers.py"), "guard_selftest", str(tmp_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["CAUGHT", "open", "CAUGHT", "os.open", "CAUGHT", "tempfile", "READ", "0"]


def test_killed_rank_fails_the_other_then_resume_under_torchrun(
    tmp_path: Path, single_process_run: Path
) -> None:
    """Rank 1 dies (os._exit) at step 3: rank 0 must stop at once with one clear line and
    a non-zero exit, long before the timeout. Steps 1-2 are checkpointed by rank 0 alone
    (rank 1 fails if it tries to write). ``--resume`` under torchrun then finishes the run,
    and the whole run equals the single-process one."""
    out = tmp_path / "run"
    timeout_s = 60
    started = time.monotonic()
    procs = dh.launch_ranks(
        [str(dh.HERE / "_dist_helpers.py"), "cli", str(tmp_path), "--", *TRAIN_ARGS, "--out", str(out)],
        timeout=90, extra_env={distributed.TIMEOUT_ENV: str(timeout_s), "GA_TEST_FAULT": "die:3"},
    )
    assert procs[1].rc == 17, dh.describe(procs)
    assert procs[0].rc == 1, dh.describe(procs)
    assert time.monotonic() - started < timeout_s
    last = procs[0].err.strip().splitlines()[-1]
    assert last.startswith("gradaccum train: error: rank 0 of 2: lost contact with a peer"), procs[0].err
    assert "Traceback" not in procs[0].err
    assert [r["step"] for r in metrics(out)] == [1, 2]

    resumed = dh.run_torchrun(["-m", "gradaccum", *TRAIN_ARGS, "--out", str(out), "--resume"], timeout=120)
    assert resumed.rc == 0, dh.describe([resumed])
    assert_same_run(out, single_process_run)


@pytest.mark.slow
def test_torchrun_train_equals_single_process(tmp_path: Path, single_process_run: Path) -> None:
    out = tmp_path / "run"
    proc = dh.run_torchrun(["-m", "gradaccum", *TRAIN_ARGS, "--out", str(out)], timeout=180)
    assert proc.rc == 0, dh.describe([proc])
    assert proc.out.count("gradaccum: done") == 1  # rank 0 alone reports
    assert_same_run(out, single_process_run)


@pytest.mark.slow
def test_console_script_under_torchrun(tmp_path: Path) -> None:
    """``torchrun --no-python gradaccum train`` (the console script) works too."""
    exe = Path(sys.executable).with_name("gradaccum")
    if not exe.exists():
        pytest.skip("console script not installed next to this python")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(dh.free_port()), "--no-python", str(exe),
           *TRAIN_ARGS, "--steps", "1", "--out", str(tmp_path / "run")]  # the last --steps wins
    p = subprocess.run(cmd, env=dh.worker_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert metrics(tmp_path / "run")[0]["world_size"] == 2


def test_oom_on_one_rank_makes_all_ranks_replay_with_the_same_smaller_micro_batch(
    tmp_path: Path, single_process_run: Path
) -> None:
    """Rank 1 runs out of memory in the first micro-batch of step 1 (micro-batch 4): both
    ranks drop the window, agree on micro-batch 2 and replay it; the run still equals the
    single-process one (same effective batch, no example lost or counted twice)."""
    out = tmp_path / "run"
    procs = dh.launch_ranks(
        [str(dh.HERE / "_dist_helpers.py"), "cli", str(tmp_path), "--", *TRAIN_ARGS, "--out", str(out)],
        timeout=120, extra_env={distributed.TIMEOUT_ENV: "60", "GA_TEST_FAULT": "oom:1:2"},
    )
    assert [p.rc for p in procs] == [0, 0], dh.describe(procs)
    assert "replaying step 1 with micro-batch 2 x accum steps 4" in procs[0].err
    rows = metrics(out)
    assert {(r["micro_batch"], r["accum_steps"], r["world_size"]) for r in rows} == {(2, 4, 2)}
    want = metrics(single_process_run)
    assert [r["num_items"] for r in rows] == [r["num_items"] for r in want]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    # Micro-batch 2 instead of 4 changes float rounding, which Adam magnifies element-wise
    # on near-zero gradients: compare the weights as a whole.
    ga = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    wa = torch.load(single_process_run / "checkpoint.pt", weights_only=True)["model"]
    diff = sum(float((ga[k] - wa[k]).double().norm() ** 2) for k in wa) ** 0.5
    norm = sum(float(wa[k].double().norm() ** 2) for k in wa) ** 0.5
    assert diff / norm < 1e-5
