"""Stopping cleanly on SIGTERM / SIGINT: finish the window, checkpoint, exit 143 / 130.

While a run is active the signals only ask the loop to stop after the current window;
under torch.distributed the ranks agree once per step on the signal they stop for, so a
signal reaching any rank stops all of them after the same step.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from gradaccum import sync


class Stopped(Exception):
    """The run stopped early on SIGTERM/SIGINT after saving a checkpoint.

    ``signum`` is the signal, ``step`` the last completed optimizer step (saved in
    ``checkpoint``, None when the trainer has no output directory), ``steps`` the target.
    """

    def __init__(self, signum: int, step: int, steps: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.steps, self.checkpoint = signum, step, steps, checkpoint
        name = signal.Signals(signum).name
        saved = f"checkpoint saved to {checkpoint}" if checkpoint is not None else "no output directory"
        super().__init__(f"stopped by {name} after step {step} of {steps}; {saved}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: SIGTERM 143, SIGINT 130


class StopSignals:
    """While active, SIGTERM and SIGINT only ask the loop to stop after the current window.

    A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once; repeated SIGTERMs
    are ignored, so a scheduler's follow-up signal cannot interrupt the final save.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def agreed(self) -> int:
        """The signal every rank stops for after this window (0: none); one tiny all-reduce."""
        return sync.max_over_ranks(self.signum or 0)
