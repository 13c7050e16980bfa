"""``gradaccum generate``: greedy completion from a model directory (e.g. OUT/model)."""

from __future__ import annotations

import argparse

from gradaccum.commands import BadInput
from gradaccum.generate import PromptError, generate
from gradaccum.workloads import WorkloadError

FLAGS = {"prompt": "--prompt", "max_new_tokens": "--max-new-tokens"}
"""``generate``'s parameters as this command's flags."""


def run(opts: argparse.Namespace) -> int:
    try:
        text = generate(opts.model, opts.prompt, opts.max_new_tokens)
    except WorkloadError as e:
        raise BadInput(str(e)) from None
    except PromptError as e:
        raise BadInput(f"{FLAGS[e.param]} {e.reason}") from None
    print(text, flush=True)
    return 0
