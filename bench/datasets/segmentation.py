"""Geometry, params and mask helpers shared by the real-image segmentation datasets (coco, voc).

The evaluation protocol is OCLF's "ccrop" one, which SPOT also uses:

- image: resize the short side to `image_size` (PIL bicubic, or bilinear as in SPOT), then
  centre-crop `image_size` x `image_size`;
- masks: resize the short side to `mask_size` with PIL's NEAREST rule (as SPOT's loader, which
  resizes PIL masks; torch's "nearest-exact", OCLF's, rounds a few boundary pixels per image
  the other way), then centre-crop `mask_size` x `mask_size`.

Sizes and offsets follow torchvision exactly: `Resize(int)` makes the long side
`int(size * long / short)` (truncated) and `CenterCrop` starts at `int(round((H - size) / 2))`
(Python's round, so half-way cases go to the even offset). Images and masks are resized
separately and may have different resolutions; both crops cover the same centred square of the
original picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ocl_bench.datasets import DatasetParamError
from ocl_bench.datasets.base import DatasetPlugin
from ocl_bench.errors import DataError
from ocl_bench.params import param

Interpolation = Literal["bicubic", "bilinear"]
Crop = Literal["center", "random"]
CROWD_MODES = ("keep", "drop", "ignore", "drop_image")

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after torchvision's `Resize(size)`: short side `size`, long side cut."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


@dataclass(frozen=True)
class View:
    """Which square of the picture a sample shows, independent of resolution.

    crop: "center" (torchvision CenterCrop) or "random" (offsets at fractions `fy`, `fx` in
    [0, 1) of the room left at each resolution); flip: mirror left-right after the crop.
    """

    crop: Crop = "center"
    fy: float = 0.5
    fx: float = 0.5
    flip: bool = False

    def offsets(self, height: int, width: int, size: int) -> tuple[int, int]:
        """(top, left) of the `size` x `size` crop of a `height` x `width` array."""
        if self.crop == "center":
            return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        return int(self.fy * (height - size + 1)), int(self.fx * (width - size + 1))


def draw_view(rng: np.random.Generator, crop: Crop, flip: bool) -> View:
    """A training view: the crop fractions and the flip (probability 0.5) drawn from `rng`."""
    fy, fx, coin = rng.random(3).tolist()
    return View(crop=crop, fy=fy, fx=fx, flip=flip and coin < 0.5)


@dataclass(frozen=True)
class GeometryParams:
    """The first params of coco and voc: `root`, then the image and mask geometry.

    `root` has no default here: each dataset declares it again with its own default and doc
    (where its files are), which keeps it first. Subclasses must be frozen dataclasses too.
    """

    root: str
    image_size: int = param(224, "side of the square images (short-side resize + crop)", ge=1)
    mask_size: int = param(
        320,
        "side of the square masks (PIL-nearest short-side resize + crop; 0 = image_size)",
        ge=0,
    )
    interpolation: Interpolation = param(
        "bicubic", "image resampling: 'bicubic' (OCLF/DINOSAUR) or 'bilinear' (SPOT)"
    )


class SegmentationDataset(DatasetPlugin):
    """Base of coco and voc: mask size and the train split's augmentation view.

    Its Params extend GeometryParams and also have `train_crop`, `hflip` and `seed`.
    """

    @property
    def mask_size(self) -> tuple[int, int]:
        """(height, width) of the masks, ignore_mask and boxes: square, mask_size or image_size."""
        side = self.params.mask_size or self.params.image_size
        return (side, side)

    def _view(self, index: int) -> View:
        """Centred outside train; in train, a crop and flip drawn from (seed, split, index)."""
        if self.split != "train":
            return View()
        rng = np.random.default_rng([self.params.seed, self.split_id, index])
        return draw_view(rng, self.params.train_crop, self.params.hflip)


def open_rgb(path: Path, what: str) -> Image.Image:
    """Decode an image file fully as RGB; a missing or corrupt file raises DataError naming it."""
    if not path.is_file():
        raise DataError(f"{what}: image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{what}: cannot decode image {path}: {err}") from err


def open_label_png(path: Path, what: str) -> np.ndarray:
    """uint8[H,W] indices of a palette ("P") or greyscale ("L") PNG (VOC label maps)."""
    if not path.is_file():
        raise DataError(f"{what}: label file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L"):
                raise DataError(
                    f"{what}: {path} is a {img.mode!r} image; expected a palette ('P') PNG whose "
                    "pixel values are label indices"
                )
            return np.array(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{what}: cannot decode label map {path}: {err}") from err


def transform_image(
    img: Image.Image, size: int, interpolation: Interpolation, view: View
) -> Tensor:
    """float32[3,size,size] in [0, 1]: short-side resize, crop, optional flip."""
    h, w = short_side_size(img.height, img.width, size)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), _RESAMPLE[interpolation])
    top, left = view.offsets(h, w, size)
    arr = np.asarray(img, dtype=np.uint8)[top : top + size, left : left + size]
    if view.flip:
        arr = arr[:, ::-1]
    out = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return out.to(torch.float32).div_(255.0)


def pil_nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """int64[size_out]: the source pixel PIL's NEAREST resize reads for each output pixel, along
    one axis (PIL treats the axes separately).

    PIL steps a double-precision coordinate by in/out from (in/out)/2 and truncates it; the
    accumulated rounding decides boundary pixels, so the table comes from PIL itself, by resizing
    an int32 ramp of source indices.
    """
    ramp = Image.fromarray(np.arange(size_in, dtype=np.int32)[None, :])
    table = ramp.resize((size_out, 1), Image.Resampling.NEAREST)
    return np.asarray(table, dtype=np.int64)[0]


def transform_maps(maps: Tensor, size: int, view: View) -> Tensor:
    """uint8[M,H,W] masks or label maps -> uint8[M,size,size]: short-side resize with PIL's
    NEAREST rule (equal to resizing each map with PIL), crop, optional flip."""
    m, height, width = maps.shape
    h, w = short_side_size(height, width, size)
    if m == 0:
        return torch.zeros((0, size, size), dtype=maps.dtype)
    top, left = view.offsets(h, w, size)
    rows = pil_nearest_indices(height, h)[top : top + size]
    cols = pil_nearest_indices(width, w)[left : left + size]
    # numpy's take gathers rows then columns several times faster than torch's indexing here
    maps = torch.from_numpy(np.take(np.take(maps.numpy(), rows, axis=1), cols, axis=2))
    if view.flip:
        maps = maps.flip(-1)
    return maps.contiguous()


def boxes_from_masks(masks: Tensor) -> Tensor:
    """float32[M,4] (x1, y1, x2, y2) in pixels of bool[M,H,W] masks; x2/y2 are exclusive (one past
    the last pixel). Empty masks get zeros."""
    m = masks.shape[0]
    out = torch.zeros((m, 4), dtype=torch.float32)
    if m == 0:
        return out
    rows = masks.any(dim=2)  # [M,H]
    cols = masks.any(dim=1)  # [M,W]
    h, w = rows.shape[1], cols.shape[1]
    nonempty = rows.any(dim=1)
    out[:, 0] = cols.to(torch.uint8).argmax(dim=1).float()
    out[:, 1] = rows.to(torch.uint8).argmax(dim=1).float()
    out[:, 2] = (w - cols.flip(1).to(torch.uint8).argmax(dim=1)).float()
    out[:, 3] = (h - rows.flip(1).to(torch.uint8).argmax(dim=1)).float()
    out[~nonempty] = 0.0
    return out


def overlap_mask(masks: Tensor) -> Tensor:
    """bool[H,W]: pixels covered by two or more of the bool[M,H,W] masks."""
    if masks.shape[0] < 2:
        return torch.zeros(masks.shape[1:], dtype=torch.bool)
    return masks.sum(dim=0, dtype=torch.int32) >= 2


def class_masks_from_instances(masks: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """OCLF's class masks (`AddSegmentationMaskFromInstanceMask`): each pixel takes the highest
    category id of the instances covering it (so overlaps are kept, not ignored); one mask per
    category present, ascending id, category 0 dropped.

    Returns (bool[C,H,W], long[C]).
    """
    if masks.shape[0] == 0:
        return torch.zeros((0, *masks.shape[1:]), dtype=torch.bool), torch.zeros(
            0, dtype=torch.long
        )
    dense = (masks.to(torch.long) * labels.to(torch.long)[:, None, None]).amax(dim=0)
    return label_map_masks(dense)


def label_map_masks(dense: Tensor, exclude: tuple[int, ...] = (0,)) -> tuple[Tensor, Tensor]:
    """One bool mask per value present in the label map long[H,W] (ascending), skipping `exclude`.

    Returns (bool[C,H,W], long[C]).
    """
    ids = torch.unique(dense.to(torch.long))
    for value in exclude:
        ids = ids[ids != value]
    return dense[None].to(torch.long) == ids[:, None, None], ids


def make_sample(
    image: Tensor,
    masks: Tensor,
    labels: Tensor,
    ignore: Tensor,
    class_masks: Tensor,
    class_ids: Tensor,
    index: int,
) -> dict:
    """A dataset sample dict (see bench.datasets) from transformed masks.

    Instance masks left empty by the crop are dropped (with their labels); boxes come from the
    remaining masks.
    """
    keep = masks.flatten(1).any(dim=1) if masks.shape[0] else torch.zeros(0, dtype=torch.bool)
    masks, labels = masks[keep], labels[keep]
    return {
        "image": image,
        "instance_masks": masks,
        "class_masks": class_masks,
        "class_ids": class_ids,
        "ignore_mask": ignore,
        "boxes": boxes_from_masks(masks),
        "labels": labels.to(torch.long),
        "index": index,
    }


def validate_params(p: Any, name: str) -> None:
    """Raise DatasetParamError for bad geometry params of dataset `name`."""

    def bad(msg: str) -> DatasetParamError:
        return DatasetParamError(f"dataset '{name}': {msg}")

    if p.image_size < 1:
        raise bad(f"image_size must be >= 1, got {p.image_size}")
    if p.mask_size < 0:
        raise bad(f"mask_size must be >= 0 (0 = image_size), got {p.mask_size}")
    if p.interpolation not in ("bicubic", "bilinear"):
        raise bad(f"interpolation must be 'bicubic' or 'bilinear', got {p.interpolation!r}")
    if p.train_crop not in ("center", "random"):
        raise bad(f"train_crop must be 'center' or 'random', got {p.train_crop!r}")
    if getattr(p, "crowd", "keep") not in CROWD_MODES:
        allowed = ", ".join(repr(m) for m in CROWD_MODES)
        raise bad(f"crowd must be one of {allowed}, got {p.crowd!r}")
    if getattr(p, "min_area", 0.0) < 0:
        raise bad(f"min_area must be >= 0, got {p.min_area}")
