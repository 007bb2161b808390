"""PASCAL VOC 2012 segmentation (SegmentationObject / SegmentationClass palette PNGs).

Layout under `root` (VOCtrainval_11-May-2012.tar from
http://host.robots.ox.ac.uk/pascal/VOC/voc2012/; `root` may be the VOC2012 folder itself or a
folder holding VOCdevkit/VOC2012 or VOC2012):

    JPEGImages/<id>.jpg   SegmentationObject/<id>.png   SegmentationClass/<id>.png
    ImageSets/Segmentation/{train,val}.txt   (+ trainaug.txt, the 10,582-image SBD list, optional)

Splits: "train" reads ImageSets/Segmentation/trainaug.txt when present (SPOT's training set),
else train.txt; "val" reads val.txt (1,449 images, SPOT's and OCLF's evaluation set).

Both PNGs are read as palette indices. Object ids 1..254 of SegmentationObject are the instances
(the object PNG is a partition, so instances never overlap); each instance's label is the most
frequent SegmentationClass value under it (255 excluded, ties to the smaller id). Class masks are
the SegmentationClass values present (1..20, ascending). Pixels that are 255 (object boundaries
and "difficult" regions) in either PNG go to ignore_mask, as OCLF does with
`_metrics_add_ignore_mask` (SPOT instead sets them to background: `void = "background"`).

Geometry follows the SPOT / OCLF "ccrop" protocol (see ocl_bench.datasets.segmentation): image short
side 224 (bicubic) + centre crop, label maps short side 320 (PIL nearest) + centre crop; the
resize rules (resize_library, long_side, crop_offset, mask_resize) select another loader's.
The train split uses SPOT's VOC augmentation, a random 224 crop and a horizontal flip
(p = 0.5), drawn from (seed, index) so runs are deterministic (the same image gets the same view
every epoch); its masks use the same crop fractions at mask resolution. Label PNGs are always
read with PIL: they hold palette indices, which OpenCV would turn into colours.

SBD's trainaug images mostly have no SegmentationObject PNG: a train list with any image lacking
either PNG yields images only (no masks), which is all training needs; with every class PNG
present (`class_folder = "SegmentationClassAug"`, SBD's) it yields class masks, their ids and
the ignore mask, what a property probe matched on classes reads (GLASS A.2). The val split
requires both PNGs for every image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ocl_bench.api.errors import DataError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.datasets import DatasetParamError, check_index, check_split
from ocl_bench.datasets.base import SEGMENTATION_PROVIDES
from ocl_bench.datasets.segmentation import (
    Crop,
    GeometryParams,
    SegmentationDataset,
    View,
    image_hw,
    label_map_masks,
    make_sample,
    open_label_png,
    validate_params,
)

ENV_ROOT = "OCL_BENCH_VOC"
IGNORE = 255
CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
WHERE = (
    "VOC 2012 is VOCtrainval_11-May-2012.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ "
    "(trainaug.txt comes with the SBD augmented set); set dataset.root (or "
    f"${ENV_ROOT}) to its VOCdevkit/VOC2012 folder"
)


@dataclass(frozen=True)
class VocParams(GeometryParams):
    """After `root` come GeometryParams' image_size (224), mask_size (320), interpolation
    ("bicubic") and the resize rules, then the VOC params below."""

    root: str = param(
        "", f"VOC2012 folder (or one holding VOCdevkit/VOC2012); '' reads ${ENV_ROOT}"
    )
    train_list: str = param(
        "",
        "image list of the train split in ImageSets/Segmentation ('' = trainaug.txt if "
        "present, else train.txt)",
    )
    class_folder: str = param(
        "SegmentationClass",
        "folder of the class PNGs ('SegmentationClassAug': SBD's, which cover trainaug)",
    )
    void: Literal["ignore", "background"] = param(
        "ignore",
        "label 255 (object outlines, difficult regions): 'ignore' them in every metric (OCLF) "
        "or count them as 'background' (SPOT's loader sets them to 0; no ignore mask)",
        since="0.2",
    )
    train_crop: Crop = param("random", "crop of the train split: 'random' (SPOT VOC) or 'center'")
    hflip: bool = param(True, "flip train images left-right with p=0.5, drawn from (seed, index)")
    seed: int = param(0, "seed of the train split's flips and random crops", ge=0)

    def __post_init__(self) -> None:
        validate_params(self, "voc")
        if self.void not in ("ignore", "background"):
            raise DatasetParamError(
                f"dataset 'voc': void must be 'ignore' or 'background', got {self.void!r}"
            )


def _find_root(text: str) -> Path:
    root = Path(text).expanduser()
    for candidate in (root, root / "VOCdevkit" / "VOC2012", root / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DataError(
        f"dataset 'voc': no JPEGImages/ folder in {root} (nor in VOCdevkit/VOC2012 or VOC2012 "
        f"below it). {WHERE}"
    )


class VocDataset(SegmentationDataset):
    """PASCAL VOC 2012 instance and class masks with SPOT/OCLF centre-crop evaluation geometry.

    Images are float[3,224,224] in [0, 1]; masks, ignore_mask (label 255) and boxes are at
    mask_size (320). SegmentationDataset adds len(), image_size, mask_size, collate and the
    train view.
    """

    kind = "dataset"
    name = "voc"
    Params = VocParams
    # {fixtures}/voc holds VOCdevkit/VOC2012 (as VOCtrainval unpacks) with train.txt and
    # val.txt (tests/test_coco_voc.py's make_voc writes a tiny one).
    conformance = {
        "dataset.root": "{fixtures}/voc",
        "dataset.image_size": 32,
        "dataset.mask_size": 32,
    }
    provides = SEGMENTATION_PROVIDES

    def __init__(self, params: VocParams | None = None, split: str = "train"):
        self.params = params if params is not None else VocParams()
        p = self.params  # validated when made (VocParams.__post_init__)
        self.split = split
        self.split_id = check_split(split)
        if split not in ("train", "val"):
            raise DatasetParamError(
                f"dataset 'voc' has no annotated {split!r} split; use 'train' or 'val'"
            )
        root_text = p.root or os.environ.get(ENV_ROOT, "")
        if not root_text:
            raise DataError(f"dataset 'voc': no root given (dataset.root or ${ENV_ROOT}). {WHERE}")
        self.root = _find_root(root_text)
        lists = self.root / "ImageSets" / "Segmentation"
        if split == "val":
            self.list_file = lists / "val.txt"
        elif p.train_list:
            self.list_file = lists / p.train_list
        else:
            trainaug = lists / "trainaug.txt"
            self.list_file = trainaug if trainaug.is_file() else lists / "train.txt"
        if not self.list_file.is_file():
            raise DataError(f"dataset 'voc': image list not found: {self.list_file}. {WHERE}")
        try:
            text = self.list_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"dataset 'voc': cannot read {self.list_file}: {err}") from err
        self.ids = [line.split()[0] for line in text.splitlines() if line.strip()]
        self._length = len(self.ids)

        files = [self._label_files(i) for i in self.ids]
        found = [(objects.is_file(), classes.is_file()) for objects, classes in files]
        missing = [f for pair, there in zip(files, found) for f, ok in zip(pair, there) if not ok]
        if missing and split == "val":
            raise DataError(
                f"dataset 'voc': {len(missing)} label PNGs of {self.list_file.name} are missing, "
                f"first {missing[0]}. {WHERE}"
            )
        self.has_masks = not missing
        # SBD's trainaug images have class PNGs (SegmentationClassAug) but no object PNGs: such
        # a split yields class masks only (what a probe matched on classes needs, GLASS A.2)
        self.has_classes = all(classes for _, classes in found)

    def _label_files(self, image_id: str) -> tuple[Path, Path]:
        return (
            self.root / "SegmentationObject" / f"{image_id}.png",
            self.root / self.params.class_folder / f"{image_id}.png",
        )

    # ----------------------------------------------------------------- description
    @property
    def num_classes(self) -> int:
        """21: background (0) and the 20 VOC classes; labels are 1..20."""
        return len(CLASS_NAMES)

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASS_NAMES

    # ----------------------------------------------------------------- samples
    def _check_index(self, index: int) -> int:
        return check_index(index, len(self.ids), f"voc {self.split} split")

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        image_id = self.ids[index]
        path = self.root / "JPEGImages" / f"{image_id}.jpg"
        img = self._load_image(path)
        height, width = image_hw(img)
        view = self._view(index)
        image = self._image(img, view)
        object_file, class_file = self._label_files(image_id)
        if not self.has_masks:
            if not self.has_classes:
                return {"image": image, "index": index}
            return self._class_sample(image, class_file, (height, width), view, index)

        objects = open_label_png(object_file, "dataset 'voc'")
        classes = open_label_png(class_file, "dataset 'voc'")
        for name, array in (("SegmentationObject", objects), ("SegmentationClass", classes)):
            if array.shape != (height, width):
                raise DataError(
                    f"dataset 'voc': {name}/{image_id}.png is {array.shape[1]}x{array.shape[0]} "
                    f"but {path.name} is {width}x{height}"
                )
        ids = [int(i) for i in np.unique(objects) if i not in (0, IGNORE)]
        labels = []
        for i in ids:
            under = classes[objects == i]
            under = under[under != IGNORE]
            labels.append(int(np.bincount(under).argmax()) if under.size else 0)

        maps = self._maps(torch.from_numpy(np.stack([objects, classes])), view)
        object_map, class_map = maps[0].long(), maps[1].long()
        ignore = (object_map == IGNORE) | (class_map == IGNORE)
        if self.params.void == "background":  # SPOT: 255 -> 0 in both maps, no ignore mask
            ignore = torch.zeros_like(ignore)
        id_tensor = torch.tensor(ids, dtype=torch.long)
        masks = object_map[None] == id_tensor[:, None, None]
        class_masks, class_ids = label_map_masks(class_map, exclude=(0, IGNORE))
        label_tensor = torch.tensor(labels, dtype=torch.long)
        return make_sample(image, masks, label_tensor, ignore, class_masks, class_ids, index)

    def _class_sample(
        self, image: torch.Tensor, class_file: Path, hw: tuple[int, int], view: View, index: int
    ) -> dict[str, Any]:
        """Image, class masks, their ids and the 255 ignore mask of an image without objects."""
        classes = open_label_png(class_file, "dataset 'voc'")
        if classes.shape != hw:
            raise DataError(
                f"dataset 'voc': {class_file} is {classes.shape[1]}x{classes.shape[0]} but its "
                f"image is {hw[1]}x{hw[0]}"
            )
        class_map = self._maps(torch.from_numpy(classes[None]), view)[0].long()
        class_masks, class_ids = label_map_masks(class_map, exclude=(0, IGNORE))
        return {
            "image": image,
            "class_masks": class_masks,
            "class_ids": class_ids,
            "ignore_mask": (class_map == IGNORE) & (self.params.void == "ignore"),
            "index": index,
        }


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [VocDataset]
