"""The HF Trainer comparison's model, tokenizer and data (hf_trainer_peer.py): a tiny Llama
built from a ``LlamaConfig`` with a word-level tokenizer, saved with ``save_pretrained``,
and prompt/completion records in TRL's SFT format. Nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


@dataclass(frozen=True)
class Size:
    """The model and data of one benchmark run."""

    words: int = 250
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    min_tokens: int = 4
    max_tokens: int = 64
    examples: int = 512

    @property
    def vocab(self) -> int:
        return self.words + len(SPECIALS)

    def describe(self) -> str:
        return (
            f"LlamaForCausalLM from a LlamaConfig (hidden {self.hidden}, {self.layers} layers, "
            f"{self.heads} heads, intermediate {2 * self.hidden}, vocab {self.vocab}, word-level tokenizer); "
            f"{self.examples} prompt/completion examples of {self.min_tokens}-{self.max_tokens} tokens "
            "(BOS and EOS included), loss on the completion and EOS only, right-padded per micro-batch"
        )


def words(n: int) -> list[str]:
    return [f"w{i:03d}" for i in range(n)]


def make_tokenizer(n_words: int) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` (one token per word), BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + words(n_words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_model_dir(path: Path, size: Size, seed: int = 0) -> Path:
    """A Llama and its tokenizer, written with ``save_pretrained`` (what ``--model DIR`` loads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(size.words)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=size.hidden,
        intermediate_size=2 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=max(128, size.max_tokens),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tok.save_pretrained(path)
    return path


def make_records(size: Size, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion pairs of ``min_tokens``-``max_tokens`` tokens in all (BOS and EOS included).

    Each sequence follows its own arithmetic pattern over the words, so later tokens
    are predictable and short and long completions come to have different mean losses.
    """
    rng = random.Random(seed)
    vocab = words(size.words)
    out = []
    for _ in range(size.examples):
        n = rng.randint(size.min_tokens, size.max_tokens) - 2  # words between BOS and EOS
        start, stride = rng.randrange(size.words), rng.randint(1, 7)
        seq = [vocab[(start + stride * t) % size.words] for t in range(n)]
        cut = rng.randint(1, n - 1)  # at least one word of prompt and of completion
        out.append({"prompt": " ".join(seq[:cut]), "completion": " " + " ".join(seq[cut:])})
    return out


@dataclass
class Setup:
    model_dir: Path
    data: Path
    size: Size
    cache_dir: Path


def make_setup(root: Path, size: Size, seed: int = 0) -> Setup:
    root.mkdir(parents=True, exist_ok=True)
    model_dir = make_model_dir(root / "model", size, seed)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(size, seed)))
    return Setup(model_dir, data, size, root / "cache")


# --------------------------------------------------------------------------- float64 that is float64
def float64_rms_norm(model: nn.Module) -> nn.Module:
    """Make Llama's RMSNorm compute in the input's dtype.

    transformers' ``LlamaRMSNorm`` upcasts to float32 and back, which in a float64 model
    rounds every gradient that flows through it to float32; patched, a float64 model is
    float64 from the embedding to the logits (the rotary tables are float32 constants
    with no gradient, the same in every model, so they do not matter).
    """

    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms, "no LlamaRMSNorm to patch"
    for m in norms:
        m.forward = types.MethodType(forward, m)
    return model


def load_model(setup: Setup, dtype: torch.dtype) -> nn.Module:
    from gradaccum.workloads import hf

    model = hf.load_model(setup.model_dir, dtype, progress=False)
    return float64_rms_norm(model) if dtype == torch.float64 else model
