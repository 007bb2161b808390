"""Typed stage outputs: the only things that flow between plugins.

dataset -> Batch -> encoder -> Features -> grouping -> Slots -> decoder -> Decoding.
Shapes use B (batch), N (tokens), K (slots), M (objects, zero-padded), H/W (pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor


def _move(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


@dataclass
class Batch:
    """What a dataset yields, collated.

    images: float[B,3,H,W] in [0, 1] (encoders normalise as they need).
    instance_masks: bool[B,M,H,W], visible part of each object, zero-padded along M.
    class_masks: bool[B,C,H,W], one mask per category present, zero-padded along C.
    ignore_mask: bool[B,H,W], pixels no metric may score.
    boxes: float[B,M,4] as (x1, y1, x2, y2) in pixels, zeros for padding.
    labels: long[B,M] category per object, -1 for padding.
    properties: name -> tensor[B,M] (long for categorical, float for continuous).
    captions: one string per image.
    index: long[B], the sample index inside its split.
    """

    images: Tensor
    instance_masks: Tensor | None = None
    class_masks: Tensor | None = None
    ignore_mask: Tensor | None = None
    boxes: Tensor | None = None
    labels: Tensor | None = None
    properties: dict[str, Tensor] | None = None
    captions: list[str] | None = None
    index: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return replace(self, **{f.name: _move(getattr(self, f.name), device) for f in fields(self)})

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    def available(self) -> set[str]:
        """Capability names ("batch.<field>") of the fields that are set."""
        return {f"batch.{f.name}" for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class Features:
    """Encoder output.

    tokens: float[B,N,D], the input of the grouping.
    grid: (h, w) with h * w == N.
    targets: float[B,N,Dt], what feature-reconstruction decoders reproduce (frozen features).
    token_ids: long[B,N], discrete tokens for masked-token decoders.
    """

    tokens: Tensor
    grid: tuple[int, int]
    targets: Tensor | None = None
    token_ids: Tensor | None = None


@dataclass
class Slots:
    """Grouping output.

    slots: float[B,K,Ds].
    attn: float[B,N,K], softmax over slots (before any renormalisation over tokens).
    logits: float[B,N,K], pre-softmax attention logits of the last iteration.
    init: float[B,K,Ds], the slots the iterations started from.
    """

    slots: Tensor
    attn: Tensor
    logits: Tensor | None = None
    init: Tensor | None = None


@dataclass
class Decoding:
    """Decoder output.

    reconstruction / target: same shape, either float[B,N,Dt] (tokens) or float[B,3,H,W].
    masks: float[B,P,K], the decoder's per-slot masks (sum to 1 over K) on mask_grid.
    mask_grid: (h, w) of masks; None means the encoder's token grid.
    extras: anything else a decoder wants to expose (per-slot reconstructions, ...).
    """

    reconstruction: Tensor
    target: Tensor
    masks: Tensor | None = None
    mask_grid: tuple[int, int] | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class ModelOutput:
    """Everything one forward pass of a composed model produced."""

    features: Features
    slots: Slots
    decoding: Decoding

    def masks(self, source: str) -> Tensor:
        """Soft masks float[B,K,h,w] on the token grid, from "decoder" or "attn"."""
        h, w = self.features.grid
        if source == "decoder":
            soft = self.decoding.masks
            if soft is None:
                raise ValueError("this decoder produces no masks; evaluate masks='attn'")
            h, w = self.decoding.mask_grid or (h, w)
        elif source == "attn":
            soft = self.slots.attn
        else:
            raise ValueError(f"unknown mask source {source!r}; expected 'decoder' or 'attn'")
        return soft.transpose(1, 2).reshape(soft.shape[0], soft.shape[2], h, w)


@dataclass
class Dims:
    """Sizes each stage learns from the ones before it when the model is built."""

    image_size: tuple[int, int]
    channels: int = 3
    grid: tuple[int, int] | None = None
    token_dim: int | None = None
    target_dim: int | None = None
    slot_dim: int | None = None
    num_slots: int | None = None
