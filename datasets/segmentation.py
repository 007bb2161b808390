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

Other official loaders resize differently, and a protocol (protocols/*.toml) picks their rule
with these params (since 0.2; the defaults are the rules above):

- `resize_library = "cv2"`: decode with `cv2.imdecode` and resize with `cv2.resize`
  (INTER_LINEAR / INTER_CUBIC), as GLASS's COCO loader; OpenCV is imported only then.
  `resize_library = "torch"`: OCLF's ToTensor + torchvision Resize on the float tensor
  (`F.interpolate`, no antialiasing under its torchvision 0.15.1) + clamp(0, 1).
- `long_side = "round"`: long side `round(long * size / short)` (GLASS's ResizeMinShape).
- `crop_offset = "floor"`: centre crop at `(H - size) // 2` (GLASS's CenterCrop).
- `mask_resize`: the nearest rule of the masks: "pil" (PIL NEAREST), "cv2" (INTER_NEAREST:
  source `floor(i * in / out)`, GLASS) or "torch" (`F.interpolate(mode="nearest-exact")`,
  OCLF's ResizeNearestExact). Each rule's index table along an axis comes from the library
  itself (a resized ramp of source indices), so boundary pixels round exactly as it does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ocl_bench.api.errors import DataError
from ocl_bench.api.params import param
from ocl_bench.datasets import DatasetParamError
from ocl_bench.datasets.base import DatasetPlugin

# The one definition of each choice: the params' types (which a config is checked against)
# and validate_params (which checks params built in code) both read these.
Interpolation = Literal["bicubic", "bilinear"]
Crop = Literal["center", "random"]
ResizeLibrary = Literal["pil", "cv2", "torch"]
LongSide = Literal["truncate", "round"]
CropOffset = Literal["round", "floor"]
MaskResize = Literal["pil", "cv2", "torch"]
CrowdMode = Literal["keep", "drop", "ignore", "drop_image"]
CROWD_MODES: tuple[str, ...] = get_args(CrowdMode)
CHOICES: dict[str, tuple[str, ...]] = {
    "interpolation": get_args(Interpolation),
    "train_crop": get_args(Crop),
    "resize_library": get_args(ResizeLibrary),
    "long_side": get_args(LongSide),
    "crop_offset": get_args(CropOffset),
    "mask_resize": get_args(MaskResize),
}

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def cv2_module(what: str) -> Any:
    """OpenCV, imported on first use: only the cv2 geometry needs it."""
    try:
        import cv2
    except ImportError as err:
        raise DataError(
            f"{what} needs OpenCV (the official loader it reproduces resizes with cv2): "
            "pip install opencv-python-headless"
        ) from err
    return cv2


def short_side_size(
    height: int, width: int, size: int, long_side: LongSide = "truncate"
) -> tuple[int, int]:
    """(height, width) with the short side `size`.

    "truncate": torchvision's `Resize(size)`, long side `int(size * long / short)`.
    "round": GLASS's ResizeMinShape, both sides `int(round(side * factor))` with
    `factor = max(size / height, size / width)` (Python's round: half-way to even).
    """
    if long_side == "round":
        factor = max(size / height, size / width)
        return int(round(height * factor)), int(round(width * factor))
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


@dataclass(frozen=True)
class View:
    """Which square of the picture a sample shows, independent of resolution.

    crop: "center" or "random" (offsets at fractions `fy`, `fx` in [0, 1) of the room left at
    each resolution); flip: mirror left-right after the crop; offset: the centre crop's rule,
    "round" (torchvision CenterCrop, half-way to even) or "floor" (`(H - size) // 2`, GLASS).
    """

    crop: Crop = "center"
    fy: float = 0.5
    fx: float = 0.5
    flip: bool = False
    offset: CropOffset = "round"

    def offsets(self, height: int, width: int, size: int) -> tuple[int, int]:
        """(top, left) of the `size` x `size` crop of a `height` x `width` array."""
        if self.crop == "center" and self.offset == "floor":
            return (height - size) // 2, (width - size) // 2
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
        "side of the square masks (nearest short-side resize, see mask_resize, + crop; "
        "0 = image_size)",
        ge=0,
    )
    interpolation: Interpolation = param(
        "bicubic", "image resampling: 'bicubic' (OCLF/DINOSAUR) or 'bilinear' (SPOT)"
    )
    resize_library: ResizeLibrary = param(
        "pil",
        "image decoding and resizing: 'pil' (PIL, torchvision) or 'cv2' (cv2.imdecode and "
        "cv2.resize, INTER_LINEAR/INTER_CUBIC for interpolation; GLASS's loader) or 'torch' "
        "(OCLF: torchvision Resize on the float tensor, no antialiasing, clamped to [0, 1])",
        since="0.2",
    )
    long_side: LongSide = param(
        "truncate",
        "long side after the short-side resize: 'truncate' int(long*size/short) "
        "(torchvision) or 'round' (GLASS's ResizeMinShape)",
        since="0.2",
    )
    crop_offset: CropOffset = param(
        "round",
        "centre-crop offset: 'round' round((H-size)/2), half-way to even (torchvision) or "
        "'floor' (H-size)//2 (GLASS)",
        since="0.2",
    )
    mask_resize: MaskResize = param(
        "pil",
        "nearest rule of the mask resize: 'pil' (PIL NEAREST, SPOT), 'cv2' (INTER_NEAREST, "
        "GLASS) or 'torch' (nearest-exact, OCLF's ResizeNearestExact)",
        since="0.2",
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
        offset = self.params.crop_offset
        if self.split != "train":
            return View(offset=offset)
        rng = np.random.default_rng([self.params.seed, self.split_id, index])
        return replace(draw_view(rng, self.params.train_crop, self.params.hflip), offset=offset)

    def _load_image(self, path: Path) -> Image.Image | np.ndarray:
        """The picture decoded by the params' resize_library (PIL image or RGB uint8 array)."""
        what = f"dataset '{self.name}'"
        if self.params.resize_library == "cv2":
            return open_rgb_cv2(path, what)
        return open_rgb(path, what)

    def _image(self, img: Image.Image | np.ndarray, view: View) -> Tensor:
        """The model's input: `img` resized, cropped and flipped as the params say."""
        p = self.params
        return transform_image(
            img, p.image_size, p.interpolation, view, p.long_side, p.resize_library
        )

    def _maps(self, maps: Tensor, view: View) -> Tensor:
        """Masks or label maps [M,H,W] at mask resolution, resized by the params' rules."""
        side = self.params.mask_size or self.params.image_size
        return transform_maps(maps, side, view, self.params.long_side, self.params.mask_resize)


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


def open_rgb_cv2(path: Path, what: str) -> np.ndarray:
    """uint8[H,W,3] RGB as GLASS reads it: `cv2.imdecode(IMREAD_COLOR)` of the file's bytes, then
    BGR -> RGB. (OpenCV's JPEG decoder and EXIF handling may differ from PIL's.)"""
    cv2 = cv2_module(f"{what} with resize_library='cv2'")
    if not path.is_file():
        raise DataError(f"{what}: image file not found: {path}")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise DataError(f"{what}: cannot read image {path}: {err}") from err
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise DataError(f"{what}: cannot decode image {path} with OpenCV")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def image_hw(img: Image.Image | np.ndarray) -> tuple[int, int]:
    """(height, width) of a PIL image or an [H,W,C] array."""
    if isinstance(img, np.ndarray):
        return int(img.shape[0]), int(img.shape[1])
    return img.height, img.width


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
    img: Image.Image | np.ndarray,
    size: int,
    interpolation: Interpolation,
    view: View,
    long_side: LongSide = "truncate",
    library: ResizeLibrary = "pil",
) -> Tensor:
    """float32[3,size,size] in [0, 1]: short-side resize, crop, optional flip.

    `img` is a PIL image or an RGB uint8[H,W,3] array; `library` resizes it with PIL or with
    `cv2.resize` (which copies when the size is unchanged, as PIL's path skips the resize).
    """
    height, width = image_hw(img)
    h, w = short_side_size(height, width, size, long_side)
    if library == "torch":
        return torch_resized_image(img, (h, w), size, interpolation, view)
    if library == "cv2":
        cv2 = cv2_module("resize_library='cv2'")
        arr = img if isinstance(img, np.ndarray) else np.asarray(img.convert("RGB"))
        flag = cv2.INTER_CUBIC if interpolation == "bicubic" else cv2.INTER_LINEAR
        arr = cv2.resize(np.ascontiguousarray(arr, dtype=np.uint8), (w, h), interpolation=flag)
    else:
        if isinstance(img, np.ndarray):
            img = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8))
        if (h, w) != (height, width):
            img = img.resize((w, h), _RESAMPLE[interpolation])
        arr = np.asarray(img, dtype=np.uint8)
    top, left = view.offsets(h, w, size)
    arr = arr[top : top + size, left : left + size]
    if view.flip:
        arr = arr[:, ::-1]
    out = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return out.to(torch.float32).div_(255.0)


def torch_resized_image(
    img: Image.Image | np.ndarray,
    hw: tuple[int, int],
    size: int,
    interpolation: Interpolation,
    view: View,
) -> Tensor:
    """float32[3,size,size]: OCLF's image path (resize_library = "torch"). ToTensor, then
    torchvision's Resize on the float tensor, which under OCLF's pinned torchvision (0.15.1)
    is `F.interpolate` without antialiasing (bicubic overshoots, hence OCLF's clamp(0, 1)),
    then the crop and flip; no rounding to uint8 in between."""
    arr = img if isinstance(img, np.ndarray) else np.asarray(img.convert("RGB"))
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(torch.float32)
    x = x.div_(255.0)
    if hw != tuple(x.shape[-2:]):
        x = F.interpolate(
            x[None], size=hw, mode=interpolation, align_corners=False, antialias=False
        )
        x = x[0]
    x = x.clamp_(0.0, 1.0)
    top, left = view.offsets(hw[0], hw[1], size)
    x = x[:, top : top + size, left : left + size]
    if view.flip:
        x = x.flip(-1)
    return x.contiguous()


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


def cv2_nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """int64[size_out]: the source pixel `cv2.resize(INTER_NEAREST)` reads for each output pixel
    along one axis (about `floor(i * in / out)`, from OpenCV itself on an int32 ramp)."""
    cv2 = cv2_module("mask_resize='cv2'")
    ramp = np.arange(size_in, dtype=np.int32)[None, :]
    table = cv2.resize(ramp, (size_out, 1), interpolation=cv2.INTER_NEAREST)
    return np.asarray(table, dtype=np.int64)[0]


def torch_nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """int64[size_out]: the source pixel `F.interpolate(mode="nearest-exact")` reads for each
    output pixel along one axis (OCLF's ResizeNearestExact), from torch itself on a ramp."""
    ramp = torch.arange(size_in, dtype=torch.float32)[None, None, None, :]
    table = F.interpolate(ramp, size=(1, size_out), mode="nearest-exact")
    return table[0, 0, 0].to(torch.int64).numpy()


_NEAREST = {
    "pil": pil_nearest_indices,
    "cv2": cv2_nearest_indices,
    "torch": torch_nearest_indices,
}


def transform_maps(
    maps: Tensor,
    size: int,
    view: View,
    long_side: LongSide = "truncate",
    rule: MaskResize = "pil",
) -> Tensor:
    """[M,H,W] masks or label maps (any integer dtype) -> [M,size,size]: short-side resize with
    the nearest `rule` (equal to resizing each map with that library), crop, optional flip."""
    m, height, width = maps.shape
    h, w = short_side_size(height, width, size, long_side)
    if m == 0:
        return torch.zeros((0, size, size), dtype=maps.dtype)
    top, left = view.offsets(h, w, size)
    nearest = _NEAREST[rule]
    rows = nearest(height, h)[top : top + size]
    cols = nearest(width, w)[left : left + size]
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
    """A dataset sample dict (see ocl_bench.datasets) from transformed masks.

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
    for key, allowed in CHOICES.items():
        value = getattr(p, key)
        if value not in allowed:
            choices = " or ".join(repr(a) for a in allowed)
            raise bad(f"{key} must be {choices}, got {value!r}")
    if getattr(p, "crowd", "keep") not in CROWD_MODES:
        allowed = ", ".join(repr(m) for m in CROWD_MODES)
        raise bad(f"crowd must be one of {allowed}, got {p.crowd!r}")
    if getattr(p, "min_area", 0.0) < 0:
        raise bad(f"min_area must be >= 0, got {p.min_area}")
