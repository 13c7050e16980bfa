"""Tiny Hugging Face model directories for tests, built on the spot (nothing downloaded).

A word-level tokenizer trained with the ``tokenizers`` library on a small generated
corpus (one token per word, so token counts are word counts and tests can predict them
exactly), a Jinja chat template, and a 2-layer Llama sized to its vocabulary, both
written with ``save_pretrained``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

WORDS = (
    "the cat dog sat on mat a big small red blue is what color yes no hello world and of to in "
    "it one two three four five six seven eight nine ten say again please thanks"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def corpus(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """A ``PreTrainedTokenizerFast``: word level, BOS prepended, pad/eos/unk set."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        corpus() + [" ".join(WORDS)], trainer=trainers.WordLevelTrainer(special_tokens=SPECIALS)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = chat_template
    return fast


def make_llama_dir(path: Path, chat_template: str | None = CHAT_TEMPLATE, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32, 4 heads) and its tokenizer, saved into ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(chat_template)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
