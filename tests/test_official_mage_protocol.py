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

from pathlib import Path

from ocl_bench.datasets.coco import CocoDataset, CocoParams
from tests import test_official_spot_protocol as spot
from tests.official_protocol_data import protocol_dataset_settings, write_coco

# the SPOT protocol test's checkout switch, its fixture (SPOT's datasets.py) and its comparison
pytestmark = spot.pytestmark
spot_datasets = spot.spot_datasets
IMAGE, MASK = 256, 320  # MAGE's 16 x 16 VQGAN tokens; SPOT's val_mask_size


def test_coco_at_256_equals_spots_loader(tmp_path: Path, spot_datasets) -> None:
    settings = protocol_dataset_settings("mage", "coco")
    root = write_coco(tmp_path / "coco")
    theirs = spot_datasets.COCO2017(str(root), split="val", image_size=IMAGE, mask_size=MASK)
    ours = CocoDataset(CocoParams(root=str(root), image_size=IMAGE, **settings), split="val")
    assert len(ours) == len(theirs) == 6
    cat_list = spot_datasets.COCO2017.CAT_LIST
    overlap_seen = 0
    for i in range(len(ours)):
        sample = ours[i]
        assert sample["image"].shape == (3, IMAGE, IMAGE)
        overlap_seen += spot.assert_coco_sample_equals_spots(sample, theirs[i], cat_list, i)
    assert overlap_seen >= 4
