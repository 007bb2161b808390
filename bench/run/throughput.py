"""Per-step throughput: wall time of an optimiser step and how much of it waited for data.

The numbers a user needs to see whether the input pipeline starves the accelerator:
`images_per_s` (images of the global batch per second of step time), `step_s` (wall
seconds from the start of the step to its logged loss) and `data_wait` (the fraction of
the step spent fetching the next batch from the loader and moving it to the device).
Reading the loss back as a float synchronises the device, so the step time covers the
asynchronous kernels too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class ThroughputMeter:
    """Times one step at a time; `waiting()` marks the parts spent on data."""

    def __init__(self) -> None:
        self._began = time.perf_counter()
        self._waited = 0.0

    def start(self) -> None:
        """A new step begins now (what ran since the last step, e.g. evaluation, is left out)."""
        self._began = time.perf_counter()
        self._waited = 0.0

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self._waited += time.perf_counter() - began

    def stop(self, images: int) -> dict[str, float]:
        """The step's figures: images_per_s, step_s, data_wait (a fraction in [0, 1])."""
        seconds = max(time.perf_counter() - self._began, 1e-9)
        wait = min(max(self._waited / seconds, 0.0), 1.0)
        return {"images_per_s": images / seconds, "step_s": seconds, "data_wait": wait}


__all__ = ["ThroughputMeter"]
