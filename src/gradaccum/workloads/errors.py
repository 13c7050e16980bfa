"""The one error type of the workload layer (its own module so data.py and hf.py share it)."""

from __future__ import annotations


class WorkloadError(ValueError):
    """A model directory or data file that cannot be used.

    The message is one line that names the flag and the path (and the line of a data
    file where there is one), so the CLI can print it as is and exit 2.
    """

    def __init__(self, message: str) -> None:
        # A traceback-free CLI promises one line: fold whatever a library told us.
        super().__init__(" ".join(str(message).split()))
