"""Issue 19: `check` and `generate` under bad input, and a window whose first backward raises.

Bad input: exit 2, one line on stderr naming the flag or the user's function, no
traceback, nothing on disk changed (the scratch tree is hashed before and after); run
in-process through ``main()``, and as a subprocess only where argv must hold raw bytes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import lm_loss_fn, make_lm, params_of, random_micro_batches
from hf_fixtures import SPECIALS, WORDS, corpus, make_llama_dir
from test_cli_bad_input import ENV, assert_refused, run_in_process, tree_digest
from torch import nn

import gradaccum as ga
from gradaccum import Accumulator
from gradaccum.generate import MAX_PROMPT_CHARS, PromptError, generate

# Resolved at collection, before any test imports the submodule gradaccum.check: importing it
# first rebinds the package attribute ``check`` to the module (PEP 562 names are set lazily).
check = ga.check


_main = run_in_process


def _refused_in_process(root: Path, argv: list[str], capfd: Any, words: tuple[str, ...]) -> None:
    before = tree_digest(root)
    assert_refused(_main(argv, capfd), argv[0], words)
    assert tree_digest(root) == before


# ----------------------------------------------------------------------------- check
USER_CODE = '''
import torch
import torch.nn.functional as F

def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)

def shape_error():
    model = torch.nn.Linear(5, 3)
    def bad_shape_loss(m, b):
        return F.cross_entropy(m(b[0].T), b[1], reduction="sum"), b[1].shape[0]
    return model, bad_shape_loss, _data()

def no_grad_loss():
    model = torch.nn.Linear(5, 3)
    def frozen_loss(m, b):
        with torch.no_grad():
            return F.cross_entropy(m(b[0]), b[1], reduction="sum"), b[1].shape[0]
    return model, frozen_loss, _data()

def loss_not_callable():
    return torch.nn.Linear(5, 3), "loss", _data()

def exits():
    raise SystemExit(3)
'''


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    (tmp_path / "user_code.py").write_text(textwrap.dedent(USER_CODE))
    (tmp_path / "breaks_on_import.py").write_text("raise ImportError('no such thing\\nsecond line')\n")
    return tmp_path


@pytest.mark.parametrize(("target", "words"), [
    ("user_code.py:shape_error", ("bad_shape_loss", "RuntimeError", "mat1 and mat2")),
    ("user_code.py:no_grad_loss", ("frozen_loss", "does not require grad", "no_grad")),
    ("user_code.py:loss_not_callable", ("loss_not_callable", "(model, loss_fn, batch)")),
    ("user_code.py:exits", ("exits", "SystemExit")),
    ("breaks_on_import.py:anything", ("breaks_on_import.py", "ImportError", "no such thing")),
])
def test_check_a_users_code_that_raises_is_one_line(user_dir: Path, capfd: Any, target: str,
                                                    words: tuple[str, ...]) -> None:
    path, _, fn = target.partition(":")
    _refused_in_process(user_dir, ["check", f"{user_dir / path}:{fn}"], capfd, (f"{path}:{fn}", *words))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)


def test_ga_check_refuses_a_loss_under_no_grad_as_backward_does() -> None:
    def frozen(m: nn.Module, b: Any) -> tuple[torch.Tensor, int]:
        with torch.no_grad():
            return F.cross_entropy(m(b[0]), b[1], reduction="sum"), b[1].shape[0]

    model = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="does not require grad") as from_check:
        check(model, frozen, _data())
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="does not require grad") as from_backward, acc.micro_step():
        acc.backward(*frozen(model, _data()))
    assert "frozen()" in str(from_check.value)
    assert str(from_backward.value) in str(from_check.value)  # the engine's own check, reused


def test_ga_check_names_a_loss_fn_that_raises() -> None:
    def shapes(m: nn.Module, b: Any) -> tuple[torch.Tensor, int]:
        return F.cross_entropy(m(b[0].T), b[1], reduction="sum"), b[1].shape[0]

    with pytest.raises(ValueError) as e:
        check(nn.Linear(5, 3), shapes, _data())
    msg = str(e.value)
    assert "shapes()" in msg and "RuntimeError" in msg and len(msg.splitlines()) == 1


def test_ga_check_names_a_loss_whose_backward_raises() -> None:
    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("custom backward failed\nsecond line")

    def exploding(m: nn.Module, b: Any) -> tuple[torch.Tensor, int]:
        return F.cross_entropy(Boom.apply(m(b[0])), b[1], reduction="sum"), b[1].shape[0]

    with pytest.raises(ValueError, match=r"exploding\(\)'s backward raised RuntimeError: custom \w+ failed$"):
        check(nn.Linear(5, 3), exploding, _data())


# ----------------------------------------------------------------------------- generate
def _no_bos_tokenizer(add_bos_token: bool) -> Any:
    """Word level like hf_fixtures' tokenizer, but nothing prepended; with or without a BOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS)
    tok.train_from_iterator(corpus() + [" ".join(WORDS)], trainer=trainer)
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if add_bos_token:
        special["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``llama`` (64-token context, BOS prepended), ``nobos`` (no BOS token at all) and
    ``bos-not-added`` (a BOS token the tokenizer does not prepend, as GPT-2's)."""
    root = tmp_path_factory.mktemp("models")
    make_llama_dir(root / "llama")
    for name, has_bos in (("nobos", False), ("bos-not-added", True)):
        make_llama_dir(root / name)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (root / name / f).unlink(missing_ok=True)
        _no_bos_tokenizer(has_bos).save_pretrained(root / name)
    return root


@pytest.mark.parametrize(("model", "args", "words"), [
    ("nobos", ["--prompt", ""], ("--prompt", "empty", "BOS")),
    ("llama", ["--prompt", "\udcff\udcfe"], ("--prompt", "UTF-8", "0xff")),
    ("llama", ["--prompt", "the cat", "--max-new-tokens", "100000"], ("--max-new-tokens", "context of 64")),
    ("llama", ["--prompt", "the cat", "--max-new-tokens", "62"], ("--max-new-tokens", "at most 61")),
    ("llama", ["--prompt", "the cat " * 40], ("--prompt", "81 tokens", "context is 64")),
    ("llama", ["--prompt", "a" * (MAX_PROMPT_CHARS + 1)], ("--prompt", "at most 1,000,000")),
])
def test_generate_bad_prompts_are_one_line(models: Path, capfd: Any, model: str, args: list[str],
                                           words: tuple[str, ...]) -> None:
    _refused_in_process(models, ["generate", "--model", str(models / model), *args], capfd, words)


def test_generate_a_prompt_of_raw_bytes_from_the_command_line(models: Path) -> None:
    before = tree_digest(models)
    model = str(models / "llama")
    argv = [sys.executable, "-m", "gradaccum", "generate", "--model", model, "--prompt", b"\xff"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=ENV, stdin=subprocess.DEVNULL)
    assert_refused(r, "generate", ("--prompt", "UTF-8", "0xff"))
    assert tree_digest(models) == before


def test_generate_an_empty_prompt_starts_from_bos(models: Path) -> None:
    """Prepended by the tokenizer, or (not prepended) by gradaccum: the same greedy text."""
    assert generate(models / "llama", "", max_new_tokens=3) == generate(models / "bos-not-added", "", 3)
    assert generate(models / "llama", "the cat", max_new_tokens=61) is not None  # exactly fills the context


def test_generate_errors_name_the_parameter(models: Path) -> None:
    for prompt, max_new, param in (("", 3, "prompt"), ("\udcff", 3, "prompt"), ("the", 0, "max_new_tokens"),
                                   (b"the", 3, "prompt")):
        with pytest.raises(PromptError) as e:
            generate(models / "nobos", prompt, max_new)  # type: ignore[arg-type]
        assert e.value.param == param and str(e.value).startswith(param)


# ----------------------------------------------------------------------------- a failed backward
class Boom(torch.autograd.Function):
    """Identity whose backward raises once asked to: an error half-way through autograd."""

    armed = False

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        if Boom.armed:
            raise RuntimeError("boom")
        return g


def _loss_through_boom(model: nn.Module, mb: Any) -> tuple[torch.Tensor, torch.Tensor]:
    # The output layer's gradients (and the noise probe's norms) are taken before Boom's backward raises.
    h = torch.tanh(model.hidden(Boom.apply(model.emb(mb["ids"]))))
    logits = model.out(h).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mb["labels"].reshape(-1), reduction="sum")
    return loss, (mb["labels"] != -100).sum()


def _run(micro: list[Any], fail: str | None, dtype: torch.dtype = torch.float64,
         grad_dtype: torch.dtype | None = None) -> tuple[list[Any], list[Any]]:
    """Four windows of two; windows 2 and 3 open with a backward that raises (``fail``), and a
    freed graph is tried mid-window too (a half-done backward there is the caller's to discard)."""
    model = make_lm(dtype)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.3), accum_steps=2, measure_noise=True,
                      grad_dtype=grad_dtype)
    results, stale = [], None
    for i, mb in enumerate(micro):
        with acc.micro_step():
            if fail is not None and i in ((2, 4, 5) if fail == "freed-graph" else (2, 4)):
                with pytest.raises(RuntimeError):
                    if fail == "freed-graph":
                        acc.backward(*stale)  # the last micro-batch's loss: its graph is freed
                    else:
                        Boom.armed = True
                        try:
                            acc.backward(*_loss_through_boom(model, mb))
                        finally:
                            Boom.armed = False
            stale = _loss_through_boom(model, mb)
            res = acc.backward(*stale)
        if res is not None:
            results.append(res)
    return results, params_of(model)


@pytest.mark.parametrize("fail", ["freed-graph", "raises-mid-backward"])
def test_a_failed_backward_leaves_the_window_as_it_was(gen: torch.Generator, fail: str) -> None:
    micro = random_micro_batches(gen, [3, 2, 4, 1, 3, 3, 2, 2])
    want, want_params = _run(micro, None)
    got, got_params = _run(micro, fail)
    assert want[-1].noise_scale is not None
    assert [r.noise_scale for r in got] == [r.noise_scale for r in want]
    assert [(r.loss, r.grad_norm, r.num_items, r.step) for r in got] == [
        (r.loss, r.grad_norm, r.num_items, r.step) for r in want]
    assert all(torch.equal(a, b) for a, b in zip(got_params, want_params, strict=True))


def test_a_failed_first_backward_with_grad_dtype_buffers(gen: torch.Generator) -> None:
    """The fp32 buffers' hooks too are attached once: a retried window sums each gradient once."""
    micro = random_micro_batches(gen, [3, 2, 4, 1, 3, 3, 2, 2])
    want, want_params = _run(micro, None, torch.bfloat16, torch.float32)
    got, got_params = _run(micro, "raises-mid-backward", torch.bfloat16, torch.float32)
    assert [r.noise_scale for r in got] == [r.noise_scale for r in want]
    assert all(torch.equal(a, b) for a, b in zip(got_params, want_params, strict=True))


def test_step_with_a_loss_that_raises_keeps_the_accumulator_usable(gen: torch.Generator) -> None:
    micro = random_micro_batches(gen, [2, 3, 2])
    model = make_lm()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.3), measure_noise=True)
    Boom.armed = True
    try:
        with pytest.raises(RuntimeError, match="boom"):
            acc.step(micro, _loss_through_boom)
    finally:
        Boom.armed = False
    ref = make_lm()
    ref_acc = Accumulator(ref, torch.optim.SGD(ref.parameters(), lr=0.3), measure_noise=True)
    for _ in range(2):
        assert acc.step(micro, lm_loss_fn) == ref_acc.step(micro, lm_loss_fn)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), params_of(ref), strict=True))
