"""Property prediction from frozen slots (Dittadi et al. protocol, as GLASS reports it).

Slots are matched one-to-one to ground-truth masks by Hungarian matching on mask IoU:
object instance masks (`match_on = "instances"`) or, where a split has no instance masks
(GLASS appendix A.2 on VOC), semantic class masks (`match_on = "classes"`, the target is
then the class id). Pairs whose IoU exceeds a threshold feed one probe per property,
trained on the first `train_images` images of the train split and scored on the evaluation
split: top-1 accuracy for categorical properties, R^2 for continuous ones. The detection
rate is the share of ground-truth masks (per image, then averaged) that the matching keeps
at that threshold. Every threshold of `iou_thresholds` gets its own probes and detection
rate (`<metric>_iou70` for 0.7), GLASS's accuracy-against-threshold remark.

`category` is a property of every dataset with per-object class labels (`batch.labels`;
`num_classes` of the dataset), besides the dataset's own properties.

With `val_images > 0` the next `val_images` train-split images (never ones the probe trains
on) choose the probe: it is scored on them every `eval_every` steps and the checkpoint with
the best validation score is the one tested (GLASS A.2: 1K validation images). 0 tests the
probe of the last step.

GLASS (after Dittadi et al.) calls the probe "a single-layer MLP"; read here as Dittadi's
MLP probe with one hidden layer of `hidden` units (a linear probe would be "no hidden
layer"), the probe this task has always trained.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ocl_bench.api.errors import ConfigError, DataError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.matching import hungarian_match, label_overlap
from ocl_bench.api.params import param
from ocl_bench.api.tasking import EvalContext, Metric, MetricRecord, Task, TaskResult
from ocl_bench.tasks.object_discovery_metrics import masks_to_pred

CATEGORY = "category"
WHERE = "tasks.property_prediction"


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
    properties: list[str] = param(
        [], "properties to predict (empty = all the dataset has, 'category' included)"
    )
    match_on: Literal["instances", "classes"] = param(
        "instances",
        "slots matched to instance masks, or to semantic masks with the class id as target",
    )
    iou_thresholds: list[float] = param(
        [], "more IoU thresholds, one probe each: metrics <name>_iouNN (0.7 -> _iou70)"
    )
    val_images: int = param(
        0, "train images after the probe's own, held out to pick its step (0 = the last)", ge=0
    )
    eval_every: int = param(250, "probe steps between validation checks (val_images > 0)", ge=1)

    def __post_init__(self) -> None:
        for t in self.iou_thresholds:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
                raise ConfigError(f"{WHERE}.iou_thresholds: {t!r} is not in [0, 1]")
        suffixes = [threshold_suffix(t) for t in self.iou_thresholds]
        if len(set(suffixes)) < len(suffixes):
            raise ConfigError(
                f"{WHERE}.iou_thresholds: {list(self.iou_thresholds)} name the same metric twice "
                "(names use the threshold in hundredths)"
            )
        others = [n for n in self.properties if n != CATEGORY]
        if self.match_on == "classes" and others:
            raise ConfigError(
                f"{WHERE}: match_on='classes' predicts only 'category' (a semantic mask has no "
                f"per-object properties), not {others[0]!r}"
            )


def threshold_suffix(t: float) -> str:
    """The metric-name suffix of an extra IoU threshold: 0.7 -> '_iou70'."""
    return f"_iou{round(100 * t):02d}"


@dataclass
class _Image:
    """The matched pairs of one image with at least one ground-truth mask."""

    index: int  # the sample index inside its split
    masks: int  # ground-truth masks (objects or classes) of the image
    ious: np.ndarray  # float32[P], the IoU of each matched pair
    slots: Tensor  # [P,D]
    targets: dict[str, Tensor]  # name -> [P] or [P,d]


def _detection(images: list[_Image], t: float) -> list[float]:
    return [float((im.ious > t).sum()) / im.masks for im in images]


def _pairs(images: list[_Image], t: float, name: str) -> tuple[Tensor, Tensor] | None:
    keep = [torch.from_numpy(im.ious > t) for im in images]
    if not images or not any(k.any() for k in keep):
        return None
    x = torch.cat([im.slots[k] for im, k in zip(images, keep)])
    y = torch.cat([im.targets[name][k] for im, k in zip(images, keep)])
    return x, y


class PropertyPrediction(Task):
    """Probe frozen slots for object properties (accuracy / R^2) after IoU matching."""

    # `_iouNN` variants come from `iou_thresholds`, one probe per threshold.
    metrics = (
        Metric(
            "detection_rate",
            "share of test objects some slot matches at the IoU",
            unit="%",
            scale=100.0,
        ),
        Metric(
            "detection_rate_iou*", "detection_rate at IoU threshold NN/100", unit="%", scale=100.0
        ),
        Metric("*_acc", "probe accuracy of a categorical property", unit="%", scale=100.0),
        Metric("*_acc_iou*", "probe accuracy at IoU threshold NN/100", unit="%", scale=100.0),
        Metric("*_r2", "probe R^2 of a continuous property"),
        Metric("*_r2_iou*", "probe R^2 at IoU threshold NN/100"),
    )
    scores_masks = True
    name = "property_prediction"
    Params = PropertyPredictionParams
    # A 5-step probe on 4 images; IoU threshold 0 matches every object, so the probe
    # trains even on the untrained model.
    conformance = {
        "tasks.property_prediction.train_images": 4,
        "tasks.property_prediction.steps": 5,
        "tasks.property_prediction.batch_size": 4,
        "tasks.property_prediction.iou_threshold": 0.0,
    }
    requires = frozenset({"slots.slots"})

    @classmethod
    def capabilities(cls, params: PropertyPredictionParams) -> tuple[set[str], set[str]]:
        needs, gives = super().capabilities(params)
        needs.add("decoding.masks" if params.masks == "decoder" else "slots.attn")
        if params.match_on == "classes":
            needs |= {"batch.class_masks", "batch.class_ids"}
            return needs, gives
        needs.add("batch.instance_masks")
        named = set(params.properties)
        # "all" is at least the category; the dataset's own properties join when it has them
        if not named or CATEGORY in named:
            needs.add("batch.labels")
        if named - {CATEGORY}:
            needs.add("batch.properties")
        return needs, gives

    def __init__(self, params: PropertyPredictionParams):
        self.params = params

    def _specs(self, data: Any) -> dict[str, tuple[str, int]]:
        specs = {} if self.params.match_on == "classes" else dict(data.property_specs())
        classes = getattr(data, "num_classes", None)
        if classes:
            specs[CATEGORY] = ("categorical", int(classes))
        return specs

    def _collect(self, ctx: EvalContext, split: str, count: int, names: list[str]) -> list[_Image]:
        classes = self.params.match_on == "classes"
        images: list[_Image] = []
        seen = 0  # predictions() walks the split in order: position = sample index
        for batch, out in ctx.predictions(split, count, desc=f"properties ({split})"):
            gt = batch.class_masks if classes else batch.instance_masks
            if gt is None:  # a dataset may leave a whole split unannotated (VOC with SBD)
                raise DataError(
                    f"property_prediction: the {split!r} split of this dataset has no "
                    f"{'class' if classes else 'instance'} masks (match_on="
                    f"{self.params.match_on!r}); give it a split whose images have them"
                )
            pred = masks_to_pred(out.masks(self.params.masks).float(), tuple(gt.shape[-2:]))
            overlap = label_overlap(pred, gt, num_labels=out.slots.slots.shape[1])
            # float32 IoUs, as the probe has always matched on: its pairs stay exactly as they
            # were (float64 could break near-ties differently)
            iou = overlap.iou().float().cpu().numpy()
            valid = overlap.area_b > 0
            counts = valid.sum(1).tolist()
            matches = hungarian_match(iou, maximize=True, valid_cols=valid)
            slots = out.slots.slots.float().cpu()
            for b, (rows, cols) in enumerate(matches):
                if not counts[b]:
                    continue
                cols_t = torch.as_tensor(cols, dtype=torch.long)
                targets = {n: self._target(batch, n, classes)[b].cpu()[cols_t] for n in names}
                images.append(
                    _Image(seen + b, counts[b], iou[b][rows, cols], slots[b, rows], targets)
                )
            seen += batch.size
        return images

    @staticmethod
    def _target(batch: Any, name: str, classes: bool) -> Tensor:
        if name != CATEGORY:
            return batch.properties[name]
        return batch.class_ids if classes else batch.labels

    def _train_and_val(self, ctx: EvalContext, names: list[str]) -> tuple[list[_Image], ...]:
        """The probe's training images and, after them, its held-out validation images."""
        p = self.params
        if not p.val_images:
            return self._collect(ctx, "train", p.train_images, names), []
        available = len(ctx.dataset("train"))
        train_images, val_images = p.train_images, p.val_images
        if train_images + val_images > available:
            # a short split (a tiny run, a subset) shrinks the probe's block as the plain
            # probe's train_images does, instead of failing after the model has trained
            val_images = min(val_images, available // 2)
            train_images = available - val_images
            warnings.warn(
                f"{WHERE}: train_images ({p.train_images}) + val_images ({p.val_images}) exceed "
                f"the {available} images of the train split; the probe trains on {train_images} "
                f"and selects on {val_images}",
                RuntimeWarning,
                stacklevel=2,
            )
        both = self._collect(ctx, "train", train_images + val_images, names)
        train = [im for im in both if im.index < train_images]
        return train, [im for im in both if im.index >= train_images]

    def evaluate(self, ctx: EvalContext) -> TaskResult:
        p = self.params
        specs = self._specs(ctx.dataset(ctx.split))
        names = list(p.properties) or list(specs)
        unknown = [n for n in names if n not in specs]
        if unknown:
            raise ConfigError(
                f"{WHERE}.properties: unknown {unknown[0]!r}; this dataset "
                f"{'with match_on=classes ' if p.match_on == 'classes' else ''}has: "
                f"{', '.join(specs) or 'none'}"
            )
        train, val = self._train_and_val(ctx, names)
        test = self._collect(ctx, ctx.split, ctx.num_images, names)
        thresholds = [("", p.iou_threshold)] + [
            (threshold_suffix(t), float(t)) for t in p.iou_thresholds
        ]
        records: list[MetricRecord] = []
        info: dict[str, Any] = {"train_images": len(train), "val_images": len(val)}
        generator = torch.Generator().manual_seed(0)
        # a threshold met twice (0.5 in iou_thresholds and as iou_threshold) is one probe
        fitted: dict[tuple[float, str], tuple[float, int | None]] = {}
        for suffix, t in thresholds:
            rates = _detection(test, t)
            value = float(np.mean(rates)) if rates else float("nan")
            records.append(
                MetricRecord(self.name, f"detection_rate{suffix}", value, p.masks, None, len(test))
            )
            info[f"train_pairs{suffix}"] = int(sum((im.ious > t).sum() for im in train))
            info[f"test_pairs{suffix}"] = int(sum((im.ious > t).sum() for im in test))
            for n in names:
                kind, size = specs[n]
                metric = f"{n}_acc{suffix}" if kind == "categorical" else f"{n}_r2{suffix}"
                if (t, n) not in fitted:
                    fit, scored = _pairs(train, t, n), _pairs(test, t, n)
                    if fit is None or len(fit[0]) < 2 or scored is None:
                        fitted[t, n] = (float("nan"), None)
                    else:
                        val_pairs = _pairs(val, t, n)
                        fitted[t, n] = _fit_and_score(
                            fit, scored, val_pairs, kind, size, p, generator
                        )
                value, step = fitted[t, n]
                if step is not None:
                    info.setdefault("selected_step", {})[metric] = step
                records.append(MetricRecord(self.name, metric, value, p.masks, None, len(test)))
        return TaskResult(records, info)


def _score(probe: nn.Module, x: Tensor, y: Tensor, categorical: bool) -> float:
    with torch.no_grad():
        pred = probe(x)
    if categorical:
        return float((pred.argmax(-1) == y).float().mean())
    ss_res = (y - pred).pow(2).sum(0)
    ss_tot = (y - y.mean(0)).pow(2).sum(0).clamp(min=1e-12)
    return float((1 - ss_res / ss_tot).mean())


def _fit_and_score(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor] | None,
    kind: str,
    size: int,
    p: PropertyPredictionParams,
    generator: torch.Generator,
) -> tuple[float, int]:
    """(test score of the chosen probe, the step it was taken at): the best validation
    check when `val` has pairs, else the last step."""
    categorical = kind == "categorical"
    (x_train, y_train), (x_test, y_test) = train, test
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)

    def inputs(x: Tensor) -> Tensor:
        return (x - mean) / std

    x_train, x_test = inputs(x_train), inputs(x_test)
    if not categorical:
        y_train = y_train.float().reshape(len(y_train), -1)
        y_mean, y_std = y_train.mean(0), y_train.std(0).clamp(min=1e-6)

    def targets(y: Tensor) -> Tensor:
        return y if categorical else (y.float().reshape(len(y), -1) - y_mean) / y_std

    y_train, y_test = targets(y_train), targets(y_test)
    if val is not None:
        val = (inputs(val[0]), targets(val[1]))
    out_dim = size if categorical else y_train.shape[1]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    probe = nn.Sequential(
        nn.Linear(x_train.shape[1], p.hidden), nn.ReLU(), nn.Linear(p.hidden, out_dim)
    )
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss() if categorical else nn.MSELoss()
    best: tuple[float, int, dict[str, Tensor]] | None = None
    with torch.enable_grad():
        for step in range(1, p.steps + 1):
            idx = torch.randint(
                0, len(x_train), (min(p.batch_size, len(x_train)),), generator=generator
            )
            loss = loss_fn(probe(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if val is not None and (step % p.eval_every == 0 or step == p.steps):
                score = _score(probe, *val, categorical)
                if best is None or score > best[0]:  # ties keep the earlier probe
                    best = (score, step, copy.deepcopy(probe.state_dict()))
    step = p.steps
    if best is not None:
        probe.load_state_dict(best[2])
        step = best[1]
    return _score(probe, x_test, y_test, categorical), step


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [PropertyPrediction]
