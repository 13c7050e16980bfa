"""The built-in demo: a tiny GPT-2 and a generated task with variable-length answers."""

from gradaccum.demo.model import build_model, loss_fn
from gradaccum.demo.task import TASK_MAX_LEN, TASK_TOKENIZER, CharTokenizer, collate, make_examples
from gradaccum.demo.text import load_text_examples
from gradaccum.workloads.files import TextFileError

__all__ = [
    "TASK_MAX_LEN",
    "TASK_TOKENIZER",
    "CharTokenizer",
    "TextFileError",
    "build_model",
    "collate",
    "load_text_examples",
    "loss_fn",
    "make_examples",
]
