"""The embedded default dataset: procedurally generated multi-object scenes.

Every sample is a pure function of (seed, split, index): it is drawn with
`numpy.random.default_rng([seed, split_id, index])` (train=0, val=1, test=2) and rasterised
with plain numpy (no anti-aliasing), so the same triple gives bitwise-identical tensors in
any process and masks are exact.

Objects are drawn back to front; later objects occlude earlier ones. Instance masks are the
visible parts, and an object left with no visible pixel is dropped from every per-object
field. With `occlusion = true`, a placement that would leave an earlier object with less than
`min_visible` of its area visible is re-drawn; with `occlusion = false` overlapping placements
are re-drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.datasets import DatasetParamError, check_index, check_split
from ocl_bench.datasets.base import SEGMENTATION_PROVIDES, DatasetPlugin

# Saturated or bright colours; backgrounds are dull greys, so objects always stand out.
# The first eight are the default palette and are pairwise well separated.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "cyan": (0.10, 0.85, 0.90),
    "magenta": (0.90, 0.20, 0.85),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.95, 0.95, 0.95),
    "purple": (0.55, 0.25, 0.95),
    "pink": (1.00, 0.60, 0.75),
}
COLOUR_NAMES = tuple(PALETTE)
SHAPE_NAMES = ("square", "circle", "triangle", "diamond", "cross", "star")

# An object's pixels lie within EXTENT * (size / 2) of its centre, whatever its rotation.
EXTENT = 1.4
TRIES_PER_OBJECT = 50
SCENE_RESTARTS = 20
BRIGHTNESS_JITTER = (0.85, 1.0)
BACKGROUND_GREY = (0.12, 0.5)
BACKGROUND_TINT = 0.06
BACKGROUND_NOISE = 0.02


def _halfplanes(
    dx: np.ndarray, dy: np.ndarray, angles: np.ndarray, offsets: np.ndarray
) -> list[np.ndarray]:
    """One bool array per half-plane {p : <p, (cos a, sin a)> <= offset}."""
    return [
        dx * math.cos(a) + dy * math.sin(a) <= d for a, d in zip(angles.tolist(), offsets.tolist())
    ]


def _inside(kind: str, dx: np.ndarray, dy: np.ndarray, h: float, angle: float) -> np.ndarray:
    """Bool mask of the pixels of shape `kind` with half-size `h`, rotated by `angle`.

    dx: float[1,w] and dy: float[h,1] are the pixel centres relative to the object's centre.
    """
    if kind == "circle":
        return dx * dx + dy * dy <= h * h
    c, s = math.cos(angle), math.sin(angle)
    if kind == "star":  # a pentagram: inside at least four of the five lines
        outer = 1.25 * h
        angles = angle - math.pi / 2 + 2 * math.pi * np.arange(5) / 5
        inside = _halfplanes(dx, dy, angles, np.full(5, outer * math.cos(2 * math.pi / 5)))
        return sum(m.astype(np.uint8) for m in inside) >= 4
    u = c * dx + s * dy
    v = -s * dx + c * dy
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85 * h
    if kind == "diamond":
        return np.abs(u) / (0.8 * h) + np.abs(v) / (1.2 * h) <= 1.0
    if kind == "cross":
        au, av = np.abs(u), np.abs(v)
        t = 0.35 * h
        return ((au <= h) & (av <= t)) | ((au <= t) & (av <= h))
    if kind == "triangle":  # equilateral, apex up, centred on its bounding box
        r = 1.2 * h
        w = v - r / 4
        half = r / 2
        k = math.sqrt(3) / 2
        return (w <= half) & (-k * u - 0.5 * w <= half) & (k * u - 0.5 * w <= half)
    raise ValueError(f"unknown shape {kind!r}")


@dataclass
class _Object:
    shape: int
    colour: int
    size: float
    cx: float
    cy: float
    rgb: np.ndarray
    window: tuple[slice, slice]
    mask: np.ndarray  # bool, inside `window`
    area: int  # pixels inside the image before occlusion


@dataclass
class _Scene:
    background: np.ndarray  # float32[H,W,3]
    label: np.ndarray  # int16[H,W], index into objects or -1
    objects: list[_Object]


class ShapesDataset(DatasetPlugin):
    """Procedural multi-object scenes of coloured shapes (embedded, no files needed).

    Samples carry images, exact instance and class masks, boxes, labels, per-object properties
    (shape, colour, size, x, y) and a caption; see ocl_bench.datasets for the sample keys.
    """

    kind = "dataset"
    name = "shapes"
    # The suite's tiny base run is on shapes (32 px, 8 train and 4 val images).
    conformance = {}
    provides = SEGMENTATION_PROVIDES | {"batch.properties", "batch.captions"}

    @dataclass(frozen=True)
    class Params:
        image_size: int = param(64, "height and width of the square images, in pixels", ge=8)
        min_objects: int = param(2, "fewest objects drawn per image", ge=1)
        max_objects: int = param(5, "most objects drawn per image", ge=1)
        shapes: list[str] = param(
            ["square", "circle", "triangle", "diamond"],
            f"shape categories, in label order; allowed: {', '.join(SHAPE_NAMES)}",
        )
        num_colours: int = param(
            8,
            f"number of palette colours used, 1..{len(PALETTE)}: {', '.join(COLOUR_NAMES)}",
            ge=1,
            le=len(PALETTE),
        )
        min_size: float = param(
            0.15, "smallest object size, as a fraction of the image side", gt=0, le=1
        )
        max_size: float = param(
            0.35, "largest object size, as a fraction of the image side", gt=0, le=1
        )
        rotate: bool = param(True, "rotate non-circular shapes by a random angle")
        occlusion: bool = param(True, "allow objects to overlap (later ones occlude earlier)")
        min_visible: float = param(
            0.25,
            "with occlusion, re-draw placements that leave an earlier object with less than this "
            "fraction of its area visible (0 allows full occlusion; hidden objects are dropped)",
            ge=0,
            le=1,
        )
        background: Literal["varying", "plain"] = param(
            "varying",
            "'varying': a random dull two-colour gradient with mild noise per image; "
            "'plain': black",
        )
        train_size: int = param(10000, "number of images in the train split", ge=0)
        val_size: int = param(500, "number of images in the val split", ge=0)
        test_size: int = param(500, "number of images in the test split", ge=0)
        seed: int = param(0, "generation seed; (seed, split, index) determines a sample", ge=0)
        cache: int = param(
            0,
            "keep up to this many generated samples of a split in memory and return them "
            "again instead of redrawing (about 45 kB each at 48 px); 0 = draw every time",
            ge=0,
        )

        def __post_init__(self) -> None:
            _validate(self)

    def __init__(self, params: Params | None = None, split: str = "train"):
        self.params = params if params is not None else self.Params()
        _validate(self.params)
        self.split = split
        self.split_id = check_split(split)
        p = self.params
        self._length = {"train": p.train_size, "val": p.val_size, "test": p.test_size}[split]
        self._shape_kinds = tuple(p.shapes)
        self._palette = np.array([PALETTE[c] for c in COLOUR_NAMES[: p.num_colours]], np.float32)
        centres = np.arange(p.image_size, dtype=np.float64) + 0.5
        self._xs = centres[None, :]
        self._ys = centres[:, None]
        # Gradient coordinate grids in [-0.5, 0.5].
        self._gx = (centres[None, :] / p.image_size - 0.5).astype(np.float32)
        self._gy = (centres[:, None] / p.image_size - 0.5).astype(np.float32)
        # Drawing a sample costs about as much as a tenth of a small model's training step;
        # a run that sees its split several times draws each sample once.
        self._kept: dict[int, dict[str, Any]] = {}

    # ----------------------------------------------------------------- description
    @property
    def num_classes(self) -> int:
        """Number of shape categories (labels are in [0, num_classes))."""
        return len(self._shape_kinds)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._shape_kinds

    @property
    def colour_names(self) -> tuple[str, ...]:
        return COLOUR_NAMES[: self.params.num_colours]

    def property_specs(self) -> dict[str, tuple[str, int]]:
        """name -> ("categorical", number of classes) or ("continuous", dimension)."""
        return {
            "shape": ("categorical", self.num_classes),
            "colour": ("categorical", self.params.num_colours),
            "size": ("continuous", 1),
            "x": ("continuous", 1),
            "y": ("continuous", 1),
        }

    # ------------------------------------------------------------------ generation
    def _rasterise(
        self, kind: str, cx: float, cy: float, h: float, angle: float
    ) -> tuple[tuple[slice, slice], np.ndarray]:
        size = self.params.image_size
        reach = EXTENT * h + 1.0
        x0, x1 = max(0, int(cx - reach)), min(size, int(math.ceil(cx + reach)) + 1)
        y0, y1 = max(0, int(cy - reach)), min(size, int(math.ceil(cy + reach)) + 1)
        dx = self._xs[:, x0:x1] - cx
        dy = self._ys[y0:y1, :] - cy
        return (slice(y0, y1), slice(x0, x1)), _inside(kind, dx, dy, h, angle)

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        size = self.params.image_size
        if self.params.background == "plain":
            return np.zeros((size, size, 3), np.float32)
        grey = rng.uniform(*BACKGROUND_GREY, size=(2, 1))
        tint = rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=(2, 3))
        ends = (grey + tint).astype(np.float32)  # two dull colours
        phi = rng.uniform(0.0, 2 * math.pi)
        c, s = math.cos(phi), math.sin(phi)
        t = (self._gx * np.float32(c) + self._gy * np.float32(s)) / np.float32(abs(c) + abs(s))
        t = t + np.float32(0.5)  # in [0, 1], 0 and 1 at opposite corners
        bg = ends[0] + (ends[1] - ends[0]) * t[:, :, None]
        noise = rng.standard_normal((size, size, 3), dtype=np.float32)
        bg += np.float32(BACKGROUND_NOISE) * noise
        return np.clip(bg, 0.0, 1.0)

    def _place(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, list[_Object]]:
        """Place up to `count` objects; stops early when one cannot be placed."""
        p = self.params
        size = p.image_size
        label = np.full((size, size), -1, np.int16)
        objects: list[_Object] = []
        visible = np.zeros(0, np.int64)
        for j in range(count):
            shape = int(rng.integers(len(self._shape_kinds)))
            colour = int(rng.integers(p.num_colours))
            rgb = self._palette[colour] * np.float32(rng.uniform(*BRIGHTNESS_JITTER))
            for _ in range(TRIES_PER_OBJECT):
                frac = float(rng.uniform(p.min_size, p.max_size))
                h = frac * size / 2
                lo, hi = min(h, size / 2), max(size - h, size / 2)
                cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
                angle = float(rng.uniform(0.0, 2 * math.pi)) if p.rotate else 0.0
                window, mask = self._rasterise(self._shape_kinds[shape], cx, cy, h, angle)
                area = int(mask.sum())
                if area == 0:
                    continue
                region = label[window]
                below = region[mask]
                below = below[below >= 0]
                lost = np.bincount(below, minlength=j)
                if below.size:
                    if not p.occlusion:
                        continue
                    if np.any(visible - lost < p.min_visible * np.array([o.area for o in objects])):
                        continue
                region[mask] = j
                visible = np.append(visible - lost, area)
                objects.append(_Object(shape, colour, frac, cx, cy, rgb, window, mask, area))
                break
            else:
                break
        return label, objects

    def _scene(self, index: int) -> _Scene:
        p = self.params
        rng = np.random.default_rng([p.seed, self.split_id, index])
        background = self._background(rng)
        count = int(rng.integers(p.min_objects, p.max_objects + 1))
        best: tuple[np.ndarray, list[_Object]] | None = None
        for _ in range(SCENE_RESTARTS):
            label, objects = self._place(rng, count)
            if best is None or len(objects) > len(best[1]):
                best = (label, objects)
            if len(objects) == count:
                break
        assert best is not None
        label, objects = best
        # Drop objects that later ones hid completely, renumbering the label map.
        counts = np.bincount(label[label >= 0], minlength=len(objects))
        keep = np.flatnonzero(counts > 0)
        if len(keep) < len(objects):
            remap = np.full(len(objects) + 1, -1, np.int16)
            remap[keep] = np.arange(len(keep), dtype=np.int16)
            label = remap[label]  # label -1 reads the last entry, which is -1
            objects = [objects[k] for k in keep.tolist()]
        return _Scene(background, label, objects)

    def full_masks(self, index: int) -> Tensor:
        """bool[M,H,W]: the un-occluded masks of the objects of sample `index` (same order)."""
        scene = self._scene(self._check_index(index))
        size = self.params.image_size
        out = np.zeros((len(scene.objects), size, size), bool)
        for k, obj in enumerate(scene.objects):
            out[k][obj.window] = obj.mask
        return torch.from_numpy(out)

    def _check_index(self, index: int) -> int:
        return check_index(index, self._length, f"{self.split} split")

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        kept = self._kept.get(index)
        if kept is None:
            kept = self._draw(index)
            if len(self._kept) < self.params.cache:
                self._kept[index] = kept
        # Copies of the containers: a caller that edits its sample leaves the cache intact
        # (collate stacks the tensors into new ones).
        return {**kept, "properties": dict(kept["properties"])}

    def _draw(self, index: int) -> dict[str, Any]:
        scene = self._scene(index)
        objects, label = scene.objects, scene.label
        size = self.params.image_size
        m = len(objects)

        table = np.zeros((m + 1, 3), np.float32)  # row -1 is unused (background)
        for k, obj in enumerate(objects):
            table[k] = obj.rgb
        fg = label >= 0
        image = np.where(fg[:, :, None], table[label], scene.background)
        image = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)

        ids = np.arange(m, dtype=np.int16)
        instance = label[None, :, :] == ids[:, None, None]
        rows, cols = instance.any(axis=2), instance.any(axis=1)
        boxes = np.zeros((m, 4), np.float32)
        if m:
            boxes[:, 0] = cols.argmax(axis=1)
            boxes[:, 1] = rows.argmax(axis=1)
            boxes[:, 2] = size - cols[:, ::-1].argmax(axis=1)
            boxes[:, 3] = size - rows[:, ::-1].argmax(axis=1)

        shapes = np.array([o.shape for o in objects], np.int64)
        dense = np.where(fg, np.append(shapes, -1)[label], -1)
        class_ids = np.unique(shapes)
        class_masks = dense[None, :, :] == class_ids[:, None, None]

        return {
            "image": torch.from_numpy(image),
            "instance_masks": torch.from_numpy(instance),
            "class_masks": torch.from_numpy(class_masks),
            "class_ids": torch.from_numpy(class_ids.astype(np.int64)),
            "ignore_mask": torch.zeros((size, size), dtype=torch.bool),
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(shapes.copy()),
            "properties": {
                "shape": torch.from_numpy(shapes.copy()),
                "colour": torch.tensor([o.colour for o in objects], dtype=torch.long),
                "size": torch.tensor([o.size for o in objects], dtype=torch.float32),
                "x": torch.tensor([o.cx / size for o in objects], dtype=torch.float32),
                "y": torch.tensor([o.cy / size for o in objects], dtype=torch.float32),
            },
            "caption": self._caption(objects),
            "index": index,
        }

    def _caption(self, objects: list[_Object]) -> str:
        """The objects from left to right, e.g. "a red circle and a small blue square"."""
        p = self.params
        third = (p.max_size - p.min_size) / 3
        phrases = []
        order = sorted(range(len(objects)), key=lambda k: (objects[k].cx, objects[k].cy, k))
        for k in order:
            obj = objects[k]
            words = [COLOUR_NAMES[obj.colour], self._shape_kinds[obj.shape]]
            if third > 0 and obj.size < p.min_size + third:
                words.insert(0, "small")
            elif third > 0 and obj.size > p.max_size - third:
                words.insert(0, "large")
            article = "an" if words[0][0] in "aeiou" else "a"
            phrases.append(" ".join([article, *words]))
        if not phrases:
            return "an empty scene"
        if len(phrases) == 1:
            return phrases[0]
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _validate(p: Any) -> None:
    """Raise DatasetParamError (a ConfigError and a ValueError) for bad shapes params."""

    def bad(msg: str) -> DatasetParamError:
        return DatasetParamError(f"dataset 'shapes': {msg}")

    if p.image_size < 8:
        raise bad(f"image_size must be at least 8, got {p.image_size}")
    if not 1 <= p.min_objects <= p.max_objects:
        raise bad(
            f"need 1 <= min_objects <= max_objects, got min_objects={p.min_objects}, "
            f"max_objects={p.max_objects}"
        )
    shapes = list(p.shapes)
    if not shapes:
        raise bad(f"shapes must not be empty; allowed: {', '.join(SHAPE_NAMES)}")
    unknown = [s for s in shapes if s not in SHAPE_NAMES]
    if unknown:
        raise bad(f"unknown shapes {unknown}; allowed: {', '.join(SHAPE_NAMES)}")
    if len(set(shapes)) != len(shapes):
        raise bad(f"shapes must not repeat, got {shapes}")
    if not 1 <= p.num_colours <= len(PALETTE):
        raise bad(
            f"num_colours must be in 1..{len(PALETTE)} ({', '.join(COLOUR_NAMES)}), "
            f"got {p.num_colours}"
        )
    if not 0 < p.min_size <= p.max_size <= 1:
        raise bad(
            f"need 0 < min_size <= max_size <= 1, got min_size={p.min_size}, max_size={p.max_size}"
        )
    if not 0 <= p.min_visible <= 1:
        raise bad(f"min_visible must be in [0, 1], got {p.min_visible}")
    if p.background not in ("varying", "plain"):
        raise bad(f"background must be 'varying' or 'plain', got {p.background!r}")
    for name in ("train_size", "val_size", "test_size"):
        if getattr(p, name) < 0:
            raise bad(f"{name} must be >= 0, got {getattr(p, name)}")


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [ShapesDataset]
