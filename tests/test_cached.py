"""Accumulator.step_cached (issue 22): an in-batch-negatives loss over a window, exact.

Every check compares with a plain full-batch loop written here, in float64, dropout ON and
a learnable temperature: the reference encodes the micro-batches one after another from the
same seed (so each gets the same dropout masks as step_cached's first pass), computes the
InfoNCE loss once on all rows and back-propagates it through the encoder in one go.

Tolerance: float64 (eps 2.2e-16), where step_cached and the reference differ only in the
order of the sums (per-micro-batch backward passes vs one); measured errors are ~1e-15, so
1e-10 relative is rounding with a wide margin and any real difference (a missing micro-batch,
a doubled temperature gradient, a wrong mask) is far above it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

import gradaccum as ga

TOL = 1e-10  # float64 rounding, see the module docstring
DIM_IN, DIM_OUT = 6, 8
Micro = tuple[torch.Tensor, torch.Tensor]


def make_encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM_IN, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, DIM_OUT)).double()


def pairs(n: int, seed: int = 1) -> Micro:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, DIM_IN, generator=g, dtype=torch.float64)
    return q, q + 0.3 * torch.randn(n, DIM_IN, generator=g, dtype=torch.float64)  # positives near anchors


def encode(model: nn.Module, mb: Micro) -> tuple[torch.Tensor, torch.Tensor]:
    return model(mb[0]), model(mb[1])


class Setup:
    """An encoder, a learnable temperature (outside the model), SGD on both; a twin for the reference."""

    def __init__(self, lr: float = 0.1, momentum: float = 0.0, **acc_kw: Any) -> None:
        self.model = make_encoder()
        self.temp = nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
        self.opt = torch.optim.SGD([*self.model.parameters(), self.temp], lr=lr, momentum=momentum)
        self.grads: list[list[torch.Tensor]] = []
        self.opt.register_step_pre_hook(lambda o, a, k: self.grads.append(
            [p.grad.clone() for g in o.param_groups for p in g["params"]]))
        self.acc = ga.Accumulator(self.model, self.opt, **acc_kw)

    def window_loss(self, reps: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return ga.losses.info_nce(reps[0], reps[1], self.temp)

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in (*self.model.parameters(), self.temp)]


def full_batch(model: nn.Module, temp: torch.Tensor, micros: Sequence[Micro], seed: int) -> tuple[
        list[torch.Tensor], float, torch.Tensor]:
    """The plain loop: (gradients of the mean loss, mean loss, the next torch.rand after it)."""
    model, temp = copy.deepcopy(model), nn.Parameter(temp.detach().clone())
    torch.manual_seed(seed)
    reps = [encode(model, mb) for mb in micros]  # one forward per micro-batch: the same masks
    loss, n = ga.losses.info_nce(torch.cat([r[0] for r in reps]), torch.cat([r[1] for r in reps]), temp)
    after = torch.rand(1)
    (loss / n).backward()
    return [p.grad.detach().clone() for p in (*model.parameters(), temp)], float(loss.detach()) / n, after


def rel_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    num = sum(float((a - b).square().sum()) for a, b in zip(got, want, strict=True))
    return (num / sum(float(b.square().sum()) for b in want)) ** 0.5


def each_rel_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> list[float]:
    return [float((a - b).norm() / b.norm()) for a, b in zip(got, want, strict=True)]


@pytest.mark.parametrize(("n", "micro"), [(24, 1), (24, 3), (24, 8), (22, 8), (19, 5)])
def test_gradients_match_the_full_batch_with_dropout(n: int, micro: int) -> None:
    s = Setup()
    micros = ga.split(pairs(n), micro)  # (22, 8) and (19, 5): a short last micro-batch
    want, loss, after = full_batch(s.model, s.temp, micros, seed=5)
    torch.manual_seed(5)
    res = s.acc.step_cached(micros, encode, s.window_loss)
    assert max(each_rel_err(s.grads[0], want)) < TOL  # every parameter, the temperature too
    assert res.loss == pytest.approx(loss, rel=1e-12) and res.num_items == n
    assert torch.equal(torch.rand(1), after)  # the RNG ends where one forward pass leaves it


def test_without_replaying_the_rng_the_gradient_would_differ() -> None:
    """The same cache with the second pass drawing fresh dropout masks (what step_cached would do
    without restoring each micro-batch's RNG state) is far off: the test above sees the masks."""
    s = Setup()
    micros = ga.split(pairs(24), 8)
    want, _, _ = full_batch(s.model, s.temp, micros, seed=5)
    torch.manual_seed(5)
    with torch.no_grad():
        cached = [encode(s.model, mb) for mb in micros]
    qs = torch.cat([c[0] for c in cached]).requires_grad_()
    ks = torch.cat([c[1] for c in cached]).requires_grad_()
    loss, n = ga.losses.info_nce(qs, ks, s.temp)
    (loss / n).backward()
    for i, mb in enumerate(micros):  # no RNG restore: new masks
        rows = slice(8 * i, 8 * i + 8)
        torch.autograd.backward(list(encode(s.model, mb)), [qs.grad[rows], ks.grad[rows]])
    naive = [p.grad for p in (*s.model.parameters(), s.temp)]
    assert rel_err(naive, want) > 1e-2


def test_plain_accumulation_trains_another_objective() -> None:
    """step() with info_nce per micro-batch: fewer negatives per row, a different gradient."""
    s = Setup()
    micros = ga.split(pairs(24), 8)
    want, loss, _ = full_batch(s.model, s.temp, micros, seed=5)
    torch.manual_seed(5)
    res = s.acc.step(micros, lambda m, mb: s.window_loss(encode(m, mb)))
    assert rel_err(s.grads[0], want) > 0.05  # vs 1e-15 for step_cached: not rounding
    assert res.loss < loss - 0.5  # 8 candidates per row instead of 24: an easier task


def test_the_step_clips_and_moves_like_the_full_batch_loop() -> None:
    """Two windows through SGD with momentum and clipping, against the same loop done by hand."""
    s = Setup(lr=0.05, momentum=0.9, max_grad_norm=0.5)
    ref_model, ref_temp = copy.deepcopy(s.model), nn.Parameter(s.temp.detach().clone())
    ref_opt = torch.optim.SGD([*ref_model.parameters(), ref_temp], lr=0.05, momentum=0.9)
    for w, (n, micro) in enumerate([(20, 6), (16, 4)]):
        micros = ga.split(pairs(n, seed=10 + w), micro)
        want, loss, _ = full_batch(ref_model, ref_temp, micros, seed=w)
        for p, g in zip((*ref_model.parameters(), ref_temp), want, strict=True):
            p.grad = g
        norm = float(torch.nn.utils.clip_grad_norm_([*ref_model.parameters(), ref_temp], 0.5))
        ref_opt.step()
        torch.manual_seed(w)
        res = s.acc.step_cached(micros, encode, s.window_loss)
        assert (res.step, res.skipped, res.lr, res.num_items) == (w + 1, False, 0.05, n)
        assert res.loss == pytest.approx(loss, rel=1e-12)
        assert res.grad_norm == pytest.approx(norm, rel=1e-10) and norm > 0.5  # it did clip
    assert rel_err(s.params(), [p.detach() for p in (*ref_model.parameters(), ref_temp)]) < TOL
    assert s.acc.micro_steps == 4 + 4 and s.acc.items_seen == 36


def test_only_representations_cross_the_window() -> None:
    """window_loss sees leaves (no encoder graph kept alive); the model's inputs are re-read."""
    s = Setup()
    seen = []

    def window_loss(reps: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        seen.append([(r.is_leaf, r.requires_grad, r.grad_fn, tuple(r.shape)) for r in reps])
        return s.window_loss(reps)

    s.acc.step_cached(iter(ga.split(pairs(10), 4)), encode, window_loss)  # a generator is fine
    assert seen == [[(True, True, None, (10, DIM_OUT))] * 2]


def test_a_single_tensor_encoder_gets_a_single_tensor() -> None:
    s = Setup()
    xq, xk = pairs(12)
    want, _, _ = full_batch(s.model, s.temp, ga.split((xq, xk), 4), seed=3)

    def stacked(model: nn.Module, mb: torch.Tensor) -> torch.Tensor:  # (rows, 2, D): query, key
        return torch.stack(encode(model, (mb[:, 0], mb[:, 1])), dim=1)

    torch.manual_seed(3)
    s.acc.step_cached(ga.split(torch.stack([xq, xk], dim=1), 4), stacked,
                      lambda r: ga.losses.info_nce(r[:, 0], r[:, 1], s.temp))
    assert rel_err(s.grads[0], want) < TOL


def test_grad_scaler_and_grad_dtype_windows_are_the_same_step() -> None:
    micros = ga.split(pairs(18), 5)
    plain = Setup()
    torch.manual_seed(2)
    plain.acc.step_cached(micros, encode, plain.window_loss)
    scaled = Setup(grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    torch.manual_seed(2)
    res = scaled.acc.step_cached(micros, encode, scaled.window_loss)
    assert not res.skipped and rel_err(scaled.params(), plain.params()) < TOL  # a power of two: exact
    wide = Setup()  # float32 encoder, float64 gradient buffers: loss gradients land in a buffer too
    wide.model.float()
    wide.acc = ga.Accumulator(wide.model, wide.opt, grad_dtype=torch.float64)
    torch.manual_seed(2)
    wide.acc.step_cached([(q.float(), k.float()) for q, k in micros], encode, wide.window_loss)
    assert wide.grads[0][-1].dtype == torch.float64  # the temperature (float64) kept its own dtype
    assert rel_err([g.double() for g in wide.grads[0]], plain.grads[0]) < 1e-5  # float32 encoder


def test_a_nonfinite_window_is_skipped_and_noise_is_not_measured() -> None:
    s = Setup(measure_noise=True)
    before = s.params()
    res = s.acc.step_cached(ga.split(pairs(8), 4), encode,
                            lambda r: (s.window_loss(r)[0] * float("inf"), 8))
    assert res.skipped and res.step == 0 and rel_err(s.params(), before) == 0.0
    res = s.acc.step_cached(ga.split(pairs(8), 4), encode, s.window_loss)
    assert not res.skipped and res.noise_scale is None  # documented: no additive micro-batch gradients
    res = s.acc.step(ga.split(pairs(8), 4), lambda m, mb: s.window_loss(encode(m, mb)))
    assert res.step == 2  # plain windows still run on the same Accumulator


def test_misuse_is_refused_by_name() -> None:
    s = Setup()
    micros = ga.split(pairs(8), 4)
    with pytest.raises(TypeError, match="encode must be callable"):
        s.acc.step_cached(micros, None, s.window_loss)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="window_loss must be callable"):
        s.acc.step_cached(micros, encode, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no micro-batches"):
        s.acc.step_cached([], encode, s.window_loss)
    with pytest.raises(TypeError, match="encode must return a Tensor"):
        s.acc.step_cached(micros, lambda m, mb: [1.0], s.window_loss)
    with pytest.raises(TypeError, match="window_loss must return"):
        s.acc.step_cached(micros, encode, lambda r: r[0].sum())
    with pytest.raises(ValueError, match="loss_sum must be a scalar"):
        s.acc.step_cached(micros, encode, lambda r: (r[0].sum(1), 4))
    calls = []

    def unsteady(model: nn.Module, mb: Micro) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)  # the second pass drops a row: not a function of the RNG state
        q, k = encode(model, mb)
        return (q, k) if len(calls) <= len(micros) else (q[1:], k[1:])

    with pytest.raises(ValueError, match="encode returned other shapes"):
        s.acc.step_cached(micros, unsteady, s.window_loss)
    with s.acc.micro_step(), pytest.raises(ga.AccumulatorStateError, match="step_cached"):
        s.acc.step_cached(micros, encode, s.window_loss)
    assert all(p.grad is None for p in s.model.parameters()) and s.acc.optimizer_steps == 0
    res = s.acc.step_cached(micros, encode, s.window_loss)  # nothing was left half-done
    assert res.step == 1 and res.num_items == 8


# ----------------------------------------------------------------------------- 2 gloo ranks
needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo")


@needs_gloo
def test_two_ranks_gather_negatives_and_match_the_full_batch(tmp_path: Any) -> None:
    """Unwrapped, DDP, and DDP owning the temperature: each rank's rows see both ranks' rows as
    negatives; every gradient, loss and weight matches the loop over the union of both ranks."""
    import _cached_dist as cd
    import _dist_helpers as dh

    procs = dh.launch_ranks([str(dh.HERE / "_cached_dist.py"), str(tmp_path)], timeout=120)
    assert all(p.rc == 0 for p in procs), dh.describe(procs)
    records = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(dh.WORLD)]
    model, temp = make_encoder(), nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
    opt = torch.optim.SGD([*model.parameters(), temp], lr=cd.LR, momentum=cd.MOMENTUM)
    for w in range(len(cd.WINDOWS)):
        reps = []
        for r in range(dh.WORLD):  # each rank's micro-batches under that rank's RNG: its masks
            torch.manual_seed(cd.rng_seed(w, r))
            reps += [encode(model, mb) for mb in cd.window_micros(w, r)]
        loss, n = ga.losses.info_nce(torch.cat([x[0] for x in reps]), torch.cat([x[1] for x in reps]), temp)
        (loss / n).backward()
        want = [p.grad.detach().clone() for p in (*model.parameters(), temp)]
        opt.step()
        opt.zero_grad()
        for r, rec in enumerate(records):
            for variant, got in rec.items():
                res = got["results"][w]
                assert (res["num_items"], res["step"], res["skipped"]) == (n, w + 1, False), (variant, r)
                assert res["loss"] == pytest.approx(float(loss.detach()) / n, rel=1e-12), (variant, r)
                assert max(each_rel_err(got["grads"][w], want)) < TOL, (variant, r, w)
                if variant != "manual":  # one synchronised backward per window, not one per micro-batch
                    assert got["comms"][w] == got["plain_backward_comms"] > 0, (variant, r)
    final = [p.detach() for p in (*model.parameters(), temp)]
    assert all(rel_err(rec[v]["params"], final) < TOL for rec in records for v in rec)
