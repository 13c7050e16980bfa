"""A Hugging Face causal LM from a local directory (what ``save_pretrained`` writes).

Everything is loaded with ``local_files_only=True``: a path that is not a usable model
directory is a one-line WorkloadError naming it, never a download attempt or a
traceback.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradaccum.errors import one_line
from gradaccum.workloads.errors import WorkloadError
from gradaccum.workloads.files import TOKENIZER_FILES, check_model_dir  # noqa: F401 - public here too
from gradaccum.workloads.packing import lm_loss

"""Any one of these marks a directory that has a tokenizer."""

DTYPES: dict[str, torch.dtype | None] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "auto": None,  # as saved (config's dtype)
}


def is_causal_lm(config: Any) -> bool:
    """Whether ``AutoModelForCausalLM`` builds a real causal LM from ``config``.

    The config type alone is not enough: BERT and RoBERTa configs are in the causal-LM
    mapping (as decoders), so a saved encoder must be told apart by its saved
    ``architectures`` or, without them, by ``is_decoder``.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING,
    )

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or getattr(config, "is_encoder_decoder", False):
        return False
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        names: set[str] = set()
        for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            names.update((v,) if isinstance(v, str) else v)
        return any(a in names or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return bool(getattr(config, "is_decoder", False)) or type(config) not in MODEL_FOR_MASKED_LM_MAPPING


def load_config(path: str | Path, flag: str = "--model", tokenizer: bool = True) -> Any:
    """The checked config of a causal-LM directory (no weights read)."""
    from transformers import AutoConfig

    p = check_model_dir(path, flag, tokenizer)
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # bad JSON, unknown model_type, ...
        raise WorkloadError(f"{flag} {path}: cannot read config.json ({one_line(e, 300, True)})") from None
    if not is_causal_lm(config):
        archs = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
        raise WorkloadError(
            f"{flag} {path}: not a causal language model ({config.model_type}: {archs}); "
            "expected one AutoModelForCausalLM loads"
        )
    return config


@contextlib.contextmanager
def quiet_transformers() -> Iterator[list[str]]:
    """No third-party chatter while loading: transformers' log lines are kept (the caller may
    quote one in its error) instead of printed, and Python warnings are ignored."""
    import transformers  # noqa: F401  (its logger is configured on import, before we swap handlers)

    kept: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record.getMessage())

    root = logging.getLogger("transformers")
    saved = root.handlers[:], root.level, root.propagate
    root.handlers, root.propagate = [Keep()], False
    root.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield kept
    finally:
        root.handlers, root.propagate = saved[0], saved[2]
        root.setLevel(saved[1])


_MISMATCH = re.compile(r"ckpt:\s*torch\.Size\(\[([^\]]*)\]\)\s*vs\s*model:\s*torch\.Size\(\[([^\]]*)\]\)")


def load_failure(kept: list[str], e: BaseException) -> str:
    """Why a load failed, in one line: the first tensor whose shape differs, if the load
    report (kept by ``quiet_transformers``) names one, else the exception's first line."""
    rows = [ln for rec in kept for ln in rec.splitlines() if "MISMATCH" in ln and _MISMATCH.search(ln)]
    if rows:
        m = _MISMATCH.search(rows[0])
        assert m is not None
        key = rows[0].split("|")[0].strip()
        return (f"the weights do not fit config.json ({key}: [{m.group(1)}] in the weights, "
                f"[{m.group(2)}] by config.json; {len(rows)} tensor group(s) differ)")
    why = one_line(e, 300, True).replace(" For details look at the above report!", "")
    return f"cannot load the model ({why})"


def load_tokenizer(path: str | Path, flag: str = "--model") -> Any:
    from transformers import AutoTokenizer

    check_model_dir(path, flag)
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise WorkloadError(f"{flag} {path}: cannot load the tokenizer ({one_line(e, 300, True)})") from None


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp32"``/``"bf16"``/``"fp16"``/``"auto"`` (or a torch dtype) -> torch dtype, None for as-saved."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise WorkloadError(f"dtype {dtype!r}: expected one of fp32, bf16, fp16, auto") from None


def load_model(
    path: str | Path, dtype: str | torch.dtype | None = "fp32", flag: str = "--model", progress: bool = True
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path)`` in ``dtype``, in train mode.

    ``dtype="fp32"`` (the default) keeps fp32 master weights whatever the checkpoint's
    dtype (mixed precision is autocast's job); ``"bf16"`` trains bf16 weights, whose
    gradients must then be accumulated in fp32 (see ``grad_dtype_for``); ``"auto"``
    keeps the saved dtype.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    load_config(path, flag)
    want = torch_dtype(dtype)
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    kept: list[str] = []
    try:
        with quiet_transformers() as kept:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, dtype="auto" if want is None else want
            )
    except Exception as e:  # no weights file, weights that do not fit the config, ...
        raise WorkloadError(f"{flag} {path}: {load_failure(kept, e)}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.train()  # from_pretrained returns eval mode; a training workload trains
    return model


def load_config_only(
    path: str | Path, dtype: str | torch.dtype | None = "fp32", flag: str = "--model"
) -> nn.Module:
    """The model built from config.json alone on the meta device: shapes and dtypes, no memory.

    For planning without reading the weights (tokenizer files are not required).
    """
    from transformers import AutoModelForCausalLM

    config = load_config(path, flag, tokenizer=False)
    want = torch_dtype(dtype)
    if want is None:
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        known = isinstance(saved, (str, torch.dtype)) and saved != "auto"
        want = (torch_dtype(saved) if known else None) or torch.float32
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=want)
    except Exception as e:
        why = one_line(e, 300, True)
        raise WorkloadError(f"{flag} {path}: cannot build the model from config.json ({why})") from None


def grad_dtype_for(model: nn.Module) -> torch.dtype | None:
    """``torch.float32`` when some trainable weight is bf16/fp16: accumulate its grads in fp32."""
    low = (torch.bfloat16, torch.float16)
    return torch.float32 if any(p.dtype in low for p in model.parameters() if p.requires_grad) else None


def max_positions(config: Any) -> int | None:
    """The model's context length, where its config says it."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and the number of labels really predicted after the shift.

    Labels are not passed to the model: its own loss would be a mean (and some
    transformers versions count one extra label per sequence). ``causal_lm`` sums in
    float32 or wider and counts exactly.
    """
    return lm_loss(model, batch)  # one forward for padded and packed batches
