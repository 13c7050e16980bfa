"""workloads/: the demo kept bit for bit, data formats and their loss masks counted exactly,
every bad input a one-line WorkloadError naming file and line, HF model directories,
and an accumulated gradient that equals a float64 full-batch reference written here."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradaccum import demo
from gradaccum.demo.task import EOS, IGNORE, TASK_TOKENIZER
from gradaccum.workloads import Workload, WorkloadError, build_workload, hf
from gradaccum.workloads import demo as demo_workload
from gradaccum.workloads.data import Collator, count_items

from hf_fixtures import make_llama_dir, write_jsonl  # isort: skip

# -------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama_dir(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("hf-datasets-cache"))


@pytest.fixture(scope="module")
def tok(llama_dir: Path) -> Any:
    return hf.load_tokenizer(llama_dir)


def build(llama_dir: Path, cache_dir: str, data: Path, **kw: Any) -> Workload:
    return build_workload(str(llama_dir), str(data), cache_dir=cache_dir, progress=False, **kw)


def words(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------- demo


def test_demo_task_is_the_workload_train_always_built() -> None:
    w = build_workload("demo", seed=3, eval_size=200)
    assert w.extra_state == {"task": "demo", "vocab": "".join(TASK_TOKENIZER.alphabet), "max_len": 24}
    assert w.dataset == demo.make_examples(20_000, 3)
    assert state_equal(w.model, demo.build_model(TASK_TOKENIZER.vocab_size, demo.TASK_MAX_LEN, seed=3))
    assert (w.fingerprint, w.kind, w.loss_fn, w.collate_fn) == ("demo", "demo", demo.loss_fn, demo.collate)
    assert w.mean_items == pytest.approx(sum(count_items(lab) for _, lab in w.dataset) / 20_000)


def test_demo_heldout_set_is_unseen_and_encoded_like_training() -> None:
    w = build_workload("demo", seed=1, task_size=2_000, eval_size=300)
    train_prompts = {demo_workload.prompt_of(ex) for ex in w.dataset}
    assert w.accuracy_fn is not None and w.eval_dataset is not None and len(w.eval_dataset) == 300
    puzzles = w.accuracy_fn.keywords["puzzles"]  # type: ignore[attr-defined]
    assert len({p.prompt for p in puzzles}) == 300 and not train_prompts & {p.prompt for p in puzzles}
    assert {p.kind for p in puzzles} == {"reversal", "addition"}
    for p, (ids, labels) in zip(puzzles, w.eval_dataset, strict=True):
        assert TASK_TOKENIZER.decode(ids) == p.prompt + p.answer
        assert [x for x in labels if x != IGNORE] == TASK_TOKENIZER.encode(p.answer) + [EOS]
    again = build_workload("demo", seed=1, task_size=2_000, eval_size=300)
    assert again.eval_dataset == w.eval_dataset  # a pure function of the seed


class Out(dict):  # the two fields puzzle_accuracy reads from a model output
    @property
    def logits(self) -> torch.Tensor:
        return self["logits"]


class Oracle(nn.Module):
    """Knows every answer (KV cache = the ids so far); answers nothing for ``wrong_kind``."""

    def __init__(self, wrong_kind: str | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.wrong_kind = wrong_kind

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, cache: Any = None) -> Out:
        full = input_ids if cache is None else torch.cat([cache, input_ids], dim=1)
        logits = torch.zeros(full.shape[0], input_ids.shape[1], TASK_TOKENIZER.vocab_size)
        for r, row in enumerate(full.tolist()):
            text = TASK_TOKENIZER.decode(row)
            cut = max(text.find(":"), text.find("=")) + 1
            prompt, so_far = text[:cut], text[cut:]
            answer = prompt[1:-1][::-1] if prompt.startswith("<") else str(eval(prompt[:-1]))
            if demo_workload.puzzle_kind(prompt) == self.wrong_kind or len(so_far) >= len(answer):
                nxt = EOS
            else:
                nxt = TASK_TOKENIZER.encode(answer[len(so_far)])[0]
            logits[r, -1, nxt] = 1.0
        return Out(logits=logits, cache=full)


def test_puzzle_accuracy_is_exact_match_per_kind_under_greedy_decoding() -> None:
    w = build_workload("demo", seed=0, task_size=500, eval_size=120)
    assert w.accuracy_fn is not None
    assert w.accuracy_fn(Oracle()) == {"reversal": 1.0, "addition": 1.0}
    assert w.accuracy_fn(Oracle(wrong_kind="addition")) == {"reversal": 1.0, "addition": 0.0}
    scores = w.accuracy_fn(w.model)  # the real GPT-2 runs through it (untrained: ~0) and stays in train mode
    assert set(scores) == {"reversal", "addition"} and w.model.training


def test_demo_text_file_is_the_workload_train_always_built(tmp_path: Path) -> None:
    f = tmp_path / "lines.txt"
    f.write_text("hello there\n\n  \nab\r\n" + "x" * 200 + "\nlast line\n")
    w = build_workload("demo", str(f), seed=2)
    examples, tok = demo.load_text_examples(f)
    assert w.dataset == examples and w.truncated == 1 and w.eval_dataset is None and w.accuracy_fn is None
    assert w.extra_state == {"task": "text", "vocab": "".join(tok.alphabet), "max_len": 128}
    assert w.fingerprint == "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
    assert state_equal(w.model, demo.build_model(tok.vocab_size, 128, seed=2))
    short = build_workload("demo", str(f), max_length=10)
    assert short.truncated == 3 and max(len(ids) for ids, _ in short.dataset) == 10  # 8 characters + BOS/EOS


def test_demo_jsonl_is_character_level_on_the_text_not_the_json(tmp_path: Path) -> None:
    rows = [{"prompt": "ab+c=", "completion": "abc"}, {"prompt": "x", "completion": "yz!"}]
    f = write_jsonl(tmp_path / "pc.jsonl", rows)
    w = build_workload("demo", str(f), cache_dir=str(tmp_path / "cache"), progress=False)
    assert w.tokenizer.alphabet == sorted(set("ab+c=abcxyz!"))  # no '{', '"' or ':' from the JSON
    assert [count_items(lab) for _, lab in w.dataset] == [4, 4]  # completion + EOS
    assert w.extra_state["task"] == "jsonl" and w.extra_state["format"] == "prompt-completion"
    ev_rows = [{"prompt": "ab", "completion": "c"}, {"prompt": "a", "completion": "Q"}]
    ev = write_jsonl(tmp_path / "ev.jsonl", ev_rows)
    with pytest.raises(WorkloadError, match=r"--eval-data .*ev\.jsonl line 2: character 'Q'"):
        build_workload("demo", str(f), str(ev), cache_dir=str(tmp_path / "cache"), progress=False)


# ------------------------------------------------------------- formats and masks (HF)


def test_text_records_put_every_token_and_eos_in_the_loss(
    llama_dir: Path, cache_dir: str, tok: Any, tmp_path: Path
) -> None:
    texts = ["the cat sat on the mat", "hello world", "one two three four five six seven"]
    w = build(llama_dir, cache_dir, write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts]))
    assert w.format == "text" and w.kind == "hf" and w.truncated == 0
    for (ids, labels), t in zip(w.dataset, texts, strict=True):
        assert ids == [tok.bos_token_id, *words(tok, t), tok.eos_token_id] and labels == ids
    _, n = w.loss_fn(w.model, w.collate_fn(list(w.dataset)))
    assert int(n) == sum(len(t.split()) + 1 for t in texts)  # BOS is never predicted; EOS is


def test_prompt_completion_counts_only_completion_and_eos(
    llama_dir: Path, cache_dir: str, tok: Any, tmp_path: Path
) -> None:
    rows = [
        {"prompt": "the cat sat on", "completion": " the red mat"},
        {"prompt": "what color is it", "completion": " blue and red"},
    ] * 5
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    evalf = write_jsonl(tmp_path / "ev.jsonl", rows[:3])
    w = build(llama_dir, cache_dir, data, eval_data=str(evalf))
    for ids, labels in w.dataset:
        assert labels[:5] == [IGNORE] * 5 and labels[5:] == ids[5:]  # BOS + 4 prompt words masked
    _, n = w.loss_fn(w.model, w.collate_fn(list(w.dataset)))
    assert int(n) == 10 * (3 + 1) and w.mean_items == 4.0
    assert w.eval_dataset is not None and len(w.eval_dataset) == 3
    assert w.extra_state == {
        "task": "hf",
        "model": str(llama_dir.resolve()),
        "model_config": "sha256:" + hashlib.sha256((llama_dir / "config.json").read_bytes()).hexdigest(),
        "data": "sha256:" + hashlib.sha256(data.read_bytes()).hexdigest(),
        "format": "prompt-completion",
        "max_length": 64,
        "dtype": "fp32",
    }


def test_messages_put_only_assistant_turns_and_their_end_of_turn_in_the_loss(
    llama_dir: Path, cache_dir: str, tok: Any, tmp_path: Path
) -> None:
    convs = [
        [
            {"role": "system", "content": "say yes"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello world"},
            {"role": "user", "content": "say again please"},
            {"role": "assistant", "content": "yes yes"},
        ],
        [{"role": "user", "content": "what color is the cat"}, {"role": "assistant", "content": "red"}],
    ]
    w = build(llama_dir, cache_dir, write_jsonl(tmp_path / "m.jsonl", [{"messages": c} for c in convs]))
    end = tok.convert_tokens_to_ids("<|end|>")
    for (_, labels), conv in zip(w.dataset, convs, strict=True):
        counted = [x for x in labels if x != IGNORE]
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        expected = [t for r in replies for t in [*words(tok, r), end]]
        assert counted == expected
        assert tok.decode(counted) == " ".join(f"{r} <|end|>" for r in replies)
        assert count_items(labels) == len(expected)
    # the template's rendering is what the model sees
    assert w.dataset[1][0] == words(tok, tok.apply_chat_template(convs[1], tokenize=False))


def test_txt_file_for_a_model_is_one_example_per_non_empty_line(
    llama_dir: Path, cache_dir: str, tok: Any, tmp_path: Path
) -> None:
    f = tmp_path / "d.txt"
    f.write_text("the cat\n\n   \nhello world again\n")
    w = build(llama_dir, cache_dir, f)
    assert [ids for ids, _ in w.dataset] == [
        [tok.bos_token_id, *words(tok, t), tok.eos_token_id] for t in ("the cat", "hello world again")
    ]


def test_max_length_truncates_and_counts(llama_dir: Path, cache_dir: str, tmp_path: Path) -> None:
    texts = ["one two", "one two three four five", "one two three four five six seven eight"]
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    w = build(llama_dir, cache_dir, f, max_length=6)  # BOS + words + EOS: 4, 7, 10 tokens
    assert w.truncated == 2 and [len(ids) for ids, _ in w.dataset] == [4, 6, 6]
    assert w.extra_state["max_length"] == 6
    with pytest.raises(WorkloadError, match="--max-length 65: longer than the model's context"):
        build(llama_dir, cache_dir, f, max_length=65)
    with pytest.raises(WorkloadError, match="--max-length 2"):
        build(llama_dir, cache_dir, f, max_length=2)


def test_json_array_file_and_memory_mapped_examples(llama_dir: Path, cache_dir: str, tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"text": "the cat"}, {"text": "a dog"}, {"text": "hello"}], indent=1))
    w = build(llama_dir, cache_dir, f)
    assert len(w.dataset) == 3 and w.dataset[-1] == w.dataset[2]
    assert w.dataset[0:2] == [w.dataset[0], w.dataset[1]]
    with pytest.raises(IndexError):
        w.dataset[3]


def test_collate_pads_each_micro_batch_on_the_right() -> None:
    b = Collator(pad_id=7)([([1, 2, 3], [IGNORE, 2, 3]), ([4], [4])])
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert b["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ------------------------------------------------------------------------ bad inputs

BAD_FILES = [
    ("d.jsonl", '{"text": "a"}\n{"text": "b"\n', "line 2: malformed JSON"),
    ("d.jsonl", '{"text": "a"}\n\n{"foo": 1}\n', "line 3: a record with none of the fields"),
    ("d.jsonl", '{"foo": 1}\n', "line 1: a record with none of the fields"),
    ("d.jsonl", '{"text": "a"}\n{"text": 5}\n', "line 2: 'text' is missing or not a string"),
    ("d.jsonl", '{"text": "a"}\n\n{"text": 5}\n', "line 3: 'text' is missing or not a string"),
    ("d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n', "line 2: 'completion' is missing"),
    ("d.jsonl", '{"messages": [{"role": "user"}]}\n', "line 1: messages[0] needs string 'role'"),
    ("d.jsonl", '{"text": "a"}\n[1, 2]\n', "line 2: not a JSON object"),
    ("d.json", '[{"text": "a"},\n 3]', "record 2: not a JSON object"),
    ("d.json", '[{"text": "a"}, {"text": null}]', "record 2: a record with none of the fields"),
    ("d.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', "line 2: not UTF-8"),
    ("d.jsonl", "", "empty file"),
    ("d.jsonl", "\n  \n", "empty file"),
    ("d.csv", "text\na\n", "unknown extension"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_FILES)
def test_bad_data_is_one_line_naming_file_and_line(
    llama_dir: Path, cache_dir: str, tmp_path: Path, name: str, content: str | bytes, message: str
) -> None:
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(WorkloadError) as e:
        build(llama_dir, cache_dir, f)
    assert str(e.value).startswith(f"--data {f}") and message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WorkloadError, match=f"--eval-data {f}"):  # the same checks for held-out data
        build(llama_dir, cache_dir, write_jsonl(tmp_path / "ok.jsonl", [{"text": "a"}]), eval_data=str(f))


def test_messages_need_a_chat_template(llama_dir: Path, cache_dir: str, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(llama_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    f = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(WorkloadError, match=r"m\.jsonl line 1: 'messages' records need a chat template"):
        build(plain, cache_dir, f)


def test_missing_file_and_missing_data(llama_dir: Path, cache_dir: str, tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match=r"--data .*nope\.jsonl: no such file"):
        build(llama_dir, cache_dir, tmp_path / "nope.jsonl")
    with pytest.raises(WorkloadError, match="--data: required with --model"):
        build_workload(str(llama_dir), None)
    with pytest.raises(WorkloadError, match="--eval-data"):
        build_workload("demo", None, str(tmp_path / "x.txt"))


def _copy_without(src: Path, dst: Path, *names: str) -> Path:
    shutil.copytree(src, dst, ignore=lambda _d, files: [f for f in files if f in names])
    return dst


def test_unusable_model_directories(llama_dir: Path, cache_dir: str, tmp_path: Path) -> None:
    from transformers import BertConfig

    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat"}])
    no_config = _copy_without(llama_dir, tmp_path / "no-config", "config.json")
    no_tok = _copy_without(llama_dir, tmp_path / "no-tok", "tokenizer.json", "tokenizer_config.json")
    bert = _copy_without(llama_dir, tmp_path / "bert", "config.json", "model.safetensors")
    BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        bert
    )
    no_weights = _copy_without(llama_dir, tmp_path / "no-weights", "model.safetensors")
    cases = [
        (tmp_path / "absent", "no such directory"),
        (data, "not a directory"),
        (no_config, "no config.json"),
        (no_tok, "no tokenizer files"),
        (bert, "not a causal language model (bert"),
        (no_weights, "cannot load the model"),
    ]
    for path, message in cases:
        with pytest.raises(WorkloadError) as e:
            build(path, cache_dir, data)
        assert str(e.value).startswith(f"--model {path}:") and message in str(e.value), str(e.value)
        assert "\n" not in str(e.value)


def test_model_loads_in_the_asked_dtype_and_from_config_alone(
    llama_dir: Path, cache_dir: str, tmp_path: Path
) -> None:
    from transformers import LlamaForCausalLM

    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat"}])
    w = build(llama_dir, cache_dir, data)
    assert isinstance(w.model, LlamaForCausalLM) and w.model.training and w.grad_dtype is None
    assert {p.dtype for p in w.model.parameters()} == {torch.float32}
    low = build(llama_dir, cache_dir, data, dtype="bf16")
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}
    assert low.grad_dtype == torch.float32 and low.extra_state["dtype"] == "bf16"
    config_only = _copy_without(llama_dir, tmp_path / "cfg", "model.safetensors", "tokenizer.json")
    meta = hf.load_config_only(config_only)
    shapes = {n: p.shape for n, p in w.model.named_parameters()}
    assert {n: p.shape for n, p in meta.named_parameters()} == shapes
    assert {p.device.type for p in meta.parameters()} == {"meta"}


# ------------------------------------------------------------------------ exactness


def float64_rms_norm(model: nn.Module) -> nn.Module:
    """Llama's RMSNorm computes in float32 even in a float64 model, so its backward rounds the
    gradient to float32 (a ~1e-7 difference between dividing the loss by the token count
    before or after backward). Make it honour the input dtype, so float64 is float64 throughout."""

    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms
    for m in norms:
        m.forward = types.MethodType(forward, m)
    return model


def test_accumulated_gradient_equals_full_batch_float64_reference(
    llama_dir: Path, cache_dir: str, tmp_path: Path
) -> None:
    import gradaccum as ga

    rows = [
        {"prompt": "the cat", "completion": " sat"},
        {"prompt": "what color is the big dog", "completion": " red and blue and red"},
        {"prompt": "hello", "completion": " world one two three four five six"},
        {"prompt": "one two three four five six seven", "completion": " eight"},
        {"prompt": "say", "completion": " yes please thanks"},
        {"prompt": "a small red cat sat on the mat", "completion": " no"},
        {"prompt": "is it", "completion": " ten nine eight seven"},
    ]
    w = build(llama_dir, cache_dir, write_jsonl(tmp_path / "pc.jsonl", rows))
    model = float64_rms_norm(w.model.double())
    reference = copy.deepcopy(model)
    examples = list(w.dataset)

    # The reference: one full batch, the token-mean loss written out in float64 here.
    full = w.collate_fn(examples)
    logits = reference(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits
    targets, logp = full["labels"][:, 1:], torch.log_softmax(logits[:, :-1].double(), dim=-1)
    counted = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = -(picked * counted).sum() / counted.sum()
    loss.backward()

    # The comparison can tell: mean-of-means (each micro-batch's mean / k) is far off here.
    mom = copy.deepcopy(reference)
    mom.zero_grad()
    micro = [w.collate_fn(examples[i:j]) for i, j in ((0, 3), (3, 4), (4, 7))]  # unequal sizes and widths
    for b in micro:
        s, n = w.loss_fn(mom, b)
        (s / n / len(micro)).backward()
    off = max(((p.grad - r.grad).abs().max() / r.grad.abs().max()).item()
              for p, r in zip(mom.parameters(), reference.parameters(), strict=True))
    assert off > 1e-2

    before = [p.detach().clone() for p in model.parameters()]
    acc = ga.Accumulator(model, torch.optim.SGD(model.parameters(), lr=1.0), accum_steps=3)
    result = acc.step(micro, w.loss_fn)
    assert int(result.num_items) == int(counted.sum()) == sum(len(r["completion"].split()) + 1 for r in rows)
    assert result.loss == pytest.approx(loss.item(), rel=1e-12)
    for p0, p1, ref in zip(before, model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p0 - p1.detach(), ref.grad, rtol=1e-9, atol=1e-12)
