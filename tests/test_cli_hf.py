"""gradaccum train --model DIR --data FILE: a tiny Llama fine-tuned through the CLI.

The model and its word-level tokenizer are built in the test (tests/hf_fixtures.py),
so token counts are word counts and every loss mask can be predicted exactly.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import hf_fixtures as hx
import pytest
import torch

from gradaccum.cli import main
from gradaccum.schedules import warmup_cosine
from gradaccum.trainer import stream_indices

PROMPT_WORDS, COMPLETION_WORDS = 2, 3


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(hx.WORDS) for _ in range(n))


def _prompt_completion(n: int, seed: int = 0, fixed: bool = True) -> list[dict[str, str]]:
    rng = random.Random(seed)
    # TRL joins prompt and completion as they are: the completion carries its leading space.
    return [{"prompt": _words(rng, PROMPT_WORDS if fixed else rng.randint(1, 5)),
             "completion": " " + _words(rng, COMPLETION_WORDS if fixed else rng.randint(1, 9))}
            for _ in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hf")
    rng = random.Random(1)
    return {
        "llama": hx.make_llama_dir(d / "llama"),
        "no_template": hx.make_llama_dir(d / "no_template", chat_template=None),
        "pc": hx.write_jsonl(d / "pc.jsonl", _prompt_completion(64)),
        "pc_var": hx.write_jsonl(d / "pc_var.jsonl", _prompt_completion(64, seed=2, fixed=False)),
        "eval": hx.write_jsonl(d / "eval.jsonl", _prompt_completion(12, seed=3, fixed=False)),
        "text": hx.write_jsonl(d / "text.jsonl",
                               [{"text": _words(rng, rng.randint(2, 10))} for _ in range(40)]),
        "messages": hx.write_jsonl(d / "messages.jsonl", [
            {"messages": [{"role": "user", "content": _words(rng, 3)},
                          {"role": "assistant", "content": _words(rng, rng.randint(1, 4))}]}
            for _ in range(40)]),
    }


def _train(out: Path, model: Path, data: Path, *extra: str, steps: int = 3, effective: int = 8,
           micro: int = 2) -> int:
    return main(["train", "--model", str(model), "--data", str(data), "--steps", str(steps),
                 "--effective-batch", str(effective), "--micro-batch", str(micro), "--out", str(out), *extra])


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_prompt_completion_counts_exactly_the_completion_and_eos(files: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    assert _train(tmp_path / "run", files["llama"], files["pc"]) == 0
    rows = _rows(tmp_path / "run")
    assert len(rows) == 3
    # <s> p1 p2 c1 c2 c3 </s>: the loss covers c1 c2 c3 </s>, all predicted after the shift.
    assert all(r["num_items"] == 8 * (COMPLETION_WORDS + 1) for r in rows)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_loss"] < summary["first_loss"] + 1.0
    assert (tmp_path / "run" / "model" / "config.json").is_file()


@pytest.mark.parametrize("fmt", ["text", "messages"])
def test_other_formats_train_end_to_end(files: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    assert _train(tmp_path / "run", files["llama"], files[fmt], steps=2) == 0
    rows = _rows(tmp_path / "run")
    assert len(rows) == 2 and all(r["num_items"] > 0 and r["loss"] == r["loss"] for r in rows)


def test_micro_batch_changes_nothing_but_rounding(files: dict[str, Path], tmp_path: Path) -> None:
    curves = {}
    for micro in (1, 4, 16):
        out = tmp_path / f"m{micro}"
        assert _train(out, files["llama"], files["pc_var"], "--no-noise-scale", steps=4, effective=16,
                      micro=micro) == 0
        curves[micro] = [r["loss"] for r in _rows(out)]
    for micro in (1, 16):
        for a, b in zip(curves[micro], curves[4], strict=True):
            assert a == pytest.approx(b, rel=1e-5)


def test_cli_equals_a_plain_full_batch_loop(files: dict[str, Path], tmp_path: Path) -> None:
    """The CLI's weights after 3 steps against a loop written here: whole effective batch,
    token-mean loss with the causal shift, one backward, clip 1.0, AdamW, same schedule.

    Tolerances, from float32 rounding: the CLI sums 4 micro-batches of 4 sequences (each padded
    to its own length) where the loop takes one batch of 16, so every gradient element differs
    by summation order. Over the n <= 16 x 32 token terms of a gradient element that is at most
    about n * 2**-24 ~ 3e-5 of the largest element; we allow RHO = 1e-4. The loss is a mean over
    those tokens: the same bound, so rel 1e-5 on it leaves a 3x margin over n * u. AdamW then
    divides each element by its own running magnitude, so an element whose gradient is within
    rounding of zero can move by up to 2 lr per step whatever the arithmetic (that is why the
    weights cannot be compared as a whole). Elements whose gradient stays at least KAPPA = 1e-2 of
    the largest at every step are rounding-stable: their update changes by at most about
    2 lr RHO / KAPPA = 0.02 lr per step, 0.06 lr over three steps; a wrong batch, order, or token
    count moves them by the order of lr itself.
    """
    from transformers import AutoModelForCausalLM

    from gradaccum.workloads import build_workload

    rho, kappa, lr = 1e-4, 1e-2, 0.01
    out = tmp_path / "run"
    assert _train(out, files["llama"], files["pc_var"], "--lr", str(lr), steps=3, effective=16, micro=4) == 0
    work = build_workload(str(files["llama"]), str(files["pc_var"]), progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(files["llama"]))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = warmup_cosine(opt, 3)
    stable = {k: torch.ones_like(p, dtype=torch.bool) for k, p in model.named_parameters()}
    for step in range(3):
        order = stream_indices(len(work.dataset), 0, 16 * step, 16)
        batch = work.collate_fn([work.dataset[i] for i in order])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        largest = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
        for k, p in model.named_parameters():
            stable[k] &= p.grad.abs() >= kappa * largest
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        assert _rows(out)[step]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    ref = dict(model.named_parameters())
    worst = max(float((saved[k] - ref[k].detach())[stable[k]].abs().amax())
                for k in stable if stable[k].any())
    assert sum(int(m.sum()) for m in stable.values()) > 1000  # the check covers real elements
    assert worst <= 3 * 2 * lr * rho / kappa
    # Every element, stable or not: AdamW moves none by more than about lr per step.
    assert max(float((saved[k] - ref[k].detach()).abs().max()) for k in stable) <= 3 * 2 * lr


def test_out_model_reloads_with_the_checkpoints_weights(files: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert _train(out, files["llama"], files["pc"], steps=2) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    AutoTokenizer.from_pretrained(str(out / "model"))
    ref = AutoModelForCausalLM.from_pretrained(str(files["llama"]))
    ref.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, ref.eval()(ids).logits)
    assert main(["generate", "--model", str(out / "model"), "--prompt", "the cat",
                 "--max-new-tokens", "3"]) == 0


def test_eval_loss_is_the_exact_held_out_mean(files: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from gradaccum.workloads import build_workload

    out = tmp_path / "run"
    assert _train(out, files["llama"], files["pc"], "--eval-data", str(files["eval"]), "--eval-every", "2",
                  steps=3) == 0
    rows = _rows(out)
    assert [r["eval_loss"] is not None for r in rows] == [False, True, True]  # every 2 steps and at the end
    work = build_workload(str(files["llama"]), str(files["pc"]), str(files["eval"]), progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    total = items = 0.0
    with torch.no_grad():
        for ex in work.eval_dataset:
            loss, n = work.loss_fn(model, work.collate_fn([ex]))
            total, items = total + loss.item(), items + float(n)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_eval_loss"] == pytest.approx(total / items, rel=1e-5)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["no-dir", "no-config", "no-data", "bad-line", "unknown-fields",
                                  "no-template", "fp16-on-cpu", "not-causal"])
def test_bad_input_exits_2_with_one_line(files: dict[str, Path], tmp_path: Path, capsys: Any,
                                         case: str) -> None:
    out = tmp_path / "run"
    assert _train(out, files["llama"], files["pc"], steps=1) == 0
    before = _digest(out)
    capsys.readouterr()
    model, data, extra = files["llama"], files["pc"], []
    if case == "no-dir":
        model = tmp_path / "nowhere"
    elif case == "no-config":
        model = tmp_path / "empty"
        model.mkdir()
    elif case == "no-data":
        data = None
    elif case == "bad-line":
        data = tmp_path / "bad.jsonl"
        data.write_text('{"text": "the cat"}\n{"text": "the dog"\n')
    elif case == "unknown-fields":
        data = hx.write_jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}])
    elif case == "no-template":
        model, data = files["no_template"], files["messages"]
    elif case == "fp16-on-cpu":
        extra = ["--precision", "fp16"]
    else:
        from transformers import BertConfig

        model = tmp_path / "bert"
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=32).save_pretrained(model)
        hx.make_tokenizer().save_pretrained(model)
    argv = ["train", "--model", str(model), "--steps", "1", "--out", str(out), "--overwrite", *extra]
    if data is not None:
        argv += ["--data", str(data)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert _digest(out) == before


def test_compare_and_check_on_a_users_model(files: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(files["llama"]), "--data", str(files["pc_var"]),
                 "--effective-batch", "8", "--micro-batch", "2", "--steps", "2", "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["reference"] == "full"
    assert result["contenders"]["accumulated"]["max_rel_deviation"] < 1e-5
    assert result["contenders"]["mean-of-means"]["max_rel_deviation"] > 1e-6
    capsys.readouterr()
    assert main(["check", "--model", str(files["llama"]), "--data", str(files["pc_var"])]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("OK")
