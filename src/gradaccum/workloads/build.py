"""build_workload: model, data, loss and collate, from the --model/--data flags.

``build_workload("demo")`` is the built-in task (with a held-out set scored per puzzle
kind); ``build_workload("demo", data=FILE)`` the demo model at character level on a
file; ``build_workload(DIR, data=FILE)`` a Hugging Face causal LM directory on a file in
TRL's SFT formats (read and checked in ``workloads.files``, tokenized in
``workloads.data``). Every failure caused by the user's model or data is a
``WorkloadError`` (a ``ValueError``) with a one-line message naming the flag and path
(and line): the CLI prints it and exits 2.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradaccum.workloads.data import Collator, Example, count_items, pad_id_of, tokenize_file
from gradaccum.workloads.errors import WorkloadError
from gradaccum.workloads.files import file_sha256, is_pairs_file, regular_file
from gradaccum.workloads.learnable import check_embedding_rows

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, Any]]

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", None: "auto"}


@dataclass
class Workload:
    """A model, its training (and held-out) examples, and how to batch and score them.

    The first six fields are those of the CLI's earlier ``Workload``, in the same order.
    """

    model: nn.Module
    dataset: Sequence[Example]
    """Training examples ``(input_ids, labels)``; a Sequence (memory-mapped for HF data)."""
    loss_fn: LossFn
    """``loss_fn(model, micro_batch) -> (loss_sum, num_items)``: labels really predicted."""
    collate_fn: Callable[[list[Example]], dict[str, torch.Tensor]]
    """Examples -> ``{"input_ids", "attention_mask", "labels"}``, padded per micro-batch."""
    extra_state: dict[str, Any]
    """Plain data that defines the workload; a checkpoint stores it, resume compares it."""
    fingerprint: str = "demo"
    """What --data is, for resume: ``"demo"`` or ``"sha256:<hex>"`` of the file."""
    eval_dataset: Sequence[Example] | None = None
    eval_fingerprint: str | None = None
    tokenizer: Any = None
    """The Hugging Face tokenizer, or the demo's ``CharTokenizer``."""
    kind: str = "demo"
    """``"demo"`` or ``"hf"``."""
    format: str = "demo"
    """``"demo"`` (generated task), or the data format: text | prompt-completion | messages."""
    truncated: int = 0
    """Training examples cut to --max-length (say so at start-up)."""
    eval_truncated: int = 0
    mean_items: float = 0.0
    """Mean items (counted labels after the causal shift) per training example."""
    grad_dtype: torch.dtype | None = None
    """Pass to ``Accumulator(grad_dtype=...)``: fp32 when the weights are bf16/fp16."""
    accuracy_fn: Callable[[nn.Module], dict[str, float]] | None = None
    """Demo task only: exact-match accuracy per puzzle kind on the held-out set (greedy)."""
    model_path: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    """Figures for start-up lines / summary (examples, items, max_length, ...)."""

    scores_fn: Callable[[nn.Module], dict[str, dict[str, float]]] | None = None
    """Demo task only: per puzzle kind, exact match and the share of answer characters right."""
    padded_collate_fn: Callable[[list[Example]], dict[str, torch.Tensor]] | None = None
    """With --packing: the padded collate ``collate_fn`` replaced (one example per row)."""
    encode: Callable[[nn.Module, Any], Any] | None = None
    """Embedding models (pairs data): ``encode(model, micro) -> representations``; with
    ``window_loss`` the Trainer runs ``Accumulator.step_cached`` (the loss couples the window)."""
    window_loss: Callable[[Any], tuple[torch.Tensor, Any]] | None = None
    eval_fn: Callable[[nn.Module, Sequence[Any]], dict[str, float]] | None = None
    """Scores the held-out set instead of the item-mean loss (embedding: loss and recall@1)."""
    items: str = "tokens"
    """What ``num_items`` counts (the throughput column): tokens, or pairs."""
    save_fn: Callable[..., Any] | None = None
    """``save_fn(model, tokenizer, out_dir, state_dict=None)`` writes OUT/model, instead of
    ``lora.save_model``."""

    def examples_for_items(self, items: float) -> float:
        """Convert an item count (tokens: e.g. the noise scale) to examples, at the mean rate."""
        return items / self.mean_items if self.mean_items > 0 else float("nan")


def _mean_items(examples: Sequence[Example]) -> float:
    return sum(count_items(labels) for _, labels in examples) / max(1, len(examples))


def build_workload(
    model: str = "demo",
    data: str | None = None,
    eval_data: str | None = None,
    max_length: int | None = None,
    seed: int = 0,
    *,
    dtype: str | torch.dtype | None = "fp32",
    task_size: int | None = None,
    eval_size: int | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
) -> Workload:
    """The workload of ``--model``/``--data``/``--eval-data``/``--max-length``/``--seed``.

    - ``model="demo"``: the built-in GPT-2; ``seed`` sets its init and the generated
      task. Without ``data``: the task (``task_size`` examples), a held-out set of
      ``eval_size`` unseen puzzles as ``eval_dataset`` and ``accuracy_fn``. With
      ``data``: character level, vocabulary = the training data's characters;
      ``max_length`` (default 128) caps examples (BOS and EOS included).
    - otherwise ``model`` is a Hugging Face model directory; ``data`` is required,
      ``max_length`` defaults to the model's context, ``dtype`` is fp32 | bf16 | fp16 |
      auto (as saved) for the weights. ``seed`` is unused (the weights are given).
    Data is read and checked before any weights are loaded, so bad input fails fast.
    """
    if max_length is not None and max_length < 3:
        raise WorkloadError(f"--max-length {max_length}: must be at least 3")
    json_data = data is not None and Path(data).suffix.lower() in (".jsonl", ".json")
    # (regular_file first: a pipe would block the peek at the first record)
    if model != "demo" and json_data and regular_file(data, "--data", WorkloadError) and is_pairs_file(data):
        from gradaccum.workloads.embedding import build_embedding

        return build_embedding(model, data, eval_data, max_length, dtype, cache_dir, progress)
    if model == "demo":
        return _demo_workload(data, eval_data, max_length, seed, task_size, eval_size, cache_dir, progress)
    return _hf_workload(model, data, eval_data, max_length, dtype, cache_dir, progress)


def _demo_workload(
    data: str | None, eval_data: str | None, max_length: int | None, seed: int,
    task_size: int | None, eval_size: int | None, cache_dir: str | None, progress: bool,
) -> Workload:
    """The demo model on the generated task, or at character level on a data file."""
    from gradaccum import demo
    from gradaccum.workloads import demo as demo_workload

    parts = demo_workload.build_demo(
        data, eval_data, max_length, seed,
        task_size=demo_workload.TASK_SIZE if task_size is None else task_size,
        eval_size=demo_workload.EVAL_SIZE if eval_size is None else eval_size,
        cache_dir=cache_dir, progress=progress,
    )
    return Workload(
        model=parts.model,
        dataset=parts.examples,
        loss_fn=demo.loss_fn,
        collate_fn=demo.collate,
        extra_state=parts.extra_state,
        fingerprint=parts.fingerprint,
        eval_dataset=parts.eval_examples,
        eval_fingerprint=parts.eval_fingerprint,
        tokenizer=parts.tokenizer,
        kind="demo",
        format=parts.format,
        truncated=parts.truncated,
        eval_truncated=parts.eval_truncated,
        mean_items=_mean_items(parts.examples),
        accuracy_fn=(
            functools.partial(demo_workload.puzzle_accuracy, puzzles=parts.puzzles)
            if parts.puzzles
            else None
        ),
        info={"examples": len(parts.examples), "max_length": parts.extra_state["max_len"]},
        scores_fn=(functools.partial(demo_workload.puzzle_scores, puzzles=parts.puzzles)
                   if parts.puzzles else None),
    )


def _check_ids(model: str, vocab: int, rows: int | None, train: Any, held: Any) -> None:
    """Every id the tokenizer (and the data) can produce has a row in the model's embedding."""
    check_embedding_rows(model, vocab, rows, train.max_id)
    if held is not None:
        check_embedding_rows(model, None, rows, held.max_id, "--eval-data")


def _hf_workload(
    model: str, data: str | None, eval_data: str | None, max_length: int | None,
    dtype: str | torch.dtype | None, cache_dir: str | None, progress: bool,
) -> Workload:
    """A Hugging Face model directory on a data file: data read and checked before the weights."""
    from gradaccum.workloads import hf

    config = hf.load_config(model)  # first: a wrong --model is the more basic mistake
    if data is None:
        raise WorkloadError(f"--data: required with --model {model} (a .txt, .jsonl or .json file)")
    tokenizer = hf.load_tokenizer(model)
    context = hf.max_positions(config)
    if max_length is not None and context is not None and max_length > context:
        raise WorkloadError(f"--max-length {max_length}: longer than the model's context ({context} tokens)")
    rows = getattr(config, "vocab_size", None)
    rows = rows if isinstance(rows, int) else None  # checked before tokenizing, again once loaded
    check_embedding_rows(model, len(tokenizer), rows)
    limit = max_length if max_length is not None else context
    limit_name = f"--max-length {limit} tokens" if max_length is not None else f"the context ({limit} tokens)"
    train = tokenize_file(data, tokenizer, limit, "--data", cache_dir, progress, limit_name)
    held = None
    if eval_data is not None:
        held = tokenize_file(eval_data, tokenizer, limit, "--eval-data", cache_dir, progress, limit_name)
    _check_ids(model, len(tokenizer), rows, train, held)
    weights = hf.load_model(model, dtype, progress=progress)  # last: reading the weights is the slow part
    _check_ids(model, len(tokenizer), weights.get_input_embeddings().num_embeddings, train, held)
    extra = {
        "task": "hf",
        "model": str(Path(model).resolve()),
        "model_config": file_sha256(Path(model) / "config.json"),
        "data": train.fingerprint,
        "format": train.format,
        "max_length": limit,
        "dtype": _DTYPE_NAMES.get(hf.torch_dtype(dtype), str(dtype)),
    }
    return Workload(
        model=weights,
        dataset=train.examples,
        loss_fn=hf.loss_fn,
        collate_fn=Collator(pad_id_of(tokenizer)),
        extra_state=extra,
        fingerprint=train.fingerprint,
        eval_dataset=held.examples if held else None,
        eval_fingerprint=held.fingerprint if held else None,
        tokenizer=tokenizer,
        kind="hf",
        format=train.format,
        truncated=train.truncated,
        eval_truncated=held.truncated if held else 0,
        mean_items=train.mean_items,
        grad_dtype=hf.grad_dtype_for(weights),
        model_path=str(model),
        info={"examples": len(train.examples), "items": train.num_items, "max_length": limit},
    )
