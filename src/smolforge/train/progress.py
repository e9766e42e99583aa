"""The progress display of long jobs: a rich bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """Step bar with loss, lr, tokens/s and ETA; `note` prints a line above it."""

    def __init__(self, total: int, start: int = 0, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.interactive = self.console.is_terminal
        self.total, self.start = total, start
        self.started = time.time()
        self.progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
            TimeRemainingColumn(), console=self.console, disable=not self.interactive,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, loss=float("nan"),
                                           lr=0.0, tps=0.0)

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        self.progress.update(self.task, completed=step, loss=loss, lr=lr, tps=tokens_per_s)
        if not self.interactive:
            done = step - self.start
            eta = (time.time() - self.started) / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  "
                  f"eta {eta:.0f}s", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        self.console.print(text) if self.interactive else print(text, file=sys.stderr, flush=True)
