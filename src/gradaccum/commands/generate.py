"""``gradaccum generate``: a completion from a model directory or a LoRA adapter (e.g. OUT/model)."""

from __future__ import annotations

import argparse
import re
import sys

from gradaccum.commands import BadInput, RunFailed
from gradaccum.errors import one_line
from gradaccum.generate import PromptError, generate, merged_dir
from gradaccum.workloads.errors import WorkloadError

FLAGS = {"prompt": "--prompt", "max_new_tokens": "--max-new-tokens", "chat": "--chat",
         "temperature": "--temperature", "top_p": "--top-p", "seed": "--seed", "merge_lora": "--merge-lora"}
"""``generate``'s parameters as this command's flags."""

_NAMED = re.compile(r"\b(temperature|top_p|merge_lora)\b")
"""Parameters a reason may mention besides its own: spelled as flags too."""


def run(opts: argparse.Namespace) -> int:
    try:
        text = generate(opts.model, opts.prompt, opts.max_new_tokens, chat=opts.chat,
                        temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed,
                        merge_lora=opts.merge_lora)
    except WorkloadError as e:
        raise BadInput(str(e)) from None
    except PromptError as e:
        reason = _NAMED.sub(lambda m: FLAGS[m.group(1)], e.reason)
        raise BadInput(f"{FLAGS[e.param]} {reason}") from None
    except OSError as e:  # writing --merge-lora's directory: a full disk, no permission
        if not opts.merge_lora:
            raise
        raise RunFailed(f"--merge-lora: cannot write {merged_dir(opts.model)}: {one_line(e)}") from None
    if opts.merge_lora:
        print(f"gradaccum generate: merged model written to {merged_dir(opts.model)}", file=sys.stderr,
              flush=True)
    print(text, flush=True)
    return 0
