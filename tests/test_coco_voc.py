"""COCO and VOC dataset plugins on tiny fixtures written here (no downloads).

Expected masks are built by explicit numpy slicing of the shapes written into the fixtures.
Geometry at mask_size = 30 on a 40x30 (W x H) picture: no resize (short side already 30), centre
crop columns 5:35; on a 30x40 picture: rows 5:35.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_api

from ocl_bench.api.errors import DataError
from ocl_bench.api.params import describe
from ocl_bench.datasets import DatasetParamError, collate_class_ids
from ocl_bench.datasets.coco import CocoDataset, CocoParams
from ocl_bench.datasets.voc import VocDataset, VocParams
from ocl_bench.run.registry import discover
from ocl_bench.tasks.object_discovery_metrics import all_metrics, fg_ari, ignore_overlaps, mbo, miou

H, W = 30, 40  # the wide picture (height, width)


# ------------------------------------------------------------------------------ fixtures
def _full(rows: slice, cols: slice, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[rows, cols] = True
    return out


# Image 1 (40 wide, 30 high): two overlapping objects and an overlapping crowd region.
A11 = _full(slice(6, 20), slice(4, 20))  # polygon, category 3
A12 = _full(slice(10, 25), slice(14, 30))  # compressed RLE, category 1
A13 = _full(slice(2, 12), slice(26, 38))  # crowd, uncompressed RLE, category 1
# Image 2 (30 wide, 40 high): a top strip (cropped away) and a square, categories 5 and 7.
TALL = (40, 30)
B21 = _full(slice(0, 5), slice(0, 30), TALL)
B22 = _full(slice(15, 25), slice(10, 20), TALL)


def _rect_polygon(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    # pycocotools fills pixels x0..x1-1, y0..y1-1 for a rectangle with integer corners.
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat.tolist():
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _gradient(height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 6, ys * 6, (xs + ys) % 256], axis=-1).astype(np.uint8)


def make_coco(root: Path, folder: str = "val2017") -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / folder).mkdir(exist_ok=True)
    Image.fromarray(_gradient(H, W)).save(root / folder / "wide.png")
    Image.fromarray(_gradient(*TALL)).save(root / folder / "tall.png")
    Image.fromarray(_gradient(H, W)).save(root / folder / "empty.png")
    images = [
        {"id": 1, "file_name": "wide.png", "height": H, "width": W},
        {"id": 2, "file_name": "tall.png", "height": TALL[0], "width": TALL[1]},
        {"id": 3, "file_name": "empty.png", "height": H, "width": W},
    ]

    def ann(i, image, cat, seg, mask, crowd=0):
        return {
            "id": i,
            "image_id": image,
            "category_id": cat,
            "segmentation": seg,
            "area": float(mask.sum()),
            "iscrowd": crowd,
            "bbox": [0, 0, 1, 1],
        }

    annotations = [
        ann(11, 1, 3, _rect_polygon(4, 6, 20, 20), A11),
        ann(12, 1, 1, _compressed_rle(A12), A12),
        ann(13, 1, 1, _uncompressed_rle(A13), A13, crowd=1),
        ann(21, 2, 5, _rect_polygon(0, 0, 30, 5), B21),
        ann(22, 2, 7, _rect_polygon(10, 15, 20, 25), B22),
    ]
    categories = [{"id": c, "name": f"cat{c}"} for c in (1, 3, 5, 7)]
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    return make_coco(tmp_path / "coco")


def coco(root: Path, split: str = "val", **params) -> CocoDataset:
    params = {"image_size": 30, "mask_size": 30, **params}
    return CocoDataset(CocoParams(root=str(root), **params), split)


def crop_wide(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a[:, 5:35]))


def crop_tall(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a[5:35, :]))


# ------------------------------------------------------------------------------ COCO
def test_plugins_are_registered():
    reg = discover()
    assert reg.get("dataset", "coco") is CocoDataset
    assert reg.get("dataset", "voc") is VocDataset


def test_coco_defaults_follow_spot_ccrop():
    p = CocoParams()
    assert (p.image_size, p.mask_size, p.interpolation, p.crowd) == (224, 320, "bicubic", "keep")
    assert p.overlaps_ignored and p.train_crop == "center" and p.hflip


def test_coco_instance_masks_crowd_kept_and_overlaps_ignored(coco_root: Path):
    ds = coco(coco_root)
    assert len(ds) == 3
    s = ds[0]
    assert s["image"].shape == (3, 30, 30)
    expected = torch.stack([crop_wide(A11), crop_wide(A12), crop_wide(A13)])
    assert torch.equal(s["instance_masks"], expected)
    assert s["labels"].tolist() == [3, 1, 1]  # the crowd region is an object (SPOT)
    overlap = np.zeros((H, W), bool)
    overlap[10:20, 14:20] = True  # A11 & A12
    overlap[10:12, 26:30] = True  # A12 & crowd
    assert torch.equal(s["ignore_mask"], crop_wide(overlap))
    # boxes from the cropped masks, x2/y2 exclusive: A11 spans columns 4..19 -> 0..14 after crop
    assert s["boxes"].tolist() == [[0, 6, 15, 20], [9, 10, 25, 25], [21, 2, 30, 12]]


def test_coco_class_masks_take_highest_category_at_overlaps(coco_root: Path):
    s = coco(coco_root)[0]
    assert s["class_ids"].tolist() == [1, 3]
    cat1 = (A12 | A13) & ~A11  # category 3 wins where A11 and A12 overlap
    assert torch.equal(s["class_masks"], torch.stack([crop_wide(cat1), crop_wide(A11)]))
    # class masks keep the overlap pixels (OCLF); only the instance metrics drop them
    assert s["class_masks"][1, 10, 14 - 5]


def test_coco_tall_image_crop_drops_cropped_away_object(coco_root: Path):
    s = coco(coco_root)[1]
    assert s["labels"].tolist() == [7]  # the top strip (rows 0:5) is outside rows 5:35
    assert torch.equal(s["instance_masks"], crop_tall(B22)[None])
    assert s["boxes"].tolist() == [[10, 10, 20, 20]]
    assert s["class_ids"].tolist() == [7]
    assert not s["ignore_mask"].any()


def test_coco_image_without_annotations(coco_root: Path):
    s = coco(coco_root)[2]
    assert s["instance_masks"].shape == (0, 30, 30)
    assert s["class_masks"].shape == (0, 30, 30)
    assert s["labels"].shape == (0,) and s["boxes"].shape == (0, 4)
    assert not s["ignore_mask"].any()


def test_coco_image_is_centre_crop_in_unit_range(coco_root: Path):
    ds = coco(coco_root)
    wide = torch.from_numpy(_gradient(H, W)[:, 5:35].transpose(2, 0, 1).copy()).float() / 255
    tall = torch.from_numpy(_gradient(*TALL)[5:35, :].transpose(2, 0, 1).copy()).float() / 255
    assert torch.equal(ds[0]["image"], wide)
    assert torch.equal(ds[1]["image"], tall)
    small = coco(coco_root, image_size=15)[0]["image"]  # bicubic resize, still in [0, 1]
    assert small.shape == (3, 15, 15) and small.dtype == torch.float32
    assert 0.0 <= float(small.min()) and float(small.max()) <= 1.0


def test_coco_mask_downsampling_is_nearest_exact_with_torchvision_crop(coco_root: Path):
    # 30x40 -> 15x20: nearest-exact reads source pixel 2i+1; CenterCrop(15) of 20 columns starts
    # at int(round(2.5)) = 2 (torchvision rounds half to even).
    s = coco(coco_root, mask_size=15)[0]
    expected = [torch.from_numpy(np.ascontiguousarray(a[1::2, 1::2][:, 2:17])) for a in (A11, A12)]
    assert torch.equal(s["instance_masks"][:2], torch.stack(expected))


def test_coco_default_320_mask_crop_keeps_the_centre(coco_root: Path):
    # 30x40 -> 320x426 (long side int(320 * 40 / 30)), centre crop starts at round(106 / 2) = 53.
    s = coco(coco_root, image_size=224, mask_size=320)[0]
    assert s["image"].shape == (3, 224, 224)
    assert s["instance_masks"].shape == (3, 320, 320) and s["ignore_mask"].shape == (320, 320)

    def src(out: int, size_in: int, size_out: int, offset: int) -> np.ndarray:
        # nearest-exact: floor((j + 0.5) * in / out), exact arithmetic
        return np.array(
            [
                min(size_in - 1, math.floor(Fraction(2 * (j + offset) + 1, 2) * size_in / size_out))
                for j in range(out)
            ]
        )

    rows, cols = src(320, 30, 320, 0), src(320, 40, 426, 53)
    for k, a in enumerate((A11, A12, A13)):
        assert torch.equal(s["instance_masks"][k], torch.from_numpy(a[rows][:, cols]))
    # the crop covers source columns 5..34 (the centre); column 4 (left edge of A11) is cut
    assert cols[0] == 5 and cols[-1] == 34


def test_coco_crowd_modes(coco_root: Path):
    overlap_11_12 = np.zeros((H, W), bool)
    overlap_11_12[10:20, 14:20] = True

    drop = coco(coco_root, crowd="drop")[0]
    assert drop["labels"].tolist() == [3, 1]
    assert torch.equal(drop["ignore_mask"], crop_wide(overlap_11_12))  # crowd pixels: background

    ign = coco(coco_root, crowd="ignore")[0]
    assert ign["labels"].tolist() == [3, 1]
    assert torch.equal(ign["instance_masks"], torch.stack([crop_wide(A11), crop_wide(A12)]))
    assert torch.equal(ign["ignore_mask"], crop_wide(overlap_11_12 | A13))
    assert ign["class_ids"].tolist() == [1, 3]

    ds = coco(coco_root, crowd="drop_image")
    assert len(ds) == 2  # the wide image holds a crowd annotation
    assert [ds.image_info(i)["file_name"] for i in range(2)] == ["tall.png", "empty.png"]


def test_coco_overlaps_can_be_left_to_the_task(coco_root: Path):
    s = coco(coco_root, overlaps_ignored=False)[0]
    assert not s["ignore_mask"].any()
    assert s["instance_masks"].shape[0] == 3


def test_coco_min_area(coco_root: Path):
    s = coco(coco_root, min_area=101.0)[1]  # B22 has area 100
    assert s["labels"].shape == (0,)


def test_coco_collate(coco_root: Path):
    ds = coco(coco_root)
    samples = [ds[i] for i in range(3)]
    batch = ds.collate(samples)
    assert batch.images.shape == (3, 3, 30, 30)
    assert batch.instance_masks.shape == (3, 3, 30, 30)
    assert batch.labels.tolist() == [[3, 1, 1], [7, -1, -1], [-1, -1, -1]]
    assert batch.class_masks.shape == (3, 2, 30, 30)
    assert collate_class_ids(samples).tolist() == [[1, 3], [7, -1], [-1, -1]]
    assert batch.captions is None
    assert batch.index.tolist() == [0, 1, 2]


def test_coco_train_split_flip_is_deterministic(tmp_path: Path):
    root = make_coco(tmp_path / "coco", "train2017")
    make_coco(root, "val2017")
    val = coco(root, "val")[0]
    flips = set()
    for seed in range(8):
        a = coco(root, "train", seed=seed)[0]
        b = coco(root, "train", seed=seed)[0]
        assert torch.equal(a["image"], b["image"])
        flipped = torch.equal(a["image"], val["image"].flip(-1))
        assert flipped or torch.equal(a["image"], val["image"])
        want = val["instance_masks"].flip(-1) if flipped else val["instance_masks"]
        assert torch.equal(a["instance_masks"], want)
        flips.add(flipped)
    assert flips == {True, False}
    no_flip = coco(root, "train", hflip=False)[0]
    assert torch.equal(no_flip["image"], val["image"])


def test_coco_missing_annotation_file_names_it(tmp_path: Path):
    with pytest.raises(DataError) as err:
        coco(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "annotations" / "instances_val2017.json") in message
    assert "cocodataset.org" in message


def test_coco_missing_image_folder_names_it(coco_root: Path):
    for f in (coco_root / "val2017").iterdir():
        f.unlink()
    (coco_root / "val2017").rmdir()
    with pytest.raises(DataError, match="image folder not found") as err:
        coco(coco_root)
    assert str(coco_root / "val2017") in str(err.value)


def test_coco_corrupt_image_names_the_file(coco_root: Path):
    bad = coco_root / "val2017" / "tall.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    ds = coco(coco_root)
    ds[0]  # the others still load
    with pytest.raises(DataError) as err:
        ds[1]
    assert str(bad) in str(err.value)


def test_coco_root_from_environment(coco_root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OCL_BENCH_COCO", str(coco_root))
    assert len(CocoDataset(CocoParams(), "val")) == 3
    monkeypatch.delenv("OCL_BENCH_COCO")
    with pytest.raises(DataError, match="OCL_BENCH_COCO"):
        CocoDataset(CocoParams(), "val")


def test_coco_bad_split_and_params(coco_root: Path):
    with pytest.raises(DatasetParamError):
        coco(coco_root, "test")
    with pytest.raises(DatasetParamError):
        CocoParams(mask_size=-1)


# ------------------------------------------------------------------------------ VOC
VOC_IDS = ("2007_000001", "2007_000002")
# Image v1 (40 wide, 30 high): objects 1 (person, 15) and 2 (car, 7; three pixels of class 9
# under it), a 255 ring around object 1 and a 255 "difficult" patch.
V1_OBJ1 = _full(slice(5, 15), slice(8, 18))
V1_OBJ2 = _full(slice(12, 26), slice(20, 34))
V1_RING = _full(slice(4, 16), slice(7, 19)) & ~V1_OBJ1
V1_PATCH = _full(slice(0, 2), slice(30, 40))
V1_NINE = _full(slice(20, 21), slice(25, 28))
# Image v2 (30 wide, 40 high): two objects, each exactly half of the centre crop.
V2_LEFT = _full(slice(0, 40), slice(0, 15), TALL)
V2_RIGHT = _full(slice(0, 40), slice(15, 30), TALL)


def _palette_png(labels: np.ndarray, path: Path) -> None:
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    palette = [0, 0, 0] * 256
    palette[3 * 255 : 3 * 256] = [224, 224, 192]
    img.putpalette(palette)
    img.save(path)


def make_voc(base: Path, trainaug: list[str] | None = None) -> Path:
    root = base / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationObject", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    obj1 = np.zeros((H, W), np.uint8)
    cls1 = np.zeros((H, W), np.uint8)
    obj1[V1_OBJ1], cls1[V1_OBJ1] = 1, 15
    obj1[V1_OBJ2], cls1[V1_OBJ2] = 2, 7
    cls1[V1_NINE] = 9
    for a in (obj1, cls1):
        a[V1_RING | V1_PATCH] = 255
    obj2 = np.zeros(TALL, np.uint8)
    cls2 = np.zeros(TALL, np.uint8)
    obj2[V2_LEFT], cls2[V2_LEFT] = 1, 1
    obj2[V2_RIGHT], cls2[V2_RIGHT] = 2, 2
    for image_id, (obj, cls) in zip(VOC_IDS, ((obj1, cls1), (obj2, cls2))):
        Image.fromarray(_gradient(*obj.shape)).save(root / "JPEGImages" / f"{image_id}.jpg")
        _palette_png(obj, root / "SegmentationObject" / f"{image_id}.png")
        _palette_png(cls, root / "SegmentationClass" / f"{image_id}.png")
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("\n".join(VOC_IDS) + "\n")
    (lists / "val.txt").write_text("\n".join(VOC_IDS) + "\n")
    if trainaug is not None:
        for image_id in trainaug:
            if not (root / "JPEGImages" / f"{image_id}.jpg").exists():
                Image.fromarray(_gradient(H, W)).save(root / "JPEGImages" / f"{image_id}.jpg")
        (lists / "trainaug.txt").write_text("\n".join(trainaug) + "\n")
    return root


def voc(base: Path, split: str = "val", **params) -> VocDataset:
    params = {"image_size": 30, "mask_size": 30, **params}
    return VocDataset(VocParams(root=str(base), **params), split)


def test_voc_defaults_follow_spot_ccrop():
    p = VocParams()
    assert (p.image_size, p.mask_size, p.interpolation) == (224, 320, "bicubic")
    assert p.train_crop == "random" and p.hflip


def test_coco_and_voc_share_geometry_params_after_their_own_root():
    coco_params, voc_params = describe(CocoParams), describe(VocParams)
    first = ["root", "image_size", "mask_size", "interpolation"]
    assert list(coco_params)[:4] == first and list(voc_params)[:4] == first
    for name in first[1:]:
        assert coco_params[name] == voc_params[name]
        assert coco_params[name]["doc"]
    assert coco_params["root"]["default"] == voc_params["root"]["default"] == ""
    assert "$OCL_BENCH_COCO" in coco_params["root"]["doc"]
    assert "$OCL_BENCH_VOC" in voc_params["root"]["doc"]


def test_voc_masks_labels_and_255_ignore(tmp_path: Path):
    make_voc(tmp_path)
    ds = voc(tmp_path)  # root found below VOCdevkit/VOC2012
    assert len(ds) == 2
    s = ds[0]
    assert torch.equal(s["instance_masks"], torch.stack([crop_wide(V1_OBJ1), crop_wide(V1_OBJ2)]))
    assert s["labels"].tolist() == [15, 7]  # majority class under each object
    assert torch.equal(s["ignore_mask"], crop_wide(V1_RING | V1_PATCH))
    assert s["class_ids"].tolist() == [7, 9, 15]
    expected = torch.stack([crop_wide(V1_OBJ2 & ~V1_NINE), crop_wide(V1_NINE), crop_wide(V1_OBJ1)])
    assert torch.equal(s["class_masks"], expected)
    assert s["boxes"].tolist() == [[3, 5, 13, 15], [15, 12, 29, 26]]
    t = ds[1]
    assert torch.equal(t["instance_masks"], torch.stack([crop_tall(V2_LEFT), crop_tall(V2_RIGHT)]))
    assert t["labels"].tolist() == [1, 2] and not t["ignore_mask"].any()


def test_voc_train_list_and_trainaug_without_object_pngs(tmp_path: Path):
    make_voc(tmp_path)
    train = voc(tmp_path, "train")
    assert train.list_file.name == "train.txt" and train.has_masks
    assert train[0]["instance_masks"].shape == (2, 30, 30)

    other = tmp_path / "aug"
    make_voc(other, trainaug=[*VOC_IDS, "2008_000003"])  # the SBD image has no object PNG
    aug = voc(other, "train")
    assert aug.list_file.name == "trainaug.txt" and len(aug) == 3 and not aug.has_masks
    batch = aug.collate([aug[0], aug[2]])
    assert batch.images.shape == (2, 3, 30, 30) and batch.instance_masks is None


def test_voc_train_random_crop_is_deterministic_and_shared_by_image_and_masks(tmp_path: Path):
    root = make_voc(tmp_path)
    pixels = np.asarray(Image.open(root / "JPEGImages" / f"{VOC_IDS[0]}.jpg").convert("RGB"))
    views = set()
    for seed in range(6):
        a = voc(tmp_path, "train", seed=seed)[0]
        b = voc(tmp_path, "train", seed=seed)[0]
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["instance_masks"], b["instance_masks"])
        # find the crop (left offset 0..10 of 40 columns) and flip that give these masks
        found = []
        for left in range(11):
            for flip in (False, True):
                want = [m[:, left : left + 30] for m in (V1_OBJ1, V1_OBJ2)]
                want = [np.ascontiguousarray(m[:, ::-1] if flip else m) for m in want]
                want = torch.from_numpy(np.stack([m for m in want if m.any()]))
                if torch.equal(a["instance_masks"], want):
                    found.append((left, flip))
        assert len(found) == 1
        left, flip = found[0]
        crop = pixels[:, left : left + 30][:, ::-1] if flip else pixels[:, left : left + 30]
        image = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))).float() / 255
        assert torch.equal(a["image"], image)  # the image shows the same square
        views.add((left, flip))
    assert len(views) > 1
    centre = voc(tmp_path, "train", train_crop="center", hflip=False)[0]
    val = voc(tmp_path, "val")[0]
    assert torch.equal(centre["instance_masks"], val["instance_masks"])
    assert torch.equal(centre["image"], val["image"])


def test_voc_missing_files(tmp_path: Path):
    with pytest.raises(DataError, match="JPEGImages") as err:
        voc(tmp_path)
    assert str(tmp_path) in str(err.value)
    root = make_voc(tmp_path)
    missing = root / "SegmentationObject" / f"{VOC_IDS[1]}.png"
    missing.unlink()
    with pytest.raises(DataError) as err:
        voc(tmp_path, "val")
    assert str(missing) in str(err.value)


def test_voc_corrupt_label_png_names_the_file(tmp_path: Path):
    root = make_voc(tmp_path)
    bad = root / "SegmentationClass" / f"{VOC_IDS[0]}.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError) as err:
        voc(tmp_path)[0]
    assert str(bad) in str(err.value)


# ------------------------------------------------------------------------------ metrics
def _perfect_prediction(gt: torch.Tensor) -> torch.Tensor:
    """Slot 0 for background, slot m + 1 for object m (overlap pixels: the last object)."""
    pred = torch.zeros(gt.shape[0], *gt.shape[2:], dtype=torch.long)
    for m in range(gt.shape[1]):
        pred[gt[:, m]] = m + 1
    return pred


def test_metrics_perfect_prediction_on_coco_batch(coco_root: Path):
    ds = coco(coco_root)
    batch = ds.collate([ds[i] for i in range(3)])
    gt = batch.instance_masks
    ignore = ignore_overlaps(gt, batch.ignore_mask)
    scores = all_metrics(_perfect_prediction(gt), gt, ignore)
    assert scores["fg_ari"].tolist() == [1.0, 1.0, 1.0]  # the empty image scores 1.0
    for name in ("mbo", "miou", "corloc", "detection_rate"):
        assert scores[name][:2].tolist() == [1.0, 1.0], name
        assert math.isnan(float(scores[name][2])), name  # no objects: skipped
    # class masks scored with the batch ignore mask, as the object_discovery task does
    class_pred = torch.zeros(3, 30, 30, dtype=torch.long)
    for c in range(batch.class_masks.shape[1]):
        class_pred[batch.class_masks[:, c]] = c + 1
    assert mbo(class_pred, batch.class_masks, batch.ignore_mask)[:2].tolist() == [1.0, 1.0]


def test_metrics_perfect_prediction_on_voc_batch(tmp_path: Path):
    make_voc(tmp_path)
    ds = voc(tmp_path)
    batch = ds.collate([ds[0], ds[1]])
    pred = _perfect_prediction(batch.instance_masks)
    scores = all_metrics(pred, batch.instance_masks, batch.ignore_mask)
    for name in ("fg_ari", "mbo", "miou", "corloc", "detection_rate"):
        assert scores[name].tolist() == [1.0, 1.0], name


def test_metrics_single_slot_matches_reference_toy_case(tmp_path: Path):
    make_voc(tmp_path)
    ds = voc(tmp_path)
    batch = ds.collate([ds[1]])  # two objects, each half of the crop
    one_slot = torch.zeros(1, 30, 30, dtype=torch.long)
    scores = all_metrics(one_slot, batch.instance_masks, batch.ignore_mask)
    # metrics-and-protocols.md: 2 GT halves, one slot covering the image
    assert scores["miou"].item() == pytest.approx(0.25)
    assert scores["mbo"].item() == pytest.approx(0.5)
    assert scores["detection_rate"].item() == 0.0
    assert scores["corloc"].item() == 0.0
    assert scores["fg_ari"].item() == pytest.approx(0.0)


def test_metrics_single_slot_with_ignored_pixels(tmp_path: Path):
    make_voc(tmp_path)
    ds = voc(tmp_path)
    batch = ds.collate([ds[0]])
    one_slot = torch.zeros(1, 30, 30, dtype=torch.long)
    gt, ignore = batch.instance_masks, batch.ignore_mask
    # 255 ring (12*12 - 10*10 = 44 pixels) and the patch (2 rows x 5 cropped columns) leave
    # 900 - 54 = 846 scored pixels; objects have 100 and 196 pixels.
    assert int(ignore.sum()) == 54
    assert mbo(one_slot, gt, ignore).item() == pytest.approx((100 / 846 + 196 / 846) / 2)
    assert miou(one_slot, gt, ignore).item() == pytest.approx(196 / 846 / 2)
    assert fg_ari(one_slot, gt, ignore).item() == pytest.approx(0.0)


def test_coco_image_size_mismatch_names_the_file(coco_root: Path):
    path = coco_root / "val2017" / "wide.png"
    Image.fromarray(_gradient(W, H)).save(path)  # 30 wide, 40 high; the json says 40x30
    with pytest.raises(DataError, match="40x30") as err:
        coco(coco_root)[0]
    assert str(path) in str(err.value)
