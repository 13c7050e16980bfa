"""Issue 12 from the command line: --lora-r / --lora-alpha, --fsdp (torchrun, 2 gloo ranks) and
--gradient-checkpointing on `gradaccum train`, `plan` and `bench`, on a tiny Llama built in the test."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import _dist_helpers as dh
import hf_fixtures as hx
import pytest
import torch
import torch.distributed as dist

from gradaccum.cli import main

REL = 1e-5
RUN = ["--effective-batch", "16", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("large")
    rng = random.Random(4)

    def words(n: int) -> str:
        return " ".join(rng.choice(hx.WORDS) for _ in range(n))

    records = [{"prompt": words(rng.randint(1, 4)), "completion": words(rng.randint(1, 8))}
               for _ in range(48)]
    llama = hx.make_llama_dir(d / "llama")
    config_only = d / "config_only"
    config_only.mkdir()
    cfg = json.loads((llama / "config.json").read_text())
    cfg["num_hidden_layers"] = 8  # deep enough that sharding pays for the gathered layers
    (config_only / "config.json").write_text(json.dumps(cfg))
    big = d / "llama70b"
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192).save_pretrained(big)
    return {"llama": llama, "data": hx.write_jsonl(d / "pc.jsonl", records), "config_only": config_only,
            "big": big}


def _train(files: dict[str, Path], out: Path, *extra: str, steps: int = 3, micro: int = 4) -> int:
    return main(["train", "--model", str(files["llama"]), "--data", str(files["data"]), *RUN,
                 "--steps", str(steps), "--micro-batch", str(micro), "--out", str(out), *extra])


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _rows(out)]


def _ck(out: Path) -> dict[str, Any]:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def _base(files: dict[str, Path]) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(files["llama"]).eval()


def _lora_from_checkpoint(files: dict[str, Path], out: Path, r: int = 4) -> torch.nn.Module:
    from gradaccum.workloads.lora import apply_lora

    model = apply_lora(_base(files), r=r, seed=0)
    model.load_state_dict(_ck(out)["model"])
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[2, 9, 14, 20, 11, 7, 30, 5]])
    with torch.no_grad():
        return model(input_ids=ids).logits


# ----------------------------------------------------------------------------- LoRA
@pytest.fixture(scope="module")
def lora_runs(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("lora_runs")
    runs = {}
    for micro in (1, 4, 16):
        runs[micro] = d / f"m{micro}"
        assert _train(files, runs[micro], "--lora-r", "4", micro=micro) == 0
    return runs


def test_lora_micro_batch_size_changes_nothing_but_rounding(lora_runs: dict[int, Path]) -> None:
    curves = {m: _losses(out) for m, out in lora_runs.items()}
    assert len(curves[16]) == 3 and curves[16][-1] < curves[16][0]
    for m in (1, 4):
        assert curves[m] == pytest.approx(curves[16], rel=REL), m
    ck = _ck(lora_runs[4])
    assert ck["run"]["--lora-r"] == 4 and ck["run"]["--lora-alpha"] == 8.0
    # the optimizer holds the adapters only: 2 matrices x 7 projections x 2 layers
    assert len(ck["optimizer"]["param_groups"][0]["params"]) == 28


def test_lora_base_weights_bitwise_unchanged_and_adapter_reloads(files: dict[str, Path],
                                                                 lora_runs: dict[int, Path]) -> None:
    from peft import PeftModel

    out = lora_runs[4]
    original = _base(files).state_dict()
    trained = _ck(out)["model"]
    base_keys = [k for k in trained if "lora_" not in k]
    assert len(base_keys) == len(original)
    for k in base_keys:
        name = k.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(trained[k], original[name]), k
    assert any("lora_B" in k and trained[k].abs().sum() > 0 for k in trained), "the adapters did not train"
    model_dir = out / "model"
    assert (model_dir / "adapter_config.json").is_file() and not (model_dir / "model.safetensors").exists()
    assert json.loads((model_dir / "adapter_config.json").read_text())["r"] == 4
    reloaded = PeftModel.from_pretrained(_base(files), model_dir).eval()
    trained_model = _lora_from_checkpoint(files, out)
    torch.testing.assert_close(_logits(reloaded), _logits(trained_model), rtol=0, atol=0)
    assert not torch.allclose(_logits(_base(files)), _logits(trained_model))


@pytest.fixture(scope="module")
def lora_resume(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4-step LoRA run, and the same run killed during step 3 (checkpoint of step 2 on disk)."""
    d = tmp_path_factory.mktemp("lora_resume")
    full, cut = d / "full", d / "cut"
    assert _train(files, full, "--lora-r", "4", "--checkpoint-every", "1", steps=4) == 0
    def dying(row: dict[str, Any]) -> None:
        if row["step"] == 2:  # after step 2 and its checkpoint: killed during step 3
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        main(["train", "--model", str(files["llama"]), "--data", str(files["data"]), *RUN, "--steps", "4",
              "--micro-batch", "4", "--out", str(cut), "--lora-r", "4", "--checkpoint-every", "1"],
             trainer_options={"on_step": dying})
    assert _ck(cut)["step"] == 2
    return {"full": full, "cut": cut}


def _same_run(a: Path, b: Path) -> None:
    keep = ("step", "loss", "grad_norm", "lr", "num_items")
    assert [{k: r[k] for k in keep} for r in _rows(a)] == [{k: r[k] for k in keep} for r in _rows(b)]
    ca, cb = _ck(a), _ck(b)
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for i, st in ca["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(cb["optimizer"]["state"][i][k])), (i, k)


def test_lora_resume_is_bitwise(files: dict[str, Path], lora_resume: dict[str, Path],
                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "cut"
    shutil.copytree(lora_resume["cut"], cut)
    assert _train(files, cut, "--lora-r", "4", "--checkpoint-every", "1", "--resume", steps=4) == 0
    assert "resuming from step 2 of 4" in capsys.readouterr().out
    _same_run(cut, lora_resume["full"])


@pytest.mark.parametrize("flags, named", [(["--lora-r", "8"], "--lora-r"), ([], "--lora-r"),
                                          (["--lora-r", "4", "--lora-alpha", "4"], "--lora-alpha")])
def test_resume_with_other_lora_flags_is_refused(files: dict[str, Path], lora_resume: dict[str, Path],
                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 flags: list[str], named: str) -> None:
    cut = tmp_path / "cut"
    shutil.copytree(lora_resume["cut"], cut)
    before = {p.name: p.read_bytes() for p in cut.iterdir() if p.is_file()}
    capsys.readouterr()
    assert _train(files, cut, *flags, "--checkpoint-every", "1", "--resume", steps=4) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "--resume" in err, err
    assert {p.name: p.read_bytes() for p in cut.iterdir() if p.is_file()} == before


def test_lora_on_the_demo(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["train", "--lora-r", "2", "--steps", "2", "--effective-batch", "8", "--out", str(out)]) == 0
    assert (out / "model" / "adapter_config.json").is_file()
    assert len(_rows(out)) == 2


# ----------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("lora", [[], ["--lora-r", "4"]])
def test_gradient_checkpointing_same_loss_curve(files: dict[str, Path], tmp_path: Path,
                                                lora: list[str]) -> None:
    assert _train(files, tmp_path / "plain", *lora) == 0
    assert _train(files, tmp_path / "ckpt", *lora, "--gradient-checkpointing") == 0
    assert _losses(tmp_path / "ckpt") == pytest.approx(_losses(tmp_path / "plain"), rel=REL)


# ----------------------------------------------------------------------------- FSDP2
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


def _torchrun(files: dict[str, Path], out: Path, *extra: str, steps: int = 4) -> None:
    args = ["-m", "gradaccum", "train", "--model", str(files["llama"]), "--data", str(files["data"]), *RUN,
            "--steps", str(steps), "--micro-batch", "4", "--out", str(out), "--checkpoint-every", "1",
            "--fsdp", *extra]
    proc = dh.run_torchrun(args, timeout=180)
    assert proc.rc == 0, dh.describe([proc])


@needs_gloo
@pytest.mark.slow
def test_fsdp_under_torchrun_equals_one_process(files: dict[str, Path], tmp_path: Path) -> None:
    """Full fine-tune sharded over 2 ranks == one process; OUT/model is a normal model directory."""
    from transformers import AutoModelForCausalLM

    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    assert _train(files, single, "--checkpoint-every", "1", steps=4) == 0
    _torchrun(files, sharded)
    assert _losses(sharded) == pytest.approx(_losses(single), rel=REL)
    assert [r["world_size"] for r in _rows(sharded)] == [2] * 4
    a, b = _ck(sharded)["model"], _ck(single)["model"]
    assert a.keys() == b.keys()  # gathered to rank 0: the unsharded layout
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    reloaded = AutoModelForCausalLM.from_pretrained(sharded / "model").eval()
    plain = AutoModelForCausalLM.from_pretrained(single / "model").eval()
    torch.testing.assert_close(_logits(reloaded), _logits(plain), rtol=1e-4, atol=1e-5)


DIE_AT = """
import os, sys
from gradaccum import cli
def dying(row):
    if row["step"] == int(sys.argv[1]):
        os._exit(17)  # every rank, right after that step's checkpoint: a kill before the next step
sys.exit(cli.main(sys.argv[2:], trainer_options={"on_step": dying}))
"""


@needs_gloo
@pytest.mark.slow
def test_fsdp_lora_checkpoints_resume_across_world_sizes(files: dict[str, Path], lora_resume: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """A checkpoint holds the full state: one process -> 2 sharded ranks, and 2 sharded ranks -> one
    process, each resumed run equal to the uninterrupted one-process run."""
    full = _losses(lora_resume["full"])
    # one process (killed during step 3) -> resumed sharded on 2 ranks
    cut = tmp_path / "cut"
    shutil.copytree(lora_resume["cut"], cut)
    _torchrun(files, cut, "--lora-r", "4", "--resume")
    assert _losses(cut) == pytest.approx(full, rel=REL)
    assert [r["world_size"] for r in _rows(cut)] == [1, 1, 2, 2]
    assert (cut / "model" / "adapter_config.json").is_file()
    # 2 sharded ranks (both killed during step 3) -> resumed in one process, unsharded
    script = tmp_path / "die_at.py"
    script.write_text(DIE_AT)
    sharded = tmp_path / "sharded"
    argv = ["train", "--model", str(files["llama"]), "--data", str(files["data"]), *RUN, "--steps", "4",
            "--micro-batch", "4", "--out", str(sharded), "--checkpoint-every", "1", "--fsdp", "--lora-r", "4"]
    procs = dh.launch_ranks([str(script), "2", *argv], timeout=180)
    assert [p.rc for p in procs] == [17, 17], dh.describe(procs)
    assert _ck(sharded)["step"] == 2
    assert _train(files, sharded, "--lora-r", "4", "--checkpoint-every", "1", "--resume", steps=4) == 0
    assert _losses(sharded) == pytest.approx(full, rel=REL)
    a, b = _ck(sharded)["model"], _ck(lora_resume["full"])["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- plan and bench
def _plan(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["plan", "--json", "--effective-batch", "16", "--memory-budget", "1TiB", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _peaks(plan: dict[str, Any]) -> dict[int, int]:
    return {r["micro_batch"]: r["predicted_peak_bytes"] for r in plan["table"]}


def test_plan_measures_less_with_lora_and_checkpointing(files: dict[str, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    model = ["--model", str(files["llama"]), "--data", str(files["data"])]
    plain = _plan(capsys, *model)
    assert plain["method"] == "measured"
    both = ["--lora-r", "4", "--gradient-checkpointing"]
    for flags in (["--lora-r", "4"], ["--gradient-checkpointing"], both):
        other = _plan(capsys, *model, *flags)
        assert other["method"] == "measured"
        for m, peak in _peaks(other).items():
            assert peak < _peaks(plain)[m], (flags, m)


def test_plan_from_config_only_directory(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """No weights, no tokenizer, no data: the analytic estimate; every mode predicts less."""
    model = ["--model", str(files["config_only"]), "--max-length", "64", "--world-size", "2"]
    plain = _plan(capsys, *model)
    assert plain["method"] == "analytic" and plain["seq_len"] == 64 and plain["world_size"] == 2
    for flags in (["--lora-r", "4"], ["--gradient-checkpointing"], ["--fsdp"],
                  ["--fsdp", "--lora-r", "4", "--gradient-checkpointing"]):
        other = _plan(capsys, *model, *flags)
        for m, peak in _peaks(other).items():
            assert peak < _peaks(plain)[m], (flags, m)
    fsdp = _plan(capsys, *model, "--fsdp")
    assert fsdp["estimate"]["fsdp"] and not plain["estimate"]["fsdp"]
    assert abs(2 * fsdp["estimate"]["params_bytes"] - plain["estimate"]["params_bytes"]) <= 2  # a half each


def test_plan_the_70b_recipe_from_its_config(files: dict[str, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """docs/large-models.md: Llama-70B shape, LoRA r=16 + FSDP2 over 4 + checkpointing fits 78 GiB."""
    capsys.readouterr()
    args = ["plan", "--model", str(files["big"]), "--lora-r", "16", "--fsdp", "--gradient-checkpointing",
            "--effective-batch", "64", "--max-length", "4096", "--precision", "bf16", "--world-size", "4",
            "--memory-budget", "78GiB"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "micro-batch 2 x accum steps 8 x world size 4 = 64" in text, text
    p = json.loads(capsys.readouterr().out if main([*args, "--json"]) == 0 else "{}")
    assert p["micro_batch"] == 2 and 60 * 2**30 < p["predicted_peak_bytes"] <= 78 * 2**30
    assert p["estimate"]["lora_r"] == 16 and p["estimate"]["world_size"] == 4


def test_bench_runs_lora_and_checkpointing(files: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["bench", "--json", "--model", str(files["llama"]), "--data", str(files["data"]),
                 "--effective-batch", "4", "--repeats", "1", "--lora-r", "4", "--gradient-checkpointing",
                 "--out", str(tmp_path / "bench")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["micro_batch"] for r in res["rows"]] == [1, 2, 4]


# ----------------------------------------------------------------------------- bad combinations
def _bad_cases(files: dict[str, Path], out: Path) -> list[list[str]]:
    train = ["train", "--model", str(files["llama"]), "--data", str(files["data"]), "--steps", "2",
             "--out", str(out)]
    return [
        [*train, "--lora-r", "0"],
        [*train, "--lora-r", "-3"],
        [*train, "--lora-alpha", "8"],
        [*train, "--lora-r", "4", "--lora-alpha", "0"],
        [*train, "--fsdp"],  # one process: needs torchrun
        [*train, "--fsdp", "--precision", "fp16"],
        ["bench", "--model", str(files["llama"]), "--data", str(files["data"]), "--fsdp", "--out", str(out)],
        ["bench", "--model", str(files["config_only"]), "--out", str(out)],
        ["plan", "--model", str(files["config_only"]), "--lora-alpha", "2"],
        ["plan", "--model", str(files["config_only"]), "--world-size", "3", "--effective-batch", "16"],
        ["plan", "--model", str(files["config_only"]), "--max-length", "100000"],
    ]


@pytest.mark.parametrize("case", range(11))
def test_bad_combinations_exit_2_with_one_line(files: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str], case: int) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    argv = _bad_cases(files, out)[case]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert any(flag in err for flag in ("--lora", "--fsdp", "--model", "--world-size", "--effective-batch",
                                        "--max-length")), err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


@needs_gloo
@pytest.mark.slow
def test_fsdp_syncs_every_micro_batch_when_held_gradients_do_not_fit(files: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """A --memory-budget between the two FSDP2 layouts: said at start-up, and the same run."""
    from gradaccum import memory
    from gradaccum.workloads.prepare import WorkloadSpec, longest_example, prepare_workload

    work, _ = prepare_workload(WorkloadSpec(model=str(files["llama"]), data=str(files["data"])))
    kw = {"fsdp": True, "world_size": 2, "gradient_checkpointing": False}
    held = memory.analytic_estimate(work.model, 4, longest_example(work), **kw).predicted_peak_bytes
    every = memory.analytic_estimate(work.model, 4, longest_example(work), sync_every_micro_batch=True,
                                     **kw).predicted_peak_bytes
    assert every < held
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    assert _train(files, single, steps=2) == 0
    args_ = ["-m", "gradaccum", "train", "--model", str(files["llama"]), "--data", str(files["data"]), *RUN,
             "--steps", "2", "--micro-batch", "4", "--out", str(sharded), "--fsdp",
             "--memory-budget", str((held + every) // 2)]
    proc = dh.run_torchrun(args_, timeout=180)
    assert proc.rc == 0, dh.describe([proc])
    assert "reduce-scattering on every micro-batch" in proc.out
    assert _losses(sharded) == pytest.approx(_losses(single), rel=REL)
