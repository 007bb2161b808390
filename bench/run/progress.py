"""How far the training in this process has got, for whoever reports it elsewhere.

The trainer says after every step how many of how many steps are done (`TRAINING.report`);
the thread that beats a grid cell's lease (grid.py) reads the latest (`TRAINING.columns()`)
and writes it with the heartbeat, so `ocl-bench status` and a grid's progress display see
every cell's step, local worker or Slurm job alike. Neither side knows the other: the
trainer names no grid, store or task, the heartbeat no trainer.

The step time is measured on the wall clock between reports (checkpoints, validation
probes and data waits included, which an ETA must count too), smoothed over recent steps.
"""

from __future__ import annotations

import threading
import time
from typing import Any

# Weight of the newest measurement in the smoothed seconds per step: about the last 20
# reports count, so a slower phase (a probe, a checkpoint) shows without dominating.
SMOOTHING = 0.1


class StepProgress:
    """The latest (step, steps, seconds per step) of one process's training; thread-safe."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget what was reported (a new cell begins in this process)."""
        with self._lock:
            self.step: int | None = None
            self.steps: int | None = None
            self.step_time: float | None = None
            self._at: float | None = None

    def report(self, step: int, steps: int) -> None:
        """`step` of `steps` are done (called by the trainer after each step)."""
        now = self._clock()
        with self._lock:
            fresh = self.step is None or steps != self.steps or step <= self.step
            if not fresh and self._at is not None:
                seconds = (now - self._at) / (step - (self.step or 0))
                old = self.step_time
                self.step_time = seconds if old is None else old + SMOOTHING * (seconds - old)
            elif fresh:
                self.step_time = None  # another run (or a restart): measure anew
            self.step, self.steps, self._at = step, steps, now

    def columns(self) -> dict[str, Any]:
        """The lease columns to write with a heartbeat ({} before any report)."""
        with self._lock:
            if self.step is None:
                return {}
            return {"step": self.step, "steps": self.steps, "step_time": self.step_time}


# The training of this process (one at a time: a grid worker or job trains one cell).
TRAINING = StepProgress()
