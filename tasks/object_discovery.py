"""Object discovery: FG-ARI, mBO (instance and class), mIoU, CorLoc, detection rate.

The metric functions follow OCLF/SPOT conventions (see object_discovery_metrics) and are
public: score your own masks with `fg_ari(pred, gt, ignore)` and friends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ocl_bench.api.errors import ConfigError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.tasking import EvalContext, Metric, Task, TaskResult, per_image_record
from ocl_bench.tasks.object_discovery_metrics import (
    all_metrics,
    corloc,
    detection_rate,
    fg_ari,
    ignore_overlaps,
    masks_to_pred,
    mbo,
    miou,
)

__all__ = [
    "ObjectDiscovery",
    "all_metrics",
    "corloc",
    "detection_rate",
    "fg_ari",
    "ignore_overlaps",
    "masks_to_pred",
    "mbo",
    "miou",
    "score_batch",
    "with_background",
]

MASK_SOURCES = ("decoder", "attn")


@dataclass(frozen=True)
class ObjectDiscoveryParams:
    masks: list[str] = param(["decoder", "attn"], "masks scored: 'decoder' and/or 'attn'")
    mask_size: int = param(0, "side the masks are scored at (0 = ground-truth resolution)", ge=0)
    ignore_overlaps: bool = param(True, "drop pixels covered by several instances (OCLF)")
    class_masks: bool = param(True, "also score mBO_c and mIoU_c on the class masks")
    background_segment: bool = param(
        False,
        "score the background (pixels in no GT mask, not ignored) as one more GT segment in "
        "mbo_i, mbo_c, miou, corloc, detection_rate, as GLASS's eval_metrics.py "
        "(ignore_background=False); miou_c always counts it; fg_ari never",
    )


class ObjectDiscovery(Task):
    """Unsupervised segmentation quality of slot masks against instance masks."""

    metrics = (
        Metric(
            "fg_ari",
            "adjusted Rand index over foreground pixels",
            unit="%",
            scale=100.0,
            per_image=True,
            headline=True,
        ),
        Metric(
            "mbo_i",
            "mean best overlap with instance masks",
            unit="%",
            scale=100.0,
            per_image=True,
            headline=True,
        ),
        Metric(
            "mbo_c",
            "mean best overlap with class masks",
            unit="%",
            scale=100.0,
            per_image=True,
            headline=True,
        ),
        Metric(
            "miou",
            "mean IoU of Hungarian-matched slots and instances",
            unit="%",
            scale=100.0,
            per_image=True,
            headline=True,
        ),
        Metric(
            "miou_c",
            "mean IoU of Hungarian-matched slots and class masks",
            unit="%",
            scale=100.0,
            per_image=True,
        ),
        Metric(
            "corloc",
            "share of images whose best slot has IoU > 0.5 with some object",
            unit="%",
            scale=100.0,
            per_image=True,
        ),
        Metric(
            "detection_rate",
            "share of objects some slot overlaps with IoU > 0.5",
            unit="%",
            scale=100.0,
            per_image=True,
        ),
    )
    validation_probe = True
    scores_masks = True
    name = "object_discovery"
    Params = ObjectDiscoveryParams
    # The suite's tiny base run (shapes has instance and class masks).
    conformance = {}
    requires = frozenset({"batch.instance_masks"})

    @classmethod
    def capabilities(cls, params: Any) -> tuple[set[str], set[str]]:
        needs, gives = super().capabilities(params)
        bad = [m for m in params.masks if m not in MASK_SOURCES]
        if bad:
            raise ConfigError(
                f"tasks.object_discovery.masks: unknown source {bad[0]!r}; allowed: decoder, attn"
            )
        if "decoder" in params.masks:
            needs.add("decoding.masks")
        if params.class_masks:
            needs.add("batch.class_masks")
        return needs, gives

    def __init__(self, params: ObjectDiscoveryParams):
        self.params = params

    def evaluate(self, ctx: EvalContext) -> TaskResult:
        p = self.params
        sums: dict[tuple[str, str], list[torch.Tensor]] = {}
        resolution: tuple[int, int] | None = None
        images = 0
        for batch, out in ctx.predictions(desc="object discovery"):
            gt = batch.instance_masks
            assert gt is not None
            ignore = batch.ignore_mask
            class_gt = batch.class_masks
            if p.mask_size > 0:
                size = (p.mask_size, p.mask_size)
                gt = _resize_masks(gt, size)
                class_gt = _resize_masks(class_gt, size) if class_gt is not None else None
                ignore = _resize_masks(ignore[:, None], size)[:, 0] if ignore is not None else None
            resolution = tuple(gt.shape[-2:])
            images += gt.shape[0]
            for source in p.masks:
                pred = masks_to_pred(out.masks(source).float(), resolution)
                num_slots = out.slots.slots.shape[1]
                scores = score_batch(pred, gt, ignore, class_gt, p, num_slots)
                for metric, values in scores.items():
                    sums.setdefault((source, metric), []).append(values.double().cpu())
        records = [
            per_image_record(self.name, metric, chunks, source, resolution)
            for (source, metric), chunks in sums.items()
        ]
        return TaskResult(records, {"images": images})


def score_batch(
    pred: torch.Tensor,
    gt: torch.Tensor,
    ignore: torch.Tensor | None,
    class_gt: torch.Tensor | None,
    params: ObjectDiscoveryParams,
    num_slots: int | None = None,
) -> dict[str, torch.Tensor]:
    """float64[B] per image and metric for slot indices `pred` [B,H,W], as `evaluate` stores them.

    `gt` / `class_gt` are bool[B,M,H,W] instance / class masks, `ignore` bool[B,H,W].
    With `params.background_segment` the scores are those of GLASS's eval_metrics.py:
    OCLF's UnsupervisedMaskIoUMetric(ignore_overlaps=True, ignore_background=False) on a
    target whose channel 0 is the background, so the background is matched like an object,
    an image without objects is scored on its background alone, and pixels covered by
    several masks of the target (instances, or classes for mbo_c / miou_c) are ignored.
    """
    background = params.background_segment
    inst_ignore = ignore_overlaps(gt, ignore) if params.ignore_overlaps else ignore
    # GLASS's FG-ARI (ARIMetric(foreground=True)) leaves the background out
    target = with_background(gt) if background else gt
    scores = all_metrics(pred, target, inst_ignore, num_slots, background_first=background)
    if params.class_masks and class_gt is not None:
        class_ignore = ignore
        if background and params.ignore_overlaps:
            # GLASS's metrics drop overlaps of the target they get: for mbo_c that is the
            # class masks, which overlap where instances of two classes do
            class_ignore = ignore_overlaps(class_gt, ignore)
        classes = with_background(class_gt)
        scores["mbo_c"] = mbo(pred, classes if background else class_gt, class_ignore)
        scores["miou_c"] = miou(pred, classes, class_ignore)
    scores["mbo_i"] = scores.pop("mbo")
    return scores


def with_background(masks: torch.Tensor) -> torch.Tensor:
    """bool[B,1+M,H,W]: the pixels in no mask of `masks` (class or instance) as one more
    segment, first.

    GLASS's mIoU (Tables 2, 6, 7; `miou_c`) is its released eval_metrics.py 'iou':
    OCLF's Hungarian mask IoU on the one-hot semantic map with ignore_background=False, so
    the background is a segment that one slot must cover like any class; the script's other
    IoU metrics do the same on the instance map (`background_segment`).
    """
    background = ~masks.bool().any(dim=1, keepdim=True)
    return torch.cat([background, masks.bool()], dim=1)


def _resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-exact resize of bool masks [B,M,H,W]."""
    if tuple(masks.shape[-2:]) == size:
        return masks
    return F.interpolate(masks.float(), size=size, mode="nearest-exact") > 0.5


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [ObjectDiscovery]
