"""``gradaccum train|compare|check --model BERT --data pairs.jsonl``: an embedding model trained with
in-batch negatives over the whole effective batch (``step_cached``), against references written here."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import hf_fixtures as hx
import pytest
import torch
from _embedding_fixtures import make_bert_dir, make_pairs, write_jsonl
from test_cli_bad_input import assert_refused, run_in_process, tree_digest

from gradaccum.cli import main
from gradaccum.trainer import Trainer
from gradaccum.workloads import build_workload

VOLATILE = {"elapsed_s", "pairs_per_s", "examples_per_s"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embedding")
    return {
        "bert": make_bert_dir(root / "bert"),
        "bert_dropout": make_bert_dir(root / "bert_dropout", dropout=0.1),
        "train": write_jsonl(root / "train.jsonl", make_pairs(128, 0)),
        "eval": write_jsonl(root / "eval.jsonl", make_pairs(48, 1)),
        "triplets": write_jsonl(root / "triplets.jsonl", make_pairs(32, 2, negatives=True)),
        "root": root,
    }


def _embed(model: Any, tok: Any, texts: list[str]) -> torch.Tensor:
    """Mean pooling written out here (not the library's), in eval mode."""
    model.eval()
    feats = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"]).last_hidden_state
    mask = feats["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def _scores(model: Any, tok: Any, records: list[dict[str, str]]) -> tuple[float, float]:
    """(InfoNCE item mean over every record, recall@1 of positives), row by row."""
    a = torch.nn.functional.normalize(_embed(model, tok, [r["anchor"] for r in records]), dim=-1)
    p = torch.nn.functional.normalize(_embed(model, tok, [r["positive"] for r in records]), dim=-1)
    sims = a @ p.T
    loss = sum(float(torch.logsumexp(sims[i] / 0.05, 0) - sims[i, i] / 0.05) for i in range(len(records)))
    hits = sum(int(sims[i].argmax()) == i for i in range(len(records)))
    return loss / len(records), hits / len(records)


def _records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(files: dict[str, Path]) -> Path:
    out = files["root"] / "run"
    argv = ["train", "--model", str(files["bert"]), "--data", str(files["train"]), "--eval-data",
            str(files["eval"]), "--effective-batch", "32", "--micro-batch", "8", "--steps", "16",
            "--lr", "3e-3", "--eval-every", "8", "--out", str(out)]
    assert main(argv) == 0
    return out


def test_train_end_to_end(trained: Path, files: dict[str, Path]) -> None:
    from transformers import AutoModel, AutoTokenizer

    rows, summary = _rows(trained), json.loads((trained / "summary.json").read_text())
    assert len({tuple(r) for r in rows}) == 1 and "eval_recall_at_1" in rows[0]  # one schema
    assert [r["step"] for r in rows if r["eval_recall_at_1"] is not None] == [8, 16]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert rows[0]["micro_batch"] == 8 and rows[0]["accum_steps"] == 4 and rows[0]["num_items"] == 32
    tok = AutoTokenizer.from_pretrained(trained / "model")
    before = _scores(AutoModel.from_pretrained(files["bert"]), tok, _records(files["eval"]))
    model = AutoModel.from_pretrained(trained / "model")
    loss, recall = _scores(model, tok, _records(files["eval"]))
    assert rows[-1]["eval_recall_at_1"] == summary["final_eval_recall_at_1"]
    assert summary["final_eval_recall_at_1"] == pytest.approx(recall, abs=1e-9)
    assert rows[-1]["eval_loss"] == summary["final_eval_loss"] == pytest.approx(loss, rel=1e-4)
    assert recall > before[1] + 0.1 and loss < before[0]
    # OUT/model holds the checkpoint's weights
    state = torch.load(trained / "checkpoint.pt", weights_only=True)["model"]
    saved = model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in state)


@pytest.mark.slow
def test_sentence_transformers_loads_out_model(trained: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    texts = ["kaka lomi", "zemi quposa ruze"]
    st = SentenceTransformer(str(trained / "model"), device="cpu")
    got = torch.as_tensor(st.encode(texts))
    path = trained / "model"
    want = _embed(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), texts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a)
    den = sum(float(((b[k].double() - start[k].double()) ** 2).sum()) for k in a)
    return math.sqrt(num / den)


def test_first_step_is_the_full_batch_step(files: dict[str, Path], tmp_path: Path) -> None:
    """One step at micro-batch 4 (cached) and at micro-batch 16 (one window, the full batch) end in
    the same weights up to fp32 rounding."""
    outs = {}
    for micro in (4, 16):
        outs[micro] = tmp_path / f"m{micro}"
        assert main(["train", "--model", str(files["bert"]), "--data", str(files["train"]), "--steps", "1",
                     "--effective-batch", "16", "--micro-batch", str(micro), "--lr", "1e-3",
                     "--warmup-steps", "0",                     "--out", str(outs[micro])]) == 0
    from safetensors.torch import load_file

    start = {k: v for k, v in load_file(files["bert"] / "model.safetensors").items() if "pooler" not in k}
    a, b = _weights(outs[4]), _weights(outs[16])
    keys = [k for k in start if k in a]
    assert _rel({k: a[k] for k in keys}, {k: b[k] for k in keys}, start) < 1e-4


def _grad_step(files: dict[str, Path], micro: int, cached: bool, encode: Any = None
               ) -> dict[str, torch.Tensor]:
    """One SGD step (lr 1, no clipping) of the Trainer on the first 16 pairs: minus the gradient."""
    work = build_workload(str(files["bert"]), str(files["train"]), progress=False)
    start = {k: v.clone() for k, v in work.model.state_dict().items()}
    Trainer(model=work.model, dataset=work.dataset[:16], loss_fn=work.loss_fn, collate_fn=work.collate_fn,
            effective_batch=16, micro_batch=micro, steps=1, max_grad_norm=None, measure_noise=False,
            optimizer_factory=lambda p: torch.optim.SGD(p, lr=1.0), progress=False, handle_signals=False,
            encode=(encode or work.encode) if cached else None,
            window_loss=work.window_loss if cached else None).fit()
    return {k: start[k] - v for k, v in work.model.state_dict().items() if "pooler" not in k}


def test_out_of_memory_replays_the_cached_window(files: dict[str, Path], capsys: pytest.CaptureFixture[str]
                                                  ) -> None:
    """An OOM in step_cached's second pass at micro-batch 8: the window is discarded and replayed at 4,
    and the step is the one a run at micro-batch 4 takes."""
    from gradaccum.workloads.embedding import encode

    calls = {"n": 0}

    def failing(model: Any, micro: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # two micro-batches of 8 encoded without grad, then the first re-encode
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return encode(model, micro)

    got, want = _grad_step(files, 8, True, failing), _grad_step(files, 4, True)
    assert "out of memory with micro-batch 8; replaying step 1 with micro-batch 4" in capsys.readouterr().err
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_cached_gradient_is_the_full_batch_gradient_and_plain_is_not(files: dict[str, Path]) -> None:
    """The Trainer's gradient at micro-batch 4 through step_cached vs a full-batch loop written here;
    plain accumulation (the loss per micro-batch) is another objective."""
    from transformers import AutoModel, AutoTokenizer

    model, tok = AutoModel.from_pretrained(files["bert"]), AutoTokenizer.from_pretrained(files["bert"])
    model.train()
    recs = _records(files["train"])[:16]  # the Trainer's step holds all 16 (the order changes nothing)

    def embed(texts: list[str]) -> torch.Tensor:
        f = tok(texts, padding=True, return_tensors="pt")
        h = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).last_hidden_state
        m = f["attention_mask"].unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)

    a = torch.nn.functional.normalize(embed([r["anchor"] for r in recs]), dim=-1)
    p = torch.nn.functional.normalize(embed([r["positive"] for r in recs]), dim=-1)
    loss = torch.nn.functional.cross_entropy(a @ p.T / 0.05, torch.arange(16))
    loss.backward()
    want = {n: q.grad for n, q in model.named_parameters() if q.grad is not None}
    cached, plain = _grad_step(files, 4, True), _grad_step(files, 4, False)
    norm = math.sqrt(sum(float((g**2).sum()) for g in want.values()))

    def err(got: dict[str, torch.Tensor]) -> float:
        return math.sqrt(sum(float(((got[n] - g) ** 2).sum()) for n, g in want.items())) / norm

    assert err(cached) < 1e-4
    assert err(plain) > 0.05


def test_compare_full_cached_plain(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(files["bert"]), "--data", str(files["train"]), "--effective-batch",
                 "16", "--micro-batch", "4", "--steps", "2", "--lr", "1e-3", "--out", str(out)]) == 0
    res = json.loads((out / "compare.json").read_text())
    assert list(res["contenders"]) == ["full", "cached", "plain"] and res["reference"] == "full"
    for c in res["contenders"].values():
        assert {"loss", "examples_seen", "final_loss", "seconds", "peak_bytes", "param_rel_diff_vs_full"} \
            <= set(c)
    assert res["contenders"]["cached"]["param_rel_diff_vs_full"] < 1e-4
    assert res["contenders"]["plain"]["param_rel_diff_vs_full"] > 1e-2


def test_check_reports_non_additive_loss(files: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    r = run_in_process(["check", "--model", str(files["bert"]), "--data", str(files["train"])], capfd)
    assert r.returncode == 1
    assert "non-additive-loss" in r.stdout and "step_cached" in r.stdout


def test_triplets_train_and_evaluate(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "trip"
    assert main(["train", "--model", str(files["bert"]), "--data", str(files["triplets"]), "--eval-data",
                 str(files["triplets"]), "--effective-batch", "8", "--micro-batch", "2", "--steps", "2",
                 "--out", str(out)]) == 0
    rows = _rows(out)
    assert rows[-1]["eval_recall_at_1"] is not None and math.isfinite(rows[-1]["eval_loss"])


def test_sigterm_then_resume_continues_exactly(files: dict[str, Path], tmp_path: Path) -> None:
    """Dropout on: the resumed run replays the same masks (RNG state in the checkpoint)."""
    argv = ["train", "--model", str(files["bert_dropout"]), "--data", str(files["train"]), "--eval-data",
            str(files["eval"]), "--effective-batch", "16", "--micro-batch", "4", "--steps", "5",
            "--lr", "1e-3", "--eval-every", "2"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*argv, "--out", str(whole)]) == 0

    def stop(row: dict[str, Any]) -> None:
        if row["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    assert main([*argv, "--out", str(cut)], trainer_options={"on_step": stop}) == 128 + signal.SIGTERM
    assert main([*argv, "--out", str(cut), "--resume"]) == 0
    want, got = _weights(whole), _weights(cut)
    assert all(torch.equal(want[k], got[k]) for k in want)
    strip = [[{k: v for k, v in r.items() if k not in VOLATILE} for r in _rows(o)] for o in (whole, cut)]
    assert strip[0] == strip[1]


def _bad_cases(files: dict[str, Path], tmp: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    tmp.mkdir()

    def jsonl(name: str, records: list[Any]) -> str:
        return str(write_jsonl(tmp / name, records))

    pair = {"anchor": "kaka lomi", "positive": "lomi kaka"}
    base = ["--model", str(files["bert"])]
    data = ["--data", str(files["train"])]
    return {
        "mixed": ([*base, "--data", jsonl("m.jsonl", [pair, {"text": "hello"}])], ("line 2", "'text'")),
        "no-positive": ([*base, "--data", jsonl("p.jsonl", [pair, {"anchor": "x"}])],
                        ("line 2", "'positive'")),
        "empty": ([*base, "--data", jsonl("e.jsonl", [pair, {"anchor": "", "positive": "y"}])],
                  ("line 2", "empty")),
        "negative-some": ([*base, "--data", jsonl("n.jsonl", [{**pair, "negative": "z"}, pair])],
                          ("line 2", "'negative'")),
        "one-record": ([*base, "--data", jsonl("o.jsonl", [pair])], ("--data", "at least 2")),
        "packing": ([*base, *data, "--packing"], ("--packing",)),
        "loss-per": ([*base, *data, "--loss-per", "sequence"], ("--loss-per sequence",)),
        "lora": ([*base, *data, "--lora-r", "4"], ("--lora-r",)),
        "auto-batch": ([*base, *data, "--effective-batch", "auto"], ("--effective-batch auto",)),
        "memory-budget": ([*base, *data, "--memory-budget", "1GiB"], ("--memory-budget",)),
        "demo": ([*data], ("--data", "--model DIR")),
        "eval-not-pairs": ([*base, *data, "--eval-data", jsonl("t.jsonl", [{"text": "a"}])],
                           ("--eval-data", "not anchor/positive")),
        "not-encoder": (["--model", str(files["llama"]), *data], ("--model", "not an encoder")),
    }


def test_bad_input_exits_2_touching_nothing(files: dict[str, Path], tmp_path: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    files = {**files, "llama": hx.make_llama_dir(tmp_path / "llama")}
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    before = tree_digest(tmp_path)
    for name, (argv, words) in _bad_cases(files, tmp_path / "data").items():
        before = tree_digest(tmp_path)
        r = run_in_process(["train", *argv, "--out", str(out / "run")], capfd)
        assert_refused(r, "train", words)
        assert tree_digest(tmp_path) == before, name
    r = run_in_process(["plan", "--model", str(files["bert"]), "--data", str(files["train"])], capfd)
    assert_refused(r, "plan", ("plan", "pairs"))


@pytest.mark.slow
def test_two_ranks_gather_the_negatives(files: dict[str, Path], tmp_path: Path) -> None:
    """torchrun, 2 gloo ranks of 8 pairs each (micro-batch 4): every anchor still sees all 16
    positives, so the step is the one-process full-batch step."""
    import _dist_helpers as dh

    args = ["train", "--model", str(files["bert"]), "--data", str(files["train"]), "--steps", "1",
            "--effective-batch", "16", "--lr", "1e-3", "--warmup-steps", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--micro-batch", "16", "--out", str(one)]) == 0
    procs = dh.launch_ranks(["-m", "gradaccum", *args, "--micro-batch", "4", "--out", str(two)], timeout=240)
    assert all(p.rc == 0 for p in procs), [p.err[-2000:] for p in procs]
    from safetensors.torch import load_file

    start = {k: v for k, v in load_file(files["bert"] / "model.safetensors").items() if "pooler" not in k}
    a, b = _weights(two), _weights(one)
    assert _rel({k: a[k] for k in start}, {k: b[k] for k in start}, start) < 1e-4
