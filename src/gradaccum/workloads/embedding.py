"""An embedding model trained on pairs with in-batch negatives over the whole effective batch.

``--model DIR`` is an encoder ``AutoModel`` loads (BERT, RoBERTa, ...); a text's embedding is
the mean of the last hidden state over its real tokens (sentence-transformers' mean pooling).
The loss is InfoNCE (``losses.info_nce``, cosine, temperature 0.05: sentence-transformers'
MultipleNegativesRankingLoss at scale 20): every anchor against every positive (and hard
negative) of the window, so it couples micro-batches; the Trainer runs it through
``Accumulator.step_cached`` (``encode`` and ``window_loss`` here). ``loss_fn`` is the same loss
on one micro-batch alone: the objective plain accumulation trains (``compare``'s ``plain``,
``check``'s split test). ``OUT/model`` is a ``save_pretrained`` directory that
sentence-transformers also loads (modules.json, 1_Pooling).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradaccum import losses
from gradaccum.errors import one_line
from gradaccum.workloads import hf
from gradaccum.workloads.errors import WorkloadError
from gradaccum.workloads.files import check_model_dir, file_sha256
from gradaccum.workloads.learnable import check_embedding_rows
from gradaccum.workloads.pairs import Pair, PairCollator, read_pairs

TEMPERATURE = 0.05
EVAL_CHUNK = 64
"""Held-out texts per forward when evaluating (no grad: only memory, never the result, depends on it)."""


# ------------------------------------------------------------------------------ the model
def load_encoder_config(path: str | Path, flag: str = "--model") -> Any:
    """The config of an encoder directory ``AutoModel`` builds (not a causal LM, not encoder-decoder)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    check_model_dir(path, flag)
    try:
        with hf.quiet_transformers():
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise WorkloadError(f"{flag} {path}: cannot read config.json ({one_line(e, 300, True)})") from None
    encoder = type(config) in MODEL_MAPPING and not getattr(config, "is_encoder_decoder", False)
    if not encoder or hf.is_causal_lm(config):
        archs = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
        raise WorkloadError(f"{flag} {path}: not an encoder ({config.model_type}: {archs}); anchor/positive "
                            "pairs train an embedding model: give an encoder AutoModel loads, such as BERT")
    return config


def load_encoder(path: str | Path, dtype: str | torch.dtype | None, progress: bool = True,
                 flag: str = "--model") -> nn.Module:
    """``AutoModel.from_pretrained(path)`` in train mode, its pooler layer (BERT's) frozen: mean
    pooling never uses it, and DDP refuses trained parameters that get no gradient."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    want = hf.torch_dtype(dtype)
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    kept: list[str] = []
    try:
        with hf.quiet_transformers() as kept:
            model = AutoModel.from_pretrained(str(path), local_files_only=True,
                                              dtype="auto" if want is None else want)
    except Exception as e:
        raise WorkloadError(f"{flag} {path}: {hf.load_failure(kept, e)}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    pooler = getattr(model, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)
    model.train()
    return model


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``hidden`` (B, T, D) over the positions where ``mask`` (B, T) is 1."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def encode(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """One micro-batch's embeddings, one tensor per role (anchor, positive[, negative]): every text
    of the micro-batch in one forward (DDP wants one forward per backward), padded to the longest."""
    roles = [k.removesuffix("_input_ids") for k in batch if k.endswith("_input_ids")]
    width = max(batch[f"{r}_input_ids"].shape[1] for r in roles)
    device = next(model.parameters()).device

    def padded(key: str, r: str) -> torch.Tensor:
        x = batch[f"{r}_{key}"]
        return nn.functional.pad(x, (0, width - x.shape[1])).to(device)  # id 0 only where masked

    ids = torch.cat([padded("input_ids", r) for r in roles])
    mask = torch.cat([padded("attention_mask", r) for r in roles])
    pooled = mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    return tuple(pooled.split([batch[f"{r}_input_ids"].shape[0] for r in roles]))


def window_loss(reps: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, int]:
    """InfoNCE over the whole window: each anchor against every positive (and hard negative)."""
    return losses.info_nce(reps[0], reps[1], TEMPERATURE, reps[2] if len(reps) > 2 else None)


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The same loss on one micro-batch alone (its own negatives only): plain accumulation's objective."""
    return window_loss(encode(model, batch))


def recall_at_1(anchors: torch.Tensor, positives: torch.Tensor) -> float:
    """Share of anchors whose nearest positive by cosine is their own."""
    a, p = (nn.functional.normalize(x.float(), dim=-1) for x in (anchors, positives))
    sims = a @ p.T
    hits = sims.argmax(dim=1) == torch.arange(len(anchors), device=sims.device)
    return float(hits.float().mean())


class EmbeddingEval:
    """The held-out metrics: ``eval_loss`` (InfoNCE over the WHOLE held-out set, item mean: exact,
    whatever the micro-batch) and ``eval_recall_at_1``. Every rank scores the whole set (no
    collective); ``last`` keeps the latest result for the summary."""

    def __init__(self, collate: PairCollator, dataset: Sequence[Pair]) -> None:
        self.collate = collate
        self.dataset = dataset
        self.last: dict[str, float] | None = None

    def __call__(self, model: nn.Module, dataset: Sequence[Pair]) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                n = len(dataset)
                parts = [encode(model, self.collate([dataset[j] for j in range(i, min(i + EVAL_CHUNK, n))]))
                         for i in range(0, n, EVAL_CHUNK)]
                reps = tuple(torch.cat(r) for r in zip(*parts, strict=True))
                loss_sum, count = window_loss(reps)
        finally:
            model.train(was_training)
        loss = float(loss_sum) / count
        self.last = {"eval_loss": loss if math.isfinite(loss) else math.nan,
                     "eval_recall_at_1": recall_at_1(reps[0], reps[1])}
        return dict(self.last)

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """summary.json's ``final_eval_recall_at_1``: the last evaluation's (else one now)."""
        last = self.last if self.last is not None else self(model, self.dataset)
        return {"final_eval_recall_at_1": last["eval_recall_at_1"]}


# ------------------------------------------------------------------------------ OUT/model
def save_model(model: nn.Module, tokenizer: Any, out_dir: str | Path,
               state_dict: dict[str, Any] | None = None, max_length: int | None = None) -> Path:
    """``save_pretrained`` (weights, tokenizer) plus what sentence-transformers reads to load it
    with mean pooling (modules.json, sentence_bert_config.json, 1_Pooling/config.json), atomically."""
    from gradaccum.checkpoint import atomic_write_dir

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    dim = int(model.config.hidden_size)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    pooling = {"word_embedding_dimension": dim, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False}

    st_config = {"max_seq_length": max_length, "do_lower_case": False}

    def write(tmp: Path) -> None:
        kwargs: dict[str, Any] = {"safe_serialization": True}
        if state_dict is not None:
            kwargs["state_dict"] = dict(state_dict)
        model.save_pretrained(str(tmp), **kwargs)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "1_Pooling").mkdir()
        for name, obj in (("modules.json", modules), ("1_Pooling/config.json", pooling),
                          ("sentence_bert_config.json", st_config)):
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")

    atomic_write_dir(out, write)
    return out


# ------------------------------------------------------------------------------ the workload
def build_embedding(model: str, data: str, eval_data: str | None, max_length: int | None,
                    dtype: str | torch.dtype | None, cache_dir: str | None, progress: bool) -> Any:
    """The embedding workload of ``--model DIR --data pairs.jsonl``: the config, tokenizer and data
    checked before the weights are read."""
    import functools

    from gradaccum.workloads.build import Workload
    from gradaccum.workloads.data import pad_id_of

    config = load_encoder_config(model)
    tokenizer = hf.load_tokenizer(model)
    context = hf.max_positions(config)
    if max_length is not None and context is not None and max_length > context:
        raise WorkloadError(f"--max-length {max_length}: longer than the model's context ({context} tokens)")
    limit = max_length if max_length is not None else context
    rows = config.vocab_size if isinstance(getattr(config, "vocab_size", None), int) else None
    check_embedding_rows(model, len(tokenizer), rows)
    train = read_pairs(data, tokenizer, limit, "--data", cache_dir, progress)
    held = read_pairs(eval_data, tokenizer, limit, "--eval-data", cache_dir, progress) if eval_data else None
    if held is not None and held.roles != train.roles:
        raise WorkloadError(f"--eval-data {eval_data}: {held.format}, but --data {data} holds {train.format}")
    weights = load_encoder(model, dtype, progress)
    for what, part in (("--data", train), ("--eval-data", held)):
        if part is not None:
            rows = weights.get_input_embeddings().num_embeddings
            check_embedding_rows(model, None, rows, part.max_id, what)
    collate = PairCollator(pad_id_of(tokenizer), train.roles)
    evaluator = EmbeddingEval(collate, held.examples) if held is not None else None
    return Workload(
        model=weights, dataset=train.examples, loss_fn=loss_fn, collate_fn=collate,  # type: ignore[arg-type]
        extra_state={"task": "embedding", "model": str(Path(model).resolve()),
                     "model_config": file_sha256(Path(model) / "config.json"), "data": train.fingerprint,
                     "format": train.format, "max_length": limit, "pooling": "mean",
                     "temperature": TEMPERATURE, "dtype": str(dtype)},
        fingerprint=train.fingerprint, eval_dataset=held.examples if held else None,  # type: ignore[arg-type]
        eval_fingerprint=held.fingerprint if held else None, tokenizer=tokenizer, kind="embedding",
        format=train.format, truncated=train.truncated, eval_truncated=held.truncated if held else 0,
        mean_items=1.0, grad_dtype=hf.grad_dtype_for(weights), model_path=str(model),
        info={"examples": len(train.examples), "items": len(train.examples), "max_length": limit},
        encode=encode, window_loss=window_loss, eval_fn=evaluator, items="pairs",
        save_fn=functools.partial(save_model, max_length=limit),
    )
