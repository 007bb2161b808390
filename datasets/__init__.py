"""Shared dataset helpers: parameter errors and the collate that turns samples into a Batch.

A dataset sample is a dict with any of these keys (each optional except "image"):

    image: float[3,H,W] in [0, 1]
    instance_masks: bool[M,H,W]        boxes: float[M,4]        labels: long[M]
    class_masks: bool[C,H,W]           class_ids: long[C]
    ignore_mask: bool[H,W]
    properties: name -> tensor[M] (long for categorical, float for continuous)
    caption: str                       index: int
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ocl_bench.api.contracts import Batch
from ocl_bench.api.errors import ConfigError

SPLITS = ("train", "val", "test")

# Padding values of per-object fields.
LABEL_PAD = -1
CATEGORICAL_PAD = -1
CONTINUOUS_PAD = 0.0


class DatasetParamError(ConfigError, ValueError):
    """A dataset parameter or split that is not allowed (both a ConfigError and a ValueError)."""


def check_split(split: str) -> int:
    """The id of `split` (train=0, val=1, test=2); anything else raises DatasetParamError."""
    if split not in SPLITS:
        allowed = ", ".join(repr(s) for s in SPLITS)
        raise DatasetParamError(f"unknown split {split!r}; expected one of {allowed}")
    return SPLITS.index(split)


def check_index(index: int, length: int, what: str) -> int:
    """A sample index, negative ones counted from the end; IndexError names `what`."""
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for {what} of {length}")
    return index


def _all_have(samples: Sequence[dict[str, Any]], key: str) -> bool:
    return all(key in s and s[key] is not None for s in samples)


def pad_stack(tensors: Sequence[Tensor], value: float | int | bool = 0) -> Tensor:
    """Stack tensors that differ only in their first dimension, padding it with `value`."""
    if not tensors:
        raise ValueError("pad_stack needs at least one tensor")
    longest = max(int(t.shape[0]) for t in tensors)
    rest = tuple(tensors[0].shape[1:])
    for t in tensors:
        if tuple(t.shape[1:]) != rest:
            raise ValueError(
                f"cannot stack tensors of shapes {tuple(tensors[0].shape)} and {tuple(t.shape)}"
            )
    out = torch.full((len(tensors), longest, *rest), value, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


def collate(samples: list[dict[str, Any]]) -> Batch:
    """Collate dataset samples into a Batch.

    Per-object fields are padded along M to the largest count in the batch: instance masks
    and boxes with zeros/False, labels with -1, categorical (integer) properties with -1 and
    continuous (float) properties with 0.0. Class masks are padded along C with False, their
    `class_ids` with -1 (`collate_class_ids`). A field is set only when every sample has it.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    images = torch.stack([s["image"] for s in samples])
    batch = Batch(images=images)
    if _all_have(samples, "instance_masks"):
        batch.instance_masks = pad_stack([s["instance_masks"] for s in samples], False)
    if _all_have(samples, "class_masks"):
        batch.class_masks = pad_stack([s["class_masks"] for s in samples], False)
    if _all_have(samples, "ignore_mask"):
        batch.ignore_mask = torch.stack([s["ignore_mask"] for s in samples])
    if _all_have(samples, "boxes"):
        batch.boxes = pad_stack([s["boxes"].float() for s in samples], 0.0)
    if _all_have(samples, "labels"):
        batch.labels = pad_stack([s["labels"].long() for s in samples], LABEL_PAD)
    if _all_have(samples, "properties"):
        names = sorted(set().union(*(s["properties"].keys() for s in samples)))
        props: dict[str, Tensor] = {}
        for name in names:
            if not all(name in s["properties"] for s in samples):
                continue
            values = [torch.as_tensor(s["properties"][name]) for s in samples]
            if values[0].is_floating_point():
                props[name] = pad_stack([v.float() for v in values], CONTINUOUS_PAD)
            else:
                props[name] = pad_stack([v.long() for v in values], CATEGORICAL_PAD)
        batch.properties = props
    if _all_have(samples, "caption"):
        batch.captions = [str(s["caption"]) for s in samples]
    if _all_have(samples, "index"):
        batch.index = torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)
    if _all_have(samples, "class_ids"):
        batch.class_ids = collate_class_ids(samples)
    return batch


def collate_class_ids(samples: list[dict[str, Any]]) -> Tensor:
    """long[B,C]: the category of each class mask of `collate(samples)`, -1 for padding."""
    return pad_stack([s["class_ids"].long() for s in samples], LABEL_PAD)
