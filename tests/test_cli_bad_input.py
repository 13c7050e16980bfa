"""Every bad input: exit 2, one line on stderr, no traceback, nothing on disk changed.

Each case runs ``python -m gradaccum`` in a subprocess inside a scratch directory that
holds a finished run (``run/``, copied from one trained once per module) and a few
files; the whole scratch tree is hashed before and after.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from gradaccum.cli import main

TINY = ["--steps", "3", "--effective-batch", "16", "--micro-batch", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)
LINES = "hello world\nthe quick brown fox\nsphinx of black quartz\njudge my vow\n" * 8


def tree_digest(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its kind and, for regular files, a content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = stat.filemode(st.st_mode)[0]
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 3-step run trained on a text file (so --data cases can resume it)."""
    root = tmp_path_factory.mktemp("finished")
    (root / "lines.txt").write_text(LINES)
    assert main(["train", *TINY, "--data", str(root / "lines.txt"), "--out", str(root / "run")]) == 0
    return root


def _edit_checkpoint(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / "run" / "checkpoint.pt"
        ck = torch.load(path, weights_only=True)
        edit(ck)
        torch.save(ck, path)

    return setup


def _set(*keys: str, value: object) -> Callable[[dict], None]:
    def edit(ck: dict) -> None:
        d = ck
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return edit


def _bad_exp_avg(ck: dict) -> None:
    state = ck["optimizer"]["state"]
    first = next(iter(state))
    state[first]["exp_avg"] = torch.zeros(3)


def _mkfile(name: str, data: bytes = b"keep me") -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_bytes(data)


def _mkfifo(tmp: Path) -> None:
    os.mkfifo(tmp / "fifo")


def _sparse(tmp: Path) -> None:
    with open(tmp / "huge.txt", "wb") as f:
        f.truncate(65 * 2**20)  # sparse: no disk used, larger than the 64 MiB limit


def _metrics_dir(tmp: Path) -> None:
    (tmp / "run" / "metrics.jsonl").unlink()
    (tmp / "run" / "metrics.jsonl").mkdir()


def _plot_dir(tmp: Path) -> None:
    (tmp / "run" / "loss.png").unlink()
    (tmp / "run" / "loss.png").mkdir()


def _same_alphabet_other_text(tmp: Path) -> None:
    # Same characters and the same longest line as lines.txt: only the fingerprint tells.
    words = LINES.splitlines()
    (tmp / "other.txt").write_text("\n".join(reversed(words)) + "\n")




@dataclass
class Case:
    id: str
    args: list[str]
    words: tuple[str, ...]
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    command: str = "train"


R = "{tmp}/run"
NEW = "{tmp}/new"
DATA = "{tmp}/lines.txt"
RESUME = [*TINY, "--data", DATA, "--resume", "--out", R]
CASES = [
    # sizes far beyond what a step, the data order or memory can serve
    Case("effective-batch-1e12", [*TINY[:2], "--effective-batch", str(10**12), "--out", NEW],
         ("--effective-batch", "at most")),
    Case("effective-batch-1e12-default-micro", ["--effective-batch", str(10**12), "--out", NEW],
         ("--effective-batch",)),
    Case("micro-batch-1e12", [*TINY[:4], "--micro-batch", str(10**12), "--out", NEW], ("--micro-batch",)),
    Case("seed-1e20", [*TINY, "--seed", str(10**20), "--out", NEW], ("--seed",)),
    Case("seed-2e13", [*TINY, "--seed", str(2 * 10**13), "--out", NEW], ("--seed",)),
    Case("seed-negative", [*TINY, "--seed", "-1", "--out", NEW], ("--seed",)),
    Case("steps-1e12", ["--steps", str(10**12), "--out", NEW], ("--steps",)),
    Case("lr-inf", [*TINY, "--lr", "1e999", "--out", NEW], ("--lr",)),
    Case("effective-batch-not-divisible", ["--effective-batch", "16", "--micro-batch", "5", "--out", R],
         ("--micro-batch",)),
    # --data
    Case("data-dev-zero", [*TINY, "--data", "/dev/zero", "--out", NEW], ("--data", "regular file")),
    Case("data-fifo", [*TINY, "--data", "{tmp}/fifo", "--out", NEW], ("--data",), _mkfifo),
    Case("data-too-large", [*TINY, "--data", "{tmp}/huge.txt", "--out", NEW], ("--data", "MiB"), _sparse),
    Case("data-empty-path", [*TINY, "--data", "", "--out", NEW], ("--data",)),
    Case("data-directory", [*TINY, "--data", "{tmp}", "--out", NEW], ("--data", "directory")),
    # --out
    Case("out-empty", [*TINY, "--out", ""], ("--out", "empty")),
    Case("out-under-a-file", [*TINY, "--out", "{tmp}/afile/run"], ("--out", "afile"), _mkfile("afile")),
    Case("out-is-a-file", [*TINY, "--out", "{tmp}/afile"], ("--out",), _mkfile("afile")),
    Case("out-dangling-symlink", [*TINY, "--out", "{tmp}/link"], ("--out", "symbolic link"),
         lambda tmp: (tmp / "link").symlink_to(tmp / "nowhere")),
    Case("out-name-too-long", [*TINY, "--out", "{tmp}/" + "x" * 300], ("--out",)),
    Case("out-holds-a-run", [*TINY, "--out", R], ("--out", "already holds a run", "--resume", "--overwrite")),
    Case("out-holds-a-run-other-flags", ["--steps", "5", "--out", R], ("--out", "already holds a run")),
    Case("resume-and-overwrite", [*TINY, "--resume", "--overwrite", "--out", R], ("--resume", "--overwrite")),
    Case("overwrite-plot-is-a-dir", [*TINY, "--data", DATA, "--overwrite", "--out", R], ("loss.png",),
         _plot_dir),
    # --resume with a changed run
    Case("resume-fewer-steps", ["--steps", "2", *TINY[2:], "--data", DATA, "--resume", "--out", R],
         ("--steps",)),
    Case("resume-other-lr", [*TINY, "--lr", "0.01", "--data", DATA, "--resume", "--out", R], ("--lr",)),
    Case("resume-other-seed", [*TINY, "--seed", "3", "--data", DATA, "--resume", "--out", R], ("--seed",)),
    Case("resume-other-data-same-alphabet", [*TINY, "--data", "{tmp}/other.txt", "--resume", "--out", R],
         ("--data",), _same_alphabet_other_text),
    Case("resume-no-checkpoint", [*TINY, "--resume", "--out", NEW], ("--resume", "checkpoint")),
    # --resume with malformed checkpoint fields or outputs
    Case("ck-version-newer", RESUME, ("checkpoint.pt", "version 99", "newer"),
         _edit_checkpoint(_set("version", value=99))),
    Case("ck-version-unknown", RESUME, ("checkpoint.pt", "version"),
         _edit_checkpoint(_set("version", value="2"))),
    Case("ck-step-string", RESUME, ("checkpoint.pt", "step"),
         _edit_checkpoint(_set("step", value="3"))),
    Case("ck-step-negative", RESUME, ("checkpoint.pt", "step"),
         _edit_checkpoint(_set("step", value=-2))),
    Case("ck-step-beyond-steps", RESUME, ("checkpoint.pt",),
         _edit_checkpoint(lambda ck: (_set("step", value=9)(ck), _set("run", value={})(ck)))),
    Case("ck-rng-broken", RESUME, ("checkpoint.pt", "RNG"),
         _edit_checkpoint(_set("rng", "torch", value=torch.zeros(7, dtype=torch.uint8)))),
    Case("ck-python-rng-broken", RESUME, ("checkpoint.pt", "RNG"),
         _edit_checkpoint(_set("rng", "python", value=[3, [1, 2], None]))),
    Case("ck-elapsed-string", RESUME, ("checkpoint.pt",),
         _edit_checkpoint(_set("elapsed_s", value="soon"))),
    Case("ck-optimizer-shape", RESUME, ("checkpoint.pt", "optimizer"),
         _edit_checkpoint(_bad_exp_avg)),
    Case("ck-accumulator-step", RESUME, ("checkpoint.pt", "accumulator"),
         _edit_checkpoint(_set("accumulator", "step", value="x"))),
    Case("ck-scheduler", RESUME, ("checkpoint.pt", "scheduler"),
         _edit_checkpoint(_set("scheduler", "last_epoch", value="x"))),
    Case("ck-metrics-history", RESUME, ("checkpoint.pt", "metrics"),
         _edit_checkpoint(_set("metrics", "length", value=2))),
    Case("ck-not-a-dict", RESUME, ("checkpoint.pt",),
         lambda tmp: torch.save([1, 2, 3], tmp / "run" / "checkpoint.pt")),
    Case("metrics-is-a-directory", RESUME, ("metrics.jsonl",),
         _metrics_dir),
    # bench and plan
    Case("bench-out-under-a-file", ["--effective-batch", "8", "--out", "{tmp}/afile/b"], ("--out",),
         _mkfile("afile"), command="bench"),
    Case("bench-repeats-1e9", ["--effective-batch", "8", "--repeats", str(10**9), "--out", "{tmp}/b"],
         ("--repeats",), command="bench"),
    Case("plan-effective-batch-1e12", ["--effective-batch", str(10**12)], ("--effective-batch",),
         command="plan"),
    # a half-set torchrun environment
    Case("env-no-master-addr", [*TINY, "--out", NEW], ("MASTER_ADDR",), env={"WORLD_SIZE": "2", "RANK": "0"}),
    Case("env-no-rank", [*TINY, "--out", NEW], ("RANK",), env={"WORLD_SIZE": "2"}),
    Case("env-world-size-text", [*TINY, "--out", NEW], ("WORLD_SIZE",), env={"WORLD_SIZE": "two"}),
    Case("env-rank-out-of-range", [*TINY, "--out", NEW], ("RANK",),
         env={"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}),
    Case("env-bad-port", [*TINY, "--out", NEW], ("MASTER_PORT",),
         env={"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"}),
]


def run_cli(command: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradaccum", command, *args], capture_output=True, text=True,
                          timeout=120, env={**ENV, **(env or {})}, stdin=subprocess.DEVNULL)


def run_in_process(argv: list[str], capfd: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess:
    """``main(argv)`` with its exit code and what it printed, as a subprocess would report them."""
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def assert_refused(r: subprocess.CompletedProcess, command: str, words: tuple[str, ...]) -> None:
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"gradaccum {command}: error: "), err
    for w in words:
        assert w in err, (w, err)


SUBPROCESS_SAMPLE = {
    "effective-batch-1e12-default-micro", "seed-1e20", "data-dev-zero", "out-under-a-file", "out-holds-a-run",
    "resume-other-data-same-alphabet", "ck-rng-broken", "metrics-is-a-directory", "bench-out-under-a-file",
    "env-no-master-addr",
}


def _prepared(tmp_path: Path, finished: Path, case: Case) -> tuple[Path, list[str]]:
    shutil.copytree(finished / "run", tmp_path / "run")
    shutil.copy(finished / "lines.txt", tmp_path / "lines.txt")
    if case.setup is not None:
        case.setup(tmp_path)
    return tmp_path, [a.replace("{tmp}", str(tmp_path)) for a in case.args]


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=() if c.id in SUBPROCESS_SAMPLE else pytest.mark.slow) for c in CASES],
    ids=[c.id for c in CASES],
)
def test_bad_input_subprocess(tmp_path, finished, case):
    """The real command line: exit status 2, one stderr line, no traceback, nothing changed.
    (A sample runs by default; ``pytest -m slow`` runs every case this way.)"""
    tmp, args = _prepared(tmp_path, finished, case)
    before = tree_digest(tmp)
    r = run_cli(case.command, args, case.env)
    assert_refused(r, case.command, case.words)
    assert tree_digest(tmp) == before


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_in_process(tmp_path, finished, case, capfd, monkeypatch):
    """Every case through ``main()`` (fast): the same promises as the subprocess test."""
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    tmp, args = _prepared(tmp_path, finished, case)
    before = tree_digest(tmp)
    assert_refused(run_in_process([case.command, *args], capfd), case.command, case.words)
    assert tree_digest(tmp) == before


def _can_mount() -> bool:
    return sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_out_on_a_read_only_file_system(tmp_path):
    if _can_mount():
        ctx: contextlib.AbstractContextManager[Path] = tmpfs(tmp_path / "ro", "ro,size=1m")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)  # as a non-root user a read-only directory fails the same way
        ctx = contextlib.nullcontext(tmp_path / "ro")
    with ctx as ro:
        r = run_cli("train", [*TINY, "--out", str(ro / "run")])
        assert_refused(r, "train", ("--out", "cannot write"))
        assert not (ro / "run").exists()


def test_out_in_an_immutable_directory(tmp_path):
    if not (_can_mount() and shutil.which("chattr")):
        pytest.skip("chattr +i needs root")
    d = tmp_path / "imm"
    d.mkdir()
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable flag")
    try:
        r = run_cli("train", [*TINY, "--out", str(d / "run")])
        assert_refused(r, "train", ("--out", "cannot write"))
        assert not (d / "run").exists()
    finally:
        subprocess.run(["chattr", "-i", str(d)], capture_output=True)
