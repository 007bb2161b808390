"""GLASS's guidance loss: slot attention pulled towards (pseudo) object masks.

Singh et al., "Guided Latent Slot Diffusion for Object-Centric Learning" (GLASS, 2024),
Section 4 "Slot matching" / "Loss function"; the plan is ../shared/reference/
diffusion-and-glass.md section 3 ("GuidanceLoss"), since GLASS's training code is not
released. Per image:

1. segments at the slot-attention resolution (nearest-neighbour): the pseudo masks of a
   `generated` dataset (`source='pseudo_masks'`, GLASS and GLASS†), ground-truth semantic
   masks (`gt_masks`, StableLSD-Mask), instance masks (`gt_instances`) or boxes filled in,
   later boxes over earlier ones (`gt_boxes`, StableLSD-Box); the background (no segment,
   not ignored) is a segment only with `match_background`;
2. Hungarian matching (bench/api/matching.py) maximising the IoU between each slot's argmax
   mask and each segment, ignore pixels left out of every count;
3. binary cross-entropy between the matched slots' attention probabilities (softmax over
   slots, clamped) and their segments, averaged over matched slots and non-ignored pixels.
   Unmatched slots get no loss. `weight` is GLASS's lambda (not published; 1 by default).

`source='pseudo_masks'` requires "batch.generated", which only the generated dataset
provides: the loss applies to generated images only, as in GLASS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, ModelOutput, Progress
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.matching import hungarian_match, mask_iou
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Objective

NEEDS = {
    "pseudo_masks": {"batch.class_masks", "batch.ignore_mask", "batch.generated"},
    "gt_masks": {"batch.class_masks"},
    "gt_instances": {"batch.instance_masks"},
    "gt_boxes": {"batch.boxes"},
}


@dataclass(frozen=True)
class GuidanceParams:
    weight: float = param(1.0, "multiplier of this loss in the total (GLASS's lambda)", ge=0)
    source: Literal["pseudo_masks", "gt_masks", "gt_instances", "gt_boxes"] = param(
        "pseudo_masks",
        "segments: a generated dataset's pseudo masks, GT semantic masks, GT instances, GT boxes",
    )
    match_background: bool = param(False, "the background is a segment a slot is matched to")
    clamp: float = param(
        1e-6, "probabilities clamped to [clamp, 1 - clamp] inside the BCE", gt=0, lt=0.5
    )


def box_masks(boxes: Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """bool[B,M,h,w]: the grid cells whose centre lies in each (x1, y1, x2, y2) pixel box,
    painted in order so that a later box covers an earlier one (GLASS's bbox_to_mask: one
    label map, box i written as i + 1 over the ones before), so segments never overlap."""
    h, w = grid
    ys = (torch.arange(h, device=boxes.device) + 0.5) * image_size[0] / h
    xs = (torch.arange(w, device=boxes.device) + 0.5) * image_size[1] / w
    x1, y1, x2, y2 = (boxes[..., i, None, None] for i in range(4))
    inside = (xs >= x1) & (xs < x2) & (ys[:, None] >= y1) & (ys[:, None] < y2)
    # covered[m]: some box after m contains the cell (reverse cumulative OR, exclusive)
    later = inside.flip(1).cumsum(1).flip(1) - inside.long()
    return inside & (later == 0)


def _nearest(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    if masks.shape[-2:] == grid:
        return masks.bool()
    return F.interpolate(masks.float(), size=grid, mode="nearest").bool()


def segments(
    batch: Batch, source: str, grid: tuple[int, int], background: bool
) -> tuple[Tensor, Tensor]:
    """(bool[B,M,h,w] segments, bool[B,h,w] ignored) at the slot-attention grid."""
    if source in ("pseudo_masks", "gt_masks"):
        segs = _nearest(batch.class_masks, grid)
    elif source == "gt_instances":
        segs = _nearest(batch.instance_masks, grid)
    else:
        segs = box_masks(batch.boxes.float(), grid, tuple(batch.images.shape[-2:]))
    if batch.ignore_mask is not None:
        ignored = _nearest(batch.ignore_mask[:, None], grid)[:, 0]
    else:
        ignored = torch.zeros(segs.shape[0], *grid, dtype=torch.bool, device=segs.device)
    segs = segs & ~ignored[:, None]
    if background:
        bg = ~segs.any(1) & ~ignored
        segs = torch.cat([bg[:, None], segs], 1)
    return segs, ignored


def guidance_loss(
    attn: Tensor, segs: Tensor, ignored: Tensor, clamp: float = 1e-6
) -> tuple[Tensor, int]:
    """(BCE over matched slots and valid pixels, number of matched pairs).

    attn float[B,N,K] (softmax over slots), segs bool[B,M,N'] with N' = N pixels, ignored
    bool[B,N]."""
    b, n, k = attn.shape
    probs = attn.transpose(1, 2)  # [B,K,N]
    segs = segs.flatten(2)
    ignored = ignored.flatten(1)
    hard = F.one_hot(probs.argmax(1), k).transpose(1, 2).bool()  # [B,K,N]
    iou = mask_iou(hard.detach(), segs, ignored)
    matches = hungarian_match(iou, maximize=True, valid_cols=segs.any(-1))
    target = torch.zeros_like(probs)
    matched = torch.zeros(b, k, dtype=torch.bool, device=attn.device)
    pairs = 0
    for i, m in enumerate(matches):
        if len(m.rows) == 0:
            continue
        rows = torch.as_tensor(m.rows, device=attn.device)
        cols = torch.as_tensor(m.cols, device=attn.device)
        target[i, rows] = segs[i, cols].to(target.dtype)
        matched[i, rows] = True
        pairs += len(m.rows)
    if pairs == 0:
        return probs.sum() * 0.0, 0
    weight = (matched[:, :, None] & ~ignored[:, None, :]).to(probs.dtype)
    p = probs.float().clamp(clamp, 1 - clamp)
    bce = F.binary_cross_entropy(p, target.float(), reduction="none")
    return (bce * weight).sum() / weight.sum().clamp_min(1), pairs


class GlassGuidance(nn.Module, Objective):
    """BCE between Hungarian-matched slot attention and (pseudo) object masks (GLASS)."""

    kind = "objective"
    name = "glass_guidance"
    Params = GuidanceParams
    # Pseudo masks of the generated dataset: two tiny images into {fixtures}/generated.
    conformance = {
        "dataset.name": "generated",
        "dataset.root": "{fixtures}/generated",
        "dataset.tiny": True,
        "dataset.steps": 2,
        "dataset.train_size": 2,
        "dataset.source_params": {"image_size": 32, "train_size": 4, "val_size": 4},
    }
    requires = frozenset({"slots.attn"})

    @classmethod
    def capabilities(cls, params: Any) -> tuple[set[str], set[str]]:
        return set(cls.requires) | NEEDS[params.source], set()

    def __init__(self, params: GuidanceParams):
        super().__init__()
        self.params = params

    def forward(self, out: ModelOutput, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        p = self.params
        segs, ignored = segments(batch, p.source, out.features.grid, p.match_background)
        loss, _ = guidance_loss(out.slots.attn, segs, ignored, p.clamp)
        return {"glass_guidance": p.weight * loss}


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [GlassGuidance]
