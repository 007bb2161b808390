"""Small COCO and VOC folders for the opt-in protocol tests against official loaders.

The cases a real split has and a loader may get wrong: odd image sizes (long sides whose
truncation and rounding differ, odd crop offsets), tall and wide images, overlapping
instances of two classes and of one class, a multi-polygon object, a crowd region (RLE with
uncompressed counts, as COCO stores crowd), an object the centre crop leaves out, an image
without annotations; VOC label PNGs with 255 boundaries and a 255 "difficult" region, object
ids 1..n per image (as VOC numbers them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tomllib
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from torch import Tensor

# (height, width): long sides 640*320/427 = 479.6 and 500*320/333 = 480.5 truncate and round
# differently; 361, 457, 353 give odd crop offsets; one tall, one square.
COCO_SIZES = [(427, 640), (480, 361), (333, 500), (301, 457), (500, 353), (250, 250)]
VOC_SIZES = [(375, 500), (500, 353), (333, 500), (281, 417)]
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PROTOCOLS = Path(__file__).resolve().parents[1] / "protocols"


def picture(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Smooth colour gradients plus noise, so resampling rules show in every pixel."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [127 + 100 * np.sin(x / 17.0 + c) * np.cos(y / 23.0 - c) for c in range(3)], axis=-1
    )
    noise = rng.normal(0, 25, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _box_polygon(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _ellipse_polygon(cx: float, cy: float, rx: float, ry: float, n: int = 24) -> list[float]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1).round(2).ravel().tolist()


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd encoding: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.astype(np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def write_coco(root: Path, seed: int = 0) -> Path:
    """root/annotations/instances_val2017.json and root/val2017/*.jpg; returns root."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val2017").mkdir(parents=True, exist_ok=True)
    images, anns = [], []

    def add(image_id: int, category: int, seg: object, crowd: int = 0) -> None:
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": image_id,
                "category_id": category,
                "segmentation": seg,
                "area": 100.0,
                "bbox": [0.0, 0.0, 1.0, 1.0],
                "iscrowd": crowd,
            }
        )

    for i, (h, w) in enumerate(COCO_SIZES):
        image_id = 100 + i
        name = f"{image_id:012d}.jpg"
        picture(rng, h, w).save(root / "val2017" / name, quality=95)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        if (h, w) == (250, 250):
            continue  # an image without annotations
        # two classes overlapping (person 1 under car 3), then two of one class overlapping
        add(image_id, 1, [_ellipse_polygon(w * 0.4, h * 0.5, w * 0.2, h * 0.3)])
        add(image_id, 3, [_box_polygon(w * 0.45, h * 0.35, w * 0.8, h * 0.7)])
        add(image_id, 18, [_box_polygon(w * 0.1, h * 0.1, w * 0.3, h * 0.3)])
        add(image_id, 18, [_ellipse_polygon(w * 0.3, h * 0.3, w * 0.1, h * 0.08)])
        # one object in two parts
        parts = [_box_polygon(w * 0.05, h * 0.8, w * 0.15, h * 0.95)]
        parts.append(_box_polygon(w * 0.85, h * 0.05, w * 0.97, h * 0.2))
        add(image_id, 44, parts)
        # a thin object at the long side's end: the centre crop leaves it out
        edge = _box_polygon(0, 0, 3, h) if w > h else _box_polygon(0, 0, w, 3)
        add(image_id, 62, [edge])
        if i % 2 == 0:  # a crowd region over part of the first person
            crowd = np.zeros((h, w), dtype=np.uint8)
            crowd[int(h * 0.55) : int(h * 0.9), int(w * 0.2) : int(w * 0.6)] = 1
            add(image_id, 1, uncompressed_rle(crowd), crowd=1)
    categories = [{"id": c, "name": f"c{c}"} for c in (1, 3, 18, 44, 62)]
    data = {"images": images, "annotations": anns, "categories": categories}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return root


def _palette_png(array: np.ndarray, path: Path) -> None:
    img = Image.fromarray(array.astype(np.uint8), mode="P")
    palette = np.random.default_rng(1).integers(0, 256, size=(256, 3)).astype(np.uint8)
    palette[0] = 0
    palette[255] = 224
    img.putpalette(palette.ravel().tolist())
    img.save(path)


def voc_label_maps(h: int, w: int, i: int) -> tuple[np.ndarray, np.ndarray]:
    """(SegmentationObject, SegmentationClass) uint8[h,w]: objects 1..n painted in order,
    each with a 255 outline in both maps, plus a 255 'difficult' region in both."""
    objects = np.zeros((h, w), dtype=np.uint8)
    classes = np.zeros((h, w), dtype=np.uint8)
    shapes = [
        ("ellipse", (w * 0.2, h * 0.2, w * 0.6, h * 0.7), 15),
        ("rectangle", (w * 0.5, h * 0.4, w * 0.9, h * 0.9), 7),
        ("rectangle", (w * 0.05, h * 0.6, w * 0.3, h * 0.95), 15),
        ("ellipse", (w * 0.65, h * 0.05, w * 0.95, h * 0.3), 12 + i),
    ]
    for obj_id, (kind, box, cls) in enumerate(shapes, start=1):
        shape = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(shape)
        getattr(draw, kind)(box, fill=1, outline=2, width=2)
        s = np.asarray(shape)
        objects[s == 1], classes[s == 1] = obj_id, cls
        objects[s == 2], classes[s == 2] = 255, 255
    difficult = (slice(int(h * 0.02), int(h * 0.1)), slice(int(w * 0.3), int(w * 0.45)))
    objects[difficult], classes[difficult] = 255, 255
    return objects, classes


def write_voc(root: Path, seed: int = 0) -> Path:
    """A VOC2012 folder (JPEGImages, SegmentationObject, SegmentationClass, val.txt)."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationObject", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for i, (h, w) in enumerate(VOC_SIZES):
        image_id = f"2007_{i:06d}"
        ids.append(image_id)
        picture(rng, h, w).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        objects, classes = voc_label_maps(h, w, i)
        _palette_png(objects, root / "SegmentationObject" / f"{image_id}.png")
        _palette_png(classes, root / "SegmentationClass" / f"{image_id}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return root


def segments(masks: object, scored: object) -> list[bytes]:
    """The non-empty masks restricted to the scored pixels, as sorted bytes: what a metric that
    drops ignored pixels and empty masks sees, independent of mask order."""
    import torch

    out = []
    for m in masks:
        m = torch.as_tensor(m).bool() & scored
        if m.any():
            out.append(m.numpy().tobytes())
    return sorted(out)


def protocol_dataset_settings(protocol: str, dataset: str) -> dict[str, Any]:
    """The [DATASET.dataset] table of protocols/PROTOCOL.toml: the settings a test gives our
    dataset to follow that protocol."""
    with open(PROTOCOLS / f"{protocol}.toml", "rb") as f:
        return tomllib.load(f)[dataset]["dataset"]


def normalized(image: Tensor) -> Tensor:
    """Our [0, 1] image after ImageNet's Normalize, as the official loaders return theirs."""
    import torch

    return (image - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
