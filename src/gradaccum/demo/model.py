"""The built-in model: a small GPT-2 decoder from Hugging Face transformers, built from a config."""

from __future__ import annotations

import torch
from torch import nn

from gradaccum import losses


def build_model(
    vocab_size: int, max_len: int, seed: int = 0, n_layer: int = 3, n_embd: int = 96, n_head: int = 4
) -> nn.Module:
    """A tiny GPT-2 with no dropout, so runs are reproducible; initialised from ``seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the config's default bos/eos ids don't apply here
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=max_len,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss over the counted labels, and their number."""
    device = next(model.parameters()).device
    out = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    )
    return losses.causal_lm(out.logits, batch["labels"].to(device))
