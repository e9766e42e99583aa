"""What keeps a long run alive: graceful stops, a loss guard, and a supervisor that restarts.

Playbook ch. 06/08 ("melting GPUs"): long runs die — preemption, node failures, loss spikes —
and the cheap fix is to checkpoint often, to survive a bad batch, and to restart on its own.
- `GracefulStop`: SIGTERM or SIGINT asks the loop to finish its step, write a checkpoint and exit
  0 with a resume hint (a second SIGINT interrupts at once).
- `LossGuard`: a non-finite step loss, or one above `spike_factor` x the median of the recent
  steps, skips the step (no optimizer update); `max_bad_steps` in a row roll the run back to
  its last checkpoint with the learning rate scaled down.
- `supervise`: runs a training command as a child process and relaunches it with `--resume`
  when it dies (exit status != 0, or killed), up to N times, logging each restart.
"""

from __future__ import annotations

import math
import signal
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from types import FrameType
from typing import Literal

Verdict = Literal["ok", "skip", "rollback"]


class GracefulStop:
    """Context manager: records SIGTERM / SIGINT instead of dying mid-step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> GracefulStop:
        import threading

        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


class LossGuard:
    """Decides per optimizer step whether its loss is usable (see the module docstring)."""

    def __init__(self, spike_factor: float, window: int, max_bad_steps: int) -> None:
        self.spike_factor, self.max_bad_steps = spike_factor, max_bad_steps
        self.recent: deque[float] = deque(maxlen=window)
        self.bad_in_a_row = 0
        self.skipped = 0

    def reason(self, loss: float) -> str | None:
        """Why `loss` is unusable, or None."""
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        if self.spike_factor > 0 and len(self.recent) >= min(10, self.recent.maxlen or 10):
            median = statistics.median(self.recent)
            if loss > self.spike_factor * median:
                return f"loss spike {loss:.4f} > {self.spike_factor:g} x median {median:.4f}"
        return None

    def check(self, loss: float) -> tuple[Verdict, str | None]:
        problem = self.reason(loss)
        if problem is None:
            self.bad_in_a_row = 0
            self.recent.append(loss)
            return "ok", None
        self.bad_in_a_row += 1
        self.skipped += 1
        if self.bad_in_a_row >= self.max_bad_steps:
            self.bad_in_a_row = 0
            return "rollback", problem
        return "skip", problem


def without_auto_restart(argv: Sequence[str]) -> list[str]:
    """`argv` without the supervisor's own `--auto-restart N` (the child must not supervise)."""
    out, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg == "--auto-restart":
            skip_next = True
        elif not arg.startswith("--auto-restart="):
            out.append(arg)
    return out


def supervise(argv: Sequence[str], max_restarts: int, delay_s: float = 2.0) -> int:
    """Run `argv` (a training command) and relaunch it with --resume after a crash.

    Returns the exit status of the last attempt. A run that exits 0 (finished, or stopped by
    SIGTERM with a checkpoint) is never restarted; a signal sent to the supervisor is passed on.
    """
    command = list(argv)
    child: subprocess.Popen | None = None

    def forward(signum: int, frame: FrameType | None) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for attempt in range(max_restarts + 1):
            child = subprocess.Popen(command)
            status = child.wait()
            if status == 0:
                return 0
            if attempt == max_restarts:
                print(f"supervisor: the run failed (exit status {status}) and {max_restarts} restart(s) "
                      f"are used up; giving up", file=sys.stderr, flush=True)
                return status
            print(f"supervisor: the run died (exit status {status}); restart {attempt + 1} of "
                  f"{max_restarts} from its last checkpoint in {delay_s:g}s", file=sys.stderr, flush=True)
            time.sleep(delay_s)
            command = command if "--resume" in command else [*command, "--resume"]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1
