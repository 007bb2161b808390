"""What a task plugin receives (EvalContext) and returns (TaskResult)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ocl_bench.api.contracts import Batch, ModelOutput
from ocl_bench.api.runtime import autocast


@dataclass
class MetricRecord:
    """One measured number and how it was measured."""

    task: str
    metric: str
    value: float
    masks: str | None = None  # "decoder" or "attn": which masks were scored
    resolution: tuple[int, int] | None = None
    num_images: int = 0
    # How it was measured beyond masks, resolution and count, as JSON-ready values: what a
    # reader needs to compare it with a published number (for FID: images, resolution,
    # reference set, feature extractor and its weights hash). Stored; shown by leaderboards.
    protocol: dict[str, Any] | None = None
    # The value on each evaluated image, in eval-split order, NaN where the image was
    # skipped: kept in the results store for intervals over images and paired comparisons.
    per_image: list[float] | None = None

    @property
    def key(self) -> str:
        return ".".join(p for p in (self.task, self.masks, self.metric) if p)


@dataclass
class TaskResult:
    records: list[MetricRecord]
    info: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)  # files the run's metrics.json lists


@dataclass
class EvalContext:
    """A trained model and the means to run it over any split of its dataset."""

    model: torch.nn.Module
    dataset: Callable[[str], Any]
    split: str
    num_images: int
    batch_size: int
    device: torch.device
    precision: str = "fp32"
    progress: bool = True
    out_dir: Path | None = None

    @torch.no_grad()
    def predictions(
        self, split: str | None = None, count: int | None = None, desc: str = "eval"
    ) -> Iterator[tuple[Batch, ModelOutput]]:
        """(batch on the device, model output) over the first `count` images of `split`."""
        data = self.dataset(split or self.split)
        loader = ordered_loader(data, self.num_images if count is None else count, self.batch_size)
        self.model.eval()
        for batch in tqdm(loader, desc=desc, disable=not self.progress, leave=False):
            batch = batch.to(self.device)
            with autocast(self.device, self.precision):
                out = self.model(batch)
            yield batch, out


def ordered_loader(dataset: Any, count: int, batch_size: int) -> DataLoader:
    """The first `count` items of a split in order (0 = all), for evaluation."""
    n = len(dataset) if count <= 0 else min(count, len(dataset))
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    return DataLoader(dataset, batch_sampler=batches, collate_fn=dataset.collate)
