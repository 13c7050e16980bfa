"""A tiny BERT (from a BertConfig, its WordPiece tokenizer trained here) and generated pairs, for the
embedding tests (nothing downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64}


def make_pairs(n: int, seed: int, negatives: bool = False, words: int = 120) -> list[dict[str, str]]:
    """Anchor: 4-8 pseudo-words; positive: the same words with some swapped for a fixed synonym and
    two neighbours exchanged (a paraphrase sharing rare tokens); negative: another anchor's words."""
    rng = random.Random(1234)  # one vocabulary for every seed: train and eval share it
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "qu", "da"]
    vocab = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(2, 3))) for _ in range(words)})
    synonym = dict(zip(vocab, vocab[1:] + vocab[:1], strict=True))
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = [rng.choice(vocab) for _ in range(rng.randint(4, 8))]
        p = [synonym[w] if rng.random() < 0.4 else w for w in a]
        i = rng.randrange(len(p) - 1)
        p[i], p[i + 1] = p[i + 1], p[i]
        rec = {"anchor": " ".join(a), "positive": " ".join(p)}
        if negatives:
            rec["negative"] = " ".join(rng.choice(vocab) for _ in range(len(a)))
        out.append(rec)
    return out


def make_bert_dir(path: Path, dropout: float = 0.0, seed: int = 0) -> Path:
    """A WordPiece tokenizer trained on generated pairs and a randomly initialised 2-layer BertModel."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    texts = [t for r in make_pairs(400, 99, negatives=True) for t in r.values()]
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=300, min_frequency=1, show_progress=False)
    wp.save_model(str(path))
    tok = BertTokenizerFast(vocab=str(path / "vocab.txt"))  # (vocab_file= is ignored in transformers 5)
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, **BERT)
    BertModel(config).save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
