"""The `spot` protocol (protocols/spot.toml) against SPOT's own loaders, when present.

Opt-in: point OCL_BENCH_SPOT_REPO at a checkout of github.com/gkakogeorgiou/spot (the same
variable as tests/test_official_spot.py). Its `datasets.py` is imported (COCO2017 and
PascalVOC with split='val', as eval_spot.py builds them: image 224, val_mask_size 320) and
run on a small COCO and VOC this test writes (tests/official_protocol_data.py: overlaps,
crowd, odd sizes, an image without objects, VOC 255 outlines and difficult regions). Our coco
and voc datasets, with the dataset settings of protocols/spot.toml, must give:

- the model's input image: SPOT's tensor after its Normalize, to 1e-6;
- the ignore mask, pixel for pixel (COCO: SPOT's mask_ignore; VOC: none);
- the instance and class segments the metrics score: each mask restricted to the pixels that
  are not ignored, empty ones dropped (SPOT's metrics drop channel 0 and zero ignored pixels
  in the prediction and the target), equal as sets, class ids mapped through SPOT's CAT_LIST.

    git --git-dir=/work/.mirror/gkakogeorgiou+spot/repo archive HEAD | tar -x -C /tmp/spot
    OCL_BENCH_SPOT_REPO=/tmp/spot python -m pytest tests/test_official_spot_protocol.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ocl_bench.datasets.coco import CocoDataset, CocoParams
from ocl_bench.datasets.voc import VocDataset, VocParams
from tests.official_checkout import checkout_from_env, checkout_on_path
from tests.official_protocol_data import (
    normalized,
    protocol_dataset_settings,
    segments,
    write_coco,
    write_voc,
)

REPO, pytestmark = checkout_from_env(
    "OCL_BENCH_SPOT_REPO", "datasets.py", "github.com/gkakogeorgiou/spot"
)
IMAGE, MASK = 224, 320  # eval_spot.py: --val_image_size 224, --val_mask_size 320


@pytest.fixture(scope="module")
def spot_datasets() -> Any:
    pytest.importorskip("pycocotools")
    # SPOT's module is named `datasets`, as is Hugging Face's: imported in isolation
    with checkout_on_path(REPO, package="datasets"):
        import datasets
    return datasets


def assert_coco_sample_equals_spots(
    sample: dict[str, Any], theirs: tuple[torch.Tensor, ...], cat_list: list[int], i: int
) -> bool:
    """Our COCO sample `i` against SPOT's (image, instance map, class map, ignore mask): the
    image to 1e-6 after Normalize, the ignore mask pixel for pixel, the instance and class
    segments the metrics score. Returns whether SPOT ignores any pixel (an overlap)."""
    image, inst, cls, ignore = theirs
    torch.testing.assert_close(normalized(sample["image"]), image, atol=1e-6, rtol=0)
    ignore = ignore[0].bool()
    assert torch.equal(sample["ignore_mask"], ignore), f"image {i}: ignore mask"
    scored = ~ignore
    spot_instances = [inst == v for v in inst.unique().tolist() if v != 0]
    assert segments(sample["instance_masks"], scored) == segments(spot_instances, scored)
    spot_classes = {cat_list[v]: cls == v for v in cls.unique().tolist() if v != 0}
    our_classes = dict(zip(sample["class_ids"].tolist(), sample["class_masks"]))
    for cat in set(spot_classes) | set(our_classes):
        a = segments([our_classes.get(cat, torch.zeros_like(scored))], scored)
        b = segments([spot_classes.get(cat, torch.zeros_like(scored))], scored)
        assert a == b, f"image {i}: class {cat}"
    return bool(ignore.any())


def test_coco_ground_truth_and_image_equal_spots_loader(tmp_path: Path, spot_datasets) -> None:
    root = write_coco(tmp_path / "coco")
    theirs = spot_datasets.COCO2017(str(root), split="val", image_size=IMAGE, mask_size=MASK)
    settings = protocol_dataset_settings("spot", "coco")
    ours = CocoDataset(CocoParams(root=str(root), image_size=IMAGE, **settings), split="val")
    assert len(ours) == len(theirs) == 6
    cat_list = spot_datasets.COCO2017.CAT_LIST
    crowd_seen = overlap_seen = 0
    for i in range(len(ours)):
        sample = ours[i]
        overlap_seen += assert_coco_sample_equals_spots(sample, theirs[i], cat_list, i)
        crowd_seen += int((sample["labels"] == 1).sum().item() >= 2)  # person + crowd
    assert overlap_seen >= 4 and crowd_seen >= 2  # the cases the data was written for


def test_coco_default_params_differ_from_spot_only_in_interpolation(
    tmp_path: Path, spot_datasets
) -> None:
    """The protocol is what makes the image equal: the default (bicubic) is off by much more
    than float rounding, so the comparison above can fail."""
    root = write_coco(tmp_path / "coco")
    theirs = spot_datasets.COCO2017(str(root), split="val", image_size=IMAGE, mask_size=MASK)
    ours = CocoDataset(CocoParams(root=str(root), image_size=IMAGE), split="val")
    diff = (normalized(ours[0]["image"]) - theirs[0][0]).abs().max().item()
    assert diff > 0.05


def test_voc_ground_truth_and_image_equal_spots_loader(tmp_path: Path, spot_datasets) -> None:
    root = write_voc(tmp_path / "VOC2012")
    theirs = spot_datasets.PascalVOC(str(root), split="val", image_size=IMAGE, mask_size=MASK)
    params = VocParams(root=str(root), image_size=IMAGE, **protocol_dataset_settings("spot", "voc"))
    ours = VocDataset(params, split="val")
    assert len(ours) == len(theirs) == 4
    for i in range(len(ours)):
        image, inst, cls, ignore = theirs[i]
        sample = ours[i]
        torch.testing.assert_close(normalized(sample["image"]), image, atol=1e-6, rtol=0)
        assert not ignore.any()  # SPOT: "There is no overlapping in VOC"; 255 -> background
        assert torch.equal(sample["ignore_mask"], ignore[0].bool())
        scored = torch.ones(MASK, MASK, dtype=torch.bool)
        spot_instances = [inst == v for v in inst.unique().tolist() if v != 0]
        assert segments(sample["instance_masks"], scored) == segments(spot_instances, scored)
        spot_classes = [cls == v for v in cls.unique().tolist() if v != 0]
        assert segments(sample["class_masks"], scored) == segments(spot_classes, scored)
        assert sample["class_ids"].tolist() == [v for v in cls.unique().tolist() if v != 0]


def test_voc_default_ignores_the_pixels_spot_counts_as_background(
    tmp_path: Path, spot_datasets
) -> None:
    """OCLF's rule (the default, void='ignore') differs from SPOT's on the 255 pixels."""
    root = write_voc(tmp_path / "VOC2012")
    theirs = spot_datasets.PascalVOC(str(root), split="val", image_size=IMAGE, mask_size=MASK)
    ours = VocDataset(VocParams(root=str(root), image_size=IMAGE), split="val")
    assert ours[0]["ignore_mask"].sum() > 1000
    assert not theirs[0][3].any()
