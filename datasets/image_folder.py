"""Unlabelled images from a folder, for training or visualising on your own pictures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ocl_bench.api.errors import DataError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.datasets import DatasetParamError, check_index, check_split
from ocl_bench.datasets.base import DatasetPlugin

EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})


def list_images(root: Path) -> list[Path]:
    """Image files under `root` (recursive, case-insensitive extensions), sorted by path."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)


def load_image(path: Path, size: int) -> torch.Tensor:
    """float[3,size,size] in [0, 1]: short side resized to `size`, then centre-cropped."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            array = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class ImageFolderDataset(DatasetPlugin):
    """Unlabelled images from a folder (png/jpg/jpeg/bmp/webp, recursive), resized and cropped.

    Every split ("train", "val", "test") reads the same folder: there are no labels to
    hold out, so use it to train or visualise, not to score. Samples have "image" and "index".
    """

    kind = "dataset"
    name = "image_folder"
    # A folder of a few images of any size, written by the caller under {fixtures}.
    conformance = {
        "dataset.root": "{fixtures}/images",
        "dataset.image_size": 32,
    }
    provides = frozenset({"batch.images", "batch.index"})

    @dataclass(frozen=True)
    class Params:
        root: str = param("", "folder searched recursively for images; all splits use it")
        image_size: int = param(
            64, "side of the square images: short side resized, centre crop", ge=1
        )

        def __post_init__(self) -> None:
            if self.image_size < 1:
                raise DatasetParamError(
                    f"dataset 'image_folder': image_size must be >= 1, got {self.image_size}"
                )

    def __init__(self, params: Params | None = None, split: str = "train"):
        self.params = params if params is not None else self.Params()
        self.split = split
        self.split_id = check_split(split)
        if not self.params.root:
            raise DataError("dataset 'image_folder': set 'root' to a folder of images")
        root = Path(self.params.root).expanduser()
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist or is not a folder")
        self.root = root
        self.files = list_images(root)
        if not self.files:
            allowed = ", ".join(sorted(EXTENSIONS))
            raise DataError(f"image folder {root} contains no images ({allowed})")
        self._length = len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = check_index(index, len(self.files), "image folder")
        image = load_image(self.files[index], self.params.image_size)
        return {"image": image, "index": index}


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [ImageFolderDataset]
