"""Gradient sync: DDP communicates once per window, and only on the window's last micro-batch.

DDP decides during *forward* whether the coming backward all-reduces, so the no-sync
context has to cover forward and backward. These tests run a real DDP wrapper in one
process (gloo, world size 1) and watch it from two sides: the sync flag DDP sees at
each forward, and a communication hook that counts bucket all-reduces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import (
    Batch,
    lm_loss_fn,
    make_lm,
    random_micro_batches,
    reference_step,
    twin,
)
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from gradaccum import Accumulator, sync


@pytest.fixture
def process_group(tmp_path: Path) -> Iterator[None]:
    """A one-process gloo group, torn down even when the test fails."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class Watched:
    """A DDP model plus what it did: sync flag per forward, no_sync entries, bucket all-reduces."""

    def __init__(self, model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ddp = DDP(model)
        self.forward_synced: list[bool] = []
        self.no_sync_entries = 0
        self.buckets = 0
        self.ddp.module.register_forward_pre_hook(
            lambda m, a: self.forward_synced.append(self.ddp.require_backward_grad_sync)
        )
        original = self.ddp.no_sync

        @contextlib.contextmanager
        def counting_no_sync() -> Iterator[None]:
            self.no_sync_entries += 1
            with original():
                yield

        monkeypatch.setattr(self.ddp, "no_sync", counting_no_sync)

        # No annotations on purpose: DDP checks them against the real classes, and
        # `from __future__ import annotations` would turn them into strings.
        def hook(state, bucket):  # type: ignore[no-untyped-def]
            self.buckets += 1
            return allreduce_hook(state, bucket)

        self.ddp.register_comm_hook(None, hook)


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def _compare(results: list[Any], ref_model: nn.Module, windows: list[list[Batch]]) -> None:
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=0.05)
    assert len(results) == len(windows)
    for res, window in zip(results, windows, strict=True):
        ref = reference_step(ref_model, ref_opt, window, max_grad_norm=0.5)
        assert res.num_items == ref["num_items"]
        assert res.loss == pytest.approx(ref["loss"], rel=1e-12)
        assert res.grad_norm == pytest.approx(ref["grad_norm"], rel=1e-12)


@pytest.mark.usefixtures("process_group")
def test_micro_step_syncs_only_on_the_last_micro_batch(
    monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    model = make_lm()
    ref_model = twin(model)
    w = Watched(model, monkeypatch)
    assert sync.grad_reduction(w.ddp) == "ddp"
    acc = Accumulator(w.ddp, torch.optim.AdamW(w.ddp.parameters(), lr=0.05), accum_steps=3, max_grad_norm=0.5)
    micro = random_micro_batches(gen, [2, 3, 1, 4, 2, 2, 3])  # two full windows and a partial one
    results = []
    for mb in micro:
        with acc.micro_step():
            res = acc.backward(*lm_loss_fn(w.ddp, mb))
        if res is not None:
            results.append(res)
    results.append(acc.flush())

    # DDP saw "sync" at forward time only on each full window's last micro-batch ...
    assert w.forward_synced == [False, False, True, False, False, True, False]
    assert w.no_sync_entries == 5
    # ... and so communicated exactly one round of buckets per full window. The flushed
    # partial window ran entirely under no_sync; gradaccum sums it over ranks itself
    # (a no-op with one rank), so DDP's hook never fires for it.
    assert w.buckets == 2
    _compare(results, ref_model, [micro[:3], micro[3:6], micro[6:]])
    _assert_same_params(w.ddp.module, ref_model)


@pytest.mark.usefixtures("process_group")
def test_step_syncs_only_on_the_last_micro_batch(
    monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    model = make_lm()
    ref_model = twin(model)
    w = Watched(model, monkeypatch)
    acc = Accumulator(w.ddp, torch.optim.AdamW(w.ddp.parameters(), lr=0.05), max_grad_norm=0.5)
    micro = random_micro_batches(gen, [2, 3, 1, 4, 2, 2])
    windows = [micro[:3], micro[3:4], micro[4:]]
    results = [acc.step(iter(win), lm_loss_fn) for win in windows]
    assert w.forward_synced == [False, False, True, True, False, True]
    assert w.no_sync_entries == 3
    assert w.buckets == 3  # one round per window, whatever its length
    _compare(results, ref_model, windows)
    _assert_same_params(w.ddp.module, ref_model)


@pytest.mark.usefixtures("process_group")
def test_no_sync_around_backward_only_still_syncs(
    monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    """The peers' pitfall: DDP has already decided to sync by the time backward runs."""
    w = Watched(make_lm(), monkeypatch)
    micro = random_micro_batches(gen, [2, 2, 2])
    for mb in micro:
        loss_sum, _ = lm_loss_fn(w.ddp, mb)  # forward outside no_sync
        with w.ddp.no_sync():
            loss_sum.backward()
    assert w.buckets == 3  # one all-reduce per micro-batch: k times the traffic


@pytest.mark.usefixtures("process_group")
def test_grad_reduction_under_a_process_group() -> None:
    assert sync.is_distributed() and sync.world_size() == 1
    plain = make_lm()
    assert sync.grad_reduction(plain) == "local"  # one rank: nothing to reduce
    assert sync.grad_reduction(DDP(make_lm())) == "ddp"


@pytest.mark.usefixtures("process_group")
def test_grad_dtype_is_refused_for_ddp() -> None:
    ddp = DDP(make_lm())
    with pytest.raises(ValueError, match="grad_dtype"):
        Accumulator(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), grad_dtype=torch.float32)


# --------------------------------------------------------------------------- no process group


def test_grad_reduction_plain_model() -> None:
    assert not sync.is_distributed() and sync.world_size() == 1
    assert sync.grad_reduction(make_lm()) == "local"


def test_no_grad_sync_on_a_plain_model_is_transparent(gen: torch.Generator) -> None:
    """On a plain model the context does nothing: gradients simply accumulate."""
    model, ref = make_lm(), make_lm()
    micro = random_micro_batches(gen, [2, 3])
    for i, mb in enumerate(micro):
        with sync.no_grad_sync(model, skip=i == 0):
            lm_loss_fn(model, mb)[0].backward()
    sum(lm_loss_fn(ref, mb)[0] for mb in micro).backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-13, atol=1e-15)


class FakeFSDP2(nn.Linear):
    """Duck-types an FSDP2 root: records every set_requires_gradient_sync call."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.calls: list[bool] = []

    def set_requires_gradient_sync(self, flag: bool) -> None:
        self.calls.append(flag)

    def reshard(self) -> None:
        pass


def test_no_grad_sync_on_fsdp2_restores_the_flag() -> None:
    model = FakeFSDP2()
    assert sync.is_fsdp2(model) and sync.grad_reduction(model) == "fsdp"
    with sync.no_grad_sync(model, skip=True):
        assert model.calls == [False]
    assert model.calls == [False, True]
    with sync.no_grad_sync(model, skip=False):
        pass
    assert model.calls == [False, True]  # nothing to do on the syncing micro-batch
    with pytest.raises(RuntimeError, match="boom"), sync.no_grad_sync(model, skip=True):
        raise RuntimeError("boom")
    assert model.calls[-1] is True  # restored even when the micro-batch fails


def test_all_reduce_sum_without_a_group_is_identity() -> None:
    t = torch.tensor([1.5, 2.0])
    assert sync.all_reduce_sum(t) is t and t.tolist() == [1.5, 2.0]
