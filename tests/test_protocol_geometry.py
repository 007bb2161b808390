"""The resize, crop and overlap rules a protocol selects on coco and voc (since 0.2).

Each rule is checked on cases worked out by hand (a long side one pixel apart, a half-way crop
offset, a boundary pixel two nearest rules read from different source pixels), and where the
rule is a library's (OpenCV's resize, torch's nearest-exact) against that library itself.
GLASS's own loader is compared in tests/test_official_glass_loader.py (opt-in).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ocl_bench.api.params import hashed_dict
from ocl_bench.datasets import DatasetParamError
from ocl_bench.datasets.coco import CocoParams
from ocl_bench.datasets.segmentation import (
    View,
    cv2_nearest_indices,
    open_rgb_cv2,
    pil_nearest_indices,
    short_side_size,
    torch_nearest_indices,
    transform_image,
    transform_maps,
)
from ocl_bench.datasets.voc import VocParams
from tests.test_coco_voc import (
    A11,
    A12,
    A13,
    coco,
    crop_wide,
    make_coco,
    make_voc,
    voc,
)

cv2 = pytest.importorskip("cv2")

NEW_GEOMETRY = ("resize_library", "long_side", "crop_offset", "mask_resize")
GLASS_GEOMETRY = dict(
    resize_library="cv2",
    long_side="round",
    crop_offset="floor",
    mask_resize="cv2",
    interpolation="bilinear",
)


# ------------------------------------------------------------------------------ sizes, offsets
def test_long_side_truncated_or_rounded() -> None:
    # 300 x 211 (W x H) to a 256 short side: 300 * 256 / 211 = 363.98...
    assert short_side_size(211, 300, 256) == (256, 363)
    assert short_side_size(211, 300, 256, "round") == (256, 364)
    assert short_side_size(300, 211, 256, "round") == (364, 256)  # tall: the same, transposed
    # 517 x 389 to 448: 517 * 448 / 389 = 595.42...: both rules give 595
    assert short_side_size(389, 517, 448) == short_side_size(389, 517, 448, "round") == (448, 595)
    assert short_side_size(100, 100, 7, "round") == (7, 7)


def test_centre_crop_offset_rounded_half_to_even_or_floored() -> None:
    # 363 - 256 = 107 spare columns: 53.5 rounds to the even 54, floors to 53
    assert View().offsets(256, 363, 256) == (0, 54)
    assert View(offset="floor").offsets(256, 363, 256) == (0, 53)
    # 109 spare: 54.5 goes to the even 54 either way
    assert View().offsets(365, 256, 256) == View(offset="floor").offsets(365, 256, 256) == (54, 0)
    # random crops do not use the centre rule
    random = View(crop="random", fy=0.5, fx=0.5)
    assert random.offsets(256, 363, 256) == View(crop="random", offset="floor").offsets(
        256, 363, 256
    )


# ------------------------------------------------------------------------------ nearest rules
def test_cv2_nearest_reads_other_source_pixels_than_pil() -> None:
    # 300 -> 256: output pixel 3 is at 3 * 300/256 = 3.52 for OpenCV (floor: 3) and at its
    # centre (3.5) * 300/256 = 4.10 for PIL (floor: 4)
    cv, pil = cv2_nearest_indices(300, 256), pil_nearest_indices(300, 256)
    assert (cv[3], pil[3]) == (3, 4)
    assert (cv != pil).sum() > 100
    ramp = np.arange(300, dtype=np.int32)[None]
    assert cv.tolist() == cv2.resize(ramp, (256, 1), interpolation=cv2.INTER_NEAREST)[0].tolist()


def test_torch_nearest_exact_differs_from_pil_on_a_boundary() -> None:
    # 640 -> 426: output 106 has its centre at exactly 106.5 * 640 / 426 = 160; PIL's
    # accumulated double lands just below (159), torch's nearest-exact on 160
    assert (torch_nearest_indices(640, 426)[106], pil_nearest_indices(640, 426)[106]) == (160, 159)


def test_cv2_mask_resize_equals_opencv_with_glass_geometry() -> None:
    # a 300 x 211 (W x H) int32 label map and three uint8 masks, GLASS's 256 rule: resized to
    # 364 x 256 with INTER_NEAREST, columns (364 - 256) // 2 = 54 onwards
    g = np.random.default_rng(0)
    label_map = g.integers(0, 50, (211, 300)).astype(np.int32)
    masks = (g.random((3, 211, 300)) < 0.3).astype(np.uint8)
    view = View(offset="floor")
    expected = cv2.resize(label_map, (364, 256), interpolation=cv2.INTER_NEAREST)[:, 54:310]
    got = transform_maps(torch.from_numpy(label_map[None]), 256, view, "round", "cv2")
    assert torch.equal(got[0], torch.from_numpy(expected))
    stacked = cv2.resize(masks.transpose(1, 2, 0), (364, 256), interpolation=cv2.INTER_NEAREST)
    got = transform_maps(torch.from_numpy(masks), 256, view, "round", "cv2")
    assert torch.equal(got, torch.from_numpy(stacked[:, 54:310].transpose(2, 0, 1).copy()))
    # the default rule is another one on this size
    assert not torch.equal(got, transform_maps(torch.from_numpy(masks), 256, view, "round"))


def test_torch_mask_resize_equals_nearest_exact_interpolate() -> None:
    # OCLF's ResizeNearestExact: torchvision's short-side sizes (517 x 389 -> 425 x 320),
    # F.interpolate(mode="nearest-exact"), then torchvision's centre crop (105 / 2 -> 52)
    g = torch.Generator().manual_seed(1)
    maps = torch.randint(0, 9, (2, 389, 517), generator=g, dtype=torch.int32)
    resized = F.interpolate(maps[None].float(), size=(320, 425), mode="nearest-exact")[0]
    expected = resized[:, :, 52:372].to(torch.int32)
    assert torch.equal(transform_maps(maps, 320, View(), rule="torch"), expected)


# ------------------------------------------------------------------------------ images
def test_cv2_decode_is_rgb(tmp_path: Path) -> None:
    pixels = np.zeros((5, 7, 3), np.uint8)
    pixels[..., 0] = 200  # red: a BGR read would put it in the last channel
    pixels[2, 3] = (10, 20, 30)
    Image.fromarray(pixels).save(tmp_path / "red.png")
    assert np.array_equal(open_rgb_cv2(tmp_path / "red.png", "test"), pixels)


@pytest.mark.parametrize(
    ("interpolation", "flag"), [("bilinear", "INTER_LINEAR"), ("bicubic", "INTER_CUBIC")]
)
def test_cv2_image_resize_equals_opencv(interpolation: str, flag: str) -> None:
    g = np.random.default_rng(2)
    rgb = g.integers(0, 256, (211, 300, 3)).astype(np.uint8)
    resized = cv2.resize(rgb, (364, 256), interpolation=getattr(cv2, flag))[:, 54:310]
    expected = torch.from_numpy(resized.transpose(2, 0, 1).copy()).float() / 255
    view = View(offset="floor")
    got = transform_image(rgb, 256, interpolation, view, "round", "cv2")
    assert torch.equal(got, expected)
    # PIL's filter is another one
    pil = transform_image(Image.fromarray(rgb), 256, interpolation, view, "round")
    assert not torch.equal(pil, expected)


# ------------------------------------------------------------------------------ later-wins
@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    return make_coco(tmp_path / "coco")


def test_later_wins_gives_overlaps_to_the_later_annotation(coco_root: Path) -> None:
    # image 1: A11 (category 3) then A12 (category 1) overlap at rows 10:20, columns 14:20
    both = torch.from_numpy(A11 & A12)
    assert both.any()
    plain = coco(coco_root, crowd="drop")[0]
    assert torch.equal(plain["ignore_mask"], crop_wide(A11 & A12))  # SPOT: overlaps ignored
    painted = coco(coco_root, crowd="drop", overlap_painting="later_wins", overlaps_ignored=False)[
        0
    ]
    assert painted["instance_masks"].shape[0] == 2
    assert torch.equal(painted["instance_masks"][0], crop_wide(A11 & ~A12))
    assert torch.equal(painted["instance_masks"][1], crop_wide(A12))
    assert not painted["ignore_mask"].any()  # every pixel is scored, as GLASS scores it
    # classes: the overlap takes category 1 (the later annotation), not the highest id 3
    assert painted["class_ids"].tolist() == plain["class_ids"].tolist() == [1, 3]
    assert torch.equal(painted["class_masks"][0], crop_wide(A12))
    assert torch.equal(painted["class_masks"][1], crop_wide(A11 & ~A12))
    assert torch.equal(plain["class_masks"][1], crop_wide(A11))
    # kept as an object, the crowd region (last in the file) wins where it covers A12
    kept = coco(coco_root, crowd="keep", overlap_painting="later_wins")[0]
    assert torch.equal(kept["instance_masks"][1], crop_wide(A12 & ~A13))
    assert torch.equal(kept["instance_masks"][2], crop_wide(A13))


def test_later_wins_drops_an_instance_hidden_by_later_ones(tmp_path: Path) -> None:
    root = make_coco(tmp_path / "coco")
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    hiding = dict(data["annotations"][0], id=14, category_id=5)  # A11 again, later
    data["annotations"].insert(2, hiding)
    path.write_text(json.dumps(data))
    sample = coco(root, crowd="drop", overlap_painting="later_wins")[0]
    assert sample["labels"].tolist() == [1, 5]  # A11 (category 3) is painted over entirely
    assert sample["class_ids"].tolist() == [1, 5]


def test_ignore_flagged_and_unknown_category_annotations(tmp_path: Path) -> None:
    root = make_coco(tmp_path / "coco")
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    flagged = dict(data["annotations"][0], id=15, category_id=5, ignore=1)
    unknown = dict(data["annotations"][1], id=16, category_id=99)  # not in `categories`
    data["annotations"] += [flagged, unknown]
    path.write_text(json.dumps(data))
    kept = coco(root, crowd="drop")[0]
    assert kept["labels"].tolist() == [3, 1, 5, 99]  # today: both are objects
    skipped = coco(root, crowd="drop", skip_ignore_flagged=True, skip_unknown_categories=True)[0]
    assert skipped["labels"].tolist() == [3, 1]
    assert coco(root, crowd="drop", skip_ignore_flagged=True)[0]["labels"].tolist() == [3, 1, 99]


# ------------------------------------------------------------------------------ voc, params
def test_voc_label_maps_follow_the_cv2_rules(tmp_path: Path) -> None:
    make_voc(tmp_path)
    base = voc(tmp_path, mask_size=24)
    glass = voc(tmp_path, mask_size=24, **GLASS_GEOMETRY)
    root = tmp_path / "VOCdevkit" / "VOC2012"
    objects, classes = (
        np.array(Image.open(root / folder / "2007_000001.png"))
        for folder in ("SegmentationObject", "SegmentationClass")
    )

    # 40 x 30 -> 32 x 24 (both long-side rules agree), columns (32 - 24) // 2 = 4 onwards
    def resized(labels: np.ndarray) -> np.ndarray:
        return cv2.resize(labels, (32, 24), interpolation=cv2.INTER_NEAREST)[:, 4:28]

    sample = glass[0]
    expected_ignore = (resized(objects) == 255) | (resized(classes) == 255)
    assert torch.equal(sample["ignore_mask"], torch.from_numpy(expected_ignore))
    for k, mask in zip((1, 2), sample["instance_masks"]):
        assert torch.equal(mask, torch.from_numpy(resized(objects) == k))
    assert not torch.equal(sample["instance_masks"], base[0]["instance_masks"])
    jpeg = root / "JPEGImages" / "2007_000001.jpg"
    rgb = cv2.cvtColor(cv2.imread(str(jpeg), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    image = cv2.resize(rgb, (40, 30), interpolation=cv2.INTER_LINEAR)[:, 5:35]
    assert torch.equal(sample["image"], torch.from_numpy(image.transpose(2, 0, 1).copy()) / 255)


def test_new_params_keep_old_hashes_and_are_checked() -> None:
    for cls in (CocoParams, VocParams):
        assert not set(NEW_GEOMETRY) & set(hashed_dict(cls()))
        assert hashed_dict(cls(long_side="round"))["long_side"] == "round"
    coco_new = ("overlap_painting", "skip_ignore_flagged", "skip_unknown_categories")
    assert not set(coco_new) & set(hashed_dict(CocoParams()))
    for bad in (
        dict(resize_library="skimage"),
        dict(long_side="ceil"),
        dict(crop_offset="ceil"),
        dict(mask_resize="bilinear"),
        dict(overlap_painting="earlier_wins"),
    ):
        with pytest.raises(DatasetParamError, match=next(iter(bad))):
            CocoParams(**bad)
    with pytest.raises(DatasetParamError, match="mask_resize"):
        VocParams(mask_resize="nearest")
