"""The `glass` protocol against GLASS's released COCO evaluation loader and metric script.

Opt-in: point OCL_BENCH_GLASS_REPO at a checkout of github.com/visinf/glass (its loader needs
OpenCV, an ocl-bench dependency, and torchvision). Nothing is copied: the test
imports GLASS's `src/eval/eval_datasets/coco_eval.py` and builds its validation set with its own
`build_coco_eval_dataset` as `src/eval/oclf_metrics/eval_metrics.py` does (suppress_idx=True),
on a small COCO it writes (the same annotation file and JPEGs, laid out for both loaders:
GLASS reads `images/val2017/`, ocl-bench `val2017/`): odd sizes (300 x 211, 517 x 389, a tall
one, a square one), overlapping objects, a crowd region, an `ignore`-flagged and an
unknown-category annotation, polygons, compressed and uncompressed RLEs, an image without
annotations, and annotations of different images interleaved in the file.

ocl-bench's `coco` dataset with protocols/glass.toml's settings (image_size 448, the size the
loader hard-codes for the model's input) then equals GLASS's loader on every image:

- the instance map: one mask per painted value (later annotation wins), in file order;
- the semantic map (GLASS's contiguous class + 1 against our category ids);
- nothing ignored (GLASS's metrics get no ignore mask and one-hot the painted maps);
- the model's input image: GLASS's `vit_image` de-normalised (ImageNet mean/std) to uint8
  equals ours times 255, exactly.

And the script's metric objects, built as it builds them (read with `ast`, helpers from
tests/test_official_glass.py) and fed its loader's batch and the same random soft masks
(upsampled bilinearly as the script does), equal `object_discovery` with the protocol's task
settings on our batch, image by image and as the script's running mean: fg_ari, fg_iou,
iou, mbo_i, mbo_c, object_recovery and cor_loc (the script's eighth, `ari` on the semantic map
with its background, has no ocl-bench counterpart). And each setting of the protocol's [coco]
table matters: set back to its default, some image differs.

    git --git-dir=/work/.mirror/visinf+glass/repo archive HEAD src | tar -x -C /tmp/glass
    OCL_BENCH_GLASS_REPO=/tmp/glass python -m pytest tests/test_official_glass_loader.py
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_api

from ocl_bench.datasets.coco import CocoDataset, CocoParams
from ocl_bench.run.protocol import load_protocol
from ocl_bench.tasks.object_discovery import (
    ObjectDiscoveryParams,
    masks_to_pred,
    score_batch,
)
from tests.official_checkout import checkout_from_env, checkout_on_path
from tests.test_coco_voc import _compressed_rle, _uncompressed_rle
from tests.test_official_glass import SCRIPT_TO_OURS, _script_metrics

REPO, pytestmark = checkout_from_env(
    "OCL_BENCH_GLASS_REPO", "src/eval/eval_datasets/coco_eval.py", "github.com/visinf/glass"
)
SLOTS = 7  # GLASS's COCO slots
VIT_MEAN = np.array([0.485, 0.456, 0.406])
VIT_STD = np.array([0.229, 0.224, 0.225])
# (width, height) of each picture: long sides 1 px apart under round and truncate, a 259 px
# side cropped at 1 (floor) or 2 (round); the last one has no annotation
SIZES = [
    (300, 211),
    (517, 389),
    (211, 300),
    (333, 257),
    (259, 256),
    (256, 256),
    (640, 427),
    (401, 299),
]
CATEGORIES = [44, 1, 90, 3, 18]  # listed out of order: GLASS sorts them to contiguous labels
UNKNOWN = 7  # a category_id the file does not list


# ------------------------------------------------------------------------------ the small COCO
def _picture(g: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour fields plus noise: every resize rule leaves its own trace."""
    coarse = g.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    noise = g.integers(-40, 41, (height, width, 3))
    return np.clip(smooth.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def _polygon(g: np.random.Generator, width: int, height: int) -> list[list[float]]:
    cx, cy = g.uniform(0.25, 0.75) * width, g.uniform(0.25, 0.75) * height
    angles = np.sort(g.uniform(0, 2 * np.pi, 7))
    radius = g.uniform(0.15, 0.4, 7) * min(width, height)
    xs = np.clip(cx + radius * np.cos(angles), 0, width - 1)
    ys = np.clip(cy + radius * np.sin(angles), 0, height - 1)
    return [np.stack([xs, ys], 1).round(2).flatten().tolist()]


def _ellipse(g: np.random.Generator, width: int, height: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    cx, cy = g.uniform(0.2, 0.8) * width, g.uniform(0.2, 0.8) * height
    rx, ry = g.uniform(0.1, 0.35) * width, g.uniform(0.1, 0.35) * height
    return (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).astype(np.uint8)


def _annotation(seg: Any, image_id: int, category: int, height: int, width: int) -> dict:
    if isinstance(seg, list):
        rle = mask_api.merge(mask_api.frPyObjects(seg, height, width))
    elif isinstance(seg.get("counts"), list):
        rle = mask_api.frPyObjects(seg, height, width)
    else:
        rle = dict(seg, counts=seg["counts"].encode("ascii"))
    return {
        "image_id": image_id,
        "category_id": category,
        "segmentation": seg,
        "area": float(mask_api.area(rle)),
        "bbox": [float(v) for v in mask_api.toBbox(rle)],
        "iscrowd": 0,
    }


def write_coco(root: Path) -> None:
    """COCO val2017 under `root` for both loaders (instances_train2017.json too: GLASS's
    builder loads its train split beside val)."""
    g = np.random.default_rng(18)
    images_dir = root / "images" / "val2017"
    images_dir.mkdir(parents=True)
    (root / "images" / "train2017").symlink_to("val2017")
    (root / "val2017").symlink_to(Path("images") / "val2017")
    (root / "annotations").mkdir()
    images, annotations = [], []
    for image_id, (width, height) in enumerate(SIZES, start=1):
        name = f"{image_id:012d}.jpg"
        Image.fromarray(_picture(g, width, height)).save(images_dir / name, quality=90)
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        if image_id == len(SIZES):
            continue  # no annotation
        for k in range(int(g.integers(2, 5))):
            category = int(g.choice(CATEGORIES))
            if k % 3 == 0:
                seg = _polygon(g, width, height)
            elif k % 3 == 1:
                seg = _compressed_rle(_ellipse(g, width, height).astype(bool))
            else:
                seg = _uncompressed_rle(_ellipse(g, width, height).astype(bool))
            annotations.append(_annotation(seg, image_id, category, height, width))
    # what GLASS skips: a crowd region, an ignore-flagged object, an unknown category; each
    # over objects of image 1 (painted later, it would win there)
    w1, h1 = SIZES[0]
    extra = [
        dict(_annotation(_uncompressed_rle(_ellipse(g, w1, h1).astype(bool)), 1, 1, h1, w1)),
        dict(_annotation(_polygon(g, w1, h1), 1, 3, h1, w1), ignore=1),
        _annotation(_polygon(g, w1, h1), 1, UNKNOWN, h1, w1),
    ]
    extra[0]["iscrowd"] = 1
    annotations += extra
    order = g.permutation(len(annotations))  # images' annotations interleaved in the file
    annotations = [dict(annotations[i], id=100 + n) for n, i in enumerate(order)]
    categories = [{"id": c, "name": f"category {c}", "supercategory": "x"} for c in CATEGORIES]
    data = {"images": images, "annotations": annotations, "categories": categories}
    for split in ("val2017", "train2017"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


# ------------------------------------------------------------------------------ both loaders
@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("glass_coco")
    write_coco(root)
    return root


@pytest.fixture(scope="module")
def glass(data_root: Path) -> tuple[Any, Any, Any]:
    """GLASS's validation set and collate function, built as eval_metrics.py builds them, and
    the metric module it star-imports."""
    pytest.importorskip("cv2")
    with checkout_on_path(REPO):
        from src.eval.eval_datasets.coco_eval import build_coco_eval_dataset
        from src.eval.oclf_metrics import oclf_eval_masks

        _, val, collate = build_coco_eval_dataset(
            argparse.Namespace(dataset_root=str(data_root)), suppress_idx=True
        )
    return val, collate, oclf_eval_masks


@pytest.fixture(scope="module")
def protocol() -> Any:
    return load_protocol("glass").datasets["coco"]


def ours(data_root: Path, rules: Any, **overrides: Any) -> CocoDataset:
    settings = {**rules.dataset, **overrides}
    return CocoDataset(CocoParams(root=str(data_root), image_size=448, **settings), "val")


def _instance_masks(painted: np.ndarray) -> torch.Tensor:
    """bool[M,H,W]: one mask per value of GLASS's instance map, ascending (= file order)."""
    values = np.unique(painted)
    values = values[values != 0]
    return torch.from_numpy(painted[None] == values[:, None, None])


def _semantic_map(class_masks: torch.Tensor, class_ids: torch.Tensor) -> np.ndarray:
    """Our class masks as GLASS's semantic map: contiguous label (sorted category ids) + 1."""
    label = {c: i + 1 for i, c in enumerate(sorted(CATEGORIES))}
    out = np.zeros(class_masks.shape[1:], dtype=np.int64)
    assert (class_masks.sum(0) <= 1).all(), "later-wins class masks are disjoint"
    for mask, cid in zip(class_masks.numpy(), class_ids.tolist()):
        out[mask] = label[cid]
    return out


def _vit_image_uint8(vit_image: np.ndarray) -> np.ndarray:
    """GLASS's normalised [448,448,3] vit_image back to its uint8 pixels."""
    pixels = (vit_image.astype(np.float64) * VIT_STD + VIT_MEAN) * 255.0
    assert np.abs(pixels - pixels.round()).max() < 1e-3  # float32 rounding only
    return pixels.round().astype(np.uint8)


def test_ground_truth_and_model_input_equal_glass_loader(data_root, glass, protocol) -> None:
    val, _, _ = glass
    dataset = ours(data_root, protocol)
    assert len(dataset) == len(val) == len(SIZES)
    overlaps = 0
    for i in range(len(val)):
        official = val[i]  # dict of numpy arrays after COCOEvalTransforms
        sample = dataset[i]
        painted = official["original_mask"]  # [256,256,3]: instance, semantic, overlap
        instance, semantic = painted[..., 0], painted[..., 1]
        overlaps += int(painted[..., 2].sum())
        expected = _instance_masks(instance)
        assert torch.equal(sample["instance_masks"], expected), f"image {i}: instance masks"
        got_semantic = _semantic_map(sample["class_masks"], sample["class_ids"])
        assert np.array_equal(got_semantic, semantic), f"image {i}: semantic map"
        assert not sample["ignore_mask"].any(), f"image {i}: GLASS scores every pixel"
        image = (sample["image"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert image.shape == (448, 448, 3)
        assert np.array_equal(image, _vit_image_uint8(official["vit_image"])), f"image {i}"
    assert overlaps > 0  # overlap pixels were there, and scored with the later owner


GLASS_COCO = load_protocol("glass").datasets["coco"].dataset
DEFAULTS = {f.name: f.default for f in dataclasses.fields(CocoParams)}


@pytest.mark.parametrize(
    "key", [k for k, v in GLASS_COCO.items() if v != DEFAULTS[k] and k != "mask_size"]
)
def test_each_protocol_setting_is_needed(data_root, glass, protocol, key: str) -> None:
    """Any one setting back at its default gives other pixels on these images, so the
    equality above checks each of them."""
    val, _, _ = glass
    dataset = ours(data_root, protocol, **{key: DEFAULTS[key]})
    differs = 0
    for i in range(len(val)):
        official, sample = val[i], dataset[i]
        masks = _instance_masks(official["original_mask"][..., 0])
        same = masks.shape == sample["instance_masks"].shape and torch.equal(
            masks, sample["instance_masks"]
        )
        image = (sample["image"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        same &= np.array_equal(image, _vit_image_uint8(official["vit_image"]))
        same &= not sample["ignore_mask"].any()
        differs += not same
    assert differs > 0, key


# ------------------------------------------------------------------------------ the metrics
def _fg_ari_metric(oclf_masks: Any) -> tuple[Any, str]:
    """A factory of eval_metrics.py's 'fg_ari' metric object and the mask its update() gets,
    read from the script with ast (test_official_glass's helper covers the IoU metrics)."""
    path = Path(REPO) / "src" / "eval" / "oclf_metrics" / "eval_metrics.py"
    tree = ast.parse(path.read_text())
    name = next(
        ast.unparse(v).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Dict)
        for k, v in zip(node.keys, node.values)
        if isinstance(k, ast.Constant) and k.value == "fg_ari"
    )
    make = fed = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == name:
            cls = getattr(oclf_masks, ast.unparse(node.value.func))
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.value.keywords}
            make = lambda cls=cls, kwargs=kwargs: cls(**kwargs)  # noqa: E731
        call = node.value if isinstance(node, ast.Expr) else None
        if isinstance(call, ast.Call) and ast.unparse(call.func) == f"{name}.update":
            fed = ast.unparse(call.args[1])
    assert make is not None and fed, f"{name} in {path}"
    return make, fed


def test_metrics_on_glass_batch_equal_object_discovery(data_root, glass, protocol) -> None:
    val, collate, oclf_masks = glass
    dataset = ours(data_root, protocol)
    params = ObjectDiscoveryParams(masks=["attn"], **protocol.tasks["object_discovery"])
    assert params.mask_size == dataset.params.mask_size  # the task scores what it is given
    script = _script_metrics(ignore_background=False)
    make_fg_ari, fed_fg_ari = _fg_ari_metric(oclf_masks)
    # the script's running means: its metric states summed over images (torchmetrics' sum
    # reduction), instead of a second update of every image
    script_sums: dict[str, list[float]] = {key: [0.0, 0] for key in [*script, "fg_ari"]}
    our_values: dict[str, list[float]] = {key: [] for key in script_sums}
    g = torch.Generator().manual_seed(5)
    for i in range(len(val)):
        batch = collate([val[i]])  # batch_size=1, as the script's DataLoader
        soft = torch.rand(1, SLOTS, 32, 32, generator=g) ** 3  # slot masks on the 32x32 grid
        targets = {  # the script: one-hot of the (index-suppressed) painted maps
            "instance_mask": F.one_hot(batch["instance_mask"].long()).permute(0, 3, 1, 2),
            "segmentation_mask": F.one_hot(batch["segmentation_mask"].long()).permute(0, 3, 1, 2),
        }
        attn = F.interpolate(soft, size=targets["instance_mask"].shape[-1], mode="bilinear")
        sample = dataset[i]
        scores = score_batch(
            masks_to_pred(soft, (256, 256)),
            sample["instance_masks"][None],
            sample["ignore_mask"][None],
            sample["class_masks"][None],
            params,
            num_slots=SLOTS,
        )
        metrics = {
            key: (getattr(oclf_masks, cls)(**kw), fed) for key, (cls, kw, fed) in script.items()
        }
        metrics["fg_ari"] = (make_fg_ari(), fed_fg_ari)
        for key, (metric, fed) in metrics.items():
            metric.update(attn, targets[fed])
            script_sums[key][0] += metric.values.item()
            script_sums[key][1] += metric.total.item()
            expected = metric.compute().item() if metric.total else float("nan")
            got = scores[SCRIPT_TO_OURS.get(key, key)].item()
            our_values[key].append(got)
            tol = 1e-6 if key == "object_recovery" else 1e-12  # float32 division there
            assert got == pytest.approx(expected, abs=tol, nan_ok=True), (i, key)
    for key, (total, count) in script_sums.items():
        values = [v for v in our_values[key] if not np.isnan(v)]
        assert len(values) == count, key  # the same images counted
        tol = 1e-6 if key == "object_recovery" else 1e-9
        assert np.mean(values) == pytest.approx(total / count, abs=tol), key
