"""``gradaccum generate``: a completion from a model directory or a LoRA adapter (a run's OUT/model).

So that a user sees what a fine-tune learned with the same tool that trained it.

- ``model_dir`` is a full model (``config.json``, weights, tokenizer) or a peft LoRA adapter
  (``adapter_config.json``): its base model is the directory ``base_model_name_or_path``
  names (a relative one is tried from the current directory, then from the adapter's
  parent directory), loaded with ``AutoModelForCausalLM``, the adapter on top with
  ``PeftModel.from_pretrained``; the tokenizer is the adapter's (else the base's).
- ``merge_lora=True`` folds the adapter into the base and writes that full model, with
  the tokenizer, to ``ADAPTER_DIR-merged`` (atomically, never replacing anything).
- ``chat=True`` renders the prompt as one user turn with the tokenizer's chat template.
- ``temperature=0`` is greedy; above it, sampling (``top_p``: nucleus; top-k off) from a
  generator seeded with ``seed``: the same seed gives the same text.

Every value is checked before anything is read, and sizes before they are loaded: the
prompt's length before it is tokenized, prompt + new tokens against the model's context
before the weights are read. Nothing is written unless ``merge_lora`` asks for it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradaccum.errors import one_line
from gradaccum.workloads import hf
from gradaccum.workloads.errors import WorkloadError

MAX_PROMPT_CHARS = 1_000_000
"""The longest prompt tokenized (a 5 MB line took 1.3 GB to tokenize, measured)."""
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
"""Sampling temperatures allowed besides 0 (greedy): below 1e-3 it is greedy with a risk of
overflowing logits / T, above 100 the distribution is uniform noise."""
MAX_SEED = 2**32 - 1
ADAPTER_CONFIG = "adapter_config.json"
MERGED_SUFFIX = "-merged"


class PromptError(ValueError):
    """A ``generate`` argument that cannot be served; ``param`` names which (``prompt``,
    ``max_new_tokens``, ``chat``, ``temperature``, ``top_p``, ``seed``, ``merge_lora``)."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param} {reason}")
        self.param = param
        self.reason = reason


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy (``temperature == 0``) or sampled."""

    temperature: float = 0.0
    top_p: float | None = None
    """Nucleus sampling's probability mass, in (0, 1]; None: 1 (off). Sampling only."""
    seed: int | None = None
    """Seeds the sampling (None: 0); sampling only."""

    def check(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not (
                t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise PromptError("temperature", f"must be 0 (greedy) or between {MIN_TEMPERATURE:g} and "
                                             f"{MAX_TEMPERATURE:g}, got {t!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise PromptError("top_p", f"must be in (0, 1], got {p!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED):
            raise PromptError("seed", f"must be an integer in [0, {MAX_SEED}], got {s!r}")
        for param, value in (("top_p", p), ("seed", s)):
            if value is not None and t == 0:
                raise PromptError(param, "only applies to sampling: give temperature > 0 (0 is greedy)")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False}
        top_p = 1.0 if self.top_p is None else float(self.top_p)
        return {"do_sample": True, "temperature": float(self.temperature), "top_p": top_p, "top_k": 0}


@dataclass(frozen=True)
class Source:
    """What ``model_dir`` names: a full model directory, or a LoRA adapter and its base."""

    weights: Path
    """The full model's directory (the base model, for an adapter)."""
    adapter: Path | None
    config: Any
    """The (base) model's transformers config."""
    tokenizer: Path
    """Where the tokenizer is read: the adapter directory when it has one, else ``weights``."""


# ----------------------------------------------------------------------------- the prompt
def check_prompt(prompt: Any) -> None:
    """Text that can be tokenized: a str, at most ``MAX_PROMPT_CHARS``, valid UTF-8."""
    if not isinstance(prompt, str):
        raise PromptError("prompt", f"must be text, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptError("prompt", f"is {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,} are read")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        # A command line's undecodable bytes arrive as surrogates U+DC80..U+DCFF (PEP 383).
        code = ord(prompt[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise PromptError("prompt", f"is not valid UTF-8 ({what} at character {e.start})") from None


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's token ids; an empty prompt starts from the BOS token (refused without one)."""
    try:
        ids = list(tokenizer(prompt)["input_ids"])
    except Exception as e:
        raise PromptError("prompt", f"cannot be tokenized ({one_line(e, 200, True)})") from None
    if not ids:
        if tokenizer.bos_token_id is None:
            raise PromptError("prompt", "is empty and the tokenizer has no BOS token to start from")
        ids = [int(tokenizer.bos_token_id)]
    return ids


def chat_ids(tokenizer: Any, prompt: str, where: Path) -> list[int]:
    """The prompt as one user turn in the tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("chat", f"needs a chat template: the tokenizer in {where} has none")
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        # The template writes its own special tokens (BOS included): add none twice.
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception as e:
        raise PromptError("chat", f"cannot render the prompt ({one_line(e, 200, True)})") from None
    if not ids:
        raise PromptError("chat", f"the chat template in {where} renders the prompt as no tokens")
    return ids


def check_room(prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    """Refuse what does not fit the model's context (its positions end there)."""
    if context is None:
        return
    if prompt_tokens >= context:
        raise PromptError("prompt", f"is {prompt_tokens} tokens; the model's context is {context} tokens")
    if prompt_tokens + max_new_tokens > context:
        raise PromptError("max_new_tokens", (
            f"{max_new_tokens} with the prompt's {prompt_tokens} tokens exceeds the model's context of "
            f"{context} tokens: at most {context - prompt_tokens}"))


# ----------------------------------------------------------------------------- what --model names
def resolve(model_dir: str | Path, flag: str = "--model") -> Source:
    """The model ``model_dir`` names, checked from its small files (no weights read)."""
    path = Path(model_dir)
    if not (path / ADAPTER_CONFIG).is_file():
        config = hf.load_config(path, flag)
        return Source(path, None, config, path)
    _peft(path, flag)  # said first: without it nothing else about the adapter matters
    base = resolve_base(path, flag)
    config = hf.load_config(base, f"{flag} {path}: its base model", tokenizer=False)
    has_tokenizer = any((path / f).is_file() for f in hf.TOKENIZER_FILES)
    if not has_tokenizer and not any((base / f).is_file() for f in hf.TOKENIZER_FILES):
        raise WorkloadError(f"{flag} {path}: no tokenizer files in the adapter directory or its base {base}")
    return Source(base, path, config, path if has_tokenizer else base)


def resolve_base(adapter: Path, flag: str = "--model") -> Path:
    """The absolute directory of the adapter's base model (``base_model_name_or_path``).

    Adapters saved before it was made absolute hold the path given to training: tried
    from the current directory, then from the adapter's parent directory.
    """
    try:
        named = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = one_line(e, 200, True)
        raise WorkloadError(f"{flag} {adapter}: cannot read base_model_name_or_path from {ADAPTER_CONFIG} "
                            f"({why})") from None
    if not isinstance(named, str) or not named:
        raise WorkloadError(f"{flag} {adapter}: {ADAPTER_CONFIG} names no base model ({named!r})")
    base = Path(named).expanduser()
    tried = [base] if base.is_absolute() else [Path.cwd() / base, adapter.resolve().parent / base]
    for candidate in tried:
        if candidate.is_dir():
            return candidate.resolve()
    where = " nor ".join(str(c) for c in tried)
    raise WorkloadError(f"{flag} {adapter}: its base model {named!r} is not a directory: neither {where} "
                        "exists (edit base_model_name_or_path in adapter_config.json)")


def merged_dir(adapter: str | Path) -> Path:
    """Where ``merge_lora`` writes: ``ADAPTER_DIR-merged``, beside the adapter."""
    return Path(os.path.abspath(adapter) + MERGED_SUFFIX)


# ----------------------------------------------------------------------------- loading
def load_tokenizer(source: Source, flag: str = "--model") -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source.tokenizer), local_files_only=True)
    except Exception as e:
        why = one_line(e, 300, True)
        raise WorkloadError(f"{flag} {source.tokenizer}: cannot load the tokenizer ({why})") from None


def load_model(source: Source, flag: str = "--model") -> nn.Module:
    """The causal LM in its saved dtype, in eval mode; the adapter on top for a LoRA directory."""
    from transformers import AutoModelForCausalLM

    with _no_progress_bars():
        try:
            model = AutoModelForCausalLM.from_pretrained(str(source.weights), config=source.config,
                                                         local_files_only=True, dtype="auto")
        except Exception as e:  # no weights file, weights that do not fit the config, ...
            why = one_line(e, 300, True)
            raise WorkloadError(f"{flag} {source.weights}: cannot load the model ({why})") from None
        if source.adapter is not None:
            model = _with_adapter(model, source.adapter, flag)
    return model.eval()


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws bars on stderr while loading and saving: the command prints its own lines."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _peft(adapter: Path, flag: str) -> Any:
    """peft, the optional extra ``lora``: imported only for an adapter directory."""
    try:
        import peft
    except ImportError:
        from gradaccum.workloads.lora import LORA_INSTALL

        needs = f"a LoRA adapter needs the peft package: {LORA_INSTALL}"
        raise WorkloadError(f"{flag} {adapter}: {needs}") from None
    return peft


def _with_adapter(model: nn.Module, adapter: Path, flag: str) -> nn.Module:
    import warnings

    peft = _peft(adapter, flag)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes on renamed transformers options
            return peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except Exception as e:
        why = one_line(e, 300, True)
        raise WorkloadError(f"{flag} {adapter}: cannot load the LoRA adapter ({why})") from None


def write_merged(model: nn.Module, tokenizer: Any, target: Path) -> nn.Module:
    """Fold the adapter into the base and save it with the tokenizer to ``target``; returns the
    merged model. Written in a temporary directory beside ``target``, then renamed into place;
    an existing ``target`` is never replaced (FileExistsError)."""
    import shutil

    merged = model.merge_and_unload()
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        with _no_progress_bars():
            merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _follow_umask(tmp)
        if target.exists() or target.is_symlink():
            raise FileExistsError(f"{target} appeared while the merged model was written")
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return merged


def _follow_umask(root: Path) -> None:
    """mkdtemp makes a 0700 directory: give the merged model the permissions the user's umask asks."""
    mask = os.umask(0)
    os.umask(mask)
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


# ----------------------------------------------------------------------------- generate
def generate(
    model_dir: str | Path, prompt: str, max_new_tokens: int = 64, flag: str = "--model", *,
    chat: bool = False, temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
    merge_lora: bool = False,
) -> str:
    """The continuation of ``prompt`` (the new text only), special tokens removed.

    Raises ``WorkloadError`` (one line) for a directory that is not a causal LM with a tokenizer
    or a LoRA adapter on one, and :class:`PromptError` for an argument that cannot be served: a
    prompt that is not text, too long, empty without a BOS token, or that leaves no room for
    ``max_new_tokens`` in the model's context; ``chat`` without a chat template; a sampling value
    out of range; ``merge_lora`` on a full model or with ``ADAPTER_DIR-merged`` already there.
    The merged model's directory is :func:`merged_dir`; a failure to write it is an OSError.
    """
    check_prompt(prompt)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise PromptError("max_new_tokens", f"must be an int >= 1, got {max_new_tokens!r}")
    sampling = Sampling(temperature, top_p, seed)
    sampling.check()
    source = resolve(model_dir, flag)
    target = _merge_target(source) if merge_lora else None
    tokenizer = load_tokenizer(source, flag)
    ids = chat_ids(tokenizer, prompt, source.tokenizer) if chat else prompt_ids(tokenizer, prompt)
    check_room(len(ids), max_new_tokens, hf.max_positions(source.config))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    # Loading (weights' init, peft's adapters) and sampling draw random numbers: the
    # caller's RNG streams are put back afterwards, and the seed alone picks the sample.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        model = load_model(source, flag)
        if target is not None:
            model = write_merged(model, tokenizer, target)
        torch.manual_seed(0 if sampling.seed is None else sampling.seed)
        return _complete(model.to(device), tokenizer, ids, max_new_tokens, sampling)


def _merge_target(source: Source) -> Path:
    if source.adapter is None:
        raise PromptError("merge_lora", f"needs a LoRA adapter directory: {source.weights} has no "
                                        f"{ADAPTER_CONFIG} (it is a full model already)")
    target = merged_dir(source.adapter)
    if target.exists() or target.is_symlink():
        raise PromptError("merge_lora", f"would write {target}, which exists: it is never replaced "
                                        "(move or delete it first, or generate from it directly)")
    return target


def _complete(
    model: nn.Module, tokenizer: Any, ids: list[int], max_new_tokens: int, sampling: Sampling
) -> str:
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling.generate_kwargs())
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
