"""Interleaved CPU timing for benchmarks that report one step's cost as a ratio to another's."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def interleaved_cpu_seconds(
    steps: dict[str, Callable[[], object]], rounds: int
) -> dict[str, list[float]]:
    """CPU seconds of each call of each step over `rounds`, timed A, B, A, B, ... so that a
    machine shared with other jobs slows them alike. CPU time, because wall time on a shared
    machine measures the neighbours too; on one torch thread, because with two it also
    counts the threads' spin-waits, which grow with the neighbours' load."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    with one_torch_thread():
        for _ in range(rounds):
            for name, step in steps.items():
                began = time.process_time()
                step()
                times[name].append(time.process_time() - began)
    return times


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread inside the block (as docs/benchmarks.md measures), then as before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
