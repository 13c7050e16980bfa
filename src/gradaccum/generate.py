"""``gradaccum generate``: greedy completion from a model directory (e.g. a run's OUT/model).

So that a user sees what a fine-tune learned with the same tool that trained it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gradaccum.workloads import hf


def generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 64, flag: str = "--model") -> str:
    """The greedy continuation of ``prompt`` (the new text only), special tokens removed.

    Raises ``WorkloadError`` (one line) for a directory that is not a causal LM with a tokenizer.
    """
    tokenizer = hf.load_tokenizer(model_dir, flag)
    model = hf.load_model(model_dir, dtype="auto", flag=flag, progress=False)
    model.eval()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    new = out[0, enc["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True)
