"""Interleaved CPU timing for benchmarks that report one step's cost as a ratio to another's."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved_cpu_seconds(
    steps: dict[str, Callable[[], object]], rounds: int
) -> dict[str, list[float]]:
    """CPU seconds of each call of each step over `rounds`, timed A, B, A, B, ... so that a
    machine shared with other jobs slows them alike. CPU time, because wall time on a shared
    machine measures the neighbours too."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            began = time.process_time()
            step()
            times[name].append(time.process_time() - began)
    return times
