"""Multi-process helpers for test_distributed.py: a launcher and the per-rank workers.

The parent (pytest) starts ranks as subprocesses with the variables torchrun would set
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT ...) and a hard deadline; each worker
runs a scenario and saves what it saw with ``torch.save``. All numerical checks happen
in the parent against a plain float64 full-batch reference, so the workers only
*record* (gradients handed to the optimizer, StepResults, communication counts).

Run as a script: ``python tests/_dist_helpers.py SCENARIO OUT_DIR [-- CLI ARGS]``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
WORLD = 2

# Micro-batch sizes per window and rank: ranks differ in micro-batch sizes, token
# counts (random lengths) and, where the scenario allows, in micro-batch counts.
# Shape (a) uses accum_steps=3; a window of fewer is partial and closed by flush().
DDP_MICRO_WINDOWS = [
    [[3, 1, 2], [2, 4, 1]],
    [[1, 1, 5], [3, 2, 2]],
    [[2, 3], [4]],  # partial, ranks with different counts
    [[2], []],  # partial, rank 1 has nothing: it still joins and gets the same gradient
]
DDP_STEP_WINDOWS = [
    [[3, 1, 2], [2, 5]],  # step(): each rank's own window length
    [[1], [2, 2, 1, 3]],
]
# FSDP2 all-gathers parameters in every forward, so ranks must run the same number
# of micro-batches (sizes and token counts may still differ).
FSDP_MICRO_WINDOWS = [
    [[3, 1, 2], [2, 4, 1]],
    [[1, 2, 2], [3, 1, 2]],
    [[2, 3], [1, 4]],  # partial: FSDP2's deferred gradients reduced by flush()
]
FSDP_STEP_WINDOWS = [[[2, 3], [4, 1]]]
# sync_every_micro_batch: every micro-batch communicates, so counts must match too.
EVERY_WINDOWS = [
    [[3, 1, 2], [2, 4, 1]],
    [[2], [3]],  # partial
]
Phases = list[tuple[str, list[list[list[int]]]]]
DDP_PHASES: Phases = [("micro", DDP_MICRO_WINDOWS), ("step", DDP_STEP_WINDOWS)]
FSDP_PHASES: Phases = [("micro", FSDP_MICRO_WINDOWS), ("step", FSDP_STEP_WINDOWS)]
EVERY_PHASES: Phases = [("every", EVERY_WINDOWS)]
ACCUM = 3
LR = 0.3
MOMENTUM = 0.9
MAX_NORM = 1.0


def window_data(phase: str, w: int, r: int, sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """Deterministic micro-batches of window ``w`` on rank ``r`` (the parent rebuilds them)."""
    from conftest import random_micro_batches

    seed = 7919 * (1 + sum(map(ord, phase))) + 101 * w + r
    return random_micro_batches(torch.Generator().manual_seed(seed), sizes)


# ----------------------------------------------------------------------------- launcher
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    rc: int | None
    out: str
    err: str
    seconds: float


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def launch_ranks(
    argv: list[str], timeout: float, extra_env: dict[str, str] | None = None, world: int = WORLD,
    stop_when_rank0_exits: bool = False,
) -> list[Proc]:
    """Start ``world`` ranks of ``python argv`` as torchrun would, and reap them by ``timeout``.

    Ranks still running at the deadline (or, with ``stop_when_rank0_exits``, when rank 0
    has exited) are killed and reported with rc None.
    """
    port = str(free_port())
    procs, started = [], time.monotonic()
    for r in range(world):
        env = worker_env(extra_env)
        env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    if stop_when_rank0_exits:
        first = _reap(procs[:1], started, timeout)
        return first + _reap(procs[1:], time.monotonic(), 0.0)
    return _reap(procs, started, timeout)


def run_torchrun(args: list[str], timeout: float, world: int = WORLD) -> Proc:
    """``python -m torch.distributed.run --nproc-per-node world ... args`` on a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    started = time.monotonic()
    p = subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _reap([p], started, timeout)[0]


def _reap(procs: list[subprocess.Popen[str]], started: float, timeout: float) -> list[Proc]:
    done: list[Proc] = []
    for p in procs:
        left = max(0.1, timeout - (time.monotonic() - started))
        try:
            out, err = p.communicate(timeout=left)
            rc: int | None = p.returncode
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            rc = None
        done.append(Proc(rc, out, err, time.monotonic() - started))
    return done


def describe(procs: list[Proc]) -> str:
    return "\n".join(
        f"--- rank {i}: rc={p.rc} after {p.seconds:.1f}s\nstdout:\n{p.out[-3000:]}\nstderr:\n{p.err[-3000:]}"
        for i, p in enumerate(procs)
    )


# ----------------------------------------------------------------------------- workers
def _capture_grads(optimizer: torch.optim.Optimizer, into: list[list[torch.Tensor]]) -> None:
    """Record the (full, unsharded) gradients at every optimizer.step()."""

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        into.append([_full(p.grad) if p.grad is not None else None
                     for g in opt.param_groups for p in g["params"]])

    optimizer.register_step_pre_hook(hook)


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def _result(res: Any) -> dict[str, Any] | None:
    if res is None:
        return None
    return {"loss": res.loss, "num_items": res.num_items, "grad_norm": res.grad_norm,
            "skipped": res.skipped, "step": res.step}


def _run_windows(acc: Any, model: Any, phase: str, windows: list[list[list[int]]], counter: list[int],
                 shape: str, grad_none: list[bool]) -> list[dict[str, Any]]:
    """Feed each window to ``acc`` in shape (a) or (b); record results and comm counts."""
    import torch.distributed as dist
    from conftest import lm_loss_fn

    r = dist.get_rank()
    log = []
    for w, per_rank in enumerate(windows):
        mbs = window_data(phase, w, r, per_rank[r])
        before = counter[0]
        during: list[int] = []  # communication calls seen after each non-final micro-batch
        if shape == "micro":
            res = None
            for mb in mbs:
                with acc.micro_step():
                    loss, n = lm_loss_fn(model, mb)
                    res = acc.backward(loss, n)
                if res is None:
                    during.append(counter[0] - before)
                    grad_none.append(all(p.grad is None for p in model.parameters()))
            if res is None:
                res = acc.flush()
        else:
            res = acc.step(mbs, lm_loss_fn)
        log.append({"result": _result(res), "comms": counter[0] - before, "during": during})
    return log


def _tiny_lm() -> torch.nn.Module:
    from conftest import make_lm

    return make_lm(torch.float64, seed=0)


def _run_variant(
    model: torch.nn.Module, phases: Phases, counter: list[int], every: bool = False
) -> dict[str, Any]:
    """Train ``model`` through ``phases`` with one Accumulator; what the parent checks.

    First a micro-batch is run and thrown away with ``discard()``: its held-back
    (unsynced) gradients must not leak into the first real window.
    """
    import torch.distributed as dist
    from conftest import lm_loss_fn

    import gradaccum as ga

    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    grads: list[list[torch.Tensor]] = []
    _capture_grads(opt, grads)
    acc = ga.Accumulator(model, opt, accum_steps=ACCUM, max_grad_norm=MAX_NORM, sync_every_micro_batch=every)
    if not every:  # with a sync per micro-batch a discarded one would be communicated already
        with acc.micro_step():
            acc.backward(*lm_loss_fn(model, window_data("junk", 0, dist.get_rank(), [4])[0]))
        acc.discard()
    log: list[dict[str, Any]] = []
    grad_none: list[bool] = []
    for phase, windows in phases:
        shape = "step" if phase == "step" else "micro"
        log += _run_windows(acc, model, phase, windows, counter, shape, grad_none)
    params = [_full(p) for p in model.parameters()]
    return {"log": log, "grads": grads, "params": params, "grad_none": grad_none}


def scenario_ddp(out: Path) -> None:
    """DDP (shapes a and b, and sync_every_micro_batch) and an unwrapped model."""
    import torch.distributed as dist
    from conftest import lm_loss_fn
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradaccum import distributed

    distributed.setup_from_env()
    r = dist.get_rank()
    counter = [0]

    # No annotations: DDP checks them at run time and would see strings here.
    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        counter[0] += 1
        return default_hooks.allreduce_hook(state, bucket)

    record: dict[str, Any] = {}

    def wrapped() -> DDP:
        # Tiny buckets: several all-reduces per synced backward, so "one sync" means
        # one full set of buckets, not merely one call.
        ddp = DDP(_tiny_lm(), bucket_cap_mb=0.0005)
        ddp.register_comm_hook(None, counting_hook)
        # DDP settles its buckets after the first backward: two plain backward passes
        # (no step, grads dropped), and the second one's count is the reference.
        for _ in range(2):
            start = counter[0]
            lm_loss_fn(ddp, window_data("probe", 0, r, [2])[0])[0].backward()
            record["plain_backward_comms"] = counter[0] - start
            ddp.zero_grad(set_to_none=True)
        return ddp

    record["ddp"] = _run_variant(wrapped(), DDP_PHASES, counter)
    record["manual"] = _run_variant(_tiny_lm(), DDP_PHASES, counter)
    record["ddp_every"] = _run_variant(wrapped(), EVERY_PHASES, counter, every=True)
    torch.save(record, out / f"rank{r}.pt")
    finish_together()


def count_reduce_scatter(counter: list[int]) -> None:
    """Count FSDP2's reduce-scatter calls into ``counter[0]`` (wraps torch.distributed's)."""
    import torch.distributed as dist

    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        orig = getattr(dist, name, None)
        if orig is not None:
            def counted(*a: Any, _orig: Any = orig, **k: Any) -> Any:
                counter[0] += 1
                return _orig(*a, **k)

            setattr(dist, name, counted)


def scenario_fsdp(out: Path) -> None:
    """FSDP2 on CPU/gloo: deferred sync (shapes a and b) and sync_every_micro_batch."""
    import torch.distributed as dist
    from conftest import lm_loss_fn
    from torch.distributed.fsdp import fully_shard

    from gradaccum import distributed

    # The tiny model's Linear outputs are views; FSDP2 warns about in-place use we never make.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    distributed.setup_from_env()
    r = dist.get_rank()
    counter = [0]
    count_reduce_scatter(counter)

    def sharded() -> torch.nn.Module:
        model = _tiny_lm()
        for sub in (model.emb, model.hidden, model.out):
            fully_shard(sub)
        return fully_shard(model)

    record: dict[str, Any] = {}
    start = counter[0]
    lm_loss_fn(sharded(), window_data("probe", 0, r, [2])[0])[0].backward()
    record["plain_backward_comms"] = counter[0] - start
    record["fsdp"] = _run_variant(sharded(), FSDP_PHASES, counter)
    record["fsdp_every"] = _run_variant(sharded(), EVERY_PHASES, counter, every=True)
    torch.save(record, out / f"rank{r}.pt")
    finish_together()


# Extra-parameter scenario: (window, per-rank micro-batch sizes); accum_steps 2, so the
# last window is partial on rank 0 and empty on rank 1. ``out`` is unfrozen before window 1.
PARAM_WINDOWS = [[[2, 3], [1, 2]], [[3, 1], [2, 2]], [[2], []]]
PARAM_ACCUM = 2
PARAM_LR = 0.2


def tempered_loss(model: Any, temperature: torch.Tensor, mb: dict[str, torch.Tensor]) -> Any:
    """Sum loss with logits divided by a temperature that the model does not own."""
    import torch.nn.functional as F
    from conftest import IGNORE

    logits = model(mb["ids"]) / temperature
    flat = logits.reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(flat, mb["labels"].reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, (mb["labels"] != IGNORE).sum()


def scenario_ddp_params(out: Path) -> None:
    """DDP with a parameter outside the model and one unfrozen after DDP was built."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import gradaccum as ga
    from gradaccum import distributed

    distributed.setup_from_env()
    r = dist.get_rank()
    lm = _tiny_lm()
    lm.out.requires_grad_(False)
    model = DDP(lm)  # DDP will not reduce ``out``: it was frozen when DDP was built
    temperature = torch.nn.Parameter(torch.tensor(1.3, dtype=torch.float64))
    opt = torch.optim.SGD([*(p for p in lm.parameters() if p.requires_grad), temperature], lr=PARAM_LR)
    acc = ga.Accumulator(model, opt, accum_steps=PARAM_ACCUM)
    for w, per_rank in enumerate(PARAM_WINDOWS):
        if w == 1:
            lm.out.requires_grad_(True)
            opt.add_param_group({"params": list(lm.out.parameters())})
        res = None
        for mb in window_data("params", w, r, per_rank[r]):
            with acc.micro_step():
                res = acc.backward(*tempered_loss(model, temperature, mb))
        if res is None:
            acc.flush()
    torch.save({"params": [_full(p) for p in lm.parameters()] + [temperature.detach().clone()]},
               out / f"rank{r}.pt")
    finish_together()


def scenario_mismatch(out: Path) -> None:
    """Rank 0 completes a window while rank 1 flushes a partial one: one error on both."""
    import torch.distributed as dist
    from conftest import lm_loss_fn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import gradaccum as ga
    from gradaccum import distributed

    distributed.setup_from_env()
    r = dist.get_rank()
    model = DDP(_tiny_lm())
    acc = ga.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=3)
    messages = []
    for case in ("micro_step", "step"):
        try:
            mbs = window_data(case, 0, r, [2, 1, 3] if r == 0 else [2, 2])
            if r == 0 and case == "step":
                acc.step(mbs, lm_loss_fn)
            else:
                for mb in mbs:
                    with acc.micro_step():
                        acc.backward(*lm_loss_fn(model, mb))
                acc.flush()
            messages.append(None)
        except ga.AccumulatorStateError as e:
            messages.append(str(e))
    # Both ranks dropped the window and can go on together.
    res = acc.step(window_data("after", 0, r, [2]), lm_loss_fn)
    torch.save({"messages": messages, "after_step": res.step}, out / f"rank{r}.pt")
    finish_together()


NOISE_SIZES = [[4, 4, 4], [2, 6, 3]]  # per rank: micro-batch sizes of every window
NOISE_WINDOWS = 500


def scenario_noise(out: Path) -> None:
    """measure_noise under DDP and with an unwrapped model: all ranks' micro-batches pooled."""
    import torch.distributed as dist
    from test_accumulator_noise import N_EXAMPLES, least_squares, squared_error
    from torch.nn.parallel import DistributedDataParallel as DDP

    import gradaccum as ga
    from gradaccum import distributed
    from gradaccum.noise import NoiseScale

    distributed.setup_from_env()
    r = dist.get_rank()
    record = {}
    for variant in ("ddp", "manual"):
        model, x, y, _ = least_squares()
        wrapped = DDP(model) if variant == "ddp" else model
        acc = ga.Accumulator(wrapped, torch.optim.SGD(model.parameters(), lr=0.0),
                             accum_steps=len(NOISE_SIZES[r]), measure_noise=NoiseScale(ema=1.0))
        res = None
        for w in range(NOISE_WINDOWS):
            g = torch.Generator().manual_seed(1000 * w + r)
            for b in NOISE_SIZES[r]:
                idx = torch.randint(0, N_EXAMPLES, (b,), generator=g)
                with acc.micro_step():
                    res = acc.backward(*squared_error(wrapped, (x[idx], y[idx])))
        record[variant] = res.noise_scale
    torch.save(record, out / f"rank{r}.pt")
    finish_together()


def finish_together() -> None:
    """Leave the process group together: under load a rank that tears down while its peer is
    still in a collective can abort the peer's gloo threads at exit (seen as rc -6)."""
    import torch.distributed as dist

    from gradaccum import distributed

    dist.barrier()
    distributed.teardown()


def scenario_hang(out: Path) -> None:
    """Rank 1 stops answering; rank 0's next collective must fail by the timeout."""
    import torch.distributed as dist

    from gradaccum import distributed

    distributed.setup_from_env()
    t = torch.ones(3)
    dist.all_reduce(t)  # both ranks alive
    if dist.get_rank() == 1:
        time.sleep(600)  # hung, sockets still open: only the timeout can tell
    started = time.monotonic()
    try:
        dist.all_reduce(t)
    except Exception as e:  # noqa: BLE001 - we report whatever the backend raised
        msg = distributed.failure_message(e)
        print(f"FAILED_AFTER {time.monotonic() - started:.2f}", flush=True)
        print(f"MESSAGE {msg}", flush=True)
        distributed.teardown()  # as the CLI does on its way out
        print("TORN_DOWN", flush=True)
        sys.exit(3)
    print("NO_ERROR", flush=True)


def refuse_writes_under(root: Path, who: str) -> None:
    """Fail (AssertionError in the caller) whenever this process opens a file under ``root`` for
    writing, by any route Python takes (open(), os.open, tempfile): an audit hook, which stays
    for the life of the process."""
    import os as os_

    root_text = os_.path.realpath(root)
    writing = os_.O_WRONLY | os_.O_RDWR | os_.O_CREAT | os_.O_APPEND | os_.O_TRUNC

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event != "open" or not isinstance(args[0], (str, bytes, os_.PathLike)):
            return
        path, mode, flags = args
        if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & writing):
            return
        full = os_.path.realpath(os_.fsdecode(path))
        if full == root_text or full.startswith(root_text + os_.sep):
            raise AssertionError(f"{who} tried to write an output file {full}")

    sys.addaudithook(hook)


def scenario_guard_selftest(out: Path) -> None:
    """The write guard itself: a write under ``out`` by each route must be caught."""
    import tempfile

    refuse_writes_under(out, "selftest")
    routes = {"open": lambda: open(out / "a.txt", "w"),  # noqa: SIM115
              "os.open": lambda: os.open(out / "b.txt", os.O_WRONLY | os.O_CREAT),
              "tempfile": lambda: tempfile.mkstemp(dir=out)}
    for name, write in routes.items():
        try:
            write()
        except AssertionError:
            print(f"CAUGHT {name}", flush=True)
    print(f"READ {len(os.listdir(out))}", flush=True)  # reading stays allowed


def scenario_cli(out: Path, argv: list[str]) -> None:
    """``gradaccum`` CLI with faults injected through public seams (``GA_TEST_FAULT``), and a
    guard that fails rank != 0 if it tries to write an output file.

    - ``die:STEP``: rank 1 dies (like SIGKILL) right after step STEP - 1 (its ``on_step``);
    - ``oom:STEP:SIZE``: every rank takes part in the OOM agreement (``oom_agreement``, which
      the trainer skips on CPU), and rank 1's loss function runs out of memory on step STEP
      while the micro-batch is larger than SIZE.
    """
    from gradaccum import cli

    rank = int(os.environ.get("RANK", "0"))
    fault = os.environ.get("GA_TEST_FAULT", "")
    options: dict[str, Any] = {}
    if rank != 0:
        refuse_writes_under(Path(argv[argv.index("--out") + 1]), f"rank {rank}")
        if fault.startswith("die:"):
            at = int(fault.split(":")[1])

            def dying(row: dict[str, Any]) -> None:
                if row["step"] + 1 == at:
                    os._exit(17)  # like SIGKILL: no clean-up, the sockets just close

            options["on_step"] = dying
    if fault.startswith("oom:"):
        _, at_text, size = fault.split(":")
        options["oom_agreement"] = True
        if rank == 1:
            from gradaccum import demo

            real_loss, calls = demo.loss_fn, {"step": 1}
            options["on_step"] = lambda row: calls.update(step=row["step"] + 1)

            def oom_loss(model: Any, batch: Any) -> Any:
                if calls["step"] == int(at_text) and batch["input_ids"].shape[0] > int(size):
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
                return real_loss(model, batch)

            demo.loss_fn = oom_loss  # type: ignore[assignment]
    sys.exit(cli.main(argv, trainer_options=options))


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rest = sys.argv[4:] if len(sys.argv) > 3 and sys.argv[3] == "--" else []
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if scenario == "cli":
        scenario_cli(out, rest)
    else:
        scenarios = {"ddp": scenario_ddp, "fsdp": scenario_fsdp, "hang": scenario_hang,
                     "guard_selftest": scenario_guard_selftest,
                     "ddp_params": scenario_ddp_params, "mismatch": scenario_mismatch,
                     "noise": scenario_noise}
        scenarios[scenario](out)


if __name__ == "__main__":
    main()
