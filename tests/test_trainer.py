"""Trainer: data order, micro-batch invariance, resume and outputs (in-process, tiny)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import gradaccum as ga
from gradaccum import demo
from gradaccum.checkpoint import CheckpointError
from gradaccum.outdir import OutDirError
from gradaccum.runlog import plot_losses
from gradaccum.trainer import Stopped, Trainer


def _trainer(tmp_path=None, micro=4, steps=6, effective=16, seed=0, **kw):
    examples = demo.make_examples(200, seed=seed)
    model = demo.build_model(demo.TASK_TOKENIZER.vocab_size, demo.TASK_MAX_LEN, seed=seed, n_embd=32)
    return Trainer(
        model=model,
        dataset=examples,
        loss_fn=demo.loss_fn,
        collate_fn=demo.collate,
        effective_batch=effective,
        micro_batch=micro,
        steps=steps,
        lr=3e-3,
        seed=seed,
        out_dir=tmp_path,
        progress=False,
        **kw,
    )


def test_trainer_is_public():
    assert ga.Trainer is Trainer


def test_data_order_depends_only_on_seed_and_step():
    a, b = _trainer(micro=4), _trainer(micro=8)
    for step in (0, 3, 12, 13):  # 200 examples / 16 per step: step 12 spans two epochs
        assert a.step_indices(step) == b.step_indices(step)
        assert len(a.step_indices(step)) == 16
    # Each epoch is a permutation: the first 12 steps see 192 distinct examples.
    seen = [i for s in range(12) for i in a.step_indices(s)]
    assert len(set(seen)) == 192
    # ... and the next epoch is reshuffled, not repeated.
    from gradaccum.trainer import stream_indices

    e0, e1 = stream_indices(200, 0, 0, 200), stream_indices(200, 0, 200, 200)
    assert sorted(e0) == sorted(e1) == list(range(200)) and e0 != e1
    assert _trainer(seed=1).step_indices(0) != a.step_indices(0)


def test_micro_batch_invariance_of_the_loss_curve(tmp_path):
    curves = {}
    finals = {}
    for micro in (2, 4, 16):
        t = _trainer(tmp_path / f"m{micro}", micro=micro, steps=12)
        t.fit()
        rows = [json.loads(x) for x in (tmp_path / f"m{micro}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 13))
        assert all(r["micro_batch"] == micro and r["accum_steps"] == 16 // micro for r in rows)
        curves[micro] = torch.tensor([r["loss"] for r in rows], dtype=torch.float64)
        finals[micro] = torch.cat([p.detach().flatten() for p in t.model.parameters()])
    for micro in (2, 16):
        torch.testing.assert_close(curves[micro], curves[4], rtol=1e-5, atol=0)
        # Adam amplifies rounding on near-zero gradients element-wise; the weights as a
        # whole still agree to float32 rounding.
        assert (finals[micro] - finals[4]).norm() / finals[4].norm() < 1e-5
    assert curves[4][-1] < curves[4][0]


def test_micro_batches_pad_per_micro_batch_and_count_only_answers():
    t = _trainer(micro=4)
    mbs = list(t.micro_batches(0))
    assert len(mbs) == 4
    idx = t.step_indices(0)
    for k, mb in enumerate(mbs):
        ex = [t.dataset[i] for i in idx[4 * k : 4 * k + 4]]
        assert mb["input_ids"].shape[1] == max(len(e[0]) for e in ex)  # own width, not the dataset's
        answer_tokens = sum(sum(1 for x in e[1] if x != -100) for e in ex)
        vocab = demo.TASK_TOKENIZER.vocab_size
        _, n = ga.losses.causal_lm(torch.zeros(*mb["labels"].shape, vocab), mb["labels"])
        assert int(n) == answer_tokens


def test_resume_in_process_is_bitwise(tmp_path):
    full = _trainer(tmp_path / "full", steps=6)
    full.fit()
    part = _trainer(tmp_path / "part", steps=6, checkpoint_every=2)
    # Stop after step 4 by making the 5th window fail (as a crash would).
    calls = {"n": 0}
    real = part.loss_fn

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] > 4 * 4:
            raise KeyboardInterrupt
        return real(model, batch)

    part.loss_fn = crashing
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resumed = _trainer(tmp_path / "part", steps=6, resume=True, checkpoint_every=2)
    resumed.fit()
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    full_rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in full_rows]


def test_checkpoint_contents_load_with_weights_only(tmp_path):
    _trainer(tmp_path, steps=2).fit()
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "rng", "data", "accumulator", "step"):
        assert key in ck
    assert ck["step"] == 2 and ck["accumulator"]["step"] == 2
    assert ck["data"] == {"seed": 0, "effective_batch": 16, "position": 2, "examples": 32}
    assert ck["run"] == {"--steps": 2, "--lr": 3e-3, "--effective-batch": 16, "--seed": 0}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["effective_batch"] == 16
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"effective": 16, "micro": 5}, "not divisible"),
        ({"effective": 16, "micro": 32}, "larger than"),
        ({"effective": 16, "micro": 0}, "micro_batch"),
        ({"effective": 0, "micro": 1}, "effective_batch"),
        ({"steps": 0}, "steps"),
    ],
)
def test_bad_sizes_raise_value_error_naming_the_parameter(kw, words):
    """The library names its parameters; the CLI maps them to flags (tests/test_cli_bad_input.py)."""
    with pytest.raises(ValueError, match=words):
        _trainer(**kw)


def test_plot_handles_empty_and_skipped_rows(tmp_path):
    plot_losses([], tmp_path / "a.png")
    rows = [
        {"step": 1, "loss": 2.0, "examples_seen": 8, "effective_batch": 8},
        {"step": 2, "loss": float("nan"), "examples_seen": 16, "effective_batch": 8, "skipped": True},
    ]
    plot_losses(rows, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_injected_oom_replays_the_window_with_a_smaller_micro_batch(tmp_path, capsys):
    """OOM on the 2nd micro-batch of step 1 (after one backward already accumulated) at
    micro-batch 8: the window is dropped and replayed at micro-batch 4; the run then
    equals, bitwise, a run that used micro-batch 4 from the start."""
    ref = _trainer(micro=4, steps=4)
    ref.fit()
    t = _trainer(micro=8, steps=4)
    real = t.loss_fn
    seen = []

    def flaky(model, batch):
        seen.append(batch["input_ids"].shape[0])
        if batch["input_ids"].shape[0] > 4 and len(seen) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, batch)

    t.loss_fn = flaky
    t.fit()
    assert seen[:2] == [8, 8] and set(seen[2:]) == {4}
    assert t.micro_batch == 4 and t.accum_steps == 4
    assert "replaying step 1 with micro-batch 4" in capsys.readouterr().err
    for a, b in zip(ref.model.parameters(), t.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_oom_at_micro_batch_one_is_an_error():
    t = _trainer(micro=1, steps=1)

    def always_oom(model, batch):
        raise torch.cuda.OutOfMemoryError("injected")

    t.loss_fn = always_oom
    with pytest.raises(RuntimeError, match="even with micro-batch 1"):
        t.fit()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_after_the_window_with_a_checkpoint_and_resumes_bitwise(tmp_path, capsys, sig):
    full = _trainer(tmp_path / "full", steps=6)
    full.fit()
    part = _trainer(tmp_path / "part", steps=6, checkpoint_every=0)
    real, calls = part.loss_fn, {"n": 0}

    def signalling(model, batch):
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 2:  # in the middle of the 3rd window
            os.kill(os.getpid(), sig)
        return real(model, batch)

    part.loss_fn = signalling
    handler_before = signal.getsignal(sig)
    with pytest.raises(Stopped) as e:
        part.fit()
    assert e.value.step == 3 and e.value.exit_code == 128 + sig  # the 3rd window was finished
    assert signal.getsignal(sig) is handler_before  # handlers restored
    ck = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 3
    resumed = _trainer(tmp_path / "part", steps=6, resume=True)
    resumed.fit()
    assert "resuming from step 3 of 6" in capsys.readouterr().out
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_changed_run_naming_the_key(tmp_path):
    _trainer(tmp_path, steps=2, run_config={"--data": "sha256:aaaa"}).fit()
    with pytest.raises(CheckpointError, match="--data sha256:bbbb differs from sha256:aaaa"):
        _trainer(tmp_path, steps=2, resume=True, run_config={"--data": "sha256:bbbb"}).fit()
    with pytest.raises(CheckpointError, match="--steps 1 differs from 2"):
        _trainer(tmp_path, steps=1, resume=True, run_config={"--data": "sha256:aaaa"}).fit()
    _trainer(tmp_path, steps=2, resume=True, run_config={"--data": "sha256:aaaa"}).fit()


def test_trainer_guards_its_out_dir_too(tmp_path):
    _trainer(tmp_path, steps=1).fit()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(OutDirError, match="already holds a run"):
        _trainer(tmp_path, steps=1).fit()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    _trainer(tmp_path, steps=1, overwrite=True).fit()
    with pytest.raises(ValueError, match="contradict"):
        _trainer(tmp_path, steps=1, overwrite=True, resume=True)
