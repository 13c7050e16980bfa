"""ga.split: every container kind, nested; the last micro-batch smaller; clear errors."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import pytest
import torch

import gradaccum as ga


class Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


@dataclasses.dataclass
class Example:
    ids: torch.Tensor
    mask: torch.Tensor
    name: str = "train"


def _rows(n: int, width: int = 3) -> torch.Tensor:
    return torch.arange(n * width).reshape(n, width)


def test_tensor() -> None:
    t = _rows(7)
    parts = ga.split(t, 3)
    assert [p.shape[0] for p in parts] == [3, 3, 1]  # the last micro-batch is smaller
    assert torch.equal(torch.cat(parts), t)
    assert parts[0].data_ptr() == t.data_ptr()  # views, not copies


def test_exact_multiple_and_oversized_micro_batch() -> None:
    t = _rows(6)
    assert [p.shape[0] for p in ga.split(t, 2)] == [2, 2, 2]
    (only,) = ga.split(t, 100)
    assert torch.equal(only, t)


def test_dict() -> None:
    batch = {"ids": _rows(5), "labels": torch.arange(5)}
    parts = ga.split(batch, 2)
    assert [list(p) for p in parts] == [["ids", "labels"]] * 3
    assert [p["labels"].tolist() for p in parts] == [[0, 1], [2, 3], [4]]
    assert torch.equal(parts[1]["ids"], batch["ids"][2:4])


def test_tuple_and_list_keep_their_type() -> None:
    for container in (tuple, list):
        batch = container([_rows(5), torch.arange(5)])
        parts = ga.split(batch, 4)
        assert all(type(p) is container for p in parts)
        assert [p[1].tolist() for p in parts] == [[0, 1, 2, 3], [4]]


def test_namedtuple() -> None:
    parts = ga.split(Pair(_rows(5), torch.arange(5)), 3)
    assert all(isinstance(p, Pair) for p in parts)
    assert parts[1].y.tolist() == [3, 4] and parts[1].x.shape == (2, 3)


def test_dataclass() -> None:
    ex = Example(_rows(5), torch.ones(5, 3, dtype=torch.bool), name="eval")
    parts = ga.split(ex, 2)
    assert all(isinstance(p, Example) for p in parts)
    assert [p.ids.shape[0] for p in parts] == [2, 2, 1]
    assert all(p.name == "eval" for p in parts)
    assert torch.equal(torch.cat([p.mask for p in parts]), ex.mask)


def test_nested_containers() -> None:
    batch = {
        "inputs": (Pair(_rows(5), torch.arange(5)), [torch.zeros(5, 2)]),
        "meta": {"ex": Example(_rows(5), torch.ones(5, 3)), "lengths": torch.tensor([3, 1, 4, 1, 5])},
    }
    parts = ga.split(batch, 2)
    assert len(parts) == 3
    last = parts[-1]
    assert isinstance(last["inputs"], tuple) and isinstance(last["inputs"][0], Pair)
    assert isinstance(last["inputs"][1], list)
    assert last["inputs"][0].y.tolist() == [4]
    assert last["meta"]["lengths"].tolist() == [5]
    assert last["meta"]["ex"].ids.shape == (1, 3)


@pytest.mark.parametrize("leaf", [None, "tokenizer-v2", 42, 0.5, True])
def test_non_tensor_leaves_are_repeated(leaf: Any) -> None:
    parts = ga.split({"x": torch.arange(5), "extra": leaf, "t": (torch.arange(5), leaf)}, 2)
    assert all(p["extra"] == leaf and p["t"][1] == leaf for p in parts)


def test_mismatched_leading_dims_name_the_keys() -> None:
    batch = {"ids": _rows(4), "labels": torch.arange(3), "other": {"mask": torch.ones(4)}}
    with pytest.raises(ValueError) as err:
        ga.split(batch, 2)
    msg = str(err.value)
    assert "'ids'" in msg and "'labels'" in msg and "'mask'" in msg
    assert "4" in msg and "3" in msg


def test_mismatch_inside_a_dataclass_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"\.mask"):
        ga.split(Example(_rows(4), torch.ones(2)), 2)


@pytest.mark.parametrize(("size", "exc"), [(0, ValueError), (-3, ValueError), (2.0, TypeError),
                                           (True, TypeError), ("2", TypeError), (None, TypeError)])
def test_bad_micro_batch_size(size: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="micro_batch_size"):
        ga.split(_rows(4), size)


def test_nothing_to_split() -> None:
    with pytest.raises(ValueError, match="no tensors"):
        ga.split({"a": 1, "b": "x"}, 2)
    with pytest.raises(ValueError, match="0-dim"):
        ga.split({"a": torch.tensor(3.0)}, 2)


def test_split_keeps_init_false_dataclass_fields() -> None:
    import dataclasses as dc

    @dc.dataclass(frozen=True)
    class B:
        x: torch.Tensor
        mask: torch.Tensor = dc.field(init=False, default=None)

    b = B(torch.arange(6))
    object.__setattr__(b, "mask", torch.arange(6) % 2)
    parts = ga.split(b, 4)
    assert [p.mask.tolist() for p in parts] == [[0, 1, 0, 1], [0, 1]]
    assert [p.x.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5]]
