"""Contrastive training under accumulation (issue 22): in-batch negatives over 256 pairs, 16 at a time.

A tiny BERT (from a config; its WordPiece tokenizer trained here on the generated text,
nothing downloaded) embeds anchor/positive pairs with mean pooling; the loss is InfoNCE
with in-batch negatives (cosine / 0.05, sentence-transformers' MultipleNegativesRankingLoss).
Effective batch 256, micro-batch 16. Contenders:

- ``full``: the 256 pairs in one forward and backward (the objective, and the yardstick);
- ``gradaccum step_cached``: the representation cache, loss on all 256 rows;
- ``plain accumulation``: ``acc.step()`` with the loss per micro-batch (15 negatives per
  row instead of 255): what every trainer's gradient accumulation computes;
- ``sentence-transformers cached``: ``CachedMultipleNegativesRankingLoss(mini_batch_size=16)``
  on a SentenceTransformer built from the same BERT directory + mean pooling.

Measured: the gradient's relative error against a float64 full-batch gradient (dropout
off, so every contender sees the same function); time per window (train mode, AdamW step
included) relative to ``full``, median of per-round ratios, contenders interleaved in a
rotating order; peak bytes of tensors allocated in one window (``gradaccum.memory.PeakTracker``,
after a warm-up window, parameters not counted) relative to ``full``.

    python benchmarks/contrastive.py [--threads 1] [--rounds 15] [--write-docs]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import gradaccum as ga  # noqa: E402
from gradaccum import memory  # noqa: E402

EFFECTIVE, MICRO, TEMPERATURE = 256, 16, 0.05
BERT = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 1024,
        "max_position_embeddings": 64, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
CONTENDERS = ("full", "gradaccum step_cached", "plain accumulation", "sentence-transformers cached")


# --------------------------------------------------------------------------- data and model
def make_pairs(n: int, seed: int, words: int = 400) -> list[tuple[str, str]]:
    """Anchor: 12-28 pseudo-words; positive: the same sentence with a third of its words swapped for
    their fixed synonym and two neighbours exchanged (similar, not equal)."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "qu", "da"]
    vocab = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(2, 3))) for _ in range(words)})
    synonym = dict(zip(vocab, vocab[1:] + vocab[:1], strict=True))
    out = []
    for _ in range(n):
        a = [rng.choice(vocab) for _ in range(rng.randint(12, 28))]
        p = [synonym[w] if rng.random() < 0.33 else w for w in a]
        i = rng.randrange(len(p) - 1)
        p[i], p[i + 1] = p[i + 1], p[i]
        out.append((" ".join(a), " ".join(p)))
    return out


def build_model_dir(path: Path, texts: list[str], seed: int = 0) -> Path:
    """A WordPiece tokenizer trained on ``texts`` and a randomly initialised BertModel, saved."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=1000, min_frequency=1, show_progress=False)
    wp.save_model(str(path))
    tok = BertTokenizerFast(vocab=str(path / "vocab.txt"))  # (vocab_file= is ignored in transformers 5)
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=tok.vocab_size, **BERT)).save_pretrained(path)
    return path


def load_st(path: Path) -> Any:
    """SentenceTransformer(BERT directory + mean pooling): the sentence-transformers contender,
    and (its BERT module) the encoder every other contender trains."""
    from sentence_transformers import SentenceTransformer, models

    bert = models.Transformer(str(path))
    return SentenceTransformer(modules=[bert, models.Pooling(bert.get_embedding_dimension(), "mean")],
                               device="cpu")


def tokenize(tok: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tok(texts, padding=True, return_tensors="pt"))


def embed(bert: Any, feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean pooling over the last hidden state's real tokens (sentence-transformers' Pooling)."""
    hidden = bert(**feats).last_hidden_state
    mask = feats["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def encode(bert: Any, micro: tuple[dict, dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return embed(bert, micro[0]), embed(bert, micro[1])


def window_loss(reps: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    return ga.losses.info_nce(reps[0], reps[1], TEMPERATURE)


def micro_batches(tok: Any, pairs: list[tuple[str, str]], size: int) -> list[tuple[dict, dict]]:
    """Each micro-batch tokenized (padded) on its own, as a data loader would."""
    chunks = [pairs[i : i + size] for i in range(0, len(pairs), size)]
    return [(tokenize(tok, [a for a, _ in c]), tokenize(tok, [p for _, p in c])) for c in chunks]


def prepare(tok: Any, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """One window's inputs, tokenized before any clock starts: whole, and in micro-batches."""
    return {"whole": micro_batches(tok, pairs, len(pairs))[0], "micro": micro_batches(tok, pairs, MICRO),
            "n": len(pairs)}


# --------------------------------------------------------------------------- one window per contender
class Contender:
    """One contender's copy of the model, its AdamW and its window."""

    def __init__(self, name: str, st: Any, lr: float) -> None:
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

        self.name = name
        self.st = copy.deepcopy(st)
        self.bert = self.st[0].auto_model
        self.opt = torch.optim.AdamW(self.bert.parameters(), lr=lr)
        self.acc = ga.Accumulator(self.bert, self.opt)
        self.cmnrl = CachedMultipleNegativesRankingLoss(self.st, scale=1 / TEMPERATURE, mini_batch_size=MICRO)

    def window(self, batch: dict[str, Any]) -> None:
        """One optimizer step on one prepared window."""
        if self.name == "full":
            loss, n = window_loss(encode(self.bert, batch["whole"]))
            self.opt.zero_grad(set_to_none=True)
            (loss / n).backward()
            self.opt.step()
        elif self.name == "gradaccum step_cached":
            self.acc.step_cached(batch["micro"], encode, window_loss)
        elif self.name == "plain accumulation":
            self.acc.step(batch["micro"], lambda m, mb: window_loss(encode(m, mb)))
        else:  # its own API: whole-batch features, split into mini-batches of MICRO inside
            self.opt.zero_grad(set_to_none=True)
            self.cmnrl(list(batch["whole"]), torch.zeros(batch["n"])).backward()
            self.opt.step()

    def grad(self, batch: dict[str, Any]) -> torch.Tensor:
        """The gradient this contender hands its optimizer for ``batch``, with dropout off."""
        got: list[torch.Tensor] = []
        params = list(self.bert.parameters())
        hook = self.opt.register_step_pre_hook(lambda o, a, k: got.append(common.flat_grad(params)))
        self.st.eval()
        try:
            self.window(batch)
        finally:
            hook.remove()
            self.st.train()
        return got[0]

    def peak(self, batch: dict[str, Any]) -> int:
        """Peak bytes of tensors allocated in one window (train mode), after a warm-up window."""
        self.window(batch)
        self.opt.zero_grad(set_to_none=True)
        with memory.PeakTracker("cpu") as tracker:
            self.window(batch)
        return tracker.peak_bytes


def reference_grad(st: Any, batch: dict[str, Any]) -> torch.Tensor:
    """float64, dropout off, one forward over all 256 pairs: the full-batch gradient."""
    bert = copy.deepcopy(st[0].auto_model).double().eval()
    loss, n = window_loss(encode(bert, batch["whole"]))
    (loss / n).backward()
    return common.flat_grad(bert.parameters())


# --------------------------------------------------------------------------- the measurements
def run(
    rounds: int = 15, warmup: int = 1, effective: int = EFFECTIVE, threads: int | None = None
) -> dict[str, Any]:
    """Gradient error, time per window and peak memory of every contender; a JSON-ready dict."""
    common.set_threads(threads)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = [t for pair in make_pairs(2000, seed=99) for t in pair]
        st = load_st(build_model_dir(Path(tmp), corpus))
    tok = st[0].tokenizer
    batches = [prepare(tok, make_pairs(effective, seed=r)) for r in range(warmup + rounds)]
    ref = reference_grad(st, batches[0])
    errors = {c: common.rel_err(Contender(c, st, lr=0.0).grad(batches[0]), ref) for c in CONTENDERS}
    racers = {c: Contender(c, st, lr=1e-4) for c in CONTENDERS}
    times = common.interleave({c: (lambda r, c=c: racers[c].window(batches[r])) for c in CONTENDERS},
                              rounds=rounds, warmup=warmup)
    peaks = {c: Contender(c, st, lr=1e-4).peak(batches[0]) for c in CONTENDERS}
    rel_time = {c: common.summary(common.ratios(times[c], times["full"])) for c in CONTENDERS}
    return {"machine": common.machine_info(), "effective_batch": effective, "micro_batch": MICRO,
            "rounds": rounds, "warmup": warmup, "bert": BERT, "temperature": TEMPERATURE,
            "grad_rel_error": errors, "seconds_per_window": {c: common.summary(times[c]) for c in CONTENDERS},
            "time_vs_full": rel_time, "peak_bytes": peaks,
            "peak_vs_full": {c: peaks[c] / peaks["full"] for c in CONTENDERS}}


def table(res: dict[str, Any]) -> str:
    rows = ["| contender | gradient error vs full batch (float64) | time per window vs full | "
            "peak memory vs full |", "|---|---:|---:|---:|"]
    for c in CONTENDERS:
        t = res["time_vs_full"][c]
        rows.append(f"| {c} | {res['grad_rel_error'][c]:.1e} | {t['median']:.2f}x "
                    f"({t['q1']:.2f}-{t['q3']:.2f}) | {res['peak_vs_full'][c]:.2f}x |")
    return "\n".join(rows)


def describe(res: dict[str, Any]) -> str:
    m, b = res["machine"], res["bert"]
    full_s, full_mib = res["seconds_per_window"]["full"]["median"], res["peak_bytes"]["full"] / 2**20
    return "\n".join([
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch "
        f"thread{'s' if m['torch_threads'] != 1 else ''}, "
        f"1-min load average {m['load_average_1min']:.1f} at the start), "
        f"torch {m['torch']}, transformers {m['transformers']}, "
        f"sentence-transformers {m['sentence_transformers']}, gradaccum {m['gradaccum']}.",
        "",
        f"Tiny BERT ({b['num_hidden_layers']} layers, hidden {b['hidden_size']}, local WordPiece), mean "
        "pooling, "
        f"InfoNCE with in-batch negatives (cosine / {res['temperature']}); effective batch "
        f"{res['effective_batch']} pairs, micro-batch {res['micro_batch']}. Gradient error: relative to a "
        "float64 full-batch gradient, dropout off, float32 contenders (the full batch's own error is the "
        f"float32 floor). Time: median of per-round ratios (quartiles) over {res['rounds']} interleaved "
        f"rounds after {res['warmup']} warm-up, AdamW step included (full batch: {full_s:.2f} s per window). "
        f"Peak: tensor bytes allocated in one window, parameters excluded (full batch: {full_mib:.0f} MiB).",
        "",
        table(res),
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="measured rounds (default 15)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds, not measured (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--write-docs", action="store_true",
                   help="also store the result in docs/benchmarks.json and its table in docs/benchmarks.md")
    a = p.parse_args(argv)
    res = run(rounds=a.rounds, warmup=a.warmup, threads=a.threads)
    print(json.dumps(res, indent=2) if a.json else describe(res))
    if a.write_docs:
        common.merge_json(common.DOCS / "benchmarks.json", "contrastive", res)
        common.write_section(common.DOCS / "benchmarks.md", "contrastive", describe(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
