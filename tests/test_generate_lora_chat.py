"""``gradaccum generate`` on a LoRA run's OUT/model, ``--merge-lora``, ``--chat`` and sampling
(issue 20, items 2 and 5).

References are computed here, plainly: the base model and the adapter loaded with peft
and a greedy argmax loop. Bad input: exit 2, one stderr line naming the flag, no
traceback, nothing on disk changed (the scratch tree is hashed before and after).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import hf_fixtures as hx
import pytest
import torch
from test_cli_bad_input import ENV, assert_refused, run_in_process, tree_digest

from gradaccum.cli import main
from gradaccum.generate import PromptError, generate, merged_dir

EOS = hx.SPECIALS.index("</s>")  # the word-level tokenizer numbers its specials first


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``base`` (a tiny Llama with a chat template), ``plain`` (one without), and ``run/model``: a
    LoRA adapter trained by ``gradaccum train --lora-r 2`` (a large lr so it changes the model)."""
    d = tmp_path_factory.mktemp("gen")
    hx.make_llama_dir(d / "base")
    hx.make_llama_dir(d / "plain", chat_template=None)
    data = hx.write_jsonl(d / "data.jsonl", [{"text": t} for t in hx.corpus(32, seed=1)])
    assert main(["train", "--model", str(d / "base"), "--data", str(data), "--lora-r", "2", "--lr", "0.05",
                 "--steps", "3", "--effective-batch", "8", "--out", str(d / "run")]) == 0
    data.unlink()
    return d


def _set_base(adapter: Path, base: str) -> None:
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base
    path.write_text(json.dumps(cfg))


def _greedy_reference(model: Any, ids: list[int], n: int) -> list[int]:
    """The plain greedy loop: argmax of the last position, appended, up to n times or EOS (no KV cache)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            if seq[-1] == EOS:
                break
    return seq[len(ids):]


def _peft_model(base: Path, adapter: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).eval()


_run = run_in_process


def _refused(root: Path, argv: list[str], capfd: Any, *words: str) -> None:
    before = tree_digest(root)
    assert_refused(_run(argv, capfd), "generate", words)
    assert tree_digest(root) == before


# ----------------------------------------------------------------------------- adapters
def test_a_lora_runs_model_generates_what_peft_gives(root: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = root / "run" / "model"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    tok = AutoTokenizer.from_pretrained(str(adapter))
    ids = tok("the cat sat")["input_ids"]
    want = _greedy_reference(_peft_model(root / "base", adapter), ids, 8)
    base_only = _greedy_reference(AutoModelForCausalLM.from_pretrained(str(root / "base")).eval(), ids, 8)
    assert want != base_only  # the adapter matters, so the test would see it ignored
    assert generate(adapter, "the cat sat", 8) == tok.decode(want, skip_special_tokens=True)


def test_a_relative_base_is_found_from_the_cwd_then_from_the_adapters_parent(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: Any) -> None:
    run = tmp_path / "runs" / "ft_lora"
    shutil.copytree(root / "run" / "model", run / "model")
    want = generate(root / "run" / "model", "the dog", 5)
    _set_base(run / "model", "base")  # as saved before: the path given to training
    monkeypatch.chdir(root)  # ./base exists
    assert generate(run / "model", "the dog", 5) == want
    shutil.copytree(root / "base", run / "base")  # the adapter's parent holds base/
    monkeypatch.chdir(tmp_path)  # ./base does not exist
    assert generate(run / "model", "the dog", 5) == want
    shutil.rmtree(run / "base")
    _refused(tmp_path, ["generate", "--model", str(run / "model"), "--prompt", "the dog"], capfd,
             "--model", "'base'", str(tmp_path / "base"), str(run / "base"))


def test_an_absolute_base_that_is_gone_is_one_line(root: Path, tmp_path: Path, capfd: Any) -> None:
    shutil.copytree(root / "run" / "model", tmp_path / "model")
    _set_base(tmp_path / "model", str(tmp_path / "gone"))
    _refused(tmp_path, ["generate", "--model", str(tmp_path / "model"), "--prompt", "hi"], capfd,
             "--model", str(tmp_path / "gone"))
    _set_base(tmp_path / "model", str(root / "plain" / "tokenizer.json"))  # not a directory either
    _refused(tmp_path, ["generate", "--model", str(tmp_path / "model"), "--prompt", "hi"], capfd, "--model")


def test_without_peft_an_adapter_is_one_line_naming_the_extra(
        root: Path, monkeypatch: pytest.MonkeyPatch, capfd: Any) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` meets when it is not installed
    _refused(root, ["generate", "--model", str(root / "run" / "model"), "--prompt", "hi"], capfd,
             "--model", "peft", 'pip install "gradaccum[lora]"')
    assert _run(["generate", "--model", str(root / "base"), "--prompt", "hi", "--max-new-tokens", "2"],
                capfd).returncode == 0  # a full model never needs it


# ----------------------------------------------------------------------------- --merge-lora
def test_merge_lora_writes_a_full_model_beside_the_adapter(root: Path, tmp_path: Path, capfd: Any) -> None:
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "model"
    shutil.copytree(root / "run" / "model", adapter)
    want = generate(adapter, "one two", 6)
    old = os.umask(0o022)
    try:
        r = _run(["generate", "--model", str(adapter), "--prompt", "one two", "--max-new-tokens", "6",
                  "--merge-lora"], capfd)
    finally:
        os.umask(old)
    merged = tmp_path / "model-merged"
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    assert r.stderr.strip() == f"gradaccum generate: merged model written to {merged}"
    assert merged == merged_dir(adapter)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model-merged"]  # no temp dir left
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in merged.iterdir()}
    assert (merged.stat().st_mode & 0o777) == 0o755  # the umask's, not mkdtemp's 0700
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in merged.iterdir())
    # The merged weights compute what base + adapter computes, without peft.
    ids = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(merged)).eval()(ids).logits
        ref = _peft_model(root / "base", adapter)(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert generate(merged, "one two", 6) == want
    # A second merge would replace it: refused, nothing touched.
    _refused(tmp_path, ["generate", "--model", str(adapter), "--prompt", "hi", "--merge-lora"], capfd,
             "--merge-lora", str(merged))


def test_merge_lora_needs_an_adapter(root: Path, capfd: Any) -> None:
    _refused(root, ["generate", "--model", str(root / "base"), "--prompt", "hi", "--merge-lora"], capfd,
             "--merge-lora", "adapter")


# ----------------------------------------------------------------------------- --chat
def test_chat_renders_the_prompt_as_a_user_turn(root: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(root / "base"))
    text = tok.apply_chat_template([{"role": "user", "content": "what color"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # one BOS: the template's
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    want = _greedy_reference(AutoModelForCausalLM.from_pretrained(str(root / "base")).eval(), ids, 6)
    got = generate(root / "base", "what color", 6, chat=True)
    assert got == tok.decode(want, skip_special_tokens=True) != generate(root / "base", "what color", 6)


def test_chat_without_a_template_is_refused(root: Path, capfd: Any) -> None:
    _refused(root, ["generate", "--model", str(root / "plain"), "--prompt", "hi", "--chat"], capfd,
             "--chat", "chat template", str(root / "plain"))


# ----------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_from_the_seed_and_leaves_the_rng_alone(root: Path) -> None:
    adapter = root / "run" / "model"
    state = torch.get_rng_state()
    a = generate(adapter, "the", 12, temperature=1.5, seed=7)
    assert torch.equal(state, torch.get_rng_state())
    assert generate(adapter, "the", 12, temperature=1.5, seed=7) == a
    others = {generate(adapter, "the", 12, temperature=1.5, seed=s) for s in (1, 2, 3)}
    assert len(others | {a}) > 1  # the seed does pick the sample
    greedy = generate(adapter, "the", 12)
    assert generate(adapter, "the", 12, temperature=1.0, top_p=1e-6, seed=3) == greedy  # only the top token


def test_sampling_flags_from_the_command_line(root: Path, capfd: Any) -> None:
    argv = ["generate", "--model", str(root / "base"), "--prompt", "the", "--max-new-tokens", "8",
            "--temperature", "0.9", "--top-p", "0.95", "--seed", "11"]
    first, second = _run(argv, capfd), _run(argv, capfd)
    assert first.returncode == second.returncode == 0 and first.stdout == second.stdout
    assert first.stdout.strip() == generate(root / "base", "the", 8, temperature=0.9, top_p=0.95, seed=11)


@pytest.mark.parametrize(("args", "flag"), [
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "1e-9"], "--temperature"),
    (["--temperature", "101"], "--temperature"),
    (["--temperature", "hot"], "--temperature"),
    (["--temperature", "1", "--top-p", "0"], "--top-p"),
    (["--temperature", "1", "--top-p", "1.5"], "--top-p"),
    (["--temperature", "1", "--top-p", "-0.1"], "--top-p"),
    (["--temperature", "1", "--seed", "-1"], "--seed"),
    (["--temperature", "1", "--seed", str(2**32)], "--seed"),
    (["--top-p", "0.9"], "--top-p"),  # greedy: meaningless without --temperature
    (["--seed", "3"], "--seed"),
])
def test_bad_sampling_values_are_one_line(root: Path, capfd: Any, args: list[str], flag: str) -> None:
    _refused(root, ["generate", "--model", str(root / "run" / "model"), "--prompt", "hi", *args], capfd, flag)


def test_library_errors_name_the_parameter(root: Path) -> None:
    cases = [({"temperature": -1.0}, "temperature"), ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
             ({"temperature": 1.0, "seed": -1}, "seed"), ({"top_p": 0.5}, "top_p"), ({"seed": 1}, "seed"),
             ({"temperature": True}, "temperature"), ({"chat": True}, "chat"),
             ({"merge_lora": True}, "merge_lora")]
    for kwargs, param in cases:
        with pytest.raises(PromptError) as e:
            generate(root / "plain", "hi", 3, **kwargs)
        assert e.value.param == param and str(e.value).startswith(param)


# ----------------------------------------------------------------------------- start-up
def test_generate_imports_neither_peft_nor_the_training_stack(root: Path) -> None:
    """What a full model's generate does not need stays unimported (start-up time)."""
    code = ("import sys; from gradaccum.cli import main; "
            f"assert main(['generate', '--model', {str(root / 'base')!r}, '--prompt', 'hi', "
            "'--max-new-tokens', '2']) == 0; "
            "print(sorted(m for m in ('peft', 'datasets', 'matplotlib', 'gradaccum.trainer', "
            "'gradaccum.accumulator', 'gradaccum.memory') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert r.stderr == ""  # no progress bars or warnings around the text


def test_a_lora_run_given_a_relative_model_records_its_base_absolutely(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The saving side: `train --model ./base --lora-r` writes the base as an absolute path, so the
    adapter loads from any directory."""
    data = tmp_path / "data.txt"
    data.write_text("the cat sat on the mat\nthe dog ran\n" * 8)
    monkeypatch.chdir(root)
    out = tmp_path / "run"
    assert main(["train", "--model", "base", "--data", str(data), "--lora-r", "2", "--steps", "1",
                 "--effective-batch", "8", "--micro-batch", "4", "--out", str(out)]) == 0
    cfg = json.loads((out / "model" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((root / "base").resolve())
    monkeypatch.chdir(tmp_path)
    assert isinstance(generate(out / "model", "the cat", 2), str)
