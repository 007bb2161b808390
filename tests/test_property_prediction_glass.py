"""property_prediction as GLASS appendix A.2 runs it: the category property, matching on
semantic masks, held-out model selection, accuracy per IoU threshold, generated datasets.

The models here are planted: their slot masks are ground-truth masks (or known parts of
them) and their slot vectors encode a chosen label, so what the probe should score is known.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, Features, ModelOutput, ReconstructionOutput, Slots
from ocl_bench.api.errors import ConfigError, DataError, IncompatiblePluginsError
from ocl_bench.api.tasking import EvalContext
from ocl_bench.run.compose import check_compatible
from ocl_bench.run.config import load_config, load_raw, resolve
from ocl_bench.run.data import evaluation_dataset, make_dataset
from ocl_bench.run.evaluate import evaluate
from ocl_bench.run.registry import registry
from ocl_bench.tasks.property_prediction import PropertyPrediction, PropertyPredictionParams

SHAPES = registry().get("dataset", "shapes")
KINDS = ["square", "circle", "triangle"]
K = 7  # up to 5 objects, the background, one spare
D = 16


def shapes(split: str, size: int, kinds: list[str] = KINDS) -> Any:
    params = SHAPES.Params(
        image_size=24, train_size=size, val_size=size, test_size=size, shapes=kinds, cache=size
    )
    return SHAPES(params, split)


def encode(labels: Tensor, generator: torch.Generator, noise: float = 0.1) -> Tensor:
    """Slot vectors [...,D]: a one-hot of `labels` (none for -1) plus Gaussian noise."""
    hot = torch.zeros(*labels.shape, D)
    hot.scatter_(-1, labels.clamp(min=0)[..., None], (labels >= 0).float()[..., None])
    return hot + noise * torch.randn(*labels.shape, D, generator=generator)


class Planted(nn.Module):
    """Slot k is ground-truth mask k (instances or classes; the background is slot K-1), or
    the part of it `keep(image, k, pixels)` leaves; its vector encodes `content(batch)`."""

    def __init__(
        self,
        content: Callable[[Batch, Tensor], Tensor],
        on: str = "instances",
        keep: Callable[[int, int, int], int] | None = None,
    ):
        super().__init__()
        self.content, self.on, self.keep = content, on, keep

    def forward(self, batch: Batch) -> ModelOutput:
        gt = (batch.class_masks if self.on == "classes" else batch.instance_masks).float()
        b, m, h, w = gt.shape
        gt = gt.flatten(2).clone()
        if self.keep is not None:  # the first `kept` pixels (raster order) of each mask stay
            for i in range(b):
                for k in range(m):
                    where = gt[i, k].nonzero()[:, 0]
                    gt[i, k, where[self.keep(int(batch.index[i]), k, len(where)) :]] = 0
        attn = torch.zeros(b, h * w, K)
        attn[:, :, :m] = gt.transpose(1, 2)
        attn[:, :, K - 1] = (gt.sum(1) == 0).float()
        labels = torch.full((b, K), -1, dtype=torch.long)
        labels[:, :m] = self.content(batch, gt)
        generator = torch.Generator().manual_seed(int(batch.index[0]))
        x = batch.images.flatten(2)
        return ModelOutput(
            features=Features(tokens=x.transpose(1, 2), grid=(h, w)),
            slots=Slots(slots=encode(labels, generator), attn=attn),
            decoding=ReconstructionOutput(reconstruction=x, target=x),
        )


def the_labels(batch: Batch, masks: Tensor) -> Tensor:
    return batch.labels


def class_of_each_object(batch: Batch, masks: Tensor) -> Tensor:
    """The class id of the class mask that covers each object: its label read without
    `batch.labels`."""
    objects = batch.instance_masks.flatten(2).float()
    inside = torch.einsum("bmp,bcp->bmc", objects, batch.class_masks.flatten(2).float())
    ids = batch.class_ids.gather(1, inside.argmax(-1))
    return torch.where(batch.labels >= 0, ids, -1)


def context(model: nn.Module, data: dict[str, Any], images: int = 24) -> EvalContext:
    return EvalContext(
        model=model,
        dataset=lambda split: data[split],
        split="val",
        num_images=images,
        batch_size=12,
        device=torch.device("cpu"),
        progress=False,
    )


def scores(ctx: EvalContext, **params: Any) -> tuple[dict[str, float], dict[str, Any]]:
    p = {"masks": "attn", "properties": ["category"], "steps": 150, "hidden": 32, **params}
    result = PropertyPrediction(PropertyPredictionParams(**p)).evaluate(ctx)
    return {r.metric: r.value for r in result.records}, result.info


def test_category_is_learned_from_slots_that_encode_it_and_needs_only_labels():
    data = {s: shapes(s, 48) for s in ("train", "val")}
    planted, _ = scores(context(Planted(the_labels), data), train_images=48)
    assert planted["category_acc"] > 0.9 and planted["detection_rate"] == 1.0

    def noise(batch: Batch, masks: Tensor) -> Tensor:
        return torch.full_like(batch.labels, -1)

    control, _ = scores(context(Planted(noise), data), train_images=48)
    assert control["category_acc"] < 0.7  # 3 classes: the slots carried the label above

    # category asks for labels, not per-object properties: COCO (no properties) composes
    coco = ["dataset.name=coco", "tasks.object_discovery.masks=['attn']"]
    check_compatible(resolve(load_raw(None, coco)))  # properties = [] means category there
    check_compatible(
        resolve(load_raw(None, [*coco, "tasks.property_prediction.properties=['category']"]))
    )
    with pytest.raises(IncompatiblePluginsError, match="batch.properties"):
        check_compatible(
            resolve(load_raw(None, [*coco, "tasks.property_prediction.properties=['shape']"]))
        )


def test_classes_matching_scores_semantic_masks_with_the_class_id_as_target():
    # one or two kinds per image, so class id and class-mask position often differ
    data = {s: shapes(s, 48) for s in ("train", "val")}

    def class_ids(batch: Batch, masks: Tensor) -> Tensor:
        return batch.class_ids

    model = Planted(class_ids, on="classes")
    by_class, info = scores(context(model, data), train_images=48, match_on="classes")
    assert by_class["detection_rate"] == 1.0 and by_class["category_acc"] > 0.9
    # the same slots against instances: a class mask covering two objects is no object's match
    by_instance, _ = scores(context(model, data), train_images=48)
    assert by_instance["detection_rate"] < 0.95
    assert {"batch.class_masks", "batch.class_ids"} <= PropertyPrediction.capabilities(
        PropertyPredictionParams(match_on="classes")
    )[0]
    assert (
        "batch.instance_masks"
        not in PropertyPrediction.capabilities(PropertyPredictionParams(match_on="classes"))[0]
    )


class Relabelled:
    """The shapes train split with the labels of its first `wrong` images shifted by one
    class (the probe's training images contradict every other image), recording reads."""

    def __init__(self, base: Any, wrong: int):
        self.base, self.wrong, self.read = base, wrong, []
        self.collate, self.num_classes = base.collate, base.num_classes

    def __len__(self) -> int:
        return len(self.base)

    def property_specs(self) -> dict[str, tuple[str, int]]:
        return self.base.property_specs()

    def __getitem__(self, index: int) -> dict[str, Any]:
        self.read.append(index)
        sample = dict(self.base[index])
        if index < self.wrong:
            sample["labels"] = (sample["labels"] + 1) % self.num_classes
        return sample


def test_held_out_validation_images_pick_the_best_probe_step():
    train_images, val_images = 40, 24
    train = Relabelled(shapes("train", 64), wrong=train_images)
    ctx = context(Planted(class_of_each_object), {"train": train, "val": shapes("val", 64)})
    common = {"train_images": train_images, "steps": 300}
    chosen, info = scores(ctx, **common, val_images=val_images, eval_every=10)
    # every image read once, none beyond the held-out block
    assert sorted(train.read) == list(range(train_images + val_images))
    step = info["selected_step"]["category_acc"]
    assert step < 300 and step % 10 == 0
    last, _ = scores(ctx, **common)  # val_images=0: the last step's probe, as before
    # the held-out images kept their labels: validation chose a step before the probe
    # learned the shifted ones, so they are not among its training images
    assert chosen["category_acc"] > last["category_acc"] + 0.3
    # the chosen score is the probe of that step: the same run stopped there scores the same
    stopped, _ = scores(ctx, train_images=train_images, steps=step)
    assert stopped["category_acc"] == chosen["category_acc"]
    # a split too short for both blocks shrinks the probe's block (a tiny run still ends)
    train.read.clear()
    with pytest.warns(RuntimeWarning, match="exceed the 64 images.*trains on 39 and selects on 25"):
        _, short = scores(ctx, train_images=train_images, val_images=25, eval_every=10)
    assert (short["train_images"], short["val_images"]) == (39, 25)
    assert sorted(train.read) == list(range(64))


def test_each_iou_threshold_has_its_own_detection_rate_and_probe():
    data = {s: shapes(s, 48) for s in ("train", "val")}
    fractions = (0.55, 0.65, 0.75, 0.85, 0.95)

    def kept(image: int, k: int, pixels: int) -> int:
        return math.ceil(fractions[(image + k) % 5] * pixels)

    def by_overlap(batch: Batch, masks: Tensor) -> Tensor:
        # the slot names the right class only when it covers > 70% of its object
        full = batch.instance_masks.flatten(2).sum(-1).clamp(min=1)
        good = masks.sum(-1) / full > 0.7
        return torch.where(good, batch.labels, (batch.labels + 1) % len(KINDS))

    thresholds = [0.5, 0.6, 0.7, 0.8, 0.9]
    model = Planted(by_overlap, keep=kept)
    got, info = scores(context(model, data), train_images=48, steps=300, iou_thresholds=thresholds)
    rates = [got[f"detection_rate_iou{round(100 * t)}"] for t in thresholds]
    assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1]
    assert got["detection_rate_iou50"] == got["detection_rate"]  # iou_threshold 0.5: the
    assert got["category_acc_iou50"] == got["category_acc"]  # same pairs, the same probe
    # the rates count exactly the objects whose planted IoU exceeds each threshold
    for t, rate in zip(thresholds, rates):
        per_image = []
        for i in range(24):
            masks = data["val"][i]["instance_masks"].flatten(1).sum(-1).tolist()
            per_image.append(sum(kept(i, k, n) / n > t for k, n in enumerate(masks)) / len(masks))
        assert rate == pytest.approx(sum(per_image) / len(per_image), abs=1e-12)
    # pairs at or below t neither train nor test the probe: above 0.7 only the right labels
    assert got["category_acc_iou70"] > 0.9 and got["category_acc_iou80"] > 0.9
    assert got["category_acc_iou50"] < got["category_acc_iou70"] - 0.15
    assert info["test_pairs_iou50"] > info["test_pairs_iou70"] > info["test_pairs_iou90"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("match_on=semantic", "'instances', 'classes'"),
        ("iou_thresholds=[0.5, 1.5]", "1.5 is not in [0, 1]"),
        ("iou_thresholds=[0.7, 0.701]", "the same metric twice"),
        ("properties=['category', 'shape']", "only 'category'"),
    ],
)
def test_bad_probe_settings_are_one_line_config_errors(override: str, message: str):
    extra = ["tasks.property_prediction.match_on=classes"] if "shape" in override else []
    with pytest.raises(ConfigError) as err:
        load_config(None, [*extra, f"tasks.property_prediction.{override}"])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_generated_dataset_probe_reads_the_real_train_images_without_the_generated_ones(
    tmp_path,
):
    pytest.importorskip("diffusers")
    source = {"image_size": 24, "train_size": 40, "val_size": 12, "shapes": KINDS}
    overrides = [
        "dataset.name=generated",
        "dataset.tiny=true",
        "dataset.build=false",
        f"dataset.root={tmp_path / 'never-built'}",
        "dataset.source_params={image_size = 24, train_size = 40, val_size = 12, shapes = "
        '["square", "circle", "triangle"]}',
        "eval.num_images=12",
        "eval.batch_size=12",
        "eval.figure_images=0",
        "tasks.property_prediction.masks=attn",
        "tasks.property_prediction.train_images=40",
        "tasks.property_prediction.steps=150",
        "tasks.property_prediction.hidden=32",
    ]
    cfg = load_config(None, overrides)
    with pytest.raises(DataError, match="lacks"):  # the generated train split is absent
        make_dataset(cfg.dataset, "train")
    real = evaluation_dataset(cfg.dataset, "train")
    expected = SHAPES(SHAPES.Params(**source), "train")
    assert real.name == "shapes" and torch.equal(real[3]["image"], expected[3]["image"])
    cfg.tasks = [c for c in cfg.tasks if c.name == "property_prediction"]
    metrics = evaluate(cfg, Planted(the_labels), tmp_path, step=0, progress=False)
    assert metrics["summary"]["property_prediction.attn.category_acc"] > 0.9


def test_voc_sbd_train_images_give_class_masks_for_the_classes_probe(tmp_path):
    from tests.test_coco_voc import VOC_IDS, _palette_png, make_voc, voc

    root = make_voc(tmp_path, trainaug=[*VOC_IDS, "2008_000003"])  # SBD: no object PNG
    aug = root / "SegmentationClassAug"
    aug.mkdir()
    for image_id in VOC_IDS:
        (aug / f"{image_id}.png").write_bytes(
            (root / "SegmentationClass" / f"{image_id}.png").read_bytes()
        )
    sbd = torch.zeros(30, 40, dtype=torch.uint8)  # the fixture's image size
    sbd[5:25, 10:30], sbd[0, :] = 12, 255
    _palette_png(sbd.numpy(), aug / "2008_000003.png")
    centre = {"train_crop": "center", "hflip": False}
    assert not voc(tmp_path, "train", **centre).has_classes  # SegmentationClass lacks the SBD PNG
    train = voc(tmp_path, "train", class_folder="SegmentationClassAug", **centre)
    assert not train.has_masks and train.has_classes
    sample = train[2]
    assert "instance_masks" not in sample and sample["class_ids"].tolist() == [12]
    assert sample["ignore_mask"][0].all() and sample["class_masks"][0].sum() > 0
    assert train[0]["class_ids"].tolist() == voc(tmp_path, "val")[0]["class_ids"].tolist()

    def class_ids(batch: Batch, masks: Tensor) -> Tensor:
        return batch.class_ids

    ctx = context(Planted(class_ids, on="classes"), {"train": train, "val": voc(tmp_path)}, 2)
    got, info = scores(ctx, train_images=3, match_on="classes")
    assert got["detection_rate"] == 1.0 and info["train_pairs"] == 6  # 3 + 2 + 1 classes
    assert 0 <= got["category_acc"] <= 1
    with pytest.raises(DataError, match="'train' split of this dataset has no instance masks"):
        scores(ctx, train_images=3)
