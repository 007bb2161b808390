"""Scalars of a run as a TensorBoard event file in the run directory (`<run>/tensorboard`).

The same numbers as train_log.jsonl and eval_log.jsonl, so curves open in TensorBoard.
A resumed run purges the events past its checkpoint (SummaryWriter's purge_step), just
as it truncates the JSON logs, so each step appears once.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

EVENT_DIR = "tensorboard"


class EventLog:
    """A SummaryWriter when TensorBoard is installed and wanted, otherwise a no-op."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool = True):
        self.writer: Any = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # a declared dependency; a broken install only warns
            warnings.warn(
                f"no TensorBoard event file ({err}): pip install tensorboard", stacklevel=2
            )
            return
        # Steps are logged 1-based: everything after the checkpoint's step is redone.
        purge = resume_step + 1 if resume_step > 0 else None
        self.writer = SummaryWriter(str(Path(run_dir) / EVENT_DIR), purge_step=purge)

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", float(value), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


__all__ = ["EVENT_DIR", "EventLog"]
