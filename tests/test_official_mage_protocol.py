"""The `mage` protocol (the thesis' MAGE pipeline at 256 px) against SPOT's COCO loader.

Opt-in: point OCL_BENCH_SPOT_REPO at a checkout of github.com/gkakogeorgiou/spot (the same
variable as tests/test_official_spot.py). The thesis names no data pipeline of its own; its
first stage is SPOT, so protocols/mage.toml is SPOT's COCO evaluation at MAGE's 256-px input
(see the file's header for MAGE's own, ImageNet-only, transforms). SPOT's `datasets.py`
COCO2017 is built with split 'val', image_size 256 and mask_size 320, and run on the small
COCO of tests/official_protocol_data.py (overlaps, crowd, odd sizes, an image without
annotations). Our coco dataset at image_size 256, with the dataset settings of
protocols/mage.toml, must give the input image (1e-6 after SPOT's Normalize), the ignore mask
pixel for pixel, and the instance and class segments the metrics score.

    git --git-dir=/work/.mirror/gkakogeorgiou+spot/repo archive HEAD | tar -x -C /tmp/spot
    OCL_BENCH_SPOT_REPO=/tmp/spot python -m pytest tests/test_official_mage_protocol.py
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch

from ocl_bench.datasets.coco import CocoDataset, CocoParams
from tests.official_checkout import checkout_on_path
from tests.official_protocol_data import MEAN, STD, segments, write_coco

REPO = os.environ.get("OCL_BENCH_SPOT_REPO", "")
pytestmark = pytest.mark.skipif(
    not REPO or not (Path(REPO) / "datasets.py").is_file(),
    reason="set OCL_BENCH_SPOT_REPO to a checkout of github.com/gkakogeorgiou/spot",
)
PROTOCOL = Path(__file__).resolve().parents[1] / "protocols" / "mage.toml"
IMAGE, MASK = 256, 320  # MAGE's 16 x 16 VQGAN tokens; SPOT's val_mask_size


@pytest.fixture(scope="module")
def spot_datasets() -> Any:
    pytest.importorskip("pycocotools")
    # SPOT's module is named `datasets`, as is Hugging Face's: imported in isolation
    with checkout_on_path(REPO, package="datasets"):
        import datasets
    return datasets


def test_coco_at_256_equals_spots_loader(tmp_path: Path, spot_datasets) -> None:
    with open(PROTOCOL, "rb") as f:
        settings = tomllib.load(f)["coco"]["dataset"]
    root = write_coco(tmp_path / "coco")
    theirs = spot_datasets.COCO2017(str(root), split="val", image_size=IMAGE, mask_size=MASK)
    ours = CocoDataset(CocoParams(root=str(root), image_size=IMAGE, **settings), split="val")
    assert len(ours) == len(theirs) == 6
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    cat_list = spot_datasets.COCO2017.CAT_LIST
    overlap_seen = 0
    for i in range(len(ours)):
        image, inst, cls, ignore = theirs[i]
        sample = ours[i]
        assert sample["image"].shape == (3, IMAGE, IMAGE)
        torch.testing.assert_close((sample["image"] - mean) / std, image, atol=1e-6, rtol=0)
        ignore = ignore[0].bool()
        assert torch.equal(sample["ignore_mask"], ignore), f"image {i}: ignore mask"
        overlap_seen += int(ignore.any())
        scored = ~ignore
        spot_instances = [inst == v for v in inst.unique().tolist() if v != 0]
        assert segments(sample["instance_masks"], scored) == segments(spot_instances, scored)
        spot_classes = {cat_list[v]: cls == v for v in cls.unique().tolist() if v != 0}
        our_classes = dict(zip(sample["class_ids"].tolist(), sample["class_masks"]))
        for cat in set(spot_classes) | set(our_classes):
            a = segments([our_classes.get(cat, torch.zeros_like(scored))], scored)
            b = segments([spot_classes.get(cat, torch.zeros_like(scored))], scored)
            assert a == b, f"image {i}: class {cat}"
    assert overlap_seen >= 4
