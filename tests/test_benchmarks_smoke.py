"""Smoke tests for benchmarks/: each script's core runs on a tiny setting, so they cannot rot.

The peer parts are skipped when accelerate / lightning are not installed (they come
from the optional ``.[bench]`` extra). The numbers checked here are the ones that do
not depend on timing: the benchmark's float64 yardstick against a plain full-batch
gradient, exact contenders being exact, and the peers' known partial-window error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_overhead  # noqa: E402
import common  # noqa: E402
import compare_peers  # noqa: E402
import peers_gradient_error  # noqa: E402
import peers_logged_loss  # noqa: E402
import peers_memory  # noqa: E402
import peers_report  # noqa: E402
import peers_speed  # noqa: E402


@pytest.fixture(autouse=True)
def _keep_threads():
    # The benchmarks use every core; the rest of the suite runs single-threaded.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def tiny_mlp() -> common.Workload:
    return common.mlp_workload(d_in=8)


def tiny_gpt2() -> common.Workload:
    return common.gpt2_workload(n_layer=1, n_embd=16, vocab=16, max_len=12)


def test_reference_is_the_plain_full_batch_gradient() -> None:
    work = tiny_mlp()
    model = work.build_model(0)
    window = work.micro_batches(work.make_examples(10, 0), 4)  # sizes 4, 4, 2
    got = peers_gradient_error.Reference(model, work).grad(list(model.parameters()), window)
    # Written out plainly: one concatenated batch, a MEAN loss, float64.
    ref_model = common.clone(model).double()
    x = torch.cat([mb["x"] for mb in window]).double()
    y = torch.cat([mb["y"] for mb in window]).double()
    F.mse_loss(ref_model(x), y).backward()
    want = torch.cat([p.grad.reshape(-1) for p in ref_model.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_lm_count_matches_causal_lm() -> None:
    work = tiny_gpt2()
    mb = work.collate(work.make_examples(5, 0))
    _, n = work.loss_sum(work.build_model(0), mb)
    assert work.count(mb) == int(n) == int((mb["labels"][:, 1:] != -100).sum())


def test_live_tensor_bytes_counts_and_frees() -> None:
    with peers_memory.LiveTensorBytes() as m:
        a = torch.zeros(1024)  # 4 KiB
        view = a[:10]
        b = a + 1
        assert m.current == 2 * 4096
        del a, b
        assert m.current == 4096  # the view keeps the storage alive
        del view
        assert m.current == 0
    assert m.peak == 2 * 4096


def test_overhead_core_runs_and_copies_agree() -> None:
    res = bench_overhead.run(rounds=2, warmup=1, k=2, micro_batch=2, n_layer=1, seq_len=12)
    assert res["same_parameters"]
    for name in bench_overhead.CONTENDERS[1:]:
        r = res["results"][name]
        assert r["speed_ratio"]["n"] == 2 and r["speed_ratio"]["median"] > 0
        assert r["max_logged_loss_diff_vs_hand"] < 1e-5
    assert res["results"]["hand again (A/A control)"]["rel_update_diff_vs_hand"] == 0.0
    assert "gradaccum step()" in bench_overhead.describe(res)
    json.dumps(res)


@pytest.mark.parametrize("make", [tiny_mlp, tiny_gpt2])
@pytest.mark.parametrize("peer", ["hand", "gradaccum"])
def test_exact_contenders_apply_the_full_batch_gradient(make, peer) -> None:
    r = peers_gradient_error.grad_error(make(), peer, k=2, n_micro=3, micro_batch=3)
    assert r["windows"] == [2, 1] and r["steps_taken"] == 2
    assert r["rel_err_full"] < 1e-5 and r["rel_err_partial"] < 1e-5


def test_exact_contenders_log_the_same_loss_for_every_k() -> None:
    res = peers_logged_loss.logged_loss_vs_k(tiny_gpt2(), ["hand", "gradaccum"], [1, 2, 4], 8, 2, 1)
    for peer in ("hand", "gradaccum"):
        assert res[peer]["max_rel_change_vs_k1"] < 1e-6
        assert res[peer]["max_rel_err_vs_exact"] < 1e-6


def test_memory_is_measured() -> None:
    r = peers_memory.memory(tiny_mlp(), "gradaccum", k=2, micro_batch=4, windows=1)
    # At least the gradients and AdamW's two moment buffers.
    assert r["peak_mib"] >= 3 * r["params_mib"]


def test_demo_workload_builds() -> None:
    work = common.demo_workload()
    r = peers_gradient_error.grad_error(work, "gradaccum", k=2, n_micro=3, micro_batch=4)
    assert r["rel_err_full"] < 1e-5 and r["rel_err_partial"] < 1e-5


def test_accelerate_partial_window_is_scaled_by_one_over_k() -> None:
    pytest.importorskip("accelerate")
    work = tiny_mlp()
    r = peers_gradient_error.grad_error(work, "accelerate", k=4, n_micro=6, micro_batch=4)
    assert r["steps_taken"] == 2
    assert r["rel_err_full"] < 1e-5  # equal-sized micro-batches: mean-of-means is exact here
    assert r["rel_err_partial"] == pytest.approx(0.5, abs=1e-4)  # 2 micro-batches divided by 4
    sp = peers_speed.speed(work, k=2, micro_batch=4, rounds=2, warmup=1)
    assert sp["accelerate"]["speed_ratio"]["n"] == 2


def test_lightning_partial_window_and_logging() -> None:
    pytest.importorskip("lightning")
    work = tiny_mlp()
    r = peers_gradient_error.grad_error(work, "lightning", k=4, n_micro=6, micro_batch=4)
    assert r["steps_taken"] == 2
    assert r["rel_err_partial"] == pytest.approx(0.5, abs=1e-4)
    examples = work.make_examples(16, 0)
    logged = peers_logged_loss.logged_losses(work, "lightning", work.build_model(0), examples, 2, 4)
    assert len(logged) == 2  # one value per optimizer step
    sp = peers_speed.speed(work, k=2, micro_batch=4, rounds=2, warmup=1)
    assert sp["lightning"]["speed_ratio"]["n"] == 2


def test_run_all_writes_table_json_and_plot(tmp_path: Path) -> None:
    cfg = {"rounds": 1, "warmup": 1, "pretrain_steps": 1, "loss_windows": 1, "mem_windows": 1}
    res = compare_peers.run_all({"mlp": (tiny_mlp(), 2)}, cfg, k=2)
    table = peers_report.markdown(res)
    assert "| mlp (micro-batch 2) | gradaccum |" in table
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\nprose stays\n")
    common.write_section(md, "compare_peers", table)
    common.write_section(md, "compare_peers", "second")
    text = md.read_text()
    assert "prose stays" in text and "second" in text and "| mlp" not in text
    common.merge_json(tmp_path / "b.json", "compare_peers", res)
    common.merge_json(tmp_path / "b.json", "overhead", {"x": 1})
    assert json.loads((tmp_path / "b.json").read_text())["compare_peers"]["setting"]["k"] == 2
    peers_report.plot(res, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000
    # The entry point redraws the table and plot from a stored result.
    common.merge_json(tmp_path / "benchmarks.json", "compare_peers", res)
    assert compare_peers.main(["--render", "--sections", "peers", "--out", str(tmp_path)]) == 0
    assert "| mlp (micro-batch 2) | gradaccum |" in (tmp_path / "benchmarks.md").read_text()
    assert (tmp_path / "benchmarks.png").stat().st_size > 1000


def test_hf_trainer_peer_runs_and_both_are_exact(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import hf_trainer_peer as hp

    size = hp.Size(words=20, hidden=16, layers=1, heads=2, min_tokens=4, max_tokens=12, examples=24)
    setup = hp.make_setup(tmp_path / "setup", size)
    cfg = hp.Config(micro=2, k=2, steps=3)
    res = hp.run(setup, cfg, runs=1, warmup=1, check_steps=2)
    for name in (hp.GA, hp.HF):
        e64, e32 = res["float64"][name], res["float32"][name]
        assert e64["steps_taken"] == e64["steps_logged"] == 2
        assert e32["grad_rel_err_max"] < 1e-5 and e32["logged_loss_rel_err_max"] < 1e-5
        assert e64["logged_loss_rel_err_max"] < 1e-6
    # float64 from end to end in gradaccum; transformers' loss upcasts the logits to float32.
    assert res["float64"][hp.GA]["grad_rel_err_max"] < 1e-12
    assert res["float64"][hp.HF]["grad_rel_err_max"] < 1e-5
    t = res["throughput"]
    assert t["steps_measured"] == 2 and t["tokens_measured"] > 0
    assert t[hp.GA]["speed_ratio"]["n"] == 2 and t[hp.GA]["tokens_per_s"] > 0
    table = hp.markdown(res)
    assert "| gradaccum |" in table and "| transformers |" in table
    hp.write_docs(res, tmp_path)
    assert json.loads((tmp_path / "benchmarks.json").read_text())["hf_trainer"]["setting"]["k"] == 2
    assert "<!-- hf_trainer:begin -->" in (tmp_path / "benchmarks.md").read_text()


@pytest.mark.slow
def test_contrastive_benchmark_core() -> None:
    """benchmarks/contrastive.py on 32 pairs, one round: the exact contenders are exact."""
    pytest.importorskip("sentence_transformers")
    import contrastive

    res = contrastive.run(rounds=1, warmup=0, effective=32, threads=1)
    err = res["grad_rel_error"]
    # float32 contenders against float64: the full batch's own error is the floor.
    assert err["gradaccum step_cached"] < 10 * err["full"] + 1e-6
    assert err["sentence-transformers cached"] < 10 * err["full"] + 1e-6
    assert err["plain accumulation"] > 100 * err["full"]  # 15 negatives per row instead of 31
    assert res["peak_vs_full"]["gradaccum step_cached"] < 1.0
    assert "| gradaccum step_cached |" in contrastive.table(res)


@pytest.mark.slow
def test_packing_benchmark_runs_and_everyone_is_exact(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/packing.py end to end at 3 steps: every contender's gradient (TRL's too) is the
    float64 full batch's to fp32 rounding (a leak between packed examples would be ~1e-1)."""
    pytest.importorskip("trl")
    import packing

    res = packing.measure(steps=3, warmup=1)
    assert set(res["contenders"]) == {"padded", "packed", "packed-tokens", "packed (A/A)", "trl padding_free",
                                      "trl padded"}
    for r in res["contenders"].values():
        assert r["grad_rel_error_vs_float64"] < 1e-5
