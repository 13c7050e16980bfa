"""FSDP2 for HF causal LMs (workloads.fsdp): 2 gloo ranks vs one process, full model and LoRA.

The ranks run ``tests/_fsdp_helpers.py train`` (shard_fsdp2 + Accumulator, then a full
state dict gathered to rank 0 and saved with save_model); the checks here compare
with a single-process run over the same micro-batches, built from the same helpers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _dist_helpers as dh
import _fsdp_helpers as fh
import pytest
import torch
import torch.distributed as dist

from gradaccum.workloads.errors import WorkloadError

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)
REL = 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("fsdp_llama")
    procs = dh.launch_ranks([str(dh.HERE / "_fsdp_helpers.py"), "train", str(out)], timeout=120.0)
    assert all(p.rc == 0 for p in procs), dh.describe(procs)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(fh.WORLD)]


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[list[float], torch.nn.Module]]:
    return {v: fh.single_process(v) for v in ("full", "lora")}


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_sharded_training_equals_single_process(run: Any, reference: Any, variant: str) -> None:
    _, records = run
    want, _ = reference[variant]
    for r, rec in enumerate(records):
        got = [entry["loss"] for entry in rec[variant]["log"]]
        assert got == pytest.approx(want, rel=REL), (variant, r)


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_one_reduce_scatter_round_per_window(run: Any, variant: str) -> None:
    _, records = run
    for rec in records:
        plain = rec[variant]["plain_backward_comms"]
        # one reduce-scatter per FSDP2 group with trainable parameters: two layers and the
        # root (embeddings, final norm, head), which has none under LoRA
        assert plain == (3 if variant == "full" else 2)
        for entry in rec[variant]["log"]:
            assert entry["during"] == [0] * (fh.ACCUM - 1), "gradient traffic before the last micro-batch"
            assert entry["comms"] == plain


def test_gathered_state_dict_matches_single_process(run: Any, reference: Any) -> None:
    _, records = run
    _, model = reference["full"]
    gathered = records[0]["full"]["state_dict"]
    own = model.state_dict()
    assert set(gathered) == set(own)
    for k, v in own.items():
        torch.testing.assert_close(gathered[k], v, rtol=1e-4, atol=5e-5)  # AdamW: rounding-level
    assert records[1]["full"]["state_dict"] is None


def test_saved_directories_reload(run: Any, reference: Any) -> None:
    """OUT/model from a sharded run: a normal save_pretrained directory, or the adapter."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    out, _ = run
    mb = fh.batch(3, seed=5)
    full = LlamaForCausalLM.from_pretrained(out / "model_full")
    lora = PeftModel.from_pretrained(fh.tiny_llama(), out / "model_lora")
    for loaded, variant in ((full, "full"), (lora, "lora")):
        _, model = reference[variant]
        loaded.eval()
        model.eval()
        with torch.no_grad():
            a = loaded(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
            b = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_shard_without_process_group_is_one_line_error() -> None:
    from gradaccum.workloads.fsdp import shard_fsdp2

    with pytest.raises(WorkloadError, match="torchrun"):
        shard_fsdp2(fh.tiny_llama())


def test_full_state_dict_without_fsdp_is_the_plain_one() -> None:
    from gradaccum.workloads.fsdp import full_state_dict, load_full_state_dict

    model = fh.tiny_llama()
    sd = full_state_dict(model)
    other = fh.tiny_llama(seed=1)
    load_full_state_dict(other, sd)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
