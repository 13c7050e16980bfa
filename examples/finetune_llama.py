"""Fine-tune a (tiny) Llama on your own JSONL through the gradaccum CLI.

Run: python examples/finetune_llama.py [WORKDIR]      (CPU, about a minute)

What a user with a real model does, end to end, with nothing downloaded: a Llama built
from a config and a tokenizer trained here stand in for a model directory, written with
save_pretrained; a JSONL file of prompt/completion pairs stands in for the data. Then:

    gradaccum train --model WORKDIR/llama --data WORKDIR/train.jsonl --eval-data WORKDIR/eval.jsonl \\
        --effective-batch 32 --micro-batch 4 --steps 60 --lr 3e-3 --out WORKDIR/run
    gradaccum generate --model WORKDIR/run/model --prompt "what color is the cat"

WORKDIR/run/model is a normal Hugging Face directory: AutoModelForCausalLM.from_pretrained loads it.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

COLORS = ["red", "blue", "green", "black", "white"]
ANIMALS = ["cat", "dog", "bird", "fish", "horse"]


def make_data(n: int, seed: int) -> list[dict[str, str]]:
    """A toy task to learn: the colour of each animal is fixed."""
    rng = random.Random(seed)
    color_of = dict(zip(ANIMALS, COLORS, strict=True))
    out = []
    for _ in range(n):
        animal = rng.choice(ANIMALS)
        # Prompt and completion are joined as they are (TRL's convention): mind the space.
        out.append({"prompt": f"what color is the {animal}",
                    "completion": f" the {animal} is {color_of[animal]}"})
    return out


def make_model_dir(path: Path, texts: list[str]) -> None:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(special_tokens=specials))
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def main() -> int:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/finetune_example")
    work.mkdir(parents=True, exist_ok=True)
    train, held_out = make_data(400, seed=0), make_data(40, seed=1)
    for name, records in (("train.jsonl", train), ("eval.jsonl", held_out)):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    make_model_dir(work / "llama", [f"{r['prompt']} {r['completion']}" for r in train])
    run = [sys.executable, "-m", "gradaccum", "train", "--model", str(work / "llama"),
           "--data", str(work / "train.jsonl"), "--eval-data", str(work / "eval.jsonl"),
           "--effective-batch", "32", "--micro-batch", "4", "--steps", "60", "--lr", "3e-3",
           "--out", str(work / "run"), "--overwrite"]
    gen = [sys.executable, "-m", "gradaccum", "generate", "--model", str(work / "run" / "model"),
           "--prompt", "what color is the cat", "--max-new-tokens", "4"]
    for cmd in (run, gen):
        print("$", " ".join(cmd[2:]).replace("-m gradaccum", "gradaccum"), flush=True)
        if subprocess.run(cmd).returncode != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
