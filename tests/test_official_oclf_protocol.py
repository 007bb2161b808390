"""The `dinosaur` protocol (protocols/dinosaur.toml) against OCLF's own preprocessing, when present.

Opt-in: point OCL_BENCH_OCLF_REPO at a checkout of
github.com/amazon-science/object-centric-learning-framework (needs hydra-core for OmegaConf
and instantiate). OCLF reads webdataset shards; this test builds, for each image of a small
COCO and VOC it writes (tests/official_protocol_data.py), the sample dict OCLF's loader yields:

- COCO: the shard members written by scripts/datasets/conversion_scripts/convert_coco.py's
  own AnnotationAggregator and convert_to_bytes (annToMask per annotation, N x H x W x 1) from
  an annotation file without crowd annotations (coco_nocrowd), decoded by
  ocl.data_decoding.default_decoder;
- VOC: the fields tfds_extended_voc.py stores (image, segmentation-class and
  segmentation-instance as H x W x 1 palette indices, objects.bbox), as convert_tfds.py names
  them.

The eval transforms are instantiated with Hydra from OCLF's YAML files, as the ccrop metric
configs compose them: configs/evaluation/projects/bridging/_preprocessing_coco.yaml +
metrics_coco_ccrop.yaml, and _preprocessing_voc2012_trainaug.yaml + _preprocessing_to_ccrop_
{image,320_masks}.yaml + metrics_voc2012_masks_ccrop.yaml; the ccrop files' entries under
plugins.03b_preprocessing.evaluation_transforms replace those keys of the 03b stage (their
intent; OCLF's current EvaluationConfig has no such key). The stages run in sorted order
through ocl.transforms.Map / SimpleTransform (torchdata and decord are stubbed: a list-backed
pipe with `map` and the `map_dict` that ocl.utils.dataset_patches registers).

One fact of OCLF's pinned torchvision (0.15.1, poetry.lock) is set explicitly: Resize on a
tensor with `antialias` unset does not antialias there (torchvision >= 0.17 does), so the
YAML's Resize nodes get antialias=False.

Our coco and voc datasets with protocols/dinosaur.toml's settings must give OCLF's image to
1e-6 (after Normalize), its instance masks (order, pixels, category), its class masks and its
ignore mask, pixel for pixel.

    git --git-dir=/work/.mirror/amazon-science+object-centric-learning-framework/repo \
        archive HEAD | tar -x -C /tmp/oclf && pip install hydra-core
    OCL_BENCH_OCLF_REPO=/tmp/oclf python -m pytest tests/test_official_oclf_protocol.py
"""

from __future__ import annotations

import io
import json
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ocl_bench.datasets.coco import CocoDataset, CocoParams
from ocl_bench.datasets.voc import VocDataset, VocParams
from tests.official_checkout import checkout_from_env, checkout_on_path
from tests.official_protocol_data import (
    normalized,
    protocol_dataset_settings,
    write_coco,
    write_voc,
)

REPO, pytestmark = checkout_from_env(
    "OCL_BENCH_OCLF_REPO",
    "ocl/preprocessing.py",
    "github.com/amazon-science/object-centric-learning-framework",
)
BRIDGING = Path(REPO) / "configs" / "evaluation" / "projects" / "bridging"
IMAGE = 224  # the ccrop configs' Resize(224) + CenterCrop(224)


# ------------------------------------------------------------------ stand-ins for torchdata


class _Pipe:
    """A list of sample dicts with the datapipe methods OCLF's transforms call."""

    def __init__(self, items: Any = ()) -> None:
        self.items = list(items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def map(self, fn: Any) -> _Pipe:
        return _Pipe(fn(x) for x in self)


def _functional_datapipe(name: str) -> Any:
    def register(cls: type) -> type:  # OCLF's DictMapper becomes _Pipe.map_dict
        setattr(_Pipe, name, lambda pipe, *args: _Pipe(cls(pipe, *args)))
        return cls

    return register


class _StreamWrapper:
    def __init__(self, file_obj: Any, parent_stream: Any = None) -> None:
        self.file_obj = file_obj

    def autoclose(self) -> None:
        self.file_obj.close()


def _stub_modules() -> dict[str, types.ModuleType]:
    iter_mod = types.ModuleType("torchdata.datapipes.iter")
    iter_mod.IterDataPipe = _Pipe
    iter_mod.util = types.SimpleNamespace(webdataset=types.SimpleNamespace())
    utils_mod = types.ModuleType("torchdata.datapipes.utils")
    utils_mod.StreamWrapper = _StreamWrapper
    datapipes = types.ModuleType("torchdata.datapipes")
    datapipes.iter, datapipes.utils = iter_mod, utils_mod
    datapipes.functional_datapipe = _functional_datapipe
    torchdata = types.ModuleType("torchdata")
    torchdata.datapipes = datapipes
    decord = types.ModuleType("decord")
    decord.bridge = types.SimpleNamespace(set_bridge=lambda name: None)
    decord.VideoReader = type("VideoReader", (), {})  # named in an annotation only
    return {
        "torchdata": torchdata,
        "torchdata.datapipes": datapipes,
        "torchdata.datapipes.iter": iter_mod,
        "torchdata.datapipes.utils": utils_mod,
        "decord": decord,
    }


@contextmanager
def _stubbed(names: dict[str, types.ModuleType]) -> Iterator[None]:
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(names)
    try:
        yield
    finally:
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod


@pytest.fixture(scope="module")
def oclf() -> Any:
    pytest.importorskip("omegaconf")
    pytest.importorskip("hydra")
    pytest.importorskip("pycocotools")
    scripts = str(Path(REPO) / "scripts" / "datasets" / "conversion_scripts")
    with _stubbed(_stub_modules()), checkout_on_path(REPO, package="ocl"):
        import hydra.utils
        import ocl.cli._config  # noqa: F401  (registers lambda_fn, torchvision_interpolation_mode)
        import ocl.data_decoding
        import ocl.preprocessing  # noqa: F401
        import ocl.transforms  # noqa: F401
        from omegaconf import OmegaConf

        webdataset = types.ModuleType("webdataset")  # convert_coco imports it for its writer
        with _stubbed({"webdataset": webdataset}), checkout_on_path(scripts, package="utils"):
            import convert_coco
        modules = types.SimpleNamespace(
            OmegaConf=OmegaConf,
            instantiate=hydra.utils.instantiate,
            decoder=ocl.data_decoding.default_decoder,
            convert_coco=convert_coco,
        )
        yield modules


def _eval_transforms(oclf: Any, preprocessing: list[str], ccrop: list[str]) -> list[Any]:
    """OCLF's eval transform stages, instantiated from its YAML, in the order it applies them."""
    OmegaConf = oclf.OmegaConf
    stages = OmegaConf.create({})
    for name in preprocessing:
        stages = OmegaConf.merge(stages, OmegaConf.load(BRIDGING / name).dataset.eval_transforms)
    for name in ccrop:
        plugin = OmegaConf.load(BRIDGING / name).plugins["03b_preprocessing"]
        for key, node in plugin.evaluation_transforms.items():
            stages["03b_preprocessing"].transforms[key] = node
    for node in stages["03b_preprocessing"].transforms.image.transforms:
        if isinstance(node, dict) or OmegaConf.is_dict(node):
            if node.get("_target_") == "torchvision.transforms.Resize":
                node.antialias = False  # torchvision 0.15.1's behaviour for tensors
    built = oclf.instantiate(stages)
    return [built[k] for k in sorted(built.keys())]


def _run(stages: list[Any], sample: dict[str, Any]) -> dict[str, Any]:
    pipe = _Pipe([sample])
    for stage in stages:
        pipe = stage(pipe)
    (out,) = list(pipe)
    return out


def _by_value(masks: torch.Tensor) -> list[tuple[int, bytes]]:
    """(value, mask bytes) of OCLF's dense masks [K,H,W] (value = category), empty ones left
    out as its metrics leave them out."""
    out = []
    for m in masks:
        if m.any():
            values = m[m > 0].unique().tolist()
            assert len(values) == 1
            out.append((int(values[0]), (m > 0).numpy().tobytes()))
    return out


def _ours(masks: torch.Tensor, ids: torch.Tensor) -> list[tuple[int, bytes]]:
    return [(int(i), m.numpy().tobytes()) for m, i in zip(masks, ids) if m.any()]


# ------------------------------------------------------------------ COCO


def _coco_shard_sample(oclf: Any, root: Path, nocrowd: Path, image_id: int) -> dict[str, Any]:
    """What OCLF's val_nocrowd shard holds for `image_id`, decoded as its loader decodes it."""
    aggregator = oclf.convert_coco.AnnotationAggregator(str(nocrowd), None, None)
    filename, annotations = aggregator[image_id]
    members = dict(oclf.convert_coco.convert_to_bytes(k, v) for k, v in annotations.items())
    members["image.jpg"] = (root / "val2017" / filename).read_bytes()
    streams = {k: _StreamWrapper(io.BytesIO(v)) for k, v in members.items()}
    return oclf.decoder(streams)


def test_coco_ccrop_equals_oclfs_preprocessing(tmp_path: Path, oclf: Any) -> None:
    root = write_coco(tmp_path / "coco")
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    data["annotations"] = [a for a in data["annotations"] if not a["iscrowd"]]
    nocrowd = tmp_path / "instances_val2017_nocrowd.json"
    nocrowd.write_text(json.dumps(data))
    stages = _eval_transforms(oclf, ["_preprocessing_coco.yaml"], ["metrics_coco_ccrop.yaml"])

    params = CocoParams(
        root=str(root), image_size=IMAGE, **protocol_dataset_settings("dinosaur", "coco")
    )
    ours = CocoDataset(params, split="val")
    overlaps = 0
    for i, info in enumerate(data["images"]):
        theirs = _run(stages, _coco_shard_sample(oclf, root, nocrowd, info["id"]))
        sample = ours[i]
        torch.testing.assert_close(normalized(sample["image"]), theirs["image"], atol=1e-6, rtol=0)
        inst = theirs["instance_mask"]
        assert inst.shape[-2:] == (320, 320)
        assert _ours(sample["instance_masks"], sample["labels"]) == _by_value(inst), i
        assert _ours(sample["class_masks"], sample["class_ids"]) == _by_value(
            theirs["segmentation_mask"]
        ), i
        assert not sample["ignore_mask"].any()  # OCLF's COCO eval has no ignore mask
        overlaps += int(((inst > 0).sum(0) > 1).any())
    assert overlaps >= 4  # class masks at overlaps took the higher id on both sides


# ------------------------------------------------------------------ VOC


def _voc_shard_sample(root: Path, image_id: str) -> dict[str, Any]:
    """The fields tfds_extended_voc.py stores for one VOC image, as OCLF decodes them."""

    def png(folder: str) -> np.ndarray:
        with Image.open(root / folder / f"{image_id}.png") as img:
            return np.expand_dims(np.array(img, dtype=np.uint8), axis=-1)

    with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as img:
        image = np.asarray(img.convert("RGB"))
    return {
        "image": image,
        "segmentation-class": png("SegmentationClass"),
        "segmentation-instance": png("SegmentationObject"),
        "objects.bbox": np.zeros((1, 4), dtype=np.float32),  # renamed only; not compared
    }


def test_voc_ccrop_equals_oclfs_preprocessing(tmp_path: Path, oclf: Any) -> None:
    root = write_voc(tmp_path / "VOC2012")
    stages = _eval_transforms(
        oclf,
        ["_preprocessing_voc2012_trainaug.yaml"],
        [
            "_preprocessing_to_ccrop_image.yaml",
            "_preprocessing_to_ccrop_320_masks.yaml",
            "metrics_voc2012_masks_ccrop.yaml",
        ],
    )
    params = VocParams(
        root=str(root), image_size=IMAGE, **protocol_dataset_settings("dinosaur", "voc")
    )
    ours = VocDataset(params, split="val")
    for i, image_id in enumerate(ours.ids):
        theirs = _run(stages, _voc_shard_sample(root, image_id))
        sample = ours[i]
        torch.testing.assert_close(normalized(sample["image"]), theirs["image"], atol=1e-6, rtol=0)
        ignore = theirs["ignore_mask"]
        assert ignore.shape == (1, 320, 320) and ignore.any()
        assert torch.equal(sample["ignore_mask"], ignore[0].bool()), i
        assert _ours(sample["instance_masks"], sample["labels"]) == _by_value(
            theirs["instance_mask"]
        ), i
        assert _ours(sample["class_masks"], sample["class_ids"]) == _by_value(
            theirs["segmentation_mask"]
        ), i


def test_default_geometry_is_not_oclfs(tmp_path: Path, oclf: Any) -> None:
    """Without the protocol (PIL bicubic, PIL-nearest masks) the image and masks differ, so
    the comparisons above can fail."""
    root = write_voc(tmp_path / "VOC2012")
    stages = _eval_transforms(
        oclf,
        ["_preprocessing_voc2012_trainaug.yaml"],
        ["_preprocessing_to_ccrop_image.yaml", "_preprocessing_to_ccrop_320_masks.yaml"],
    )
    ours = VocDataset(VocParams(root=str(root), image_size=IMAGE), split="val")
    theirs = _run(stages, _voc_shard_sample(root, ours.ids[0]))
    sample = ours[0]
    assert (normalized(sample["image"]) - theirs["image"]).abs().max() > 0.05
    assert _ours(sample["instance_masks"], sample["labels"]) != _by_value(theirs["instance_mask"])
