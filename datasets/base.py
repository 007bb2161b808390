"""What every built-in dataset plugin has in common (shapes, image_folder, coco, voc).

A subclass sets, in its `__init__`: `params` (its Params, with an `image_size` field), `split`,
`split_id` (from `check_split`) and `_length` (the number of samples of the split). It then
gets `len()`, square `image_size`, the shared `collate` and, unless it overrides them, no
per-object `property_specs`.
"""

from __future__ import annotations

from typing import Any

from ocl_bench.api.contracts import Batch
from ocl_bench.api.plugin import Dataset
from ocl_bench.datasets import collate as collate_samples

# What every segmentation dataset yields (coco and voc exactly; shapes adds its properties
# and captions).
SEGMENTATION_PROVIDES = frozenset(
    {
        "batch.images",
        "batch.instance_masks",
        "batch.class_masks",
        "batch.class_ids",
        "batch.ignore_mask",
        "batch.boxes",
        "batch.labels",
        "batch.index",
    }
)


class DatasetPlugin(Dataset):
    """Base of the dataset plugins: length, image size, collate and property specs."""

    params: Any
    split: str
    split_id: int
    _length: int

    def __len__(self) -> int:
        return self._length

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images: square, `params.image_size` pixels a side."""
        return (self.params.image_size, self.params.image_size)

    def property_specs(self) -> dict[str, tuple[str, int]]:
        """name -> ("categorical", number of classes) or ("continuous", dimension); none here."""
        return {}

    @staticmethod
    def collate(samples: list[dict[str, Any]]) -> Batch:
        """Samples -> Batch, per-object fields padded (see ocl_bench.datasets.collate)."""
        return collate_samples(samples)
