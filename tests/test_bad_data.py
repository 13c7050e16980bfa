"""Issue 19, the data and model-loading layer: every bad data file or model directory is exit 2
with one line naming the flag, file (and line), found before anything is touched.

Each refusal runs ``gradaccum.cli.main`` in-process in a scratch tree holding a finished
run (``run/``, given with ``--overwrite`` where that matters) and hashes the tree before
and after; a subprocess only where third-party chatter on stderr is what is tested.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gradaccum.cli import main
from gradaccum.demo.task import IGNORE, CharTokenizer
from gradaccum.workloads import WorkloadError, build_workload, hf
from gradaccum.workloads import demo as demo_workload
from gradaccum.workloads.data import TokenEncoder
from gradaccum.workloads.learnable import check_embedding_rows
from gradaccum.workloads.limits import MAX_FILE_BYTES, MAX_LINE_BYTES

from hf_fixtures import make_llama_dir, make_tokenizer, write_jsonl  # isort: skip
from test_cli_bad_input import LINES, TINY, assert_refused, run_cli, tree_digest  # isort: skip

PC = [{"prompt": "the cat sat on", "completion": "the mat"},
      {"prompt": "what color is it", "completion": "red"}] * 8


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished demo run and a finished run of the tiny Llama, plus a valid data file each."""
    root = tmp_path_factory.mktemp("bad-data")
    (root / "lines.txt").write_text(LINES)
    write_jsonl(root / "pc.jsonl", PC)
    make_llama_dir(root / "llama")
    assert main(["train", *TINY, "--data", str(root / "lines.txt"), "--out", str(root / "run")]) == 0
    assert main(["train", *TINY, "--model", str(root / "llama"), "--data", str(root / "pc.jsonl"),
                 "--out", str(root / "hfrun")]) == 0
    return root


@pytest.fixture
def tree(tmp_path: Path, scratch: Path) -> Path:
    for name in ("run", "hfrun", "llama"):
        shutil.copytree(scratch / name, tmp_path / name)
    for name in ("lines.txt", "pc.jsonl"):
        shutil.copy(scratch / name, tmp_path / name)
    return tmp_path


def refused(capfd: Any, root: Path, args: list[str], words: tuple[str, ...], command: str = "train") -> str:
    """``main([command, *args])``: exit 2, one stderr line holding ``words``, nothing else printed,
    the scratch tree unchanged. Returns the line."""
    before = tree_digest(root)
    capfd.readouterr()
    try:
        code = main([command, *args])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capfd.readouterr()
    assert_refused(subprocess.CompletedProcess([], code, out, err), command, words)
    assert out == "", out
    assert tree_digest(root) == before
    return err.strip()


def hf_args(root: Path, data: Path, *extra: str) -> list[str]:
    return [*TINY, "--model", str(root / "llama"), "--data", str(data), "--overwrite",
            "--out", str(root / "hfrun"), *extra]


def demo_args(root: Path, data: Path, *extra: str) -> list[str]:
    return [*TINY, "--data", str(data), "--overwrite", "--out", str(root / "run"), *extra]


# --------------------------------------------------------- 1. no token in the loss


def test_user_only_messages_are_refused_up_front(tree: Path, capfd: Any) -> None:
    data = write_jsonl(tree / "users.jsonl", [{"messages": [{"role": "user", "content": "hello world"}]}] * 9)
    words = ("--data", str(data), "no example has a token in the loss", "'assistant'", "'user'")
    line = refused(capfd, tree, hf_args(tree, data), words)
    assert "--eval-data" not in line


def test_unknown_reply_role_is_refused_by_the_demo_and_by_compare(tree: Path, capfd: Any) -> None:
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    data = write_jsonl(tree / "bot.jsonl", [rec] * 9)
    refused(capfd, tree, demo_args(tree, data), ("--data", "no example has a token in the loss", "'bot'"))
    refused(capfd, tree, ["--data", str(data), "--effective-batch", "8", "--micro-batch", "2", "--steps", "2",
                          "--out", str(tree / "cmp")], ("--data", "no example has a token in the loss"),
            command="compare")


def test_every_prompt_cut_away_by_max_length_is_refused(tree: Path, capfd: Any) -> None:
    rec = {"prompt": "one two three four five six", "completion": "yes"}
    data = write_jsonl(tree / "long.jsonl", [rec] * 9)
    refused(capfd, tree, hf_args(tree, data, "--max-length", "4"),
            ("--data", "no example has a token in the loss", "every prompt", "--max-length 4"))


def test_eval_data_without_a_loss_token_is_refused(tree: Path, capfd: Any) -> None:
    ev = write_jsonl(tree / "ev.jsonl", [{"messages": [{"role": "user", "content": "the cat"}]}] * 3)
    refused(capfd, tree, hf_args(tree, tree / "pc.jsonl", "--eval-data", str(ev)),
            ("--eval-data", str(ev), "no example has a token in the loss", "NaN"))
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello"}]
    demo_data = write_jsonl(tree / "demo_chat.jsonl", [{"messages": chat}] * 9)
    demo_ev = write_jsonl(tree / "demo_ev.jsonl", [{"messages": chat[:1]}] * 3)
    refused(capfd, tree, demo_args(tree, demo_data, "--eval-data", str(demo_ev)),
            ("--eval-data", "no example has a token in the loss"))


def test_examples_without_a_loss_token_next_to_others_count_zero(tree: Path) -> None:
    mixed = [{"messages": [{"role": "user", "content": "the cat"}]},
             {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the dog"}]}]
    data = write_jsonl(tree / "mixed.jsonl", mixed * 4)
    w = build_workload(str(tree / "llama"), str(data), progress=False, cache_dir=str(tree / "cache"))
    counts = [sum(1 for x in labels[1:] if x != IGNORE) for _, labels in w.dataset]
    assert counts[0::2] == [0] * 4 and all(c > 0 for c in counts[1::2])


# ---------------------------------------------------------------- 2. a one-line file


def test_a_one_line_text_file_trains_and_evaluates(tree: Path, capfd: Any) -> None:
    (tree / "one.txt").write_text("a\n")
    out = tree / "one"
    code = main(["train", "--steps", "60", "--effective-batch", "16", "--micro-batch", "4",
                 "--data", str(tree / "one.txt"), "--eval-data", str(tree / "one.txt"), "--out", str(out)])
    assert code == 0, capfd.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_eval_loss"] is not None
    assert "Traceback" not in capfd.readouterr().err


# ----------------------------------------------- 3. sizes bounded, no archive sniffing


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Outside the hashed tree (hashing reads every byte)."""
    return tmp_path_factory.mktemp("big")


def test_a_1gib_sparse_file_is_refused_at_once_without_sniffing(tree: Path, big: Path) -> None:
    """A subprocess with a timeout: before, ``datasets`` hung in ``tarfile`` on this file."""
    data = _sparse(big / "nul.jsonl", 2**30)
    before = tree_digest(tree)
    r = run_cli("train", hf_args(tree, data))
    assert_refused(r, "train", ("--data", str(data), "line 1", f"{MAX_LINE_BYTES // 2**20} MiB"))
    assert r.stdout == "" and tree_digest(tree) == before


def test_the_demo_refuses_a_large_jsonl_by_its_own_ceiling(tree: Path, big: Path, capfd: Any) -> None:
    data = _sparse(big / "nul.jsonl", 2**30)
    refused(capfd, tree, demo_args(tree, data), ("--data", str(data), "64 MiB", "demo"))


def test_a_file_over_the_ceiling_is_refused_by_its_size(tree: Path, big: Path, capfd: Any) -> None:
    try:
        data = _sparse(big / "huge.jsonl", MAX_FILE_BYTES + 1)
    except OSError:
        pytest.skip("this file system has no sparse files that large")
    refused(capfd, tree, hf_args(tree, data), ("--data", str(data), "32 GiB"))


def test_a_gzip_named_jsonl_is_read_as_jsonl(tree: Path, capfd: Any) -> None:
    data = tree / "packed.jsonl"
    data.write_bytes(gzip.compress((tree / "pc.jsonl").read_bytes()))
    refused(capfd, tree, hf_args(tree, data), ("--data", str(data), "line 1", "not UTF-8"))


# ------------------------------------------------ 4. long lines: refused, or cut first


def test_a_50mb_line_is_refused_naming_it(tree: Path, big: Path, capfd: Any) -> None:
    data = big / "big.jsonl"
    with open(data, "w") as f:
        f.write(json.dumps(PC[0]) + "\n")
        f.write(json.dumps({"text": "the cat " * (50 * 2**20 // 8)}) + "\n")
    refused(capfd, tree, hf_args(tree, data), ("--data", str(data), "line 2", "16 MiB"))


class Recording:
    """A tokenizer that remembers the longest text it was asked to tokenize."""

    def __init__(self, tok: Any) -> None:
        self.tok, self.longest = tok, 0
        self.eos_token_id = tok.eos_token_id

    def __call__(self, text: str, **kw: Any) -> Any:
        self.longest = max(self.longest, len(text))
        return self.tok(text, **kw)

    def get_vocab(self) -> dict[str, int]:
        return self.tok.get_vocab()

    def apply_chat_template(self, *a: Any, **kw: Any) -> Any:
        return self.tok.apply_chat_template(*a, **kw)


def _byte_bpe() -> Any:
    from hf_fixtures import corpus
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(400, seed=3), trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def _texts(rng: random.Random) -> list[str]:
    from hf_fixtures import WORDS

    words = [*WORDS, "zebra", "catdog", "élan", "x" * 500]  # unknown words, a long <unk>, non-ASCII
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 400))) + rng.choice(["", " ", "  ", "!"])
            for _ in range(40)]


@pytest.mark.parametrize("which", ["word-level", "byte-bpe"])
def test_cutting_before_tokenizing_gives_the_same_example(which: str) -> None:
    """The first N tokens of the cut text are the first N of the whole: every format, many N."""
    tok = make_tokenizer() if which == "word-level" else _byte_bpe()
    rng = random.Random(0)
    texts = _texts(rng)
    whole = TokenEncoder(tok, None)
    for n in (3, 4, 7, 16, 50, 300):
        enc = TokenEncoder(tok, n)
        for i, text in enumerate(texts):
            other = texts[(i + 1) % len(texts)]
            records = [({"text": text}, "text"), ({"prompt": other, "completion": text}, "prompt-completion")]
            if which == "word-level":
                msgs = [{"role": "user", "content": other}, {"role": "assistant", "content": text}]
                records.append(({"messages": msgs}, "messages"))
            for record, fmt in records:
                got, want = enc(record, 0, fmt), whole(record, 0, fmt)
                assert got["input_ids"] == want["input_ids"][:n], (n, fmt, text[:80])
                assert got["labels"] == want["labels"][:n], (n, fmt, text[:80])
                assert got["truncated"] == (len(want["input_ids"]) > n)


def test_a_5mb_line_is_tokenized_from_a_prefix_only() -> None:
    tok = Recording(make_tokenizer())
    enc = TokenEncoder(tok, 64)
    text = "the cat sat on the mat " * (5 * 2**20 // 23)
    row = enc({"prompt": "hello", "completion": text}, 0, "prompt-completion")
    assert len(row["input_ids"]) == 64 and row["truncated"]
    assert tok.longest < 64 * 1000, tok.longest  # memory follows --max-length, not the line


def test_the_demo_cuts_before_encoding_with_the_same_result() -> None:
    tok = CharTokenizer("abcuser: \n")
    items = [([("a" * 300, False), ("b" * 50, True)], True), ([("user: ", False), ("ab\n", True)], False),
             ([("c" * 7, True)], True)]
    got, cut = demo_workload.char_examples(items, tok, 40)
    for (ids, labels), (segs, _) in zip(got, items, strict=True):
        full = [i for t, _ in segs for i in tok.encode(t)]
        lab = [i if keep else IGNORE for t, keep in segs for i in tok.encode(t)]
        assert ids[1:-1] == full[:38] and labels[1:-1] == lab[:38]
    assert cut == 1


# ------------------------------------------- 5. a tokenizer larger than the embedding


def test_a_tokenizer_larger_than_the_embedding_is_refused(tree: Path, capfd: Any) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    small = tree / "small-embedding"
    tok = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tok) - 5, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(small)
    tok.save_pretrained(small)
    args = hf_args(tree, tree / "pc.jsonl")
    args[args.index("--model") + 1] = str(small)
    refused(capfd, tree, args, ("--model", str(small), f"{len(tok)} tokens", f"{len(tok) - 5} rows"))


def test_data_ids_past_the_embedding_are_refused() -> None:
    with pytest.raises(WorkloadError, match="--eval-data tokenizes to id 40, past .* 40 rows"):
        check_embedding_rows("m", 30, 40, 40, "--eval-data")
    check_embedding_rows("m", 40, 40, 39)


# ------------------------------------------------- 6. no third-party chatter first


def test_weights_that_do_not_fit_config_are_one_line(tree: Path) -> None:
    bad = tree / "bad-weights"
    shutil.copytree(tree / "llama", bad)
    config = json.loads((bad / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128)
    (bad / "config.json").write_text(json.dumps(config))
    args = hf_args(tree, tree / "pc.jsonl")
    args[args.index("--model") + 1] = str(bad)
    before = tree_digest(tree)
    r = run_cli("train", args)
    assert_refused(r, "train", ("--model", str(bad), "do not fit config.json"))
    assert r.stdout == "" and "REPORT" not in r.stderr and tree_digest(tree) == before


def test_a_pickle_checkpoint_is_refused_without_torch_warnings(tree: Path) -> None:
    import pickle

    (tree / "run" / "checkpoint.pt").write_bytes(pickle.dumps(shutil.rmtree, protocol=4))
    before = tree_digest(tree)
    r = run_cli("train", [*TINY, "--data", str(tree / "lines.txt"), "--resume", "--out", str(tree / "run")])
    assert_refused(r, "train", ("checkpoint.pt", "refused"))
    assert "Warning" not in r.stderr and tree_digest(tree) == before


def test_hf_loads_leave_logging_as_they_found_it(tree: Path) -> None:
    import logging

    root = logging.getLogger("transformers")
    before = (root.handlers[:], root.level, root.propagate)
    hf.load_model(tree / "llama", progress=False)
    with pytest.raises(WorkloadError):
        hf.load_model(tree / "missing", progress=False)
    assert (root.handlers[:], root.level, root.propagate) == before
