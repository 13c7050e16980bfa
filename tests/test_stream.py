"""BatchShape (micro x accum x world, written once) and the data order."""

from __future__ import annotations

import pytest

from gradaccum.stream import (
    BatchShape,
    ShapeError,
    default_micro_batch,
    next_smaller_micro_batch,
    rank_indices,
    stream_indices,
)


def test_shape_arithmetic() -> None:
    s = BatchShape(128, 4, 4)
    assert (s.per_rank, s.accum_steps) == (32, 8)
    assert s.micro_batch * s.accum_steps * s.world_size == s.effective_batch
    t = s.with_micro_batch(2)
    assert (t.effective_batch, t.accum_steps) == (128, 16)


@pytest.mark.parametrize(("args", "param", "words"), [
    ((16, 5), "micro_batch", "not divisible"),
    ((16, 32), "micro_batch", "larger than"),
    ((16, 0), "micro_batch", "positive"),
    ((0, 1), "effective_batch", "positive"),
    ((10, 1, 3), "effective_batch", "world size 3"),
    ((16, 4, 0), "world_size", "positive"),
    ((16, True), "micro_batch", "positive"),
])
def test_bad_shapes_name_the_parameter(args: tuple[int, ...], param: str, words: str) -> None:
    with pytest.raises(ShapeError, match=words) as e:
        BatchShape(*args)
    assert e.value.param == param and param in str(e.value)


def test_micro_batch_choices() -> None:
    assert default_micro_batch(128) == 16 and default_micro_batch(24) == 12 and default_micro_batch(7) == 7
    assert next_smaller_micro_batch(24, 8) == 6 and next_smaller_micro_batch(24, 1) is None


def test_ranks_take_contiguous_shards_of_one_stream() -> None:
    shape = BatchShape(12, 2, 3)
    shards = [rank_indices(50, 7, 24, shape, r) for r in range(3)]
    assert sum(shards, []) == stream_indices(50, 7, 24, 12)
    assert all(len(s) == 4 for s in shards)
