"""Per-image object discovery metrics following OCLF conventions.

Pure functions (torch + scipy). Shapes: B images, K slots, M ground-truth objects, H x W pixels.

Inputs shared by every metric:

- ``pred``: long[B,H,W], the slot index of each pixel (argmax already taken; see
  :func:`masks_to_pred`). Every slot index is a candidate, including "background" slots.
- ``gt``: bool[B,M,H,W], one mask per object, zero-padded along M. Non-bool tensors are read
  as ``gt > 0``.
- ``ignore``: bool[B,H,W] or None. Ignored pixels are removed from both the prediction and the
  ground truth: they leave every intersection, union and FG-ARI's contingency table.

Pixels covered by more than one GT mask are *not* ignored automatically. OCLF's instance-mask
metrics ignore them; to do the same, pass ``ignore=ignore_overlaps(gt, ignore)``. Without that,
such a pixel counts in the intersection of every mask covering it, and in FG-ARI it counts once
in each of those rows (OCLF's formula with a multi-hot target row).

Every metric returns a float64 tensor[B] of per-image values on ``pred``'s device; report the
mean over the non-NaN entries, as OCLF does.

- FG-ARI: adjusted Rand index over foreground pixels (pixels in no GT mask drop out). An image
  with no foreground pixels scores 1.0 and is counted (never NaN).
- IoU family (mBO, mIoU, CorLoc, detection rate): GT masks that are empty (padding, or emptied by
  ``ignore``) are dropped; an image with no GT mask left is skipped (NaN). An IoU whose union is
  empty is 0. "Detected" means best IoU over slots strictly greater than 0.5.

All counts come from one joint histogram of (image, slot, GT-membership bits) built with
``torch.bincount`` (``ocl_bench.api.matching.label_overlap``), so the cost is a few passes over the
pixels; only the Hungarian matching of mIoU (``ocl_bench.api.matching.hungarian_match``) loops over
images (on a K x M matrix). The property probe and SPOT self-training share that module, so a
slot-object IoU means the same thing everywhere.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ocl_bench.api.matching import (
    DEFAULT_HIST_BINS,
    Overlap,
    hungarian_match,
    label_overlap,
    masks_to_pred,
)

__all__ = [
    "all_metrics",
    "corloc",
    "detection_rate",
    "fg_ari",
    "ignore_overlaps",
    "masks_to_pred",
    "mbo",
    "miou",
]

METRIC_NAMES = ("fg_ari", "mbo", "miou", "corloc", "detection_rate")

# Upper bound on histogram bins per pass; GT masks are processed in groups of as many bits as fit.
_MAX_HIST_BINS = DEFAULT_HIST_BINS


def ignore_overlaps(gt: Tensor, ignore: Tensor | None = None) -> Tensor:
    """Return bool[B,H,W]: ``ignore`` OR pixels covered by more than one GT mask of ``gt``."""
    gt = _as_bool(gt)
    seen = torch.zeros(gt.shape[0], *gt.shape[2:], dtype=torch.bool, device=gt.device)
    overlap = torch.zeros_like(seen)
    for m in range(gt.shape[1]):
        overlap |= seen & gt[:, m]
        seen |= gt[:, m]
    if ignore is not None:
        overlap |= ignore.to(device=gt.device, dtype=torch.bool)
    return overlap


def fg_ari(pred: Tensor, gt: Tensor, ignore: Tensor | None = None) -> Tensor:
    """Foreground adjusted Rand index per image, float64[B] (1.0 for images without foreground).

    OCLF's formula on the contingency table ``n_ij = sum_pixels T[p,i] * P[p,j]`` (GT rows i,
    slot columns j), evaluated in float64; it returns 1.0 whenever the maximum index does not
    exceed the expected index (``(A + B) / 2 - E <= 0``).
    """
    return _fg_ari(_counts(pred, gt, ignore))


def mbo(pred: Tensor, gt: Tensor, ignore: Tensor | None = None) -> Tensor:
    """Mean best overlap per image, float64[B]: mean over GTs of the max IoU over slots (NaN if
    no GT). A slot may be the best match of several GTs."""
    return _mbo(_iou(_counts(pred, gt, ignore)))


def miou(pred: Tensor, gt: Tensor, ignore: Tensor | None = None) -> Tensor:
    """Hungarian mIoU per image, float64[B] (NaN if no GT).

    One-to-one matching maximising total IoU on the slot x GT IoU matrix
    (``scipy.optimize.linear_sum_assignment(maximize=True)``); GTs left unmatched (more GTs than
    slots) score 0; the image score is the mean over its GTs.
    """
    return _miou(_iou(_counts(pred, gt, ignore)))


def corloc(pred: Tensor, gt: Tensor, ignore: Tensor | None = None) -> Tensor:
    """CorLoc per image, float64[B]: 1.0 if some GT has best IoU > 0.5 (strict), else 0.0; NaN if
    no GT."""
    return _corloc(_iou(_counts(pred, gt, ignore)))


def detection_rate(pred: Tensor, gt: Tensor, ignore: Tensor | None = None) -> Tensor:
    """Detection rate (OCLF "instance_mask_recall") per image, float64[B]: fraction of GTs whose
    best IoU over slots is > 0.5 (strict); NaN if no GT. Average it per image, not per object."""
    return _detection_rate(_iou(_counts(pred, gt, ignore)))


def all_metrics(
    pred: Tensor,
    gt: Tensor,
    ignore: Tensor | None = None,
    num_slots: int | None = None,
    background_first: bool = False,
) -> dict[str, Tensor]:
    """All five metrics, sharing one set of slot x object pixel counts.

    Returns ``{"fg_ari", "mbo", "miou", "corloc", "detection_rate"}`` -> float64[B], identical to
    the single-metric functions. ``num_slots`` defaults to ``pred.max() + 1``; extra empty slots
    change no metric. With ``background_first`` the first mask of ``gt`` is the background
    segment (GLASS's evaluation): the IoU metrics score it like an object, FG-ARI leaves it
    out (its column of the counts is exactly the pixels no object covers).
    """
    counts = _counts(pred, gt, ignore, num_slots)
    iou = _iou(counts)
    foreground = counts._replace(inter=counts.inter[:, :, 1:]) if background_first else counts
    return {
        "fg_ari": _fg_ari(foreground),
        "mbo": _mbo(iou),
        "miou": _miou(iou),
        "corloc": _corloc(iou),
        "detection_rate": _detection_rate(iou),
    }


# --------------------------------------------------------------------------------------------
# Shared work


def _as_bool(gt: Tensor) -> Tensor:
    if gt.dim() != 4:
        raise ValueError(f"gt must be [B,M,H,W], got shape {tuple(gt.shape)}")
    return gt if gt.dtype == torch.bool else gt > 0


def _counts(
    pred: Tensor, gt: Tensor, ignore: Tensor | None, num_slots: int | None = None
) -> Overlap:
    """Slot x GT pixel counts: inter [B,K,M], slot areas area_a [B,K], GT areas area_b [B,M]."""
    gt = _as_bool(gt)
    if pred.dim() != 3:
        raise ValueError(f"pred must be [B,H,W], got shape {tuple(pred.shape)}")
    return label_overlap(pred, gt, ignore, num_slots, max_bins=_MAX_HIST_BINS)


class _IoU(NamedTuple):
    iou: Tensor  # float64[B,K,M]
    hit: Tensor  # bool[B,K,M]: IoU > 0.5, decided exactly in integers (2 * inter > union)
    valid: Tensor  # bool[B,M]: GT mask non-empty after ignore
    n_valid: Tensor  # float64[B]


def _iou(counts: Overlap) -> _IoU:
    valid = counts.area_b > 0
    hit = 2 * counts.inter > counts.union
    return _IoU(counts.iou(), hit, valid, valid.sum(1).to(torch.float64))


def _per_gt_mean(values: Tensor, iou: _IoU) -> Tensor:
    """Mean of float[B,M] over valid GTs; NaN for images without any."""
    total = torch.where(iou.valid, values, torch.zeros_like(values)).sum(1)
    return torch.where(iou.n_valid > 0, total / iou.n_valid.clamp_min(1), torch.nan)


def _fg_ari(counts: Overlap) -> Tensor:
    n_ij = counts.inter  # float64 [B,K,M]; OCLF's rows are GTs (sum over M) and columns slots
    a = n_ij.sum(1)
    b = n_ij.sum(2)
    n = a.sum(1)
    rindex = (n_ij * (n_ij - 1)).sum((1, 2))
    aindex = (a * (a - 1)).sum(1)
    bindex = (b * (b - 1)).sum(1)
    expected = aindex * bindex / (n * (n - 1)).clamp_min(1)
    max_rindex = (aindex + bindex) / 2
    denominator = max_rindex - expected
    ari = (rindex - expected) / torch.where(denominator > 0, denominator, 1)
    return torch.where(denominator > 0, ari, torch.ones_like(ari))


def _mbo(iou: _IoU) -> Tensor:
    return _per_gt_mean(iou.iou.amax(1), iou)


def _detection_rate(iou: _IoU) -> Tensor:
    return _per_gt_mean(iou.hit.any(1).to(torch.float64), iou)


def _corloc(iou: _IoU) -> Tensor:
    found = (iou.hit.any(1) & iou.valid).any(1).to(torch.float64)
    return torch.where(iou.n_valid > 0, found, torch.nan)


def _miou(iou: _IoU) -> Tensor:
    matrices = iou.iou.cpu().numpy()
    n_valid = iou.valid.sum(1).tolist()
    out = np.full(matrices.shape[0], np.nan)
    matches = hungarian_match(matrices, maximize=True, valid_cols=iou.valid)
    for i, (rows, cols) in enumerate(matches):
        if n_valid[i]:
            out[i] = matrices[i][rows, cols].sum() / n_valid[i]
    return torch.from_numpy(out).to(iou.iou.device)
