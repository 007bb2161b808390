"""ocl-bench: a plugin-based benchmark harness for object-centric learning."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_run(run_dir: str) -> Any:
    """The trained model of a run directory (its forward gives typed ModelOutput)."""
    from ocl_bench.evaluate import load_run as _load_run

    return _load_run(run_dir)[1]
