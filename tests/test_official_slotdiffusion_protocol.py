"""The `slotdiffusion` and `slate` protocols against SlotDiffusion's own COCO and VOC loaders.

Opt-in: point OCL_BENCH_SLOTDIFFUSION_REPO at a checkout of github.com/Wuziyi616/SlotDiffusion
(the same variable as tests/test_official_slotdiffusion.py). Its
`slotdiffusion/img_based/datasets/{coco,voc}.py` (with their transforms and utils) are
imported as a package without its `__init__` (which pulls in nerv through clevrtex.py) and
built as `test_seg.py` builds them: split 'val', the val transforms (ResizeMinShape +
CenterCrop + Normalize(0.5, 0.5)), `load_sem_mask = True`, collated by its collater. They run
on the small COCO and VOC of tests/official_protocol_data.py (overlaps, crowd, odd sizes, an
image without annotations, VOC 255 outlines and difficult regions), laid out as SlotDiffusion
expects (images/, sets/ as links). Our coco and voc datasets, with the dataset settings of
protocols/slotdiffusion.toml, must give:

- the model's input image: SlotDiffusion's tensor (in [-1, 1]) to 1e-6;
- the ignore mask: SlotDiffusion's `inst_overlap_masks`, pixel for pixel (test_seg.py hands it
  to every metric: ground-truth pixels there become background and predictions a class of
  their own, which for FG-ARI and mBO is the same as ignoring them);
- the instance map and the semantic map, pixel for pixel, overlap pixels included: ours
  painted with ids 1..M in mask order (class masks in ascending id) against SlotDiffusion's
  maps after its `suppress_mask_idx` compaction.

SLATE released no COCO loader: the SLATE rows' COCO numbers are SlotDiffusion's
re-implementation of SLATE, evaluated by the same test_seg.py, so protocols/slate.toml is this
COCO protocol; it is checked here at SLATE's 128 px.

    git --git-dir=/work/.mirror/Wuziyi616+SlotDiffusion/repo archive HEAD | tar -x -C /tmp/sdf
    OCL_BENCH_SLOTDIFFUSION_REPO=/tmp/sdf \
        python -m pytest tests/test_official_slotdiffusion_protocol.py
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch

from ocl_bench.datasets.coco import CocoDataset, CocoParams
from ocl_bench.datasets.voc import VocDataset, VocParams
from tests.official_protocol_data import segments, write_coco, write_voc

REPO = os.environ.get("OCL_BENCH_SLOTDIFFUSION_REPO", "")
DATASETS = Path(REPO) / "slotdiffusion" / "img_based" / "datasets"
pytestmark = pytest.mark.skipif(
    not REPO or not (DATASETS / "coco.py").is_file(),
    reason="set OCL_BENCH_SLOTDIFFUSION_REPO to a checkout of github.com/Wuziyi616/SlotDiffusion",
)
PROTOCOLS = Path(__file__).resolve().parents[1] / "protocols"
PACKAGE = "_sdf_img_datasets"


@pytest.fixture(scope="module")
def sdf() -> dict[str, types.ModuleType]:
    """SlotDiffusion's coco and voc dataset modules, imported from the checkout."""
    pytest.importorskip("pycocotools")
    pytest.importorskip("cv2")
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(DATASETS)]  # a package without running its __init__.py
    sys.modules[PACKAGE] = package
    try:
        return {n: importlib.import_module(f"{PACKAGE}.{n}") for n in ("coco", "voc")}
    finally:
        for name in [n for n in sys.modules if n.startswith(PACKAGE)]:
            sys.modules.pop(name)


def protocol(name: str, dataset: str) -> dict[str, Any]:
    with open(PROTOCOLS / f"{name}.toml", "rb") as f:
        return tomllib.load(f)[dataset]


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve(), target_is_directory=True)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = write_coco(tmp_path_factory.mktemp("coco"))
    # SlotDiffusion reads data_root/images/val2017 and data_root/annotations
    _link(root / "sdf" / "images" / "val2017", root / "val2017")
    _link(root / "sdf" / "annotations", root / "annotations")
    return root


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    root = write_voc(tmp_path_factory.mktemp("voc"))
    # SlotDiffusion reads data_root/images/<id>.jpg and data_root/sets/val.txt
    _link(root / "images", root / "JPEGImages")
    _link(root / "sets", root / "ImageSets" / "Segmentation")
    return root


def _official_samples(dataset: Any, collate: Any) -> list[dict[str, torch.Tensor]]:
    dataset.load_sem_mask = True  # test_seg.py: also the semantic maps (COCO; VOC has them)
    return [{k: v[0] for k, v in collate([dataset[i]]).items()} for i in range(len(dataset))]


def _painted(masks: torch.Tensor) -> torch.Tensor:
    """long[H,W]: disjoint bool masks [M,H,W] painted with ids 1..M (0 elsewhere)."""
    assert masks.sum(0).max() <= 1, "expected disjoint masks"
    ids = torch.arange(1, masks.shape[0] + 1)[:, None, None]
    return (masks.long() * ids).sum(0)


def _compare(ours: dict, theirs: dict, where: str) -> None:
    torch.testing.assert_close(ours["image"] * 2 - 1, theirs["img"], rtol=0, atol=1e-6)
    ignore = theirs["inst_overlap_masks"].bool()
    assert torch.equal(ours["ignore_mask"], ignore), f"{where}: ignore mask"
    inst, sem = theirs["masks"], theirs["sem_masks"]
    assert torch.equal(_painted(ours["instance_masks"]), inst), f"{where}: instance map"
    assert torch.equal(_painted(ours["class_masks"]), sem), f"{where}: semantic map"
    # what FG-ARI / mBO score: every segment restricted to the pixels that are not ignored
    scored = ~ignore
    for name, dense in (("instance", inst), ("class", sem)):
        mine = ours["instance_masks" if name == "instance" else "class_masks"]
        official = [dense == i for i in range(1, int(dense.max()) + 1)]
        assert segments(mine, scored) == segments(official, scored), f"{where}: {name} segments"


def _coco_case(sdf, coco_root: Path, name: str, size: int) -> None:
    settings = protocol(name, "coco")
    official = sdf["coco"].COCO2017Dataset(
        data_root=str(coco_root / "sdf"),
        split="val",
        coco_transforms=sdf["coco"].COCOTransforms((size, size), val=True),
        load_anno=True,
    )
    ours = CocoDataset(
        CocoParams(root=str(coco_root), image_size=size, **settings["dataset"]), split="val"
    )
    theirs = _official_samples(official, sdf["coco"].COCOCollater())
    assert len(theirs) == len(ours) == 6  # every val image, the one without annotations too
    overlaps = 0
    for i, expected in enumerate(theirs):
        mine = ours[i]
        _compare(mine, expected, f"coco image {i}")
        overlaps += int(mine["ignore_mask"].sum())
    assert overlaps > 0  # the overlap rule was exercised
    # SlotDiffusion's masks come with the image (ResizeMinShape resizes both): mask_size 0
    assert mine["ignore_mask"].shape == (size, size)
    assert settings["tasks"]["object_discovery"]["mask_size"] == 0


def test_slotdiffusion_coco_equals_the_official_loader(sdf, coco_root) -> None:
    _coco_case(sdf, coco_root, "slotdiffusion", 224)


def test_slate_coco_equals_slotdiffusions_loader_at_128(sdf, coco_root) -> None:
    assert protocol("slate", "coco")["dataset"] == protocol("slotdiffusion", "coco")["dataset"]
    _coco_case(sdf, coco_root, "slate", 128)


def test_slotdiffusion_voc_equals_the_official_loader(sdf, voc_root) -> None:
    settings = protocol("slotdiffusion", "voc")
    official = sdf["voc"].VOC12Dataset(
        data_root=str(voc_root),
        split="val",
        voc_transforms=sdf["voc"].VOCTransforms((224, 224), val=True),
        load_anno=True,
    )
    ours = VocDataset(
        VocParams(root=str(voc_root), image_size=224, **settings["dataset"]), split="val"
    )
    theirs = _official_samples(official, sdf["voc"].VOCCollater())
    assert len(theirs) == len(ours) == 4
    for i, expected in enumerate(theirs):
        mine = ours[i]
        _compare(mine, expected, f"voc image {i}")
        assert mine["ignore_mask"].any()  # the 255 outlines reached the ignore mask
