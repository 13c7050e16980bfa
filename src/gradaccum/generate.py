"""``gradaccum generate``: greedy completion from a model directory (e.g. a run's OUT/model).

So that a user sees what a fine-tune learned with the same tool that trained it.
Sizes are bounded before they are read: the prompt's length before it is tokenized, and
prompt + new tokens against the model's context before the model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gradaccum.errors import one_line
from gradaccum.workloads import hf

MAX_PROMPT_CHARS = 1_000_000
"""The longest prompt tokenized (a 5 MB line took 1.3 GB to tokenize, measured)."""


class PromptError(ValueError):
    """A ``prompt`` or ``max_new_tokens`` that cannot be served; ``param`` names which."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param} {reason}")
        self.param = param
        self.reason = reason


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


def generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 64, flag: str = "--model") -> str:
    """The greedy continuation of ``prompt`` (the new text only), special tokens removed.

    Raises ``WorkloadError`` (one line) for a directory that is not a causal LM with a tokenizer,
    and :class:`PromptError` for a prompt that is not text, too long, empty without a BOS token,
    or that leaves no room for ``max_new_tokens`` in the model's context.
    """
    check_prompt(prompt)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise PromptError("max_new_tokens", f"must be an int >= 1, got {max_new_tokens!r}")
    config = hf.load_config(model_dir, flag)
    tokenizer = hf.load_tokenizer(model_dir, flag)
    ids = prompt_ids(tokenizer, prompt)
    check_room(len(ids), max_new_tokens, hf.max_positions(config))
    model = hf.load_model(model_dir, dtype="auto", flag=flag, progress=False)
    model.eval()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    input_ids = torch.tensor([ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
