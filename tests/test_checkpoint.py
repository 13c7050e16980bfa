"""Atomic save and safe load."""

from __future__ import annotations

import pytest
import torch

from gradaccum import checkpoint


def test_round_trip(tmp_path):
    obj = {"format": "gradaccum", "w": torch.arange(4.0), "n": 3, "t": (1, [2, 3], None)}
    checkpoint.save(obj, tmp_path / "c.pt")
    back = checkpoint.load(tmp_path / "c.pt", required=("w",))
    assert torch.equal(back["w"], obj["w"]) and back["n"] == 3


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoint.save({"format": "gradaccum", "v": 1}, path)
    before = path.read_bytes()

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        checkpoint.save({"format": "gradaccum", "v": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_missing_and_foreign(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "nope.pt")
    torch.save({"model": {}}, tmp_path / "f.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a gradaccum checkpoint"):
        checkpoint.load(tmp_path / "f.pt")
    checkpoint.save({"format": "gradaccum"}, tmp_path / "g.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a gradaccum checkpoint"):
        checkpoint.load(tmp_path / "g.pt", required=("model",))
