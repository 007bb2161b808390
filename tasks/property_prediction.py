"""Property prediction from frozen slots (Dittadi et al. protocol, as GLASS reports it).

Slots are matched to ground-truth objects by Hungarian matching on mask IoU; pairs above
the IoU threshold feed one probe per property (an MLP with one hidden layer) trained on
a train split and scored on the evaluation split: top-1 accuracy for categorical
properties, R^2 for continuous ones. The detection rate is the share of objects (per
image, then averaged) that the matching keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ocl_bench.errors import ConfigError
from ocl_bench.hookspecs import hookimpl
from ocl_bench.matching import hungarian_match, label_overlap
from ocl_bench.params import param
from ocl_bench.plugin import Plugin
from ocl_bench.tasking import EvalContext, MetricRecord, TaskResult
from ocl_bench.tasks.object_discovery_metrics import masks_to_pred


@dataclass(frozen=True)
class PropertyPredictionParams:
    train_images: int = param(1000, "images of the train split the probes learn from", ge=1)
    masks: str = param("decoder", "masks used for matching: 'decoder' or 'attn'")
    iou_threshold: float = param(
        0.5, "a slot-object pair counts when its IoU exceeds this", ge=0, le=1
    )
    hidden: int = param(256, "hidden width of each probe", ge=1)
    steps: int = param(1500, "probe training steps (Adam, lr 1e-3)", ge=1)
    batch_size: int = param(64, "probe batch size", ge=1)
    properties: list[str] = param([], "properties to predict (empty = all the dataset has)")


@dataclass
class _Pairs:
    slots: list[Tensor]
    targets: dict[str, list[Tensor]]
    detection: list[float]


class PropertyPrediction(Plugin):
    """Probe frozen slots for object properties (accuracy / R^2) after IoU matching."""

    kind = "task"
    name = "property_prediction"
    Params = PropertyPredictionParams
    requires = frozenset({"batch.instance_masks", "batch.properties", "slots.slots"})

    @classmethod
    def capabilities(cls, params: PropertyPredictionParams) -> tuple[set[str], set[str]]:
        needs, gives = super().capabilities(params)
        needs.add("decoding.masks" if params.masks == "decoder" else "slots.attn")
        return needs, gives

    def __init__(self, params: PropertyPredictionParams):
        self.params = params

    def _collect(self, ctx: EvalContext, split: str, count: int, names: list[str]) -> _Pairs:
        pairs = _Pairs([], {n: [] for n in names}, [])
        for batch, out in ctx.predictions(split, count, desc=f"properties ({split})"):
            gt = batch.instance_masks
            assert gt is not None and batch.properties is not None
            pred = masks_to_pred(out.masks(self.params.masks).float(), tuple(gt.shape[-2:]))
            overlap = label_overlap(pred, gt, num_labels=out.slots.slots.shape[1])
            # float32 IoUs, as the probe has always matched on: its pairs stay exactly as they
            # were (float64 could break near-ties differently)
            iou = overlap.iou().float().cpu().numpy()
            valid = overlap.area_b > 0
            objects = valid.sum(1).tolist()
            matches = hungarian_match(iou, maximize=True, valid_cols=valid)
            slots = out.slots.slots.float().cpu()
            for b, (rows, cols) in enumerate(matches):
                if not objects[b]:
                    continue
                keep = iou[b][rows, cols] > self.params.iou_threshold
                pairs.detection.append(float(keep.sum()) / objects[b])
                for slot, obj in zip(rows[keep], cols[keep]):
                    pairs.slots.append(slots[b, slot])
                    for n in names:
                        pairs.targets[n].append(batch.properties[n][b, obj].cpu())
        return pairs

    def evaluate(self, ctx: EvalContext) -> TaskResult:
        p = self.params
        specs = ctx.dataset(ctx.split).property_specs()
        names = list(p.properties) or list(specs)
        unknown = [n for n in names if n not in specs]
        if unknown:
            raise ConfigError(
                f"tasks.property_prediction.properties: unknown {unknown[0]!r}; "
                f"this dataset has: {', '.join(specs)}"
            )
        train = self._collect(ctx, "train", p.train_images, names)
        test = self._collect(ctx, ctx.split, ctx.num_images, names)
        images = len(test.detection)
        records = [
            MetricRecord(
                self.name,
                "detection_rate",
                float(np.mean(test.detection)) if images else float("nan"),
                p.masks,
                None,
                images,
            )
        ]
        generator = torch.Generator().manual_seed(0)
        for n in names:
            kind, size = specs[n]
            if len(train.slots) < 2 or not test.slots:
                value = float("nan")
            else:
                value = _fit_and_score(
                    torch.stack(train.slots),
                    torch.stack(train.targets[n]),
                    torch.stack(test.slots),
                    torch.stack(test.targets[n]),
                    kind,
                    size,
                    p,
                    generator,
                )
            metric = f"{n}_acc" if kind == "categorical" else f"{n}_r2"
            records.append(MetricRecord(self.name, metric, value, p.masks, None, images))
        return TaskResult(records, {"train_pairs": len(train.slots), "test_pairs": len(test.slots)})


def _fit_and_score(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    kind: str,
    size: int,
    p: PropertyPredictionParams,
    generator: torch.Generator,
) -> float:
    categorical = kind == "categorical"
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    if not categorical:
        y_train, y_test = (
            y_train.float().reshape(len(y_train), -1),
            y_test.float().reshape(len(y_test), -1),
        )
        y_mean, y_std = y_train.mean(0), y_train.std(0).clamp(min=1e-6)
        y_train = (y_train - y_mean) / y_std
        y_test = (y_test - y_mean) / y_std
    out_dim = size if categorical else y_train.shape[1]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    probe = nn.Sequential(
        nn.Linear(x_train.shape[1], p.hidden), nn.ReLU(), nn.Linear(p.hidden, out_dim)
    )
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss() if categorical else nn.MSELoss()
    with torch.enable_grad():
        for _ in range(p.steps):
            idx = torch.randint(
                0, len(x_train), (min(p.batch_size, len(x_train)),), generator=generator
            )
            loss = loss_fn(probe(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        pred = probe(x_test)
    if categorical:
        return float((pred.argmax(-1) == y_test).float().mean())
    ss_res = (y_test - pred).pow(2).sum(0)
    ss_tot = (y_test - y_test.mean(0)).pow(2).sum(0).clamp(min=1e-12)
    return float((1 - ss_res / ss_tot).mean())


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [PropertyPrediction]
