"""DINO's input in the slotdiffusion presets against SlotDiffusion's own loader.

SlotDiffusion's COCO2017Dataset (slotdiffusion/img_based/datasets/coco.py with
COCOTransforms(val=True): Normalize(0.5, 0.5)) gives the image its DINOEncoder feeds
ViTModel unchanged (video_based/models/dino.py). The slotdiffusion-coco preset's encoder
(`encoder.normalize = "half"`), on our coco dataset under protocol slotdiffusion, must feed
its ViT that same tensor; ImageNet's mean/std (the default) must not.

Opt-in: OCL_BENCH_SLOTDIFFUSION_REPO=/path/to/SlotDiffusion
    python -m pytest tests/test_official_slotdiffusion_dino_input.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from ocl_bench.api.contracts import Dims
from ocl_bench.datasets.coco import CocoDataset, CocoParams
from ocl_bench.encoders.vit import ENCODERS
from ocl_bench.run.config import load_config
from tests import test_official_slotdiffusion_protocol as loaders
from tests.test_vit_encoders import _vit_input

# the loader test's checkout switch and fixtures (SlotDiffusion's dataset modules, the COCO)
pytestmark = loaders.pytestmark
sdf = loaders.sdf
coco_root = loaders.coco_root

SIZE = 32  # 4 x 4 patches of 8 px: a tiny DINO ViT-S/8 stand-in
TINY_VIT = [
    "encoder.random_init=true",
    "encoder.embed_dim=16",
    "encoder.depth=1",
    "encoder.num_heads=2",
    f"encoder.image_size={SIZE}",
]


def test_the_preset_feeds_dino_what_slotdiffusion_feeds_it(sdf, coco_root: Path) -> None:
    official = sdf["coco"].COCO2017Dataset(
        data_root=str(coco_root / "sdf"),
        split="val",
        coco_transforms=sdf["coco"].COCOTransforms((SIZE, SIZE), val=True),
        load_anno=True,
    )
    theirs = torch.stack(
        [s["img"] for s in loaders._official_samples(official, sdf["coco"].COCOCollater())]
    )
    settings = loaders.protocol("slotdiffusion", "coco")["dataset"]
    ours = CocoDataset(CocoParams(root=str(coco_root), image_size=SIZE, **settings), split="val")
    images = torch.stack([ours[i]["image"] for i in range(len(ours))])
    cfg = load_config("slotdiffusion-coco", TINY_VIT)
    assert cfg.encoder.params.normalize == "half"
    encoder = ENCODERS[cfg.encoder.name](cfg.encoder.params, Dims(image_size=(SIZE, SIZE)))
    torch.testing.assert_close(_vit_input(encoder, images), theirs, rtol=0, atol=1e-6)
    # the setting is necessary: ImageNet's statistics give another input
    default = load_config("slotdiffusion-coco", [*TINY_VIT, "encoder.normalize=imagenet"])
    imagenet = ENCODERS[default.encoder.name](default.encoder.params, Dims(image_size=(SIZE, SIZE)))
    assert (_vit_input(imagenet, images) - theirs).abs().max() > 0.1
