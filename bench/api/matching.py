"""IoU matrices between sets of masks and Hungarian matching on them.

One module for every place that pairs slots with objects or with other slots: the object
discovery metrics (mBO, mIoU, CorLoc), the property probe, SPOT self-training and guidance
objectives. Pure functions (torch + scipy); B images, K and M masks per set, pixels in any
spatial layout after the set axis.

Two ways to get the overlap counts, one IoU rule:

- :func:`mask_overlap` takes two dense sets of masks, soft (probabilities) or hard, and is
  differentiable in soft masks (one batched matrix product).
- :func:`label_overlap` takes a label map (one slot index per pixel, the argmax of soft masks)
  and hard masks; it counts with one joint histogram, a few passes over the pixels whatever the
  number of labels, which is what evaluating hundreds of images at full resolution needs.

Both return an :class:`Overlap`; its :meth:`Overlap.iou` is ``inter / union``, 0 where the union
is empty (so an empty or padding mask has IoU 0 with everything). Ignored pixels leave every
intersection and every area, in both sets.

:func:`masks_to_pred` turns soft slot masks into a label map at a ground truth's size (OCLF's
rule), for every metric and figure that scores or draws slots.

:func:`hungarian_match` solves one assignment per image with
``scipy.optimize.linear_sum_assignment``, minimising or maximising, after dropping the rows and
columns that are padding; the index pairs it returns refer to the full matrix.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_HIST_BINS",
    "Matching",
    "Overlap",
    "hungarian_match",
    "label_overlap",
    "mask_iou",
    "mask_overlap",
]

# Bins of one histogram pass of label_overlap: bounds its memory (8 bytes a bin). Masks beyond
# what fits are counted in further passes.
DEFAULT_HIST_BINS = 1 << 20


class Overlap(NamedTuple):
    """Pixel counts (masses, for soft masks) shared by two sets of masks."""

    inter: Tensor  # [B,K,M]: pixels in mask k of the first set and mask m of the second
    area_a: Tensor  # [B,K]: pixels of mask k of the first set
    area_b: Tensor  # [B,M]: pixels of mask m of the second set

    @property
    def union(self) -> Tensor:
        """[B,K,M]: area_a + area_b - inter."""
        return self.area_a[:, :, None] + self.area_b[:, None, :] - self.inter

    def iou(self) -> Tensor:
        """[B,K,M] intersection over union, 0 where the union is empty."""
        union = self.union
        nonempty = union > 0
        return torch.where(
            nonempty, self.inter / torch.where(nonempty, union, 1), torch.zeros_like(union)
        )


def mask_overlap(
    masks_a: Tensor,
    masks_b: Tensor,
    ignore: Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Overlap:
    """Overlap of two dense mask sets [B,K,*S] and [B,M,*S]; ``ignore`` bool[B,*S] drops pixels.

    Soft masks count their mass: inter = sum_p a[k,p] * b[m,p] (the soft Jaccard of a soft
    prediction against a hard target; a soft mask is not its own perfect match). Counts are in
    ``dtype``: by default the floating dtype of the inputs, or float64 for bool/integer masks
    (exact pixel counts at any image size).
    """
    if masks_a.dim() < 3 or masks_a.dim() != masks_b.dim():
        raise ValueError(
            f"masks must be [B,K,*S] and [B,M,*S], got {tuple(masks_a.shape)} and"
            f" {tuple(masks_b.shape)}"
        )
    spatial = masks_a.shape[2:]
    if masks_b.shape[0] != masks_a.shape[0] or masks_b.shape[2:] != spatial:
        raise ValueError(
            f"mask sets {tuple(masks_a.shape)} and {tuple(masks_b.shape)} differ in batch or pixels"
        )
    if ignore is not None and ignore.shape != (masks_a.shape[0], *spatial):
        raise ValueError(
            f"ignore shape {tuple(ignore.shape)} does not match masks {tuple(masks_a.shape)}"
        )
    if dtype is None:
        floating = [m.dtype for m in (masks_a, masks_b) if m.dtype.is_floating_point]
        dtype = functools.reduce(torch.promote_types, floating) if floating else torch.float64
    a = masks_a.flatten(2).to(dtype)
    b = masks_b.flatten(2).to(dtype)
    if ignore is not None:
        keep = ~ignore.to(device=a.device, dtype=torch.bool).flatten(1)[:, None, :]
        a = a * keep
        b = b * keep
    inter = torch.bmm(a, b.transpose(1, 2))
    return Overlap(inter, a.sum(-1), b.sum(-1))


def mask_iou(masks_a: Tensor, masks_b: Tensor, ignore: Tensor | None = None) -> Tensor:
    """IoU matrix [B,K,M] of two dense mask sets (see :func:`mask_overlap`)."""
    return mask_overlap(masks_a, masks_b, ignore).iou()


def label_overlap(
    labels: Tensor,
    masks: Tensor,
    ignore: Tensor | None = None,
    num_labels: int | None = None,
    *,
    max_bins: int = DEFAULT_HIST_BINS,
) -> Overlap:
    """Overlap, in float64 pixel counts, of a label map and a set of hard masks.

    ``labels`` long[B,*S] holds one label (slot index) per pixel: the first set is its one-hot
    masks, K = ``num_labels`` (default ``labels.max() + 1``). ``masks`` bool[B,M,*S] is the
    second set (non-bool masks are read as ``masks > 0``); it may overlap and be zero-padded.
    ``ignore`` bool[B,*S] drops pixels from both sets. ``max_bins`` bounds the histogram of one
    pass.
    """
    masks = _checked_masks(labels, masks, ignore)
    b, m = masks.shape[:2]
    device = labels.device
    masks = masks.to(device)
    pixels = int(np.prod(masks.shape[2:]))
    k = _label_count(labels, num_labels)
    rows = b * (k + 1)  # label K collects ignored pixels and is dropped at the end

    # base[b, p] = b * (K + 1) + label, with label K for ignored pixels.
    index_dtype = torch.int32 if rows < 1 << 30 else torch.int64
    base = labels.reshape(b, pixels).to(index_dtype, copy=True)
    if ignore is not None:
        base.masked_fill_(ignore.to(device=device, dtype=torch.bool).reshape(b, pixels), k)
    base += (torch.arange(b, device=device, dtype=index_dtype) * (k + 1)).view(b, 1)

    if m == 0:
        hist = torch.bincount(base.reshape(-1), minlength=rows).view(b, k + 1)
        area_a = hist[:, :k].to(torch.float64)
        empty = torch.zeros(b, k, 0, dtype=torch.float64, device=device)
        return Overlap(empty, area_a, torch.zeros(b, 0, dtype=torch.float64, device=device))
    return _joint_counts(base, masks.reshape(b, m, pixels), k, max_bins)


def _checked_masks(labels: Tensor, masks: Tensor, ignore: Tensor | None) -> Tensor:
    """``masks`` as bool, once the shapes and dtypes of label_overlap's inputs agree."""
    if masks.dim() < 3:
        raise ValueError(f"masks must be [B,M,*S], got shape {tuple(masks.shape)}")
    masks = masks if masks.dtype == torch.bool else masks > 0
    b = masks.shape[0]
    spatial = tuple(masks.shape[2:])
    if labels.dim() != masks.dim() - 1:
        raise ValueError(
            f"labels must be [B,*S] for masks [B,M,*S], got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer slot indices, got {labels.dtype}")
    if labels.shape != (b, *spatial):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match masks {tuple(masks.shape)}"
        )
    if ignore is not None and ignore.shape != (b, *spatial):
        raise ValueError(
            f"ignore shape {tuple(ignore.shape)} does not match masks {tuple(masks.shape)}"
        )
    return masks


def _label_count(labels: Tensor, num_labels: int | None) -> int:
    """K, the number of labels (at least 1); checks that every label is in 0..K-1."""
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0:
            raise ValueError(f"labels hold a negative slot index ({lo})")
    else:
        hi = -1
    k = hi + 1 if num_labels is None else int(num_labels)
    if hi >= k:
        raise ValueError(f"labels hold slot index {hi} but num_labels={k}")
    return max(k, 1)


def _joint_counts(base: Tensor, masks: Tensor, k: int, max_bins: int) -> Overlap:
    """The overlap of the rows in ``base`` int[B,P] (see label_overlap) with ``masks``
    bool[B,M,P], M >= 1, in passes of as many masks as ``max_bins`` allows."""
    b, m = masks.shape[:2]
    rows = b * (k + 1)
    device = base.device
    # Each mask is one bit of a per-pixel code; bincount over (row, code) gives the joint
    # histogram, and a 0/1 matrix product turns codes back into per-mask intersections.
    bits = max(1, min(m, (max_bins // rows).bit_length() - 1))
    packed = _PackedMasks(masks)
    inter_parts = []
    area_a = None
    for start in range(0, m, bits):
        nbits = min(bits, m - start)
        key_dtype = torch.int32 if rows << nbits < 1 << 31 else torch.int64
        key = base.to(key_dtype, copy=nbits < m)  # a single pass may reuse the buffer
        key <<= nbits
        widened = torch.empty_like(key)  # mixed-dtype in-place ops are slow; widen explicitly
        for byte in range(0, nbits, 8):
            widened.copy_(packed.codes(start + byte, min(8, nbits - byte)))
            if byte:
                widened <<= byte
            key |= widened
        del widened
        hist = torch.bincount(key.reshape(-1), minlength=rows << nbits)
        del key
        hist = hist.view(rows, 1 << nbits).to(torch.float64)
        codes = torch.arange(1 << nbits, device=device)
        code_bits = ((codes[:, None] >> torch.arange(nbits, device=device)) & 1).to(torch.float64)
        inter_parts.append((hist @ code_bits).view(b, k + 1, nbits)[:, :k])
        if area_a is None:
            area_a = hist.sum(1).view(b, k + 1)[:, :k]
    inter = torch.cat(inter_parts, dim=2) if len(inter_parts) > 1 else inter_parts[0]
    return Overlap(inter, area_a, inter.sum(1))


class _PackedMasks:
    """Per-pixel codes holding up to 8 masks as bits of one byte.

    Mask bytes are 0/1, so shifting a mask left by j < 8 stays inside each byte: reading the
    bytes as int64 handles 8 pixels per element.
    """

    def __init__(self, masks: Tensor) -> None:  # bool[B,M,P]
        self.pixels = masks.shape[2]
        data = masks.view(torch.uint8)
        if self.pixels % 8:
            data = F.pad(data, (0, 8 - self.pixels % 8))
        elif data.storage_offset() % 8 or not data.is_contiguous():
            data = data.clone(memory_format=torch.contiguous_format)
        self.words = data.view(torch.int64)  # int64[B,M,ceil(P/8)]

    def codes(self, start: int, count: int) -> Tensor:
        """uint8[B,P]: bit j is mask ``start + j`` for j < count <= 8."""
        acc = self.words[:, start].clone()
        shifted = torch.empty_like(acc)
        for j in range(1, count):
            torch.bitwise_left_shift(self.words[:, start + j], j, out=shifted)
            acc |= shifted
        return acc.view(torch.uint8)[:, : self.pixels]


class Matching(NamedTuple):
    """One image's assignment: row ``rows[i]`` is matched to column ``cols[i]`` (int64 arrays,
    rows ascending), indices into the full matrix."""

    rows: np.ndarray
    cols: np.ndarray


def hungarian_match(
    scores: Tensor | np.ndarray,
    *,
    maximize: bool = False,
    valid_rows: Tensor | np.ndarray | None = None,
    valid_cols: Tensor | np.ndarray | None = None,
) -> list[Matching]:
    """Optimal one-to-one assignment per image of a cost (or, with ``maximize``, score) matrix.

    ``scores`` [B,K,M]; ``valid_rows`` bool[B,K] and ``valid_cols`` bool[B,M] mark the real
    entries (padding and empty masks are False and never matched). Each image matches
    min(valid rows, valid cols) pairs; an image without a valid row or column matches none.
    Ties are broken as ``scipy.optimize.linear_sum_assignment`` breaks them on the valid
    sub-matrix.
    """
    from scipy.optimize import linear_sum_assignment

    matrices = _numpy(scores)
    if matrices.ndim != 3:
        raise ValueError(f"scores must be [B,K,M], got shape {matrices.shape}")
    b, k, m = matrices.shape
    row_ok = _valid(valid_rows, (b, k), "valid_rows")
    col_ok = _valid(valid_cols, (b, m), "valid_cols")
    out = []
    for i, matrix in enumerate(matrices):
        row_ids = np.arange(k) if row_ok is None else np.flatnonzero(row_ok[i])
        col_ids = np.arange(m) if col_ok is None else np.flatnonzero(col_ok[i])
        if row_ids.size == 0 or col_ids.size == 0:
            none = np.zeros(0, dtype=np.int64)
            out.append(Matching(none, none.copy()))
            continue
        if row_ok is None:
            matrix = matrix if col_ok is None else matrix[:, col_ids]
        else:
            matrix = matrix[np.ix_(row_ids, col_ids)]
        rows, cols = linear_sum_assignment(matrix, maximize=maximize)
        out.append(Matching(row_ids[rows].astype(np.int64), col_ids[cols].astype(np.int64)))
    return out


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _valid(
    mask: Tensor | np.ndarray | None, shape: tuple[int, int], name: str
) -> np.ndarray | None:
    if mask is None:
        return None
    mask = _numpy(mask).astype(bool, copy=False)
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {mask.shape}")
    return mask


def masks_to_pred(soft_masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Turn soft slot masks float[B,K,h,w] into slot indices long[B,H,W] at ``size=(H, W)``.

    As in OCLF, masks are upsampled bilinearly (``align_corners=False``) *before* the argmax;
    ties go to the lowest slot index. Computation happens in the dtype of ``soft_masks``.
    """
    if soft_masks.dim() != 4:
        raise ValueError(f"soft_masks must be [B,K,h,w], got shape {tuple(soft_masks.shape)}")
    size = (int(size[0]), int(size[1]))
    if tuple(soft_masks.shape[-2:]) != size:
        soft_masks = F.interpolate(soft_masks, size=size, mode="bilinear", align_corners=False)
    return soft_masks.argmax(dim=1)
