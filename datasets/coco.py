"""COCO 2017 instance segmentation (`instances_{split}2017.json`, decoded with pycocotools).

Layout under `root` (from https://cocodataset.org/#download, annotations_trainval2017.zip plus
train2017.zip / val2017.zip):

    root/annotations/instances_train2017.json   root/train2017/*.jpg
    root/annotations/instances_val2017.json     root/val2017/*.jpg

Every image listed in the annotation file is a sample, in file order, annotated or not (as in
SPOT). Defaults follow the SPOT / OCLF "ccrop" evaluation (see ocl_bench.datasets.segmentation):
image short side 224 (bicubic) + centre crop 224, masks short side 320 (PIL nearest) + centre
crop 320. The train split adds a horizontal flip (p = 0.5) after the centre crop, as in SPOT's
and DINOSAUR's COCO training; the flip is a pure function of (seed, index), so a run is
deterministic (the same image gets the same flip every epoch).

Per sample: instance masks (one per annotation, annotation order, dropped when the crop leaves
it empty) with labels = COCO category ids (1..90) and boxes computed from the transformed masks
(x2/y2 exclusive, in mask pixels); ignore_mask = pixels covered by two or more instances (SPOT's
`mask_ignore`; see `overlaps_ignored`), plus crowd pixels with `crowd = "ignore"`; class masks
built from the instance masks as OCLF does (each pixel takes the highest category id covering
it, so class masks keep overlap pixels), ascending category id.

Crowd annotations (`iscrowd = 1`), parameter `crowd`:

- "keep" (default): crowd regions are ordinary objects. This is what SPOT's evaluation does
  (its COCO loader decodes every annotation of an image, crowd included); the published SPOT
  COCO numbers were measured this way.
- "drop": crowd annotations are removed and their pixels are background. This is OCLF's
  `coco_nocrowd` validation set (DINOSAUR), which keeps all 5000 images.
- "ignore": crowd annotations are removed and their pixels go to ignore_mask.
- "drop_image": images with any crowd annotation are left out of the split.

Overlaps, parameter `overlap_painting` (since 0.2):

- "none" (default): every instance keeps its whole mask; overlap pixels belong to several
  instances (and go to ignore_mask with `overlaps_ignored`), class masks as above.
- "later_wins": as GLASS's COCO loader paints its maps: each pixel belongs to the last
  annotation (file order) covering it, so instance masks are disjoint (an instance hidden
  entirely is dropped), and class masks take that annotation's category, not the highest id.
  With `overlaps_ignored` the pixels two or more annotations cover still go to ignore_mask
  (SlotDiffusion's `inst_overlap_masks` beside its later-wins maps); GLASS scores them, so
  its protocol sets `overlaps_ignored = false`.

`skip_ignore_flagged` and `skip_unknown_categories` (since 0.2) leave out annotations with a
true `ignore` field and those whose category is not in the file's `categories`, as GLASS's
loader does; by default both are kept as objects.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from ocl_bench.api.errors import DataError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.datasets import DatasetParamError, check_index, check_split
from ocl_bench.datasets.base import SEGMENTATION_PROVIDES
from ocl_bench.datasets.segmentation import (
    Crop,
    CrowdMode,
    GeometryParams,
    SegmentationDataset,
    View,
    class_masks_from_instances,
    image_hw,
    label_map_masks,
    make_sample,
    overlap_mask,
    validate_params,
)

ENV_ROOT = "OCL_BENCH_COCO"
OverlapPainting = Literal["none", "later_wins"]
OVERLAP_PAINTING: tuple[str, ...] = get_args(OverlapPainting)
SPLIT_DIRS = {"train": "train2017", "val": "val2017"}
WHERE = (
    "COCO 2017 is at https://cocodataset.org/#download: unpack annotations_trainval2017.zip and "
    "{folder}.zip into one folder so that it holds annotations/instances_{folder}.json and "
    f"{{folder}}/, then set dataset.root (or ${ENV_ROOT}) to that folder"
)


def _mask_api() -> Any:
    try:
        from pycocotools import mask as mask_api
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise DataError(
            "dataset 'coco' needs pycocotools to decode masks: pip install 'pycocotools>=2.0'"
        ) from err
    return mask_api


@dataclass(frozen=True)
class CocoParams(GeometryParams):
    """After `root` come GeometryParams' image_size (224), mask_size (320), interpolation
    ("bicubic") and the resize rules, then the COCO params below."""

    root: str = param(
        "", f"folder holding annotations/ and train2017/, val2017/ ('' reads ${ENV_ROOT})"
    )
    crowd: CrowdMode = param(
        "keep",
        "iscrowd annotations: 'keep' as objects (SPOT eval), 'drop' them (pixels become "
        "background; OCLF coco_nocrowd), 'ignore' their pixels, 'drop_image' skips such images",
    )
    overlaps_ignored: bool = param(
        True,
        "put pixels covered by several instances in ignore_mask (SPOT: its mBO_c ignores them "
        "too); false leaves them to the task's ignore_overlaps (OCLF: class mBO scores them)",
    )
    min_area: float = param(
        0.0, "drop objects whose COCO 'area' (original pixels) is below this; 0 keeps all", ge=0
    )
    overlap_painting: OverlapPainting = param(
        "none",
        "'none': instances keep their whole masks and may overlap; 'later_wins': each pixel "
        "belongs to the last annotation (file order) covering it, in instance and class masks "
        "(GLASS's loader)",
        since="0.2",
    )
    skip_ignore_flagged: bool = param(
        False,
        "leave out annotations whose 'ignore' field is true (GLASS); false keeps them as objects",
        since="0.2",
    )
    skip_unknown_categories: bool = param(
        False,
        "leave out annotations whose category_id is not in the file's categories (GLASS); false "
        "keeps them as objects",
        since="0.2",
    )
    train_crop: Crop = param(
        "center", "crop of the train split: 'center' (SPOT, DINOSAUR) or 'random'"
    )
    hflip: bool = param(True, "flip train images left-right with p=0.5, drawn from (seed, index)")
    seed: int = param(0, "seed of the train split's flips and random crops", ge=0)

    def __post_init__(self) -> None:
        validate_params(self, "coco")
        if self.overlap_painting not in OVERLAP_PAINTING:
            raise DatasetParamError(
                "dataset 'coco': overlap_painting must be 'none' or 'later_wins', got "
                f"{self.overlap_painting!r}"
            )


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"dataset 'coco': cannot read annotation file {path}: {err}") from err
    if not isinstance(data, dict):
        data = {}
    missing = [k for k in ("images", "annotations") if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(
            f"dataset 'coco': {path} is not a COCO instances file (no {', '.join(missing)} list)"
        )
    _check_entries(data, path)
    return data


# The fields of each entry that loading and decoding read, and the JSON types they must have.
_ENTRY_FIELDS = {
    "images": {"id": int, "file_name": str, "height": int, "width": int},
    "annotations": {"image_id": int, "category_id": int, "segmentation": (list, dict)},
    "categories": {"id": int},
}


def _check_entries(data: dict[str, Any], path: Path) -> None:
    """One line naming the file and the first bad entry, instead of a KeyError mid-epoch."""
    if not isinstance(data.get("categories", []), list):
        raise DataError(f"dataset 'coco': {path}: 'categories' is not a list")
    for section, fields in _ENTRY_FIELDS.items():
        for i, entry in enumerate(data.get(section, [])):
            if not isinstance(entry, dict):
                raise DataError(
                    f"dataset 'coco': {path}: {section}[{i}] is {type(entry).__name__}, expected"
                    " an object"
                )
            for key, kind in fields.items():
                value = entry.get(key)
                if not isinstance(value, kind) or isinstance(value, bool):
                    want = "a list or object" if kind == (list, dict) else kind.__name__
                    found = f"{key}={value!r:.40}" if key in entry else f"no {key!r}"
                    raise DataError(
                        f"dataset 'coco': {path}: {section}[{i}] (id {entry.get('id')!r:.20}) has"
                        f" {found}, expected {want}; not a COCO instances file"
                    )
            area = entry.get("area", 0.0)
            if section == "annotations" and (
                not isinstance(area, (int, float)) or isinstance(area, bool)
            ):
                raise DataError(
                    f"dataset 'coco': {path}: annotations[{i}] (id {entry.get('id')!r}) has"
                    f" area={area!r}, expected a number"
                )


class CocoDataset(SegmentationDataset):
    """COCO 2017 instance masks (pycocotools) with SPOT/OCLF centre-crop evaluation geometry.

    Images are float[3,224,224] in [0, 1]; masks, ignore_mask and boxes are at mask_size (320).
    SegmentationDataset adds len(), image_size, mask_size, collate and the train view.
    """

    kind = "dataset"
    name = "coco"
    Params = CocoParams
    # {fixtures}/coco holds annotations/instances_{train,val}2017.json and both image
    # folders (tests/test_coco_voc.py's make_coco writes a tiny one).
    conformance = {
        "dataset.root": "{fixtures}/coco",
        "dataset.image_size": 32,
        "dataset.mask_size": 32,
    }
    provides = SEGMENTATION_PROVIDES

    def __init__(self, params: CocoParams | None = None, split: str = "train"):
        self.params = params if params is not None else CocoParams()
        p = self.params  # validated when made (CocoParams.__post_init__)
        self.split = split
        self.split_id = check_split(split)
        if split not in SPLIT_DIRS:
            raise DatasetParamError(
                f"dataset 'coco' has no annotated {split!r} split; use 'train' (train2017) or "
                "'val' (val2017)"
            )
        folder = SPLIT_DIRS[split]
        where = WHERE.format(folder=folder)
        root_text = p.root or os.environ.get(ENV_ROOT, "")
        if not root_text:
            raise DataError(f"dataset 'coco': no root given (dataset.root or ${ENV_ROOT}). {where}")
        self.root = Path(root_text).expanduser()
        self.annotation_file = self.root / "annotations" / f"instances_{folder}.json"
        self.image_dir = self.root / folder
        if not self.annotation_file.is_file():
            raise DataError(
                f"dataset 'coco': annotation file not found: {self.annotation_file}. {where}"
            )
        if not self.image_dir.is_dir():
            raise DataError(f"dataset 'coco': image folder not found: {self.image_dir}. {where}")
        self._mask_api = _mask_api()

        data = _load_json(self.annotation_file)
        self.categories: dict[int, str] = {
            int(c["id"]): str(c.get("name", c["id"])) for c in data.get("categories", [])
        }
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
        images = data["images"]
        if p.crowd == "drop_image":
            crowded = {i for i, anns in by_image.items() if any(a.get("iscrowd", 0) for a in anns)}
            images = [im for im in images if int(im["id"]) not in crowded]
        self._images: list[dict[str, Any]] = images
        self._length = len(images)
        self._anns = by_image

    # ----------------------------------------------------------------- description
    @property
    def num_classes(self) -> int:
        """One more than the largest category id (labels are raw COCO ids, 1..90)."""
        return max(self.categories, default=0) + 1

    @property
    def class_names(self) -> dict[int, str]:
        return dict(self.categories)

    # ----------------------------------------------------------------- samples
    def image_info(self, index: int) -> dict[str, Any]:
        """The annotation file's entry of sample `index` (id, file_name, height, width, ...)."""
        return self._images[self._check_index(index)]

    def _check_index(self, index: int) -> int:
        return check_index(index, len(self._images), f"coco {self.split} split")

    def _decode(self, ann: dict[str, Any], height: int, width: int, path: Path) -> np.ndarray:
        api = self._mask_api
        seg = ann.get("segmentation")
        try:
            if isinstance(seg, list):  # polygons
                rle = api.merge(api.frPyObjects(seg, height, width))
            elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
                rle = api.frPyObjects(seg, height, width)
            elif isinstance(seg, dict):  # compressed RLE
                rle = seg
            else:
                raise ValueError(f"unsupported segmentation {type(seg).__name__}")
            with warnings.catch_warnings():  # pycocotools' numpy-2 copy=False notice
                warnings.simplefilter("ignore", DeprecationWarning)
                mask = api.decode(rle)
        except Exception as err:
            raise DataError(
                f"dataset 'coco': cannot decode segmentation of annotation {ann.get('id')} "
                f"(image {path}) in {self.annotation_file}: {err}"
            ) from err
        if mask.shape != (height, width):
            raise DataError(
                f"dataset 'coco': annotation {ann.get('id')} of {path} has mask size "
                f"{mask.shape}, expected {(height, width)}"
            )
        return mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        p = self.params
        info = self._images[index]
        path = self.image_dir / str(info["file_name"])
        img = self._load_image(path)
        height, width = int(info["height"]), int(info["width"])
        if image_hw(img) != (height, width):
            raise DataError(
                f"dataset 'coco': {path} is {image_hw(img)[1]}x{image_hw(img)[0]} but "
                f"{self.annotation_file.name} says {width}x{height}"
            )
        view = self._view(index)
        image = self._image(img, view)

        objects: list[np.ndarray] = []
        labels: list[int] = []
        crowd = np.zeros((height, width), dtype=np.uint8)
        for ann in self._anns.get(int(info["id"]), []):
            if p.skip_ignore_flagged and ann.get("ignore", False):
                continue
            if p.skip_unknown_categories and int(ann["category_id"]) not in self.categories:
                continue
            is_crowd = bool(ann.get("iscrowd", 0))
            if is_crowd and p.crowd == "drop":
                continue
            if is_crowd and p.crowd == "ignore":
                crowd |= self._decode(ann, height, width, path)
                continue
            if p.min_area > 0 and float(ann.get("area", 0.0)) < p.min_area:
                continue
            objects.append(self._decode(ann, height, width, path))
            labels.append(int(ann["category_id"]))

        side = p.mask_size or p.image_size
        label_tensor = torch.tensor(labels, dtype=torch.long)
        if p.overlap_painting == "later_wins":
            masks, class_masks, class_ids = self._painted(objects, label_tensor, view)
        else:
            stack = np.stack(objects) if objects else np.zeros((0, height, width), np.uint8)
            masks = self._maps(torch.from_numpy(stack), view).bool()
            class_masks, class_ids = class_masks_from_instances(masks, label_tensor)
        ignore = torch.zeros((side, side), dtype=torch.bool)
        if p.overlaps_ignored and p.overlap_painting == "later_wins" and objects:
            # painted masks are disjoint: the overlaps are the annotations' own (SlotDiffusion)
            covered = np.sum(np.stack(objects) > 0, axis=0, dtype=np.uint8) >= 2
            ignore |= self._maps(torch.from_numpy(covered[None].astype(np.uint8)), view)[0].bool()
        elif p.overlaps_ignored:
            ignore |= overlap_mask(masks)
        if p.crowd == "ignore":
            ignore |= self._maps(torch.from_numpy(crowd[None]), view)[0].bool()
        return make_sample(image, masks, label_tensor, ignore, class_masks, class_ids, index)

    def _painted(
        self, objects: list[np.ndarray], labels: torch.Tensor, view: View
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(instance masks, class masks, class ids) painted later-wins, as GLASS's loader paints
        its instance and semantic maps: an owner map at the original resolution (annotation k
        paints k + 1 over whatever is there), resized as one label map (nearest resizing picks
        the same source pixel for every map, so this equals painting the resized masks)."""
        if not objects:
            empty = torch.zeros((0, *self.mask_size), dtype=torch.bool)
            return empty, empty, torch.zeros(0, dtype=torch.long)
        owner_np = np.zeros(objects[0].shape, dtype=np.int32)
        for k, mask in enumerate(objects):
            owner_np[mask > 0] = k + 1
        owner = self._maps(torch.from_numpy(owner_np[None]), view)[0].long()
        masks = owner[None] == torch.arange(1, len(objects) + 1)[:, None, None]
        category_of = torch.cat([torch.zeros(1, dtype=torch.long), labels])  # owner 0: none
        class_masks, class_ids = label_map_masks(category_of[owner])
        return masks, class_masks, class_ids


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [CocoDataset]
