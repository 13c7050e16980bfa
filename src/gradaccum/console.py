"""What a run prints while it trains: the plan line, a progress bar or plain log lines."""

from __future__ import annotations

import sys
from typing import Any


class Console:
    """Rank 0's voice: a tqdm bar when stderr is a terminal, else a log line every N steps."""

    def __init__(self, steps: int, items_name: str, progress: bool | None, log_every: int, rank: int) -> None:
        self.steps, self.items_name, self.log_every = steps, items_name, log_every
        self.speaks = rank == 0
        self.show_bar = (progress if progress is not None else sys.stderr.isatty()) and self.speaks
        self.bar: Any = None
        self.notes: list[str] = []
        """Lines the caller wants said first, once the run is sure to start (e.g. what the data holds)."""

    def announce(self, shape: Any, out: Any, resumed_at: int | None, tokens: int | None = None) -> None:
        if not self.speaks:
            return
        for note in self.notes:
            print(f"gradaccum: {note}", flush=True)
        split = (f"micro-batch {shape.micro_batch} x accum steps {shape.accum_steps}" if tokens is None
                 else f"{shape.per_rank} examples in micro-batches of at most {tokens} tokens")
        print(f"gradaccum: effective batch {shape.effective_batch} = {split} x world size "
              f"{shape.world_size}; "
              f"{self.steps} steps; outputs -> {out if out is not None else '(none)'}", flush=True)
        if resumed_at is not None:
            print(f"gradaccum: resuming from step {resumed_at} of {self.steps}", flush=True)

    def say(self, text: str) -> None:
        """A one-off note on stderr (an OOM replay, a batch change)."""
        if self.speaks:
            print(f"gradaccum: {text}", file=sys.stderr, flush=True)

    def extended(self, old_steps: int, step: int) -> None:
        self.say(f"--steps {self.steps} extends the run from {old_steps} steps: the learning-rate schedule "
                 f"now spans {self.steps} steps, from step {step}")

    def open(self, start: int) -> None:
        if self.show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.steps, initial=start, unit="step", dynamic_ncols=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def report(self, row: dict[str, Any]) -> None:
        if not self.speaks:
            return
        rate = row[f"{self.items_name}_per_s"]
        if self.bar is not None:
            post = {"loss": f"{row['loss']:.4f}", f"{self.items_name}/s": f"{rate:.0f}"}
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif row["step"] % self.log_every == 0 or row["step"] == self.steps:
            print(f"step {row['step']}/{self.steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                  f"grad_norm {row['grad_norm']:.3f} {self.items_name}/s {rate:.0f} "
                  f"examples/s {row['examples_per_s']:.0f}", flush=True)
