"""resume.py: the checkpoint's schema, one check per concern, FORMAT_VERSION."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gradaccum import Accumulator, resume
from gradaccum.checkpoint import CheckpointError
from gradaccum.runlog import MetricsHistory


def _objects() -> tuple[nn.Module, torch.optim.Optimizer, Accumulator]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt, Accumulator(model, opt, accum_steps=2)


def _spec(**kw: object) -> resume.RunSpec:
    base = {"defining": {"--steps": 4, "--data": "sha256:aa"}, "seed": 0, "start_batch": 8, "steps": 4,
            "extra": {}}
    return resume.RunSpec(**{**base, **kw})  # type: ignore[arg-type]


def _saved(tmp_path: Path) -> Path:
    model, opt, acc = _objects()
    x = torch.randn(4, 3)
    acc.step([x[:2], x[2:]], lambda m, mb: (m(mb).square().sum(), mb.shape[0]))
    history = MetricsHistory()
    for step in (1, 2):
        history.append({"step": step, "loss": 1.0 / step})
    run = resume.RunState(step=2, position=16, elapsed_s=1.5, history=history)
    path = tmp_path / "checkpoint.pt"
    assert resume.save(path, _spec(), run, model, opt, None, acc) is not None
    assert run.last_saved == 2
    return path


def test_round_trip_restores_weights_state_and_position(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    saved = torch.load(path, weights_only=True)
    assert saved["version"] == resume.FORMAT_VERSION
    model, opt, acc = _objects()
    state = resume.load(path, _spec(), model, opt, None, acc)
    assert (state.step, state.position, state.elapsed_s, state.last_saved) == (2, 16, 1.5, 2)
    assert state.history.column("step") == [1, 2]
    assert torch.equal(model.weight, saved["model"]["weight"]) and acc.step_count == 1


@pytest.mark.parametrize(("version", "words"), [(99, "newer"), ("2", "unknown"), (0, "unknown")])
def test_unknown_or_newer_format_is_refused(tmp_path: Path, version: object, words: str) -> None:
    path = _saved(tmp_path)
    ck = torch.load(path, weights_only=True)
    ck["version"] = version
    torch.save(ck, path)
    model, opt, acc = _objects()
    before = model.weight.detach().clone()
    with pytest.raises(CheckpointError, match=words):
        resume.load(path, _spec(), model, opt, None, acc)
    assert torch.equal(model.weight, before)  # nothing loaded


def test_a_changed_defining_value_is_named(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    model, opt, acc = _objects()
    with pytest.raises(CheckpointError, match="--data sha256:bb differs from sha256:aa"):
        resume.load(path, _spec(defining={"--steps": 4, "--data": "sha256:bb"}), model, opt, None, acc)
    with pytest.raises(CheckpointError, match="--seed 1 does not match"):
        resume.load(path, _spec(seed=1), model, opt, None, acc)
