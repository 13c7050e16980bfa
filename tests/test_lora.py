"""LoRA adapters, activation checkpointing and save_model (workloads.lora) on a tiny Llama."""

from __future__ import annotations

import sys
from pathlib import Path

import _fsdp_helpers as fh
import pytest
import torch

import gradaccum as ga
from gradaccum.workloads import lora as wl
from gradaccum.workloads.errors import WorkloadError

from hf_fixtures import make_llama_dir  # isort: skip

REL = 1e-5
EFFECTIVE = 16
STEPS = 3


def train_curve(model: torch.nn.Module, micro: int, steps: int = STEPS) -> list[float]:
    """``steps`` optimizer steps of EFFECTIVE examples each, in micro-batches of ``micro``."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    acc = ga.Accumulator(model, opt, accum_steps=EFFECTIVE // micro)
    losses = []
    for s in range(steps):
        res = None
        for mb in ga.split(fh.batch(EFFECTIVE, seed=s), micro):
            with acc.micro_step():
                res = acc.backward(*fh.loss_fn(model, mb))
        assert res is not None
        losses.append(res.loss)
    return losses


def lora_model(seed: int = 0, r: int = 4) -> torch.nn.Module:
    return wl.apply_lora(fh.tiny_llama(), r=r, seed=seed)


def test_targets_are_the_projections() -> None:
    assert wl.lora_targets(fh.tiny_llama()) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    ]
    from gradaccum.demo import build_model

    assert sorted(wl.lora_targets(build_model(20, 16))) == ["c_attn", "c_fc", "c_proj"]


def test_only_adapters_train_and_base_is_bitwise_unchanged() -> None:
    model = lora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # every projection of every layer has its A and B
    assert len(trainable) == 2 * 7 * 2
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_curve(model, micro=4)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, adapters[n]) or "lora_A" in n, n  # B starts at 0 and moves
        else:
            assert torch.equal(p, base[n]), n


def test_micro_batch_size_changes_nothing_but_rounding() -> None:
    curves = {m: train_curve(lora_model(), micro=m) for m in (1, 4, 16)}
    for m in (1, 4):
        assert curves[m] == pytest.approx(curves[16], rel=REL), m


def test_same_seed_same_init_whatever_the_global_rng() -> None:
    torch.manual_seed(1)
    a = lora_model(seed=3)
    torch.manual_seed(2)
    torch.rand(100)
    state = torch.get_rng_state()
    b = lora_model(seed=3)
    assert torch.equal(torch.get_rng_state(), state), "apply_lora must leave the global RNG alone"
    c = lora_model(seed=4)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
    assert any(not torch.equal(pa[n], pc[n]) for n in pa if "lora_A" in n)


def test_alpha_defaults_to_twice_r() -> None:
    model = lora_model(r=4)
    cfg = model.peft_config["default"]
    assert cfg.r == 4 and cfg.lora_alpha == 8.0 and cfg.lora_dropout == 0.0
    assert wl.apply_lora(fh.tiny_llama(), r=4, alpha=4).peft_config["default"].lora_alpha == 4.0


def test_adapter_save_and_reload_gives_same_logits(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = make_llama_dir(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(src)
    model = wl.apply_lora(base, r=4, seed=0)
    # move the adapters away from B = 0 so the check is not trivially true
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    out = wl.save_model(model, None, tmp_path / "out" / "model")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src), out)
    ids = torch.tensor([[2, 5, 9, 11, 7, 3]])
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=0)
        plain = AutoModelForCausalLM.from_pretrained(src).eval()(input_ids=ids).logits
    assert not torch.allclose(plain, model(input_ids=ids).logits)


def test_save_model_full_directory_with_tokenizer_replaces_atomically(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = make_llama_dir(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    dest = tmp_path / "out" / "model"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("old run")
    wl.save_model(model, tok, dest)
    assert not (dest / "stale.txt").exists()
    assert (dest / "config.json").is_file() and (dest / "tokenizer.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(dest).state_dict().keys() == model.state_dict().keys()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model"]  # no temporaries left

    class Boom(RuntimeError):
        pass

    def fail(*a: object, **k: object) -> None:
        raise Boom("disk full")

    model.save_pretrained = fail  # type: ignore[method-assign]
    with pytest.raises(Boom):
        wl.save_model(model, tok, dest)
    assert (dest / "config.json").is_file()  # the previous directory is intact
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model"]


def test_checkpointing_gives_the_same_loss_curve() -> None:
    for make in (fh.tiny_llama, lora_model):
        plain = train_curve(make(), micro=4)
        ckpt_model = wl.enable_gradient_checkpointing(make())
        assert wl.gradient_checkpointing_enabled(ckpt_model)
        assert train_curve(ckpt_model, micro=4) == pytest.approx(plain, rel=REL)


def test_lora_on_the_demo_gpt2() -> None:
    from gradaccum.demo import build_model

    model = wl.apply_lora(build_model(20, 16), r=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, 20, (2, 10))
    model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("r", [0, -1, 2.5, True])
def test_bad_rank_is_one_line(r: object) -> None:
    with pytest.raises(WorkloadError, match=r"--lora-r .*must be an integer >= 1") as e:
        wl.apply_lora(fh.tiny_llama(), r=r)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


def test_bad_alpha_and_dropout() -> None:
    with pytest.raises(WorkloadError, match="--lora-alpha"):
        wl.apply_lora(fh.tiny_llama(), r=2, alpha=0)
    with pytest.raises(WorkloadError, match="dropout"):
        wl.apply_lora(fh.tiny_llama(), r=2, dropout=1.0)


def test_model_without_projections() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(4, 4))
    with pytest.raises(WorkloadError, match="no Linear projections"):
        wl.apply_lora(model, r=2)


def test_peft_missing_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(WorkloadError, match=r'pip install "gradaccum\[lora\]"'):
        wl.apply_lora(fh.tiny_llama(), r=2)


def test_checkpointing_unsupported_model() -> None:
    with pytest.raises(WorkloadError, match="--gradient-checkpointing"):
        wl.enable_gradient_checkpointing(torch.nn.Linear(2, 2))
