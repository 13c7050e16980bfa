"""The commands: one module each, ``run(opts) -> exit code``; ``opts`` is argparse's namespace.

A command checks its flags, builds what it needs through the library, and reports. Bad
input is :class:`BadInput` (the CLI prints one line and exits 2), a failure worth one
line :class:`RunFailed` (exit 1). Library errors name parameters; :func:`flag_message`
turns them into the flags a user typed.
"""

from __future__ import annotations

import re

FLAGS = {
    "effective_batch": "--effective-batch",
    "micro_batch": "--micro-batch",
    "max_effective_batch": "--max-effective-batch",
    "steps": "--steps",
    "lr": "--lr",
    "seed": "--seed",
    "checkpoint_every": "--checkpoint-every",
    "world_size": "world size",
}
"""Library parameter -> what the command line calls it."""


class BadInput(Exception):
    """Bad flags, files, configs or environment: exit code 2 with a one-line message."""


class RunFailed(Exception):
    """A failure that is not bad input but deserves one line, not a traceback (exit 1)."""


def flag_message(e: BaseException) -> str:
    """A library error's message with its parameter names spelled as the command line's flags."""
    return re.sub(r"\b(" + "|".join(FLAGS) + r")\b", lambda m: FLAGS[m.group(1)], str(e))


def bad_input(e: BaseException) -> BadInput:
    return BadInput(flag_message(e))
