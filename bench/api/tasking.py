"""The task contract: the Task base class, the metrics a task declares (Metric), what it
receives (EvalContext) and what it returns (TaskResult of MetricRecords)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ocl_bench.api.contracts import Batch, ModelOutput
from ocl_bench.api.errors import ConfigError
from ocl_bench.api.plugin import Plugin
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


def per_image_record(
    task: str,
    metric: str,
    chunks: Sequence[torch.Tensor],
    masks: str | None = None,
    resolution: tuple[int, int] | None = None,
    protocol: dict[str, Any] | None = None,
) -> MetricRecord:
    """The record of a metric measured on each image: `chunks` are its per-image values,
    one float64 tensor a batch in eval-split order, NaN where an image has none (no object,
    no masked token). The value is the mean over the other images (NaN if none is left),
    num_images how many they are; per_image keeps every value, NaN included."""
    values = torch.cat(list(chunks)) if chunks else torch.zeros(0, dtype=torch.float64)
    counted = values[~values.isnan()]
    value = float(counted.mean()) if counted.numel() else float("nan")
    return MetricRecord(
        task,
        metric,
        value,
        masks,
        resolution,
        int(counted.numel()),
        protocol=protocol,
        per_image=values.tolist(),
    )


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


@dataclass(frozen=True)
class Metric:
    """A number a task reports, as leaderboards, comparisons and figures need to know it.

    `name` is the stored metric name, or a glob for a family of names ("*_acc_iou*").
    Stored values are multiplied by `scale` for display (fractions shown in percent: 100).
    """

    name: str
    doc: str
    higher_is_better: bool = True
    unit: str = ""  # after scaling: "%", "" for a plain number
    scale: float = 1.0
    per_image: bool = False  # a value per evaluated image is stored (intervals, pairing)
    headline: bool = False  # shown by default: grid columns, `results`, training progress


class Task(Plugin):
    """Base of task plugins: `evaluate(ctx)` scores a trained model.

    A task declares its `metrics`; the core knows metrics only through them. A task cheap
    enough to score while training sets `validation_probe = True` (object discovery): a
    run's `train.eval_every` scores it on held-out images. The run's own figure of slot
    masks is drawn by the core; a task writes its other figures itself and lists them in
    TaskResult.figures (the files it draws are named in `figures`).
    """

    kind: ClassVar[str] = "task"
    metrics: ClassVar[tuple[Metric, ...]] = ()
    figures: ClassVar[tuple[str, ...]] = ()
    validation_probe: ClassVar[bool] = False
    # True when its records name the masks they scored (MetricRecord.masks: "decoder" or
    # "attn"), so a leaderboard column of it picks one.
    scores_masks: ClassVar[bool] = False

    def __init__(self, params: Any) -> None:
        self.params = params

    def evaluate(self, ctx: EvalContext) -> TaskResult:
        """Score ctx.model on ctx's dataset; records carry the metric names declared."""
        raise NotImplementedError

    @classmethod
    def metric(cls, name: str) -> Metric:
        """The declared Metric of stored metric `name` (an exact name before a glob)."""
        for m in cls.metrics:
            if m.name == name:
                return m
        for m in cls.metrics:
            if fnmatch.fnmatchcase(name, m.name):
                return m
        declared = ", ".join(m.name for m in cls.metrics) or "none"
        raise ConfigError(f"task '{cls.name}' reports no metric '{name}'; it declares: {declared}")

    @classmethod
    def headline_metrics(cls) -> list[Metric]:
        """The metrics shown by default, in declaration order."""
        return [m for m in cls.metrics if m.headline]
