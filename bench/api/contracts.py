"""Typed stage outputs: the only things that flow between plugins.

dataset -> Batch -> encoder -> Features -> grouping -> Slots -> decoder -> Decoding.
Shapes use B (batch), N (tokens), K (slots), M (objects, zero-padded), H/W (pixels),
V (vocabulary), T (timesteps).

Decoders come in families, each with its own output class (all subclasses of Decoding):
ReconstructionOutput (pixels or features, today's decoders), TokenPrediction (logits over
a vocabulary: MAGE, SLATE) and Denoising (a diffusion model's prediction and target).
What a decoder provides to objectives and tasks is the set of its family's fields
("decoding.<field>"), plus optional ones it declares (decoding.masks), plus
"generation.images" when it can sample images from slots (GenerativeDecoder).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


def _map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """`fn` applied to a tensor, or to every tensor of a (nested) dict; other values kept."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


@dataclass
class Batch:
    """What a dataset yields, collated.

    images: float[B,3,H,W] in [0, 1] (encoders normalise as they need).
    instance_masks: bool[B,M,H,W], visible part of each object, zero-padded along M.
    class_masks: bool[B,C,H,W], one mask per category present, zero-padded along C.
    ignore_mask: bool[B,H,W], pixels no metric may score.
    boxes: float[B,M,4] as (x1, y1, x2, y2) in pixels of the masks (whose side may differ
        from the images', e.g. COCO at mask_size 320), zeros for padding.
    labels: long[B,M] category per object, -1 for padding.
    properties: name -> tensor[B,M] (long for categorical, float for continuous).
    captions: one string per image.
    index: long[B], the sample index inside its split.
    class_ids: long[B,C], the category of each class mask, -1 for padding.
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
    class_ids: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        """Page-locked copies of the tensors (DataLoader(pin_memory=True) calls this)."""
        return self._map(Tensor.pin_memory)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        mapped = {f.name: _map_tensors(getattr(self, f.name), fn) for f in fields(self)}
        return replace(self, **mapped)

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
    token_ids: long[B,N], discrete tokens (a VQ tokenizer's ids) of every grid position.
    token_mask: uint8[B,N], TokenState of every grid position for encoders that see only
        part of the tokens (MAGE): VISIBLE, MASKED (replaced by a mask token) or DROPPED
        (removed before the encoder).
    kept: long[B,N'], the grid positions the partly masked pass encoded (token_mask is
        not DROPPED there), in the order of `masked_tokens`.
    masked_tokens: float[B,P+N',D], the encoder's output on the partly masked input, P
        prefix tokens (MAGE: the class token) first, then the positions of `kept`. An
        encoder with two branches (MAGE in the thesis) keeps `tokens` = the pass over all
        visible tokens (what the grouping reads) and gives the masked pass here, for a
        decoder that reconstructs the masked ids.
    """

    tokens: Tensor
    grid: tuple[int, int]
    targets: Tensor | None = None
    token_ids: Tensor | None = None
    token_mask: Tensor | None = None
    kept: Tensor | None = None
    masked_tokens: Tensor | None = None

    def available(self) -> set[str]:
        """Capability names ("features.<field>") of the fields that are set."""
        return _available("features", self)


class TokenState(enum.IntEnum):
    """What an encoder did with each grid position (Features.token_mask)."""

    VISIBLE = 0
    MASKED = 1
    DROPPED = 2


def _available(prefix: str, obj: Any) -> set[str]:
    return {f"{prefix}.{f.name}" for f in fields(obj) if getattr(obj, f.name) is not None}


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


@dataclass(kw_only=True)
class Decoding:
    """What every decoder family shares.

    masks: float[B,P,K], the decoder's per-slot masks (sum to 1 over K) on mask_grid.
    mask_grid: (h, w) of masks; None means the encoder's token grid.
    extras: anything else a decoder wants to expose (per-slot reconstructions, ...).
    """

    masks: Tensor | None = None
    mask_grid: tuple[int, int] | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def family_fields(cls) -> set[str]:
        """Capabilities every output of this family has: its fields without a default."""
        return {
            f"decoding.{f.name}"
            for f in fields(cls)
            if f.default is MISSING and f.default_factory is MISSING
        }

    def available(self) -> set[str]:
        """Capability names ("decoding.<field>") of the fields that are set."""
        return {n for n in _available("decoding", self) if n != "decoding.extras"}


@dataclass(kw_only=True)
class ReconstructionOutput(Decoding):
    """Reconstruction family: pixels or features, compared with a target of equal shape.

    reconstruction / target: either float[B,N,Dt] (tokens) or float[B,3,H,W].
    """

    reconstruction: Tensor
    target: Tensor


@dataclass(kw_only=True)
class TokenPrediction(Decoding):
    """Token-prediction family: logits over a vocabulary at grid positions (MAGE, SLATE).

    logits: float[B,N,V]; target_ids: long[B,N].
    predicted: bool[B,N], the positions the loss scores (masked tokens for MAGE, every
        position for an autoregressive decoder).
    """

    logits: Tensor
    target_ids: Tensor
    predicted: Tensor


@dataclass(kw_only=True)
class Denoising(Decoding):
    """Denoising family: a diffusion decoder's prediction of its target at timesteps.

    prediction / target: same shape, float[B,C,h,w] (latents) or float[B,3,H,W].
    timesteps: long[B], the diffusion step each sample was noised to.
    kind: what is predicted ("epsilon", "v_prediction" or "sample"), as the scheduler says.
    """

    prediction: Tensor
    target: Tensor
    timesteps: Tensor
    kind: str = "epsilon"


@runtime_checkable
class GenerativeDecoder(Protocol):
    """A decoder that can produce images from slots ("generation.images").

    The one sampling entry point every generation figure and task uses: slots in,
    float[B,3,H,W] images in [0, 1] out. `steps`, `guidance_scale` and `generator` apply
    to stochastic samplers (diffusion, MaskGIT); deterministic decoders ignore them.
    """

    def generate(
        self,
        slots: Slots,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor: ...


def recombine_slots(slots: Slots, generator: torch.Generator | None = None) -> Slots:
    """Slots of several images mixed: slot k of image b comes from image perm_k(b).

    Each slot index draws its own permutation of the batch, so a generated image gets
    objects from several source images; the attention columns travel with their slots
    (decoders that place slots by their attention need them).
    """
    b, k = slots.slots.shape[:2]
    device = slots.slots.device
    perms = torch.stack([torch.randperm(b, generator=generator) for _ in range(k)], 1)  # [B,K]
    perms = perms.to(device)
    cols = torch.arange(k, device=device).expand(b, k)
    mixed = slots.slots[perms, cols]
    attn = slots.attn.permute(0, 2, 1)[perms, cols].permute(0, 2, 1)
    logits = None
    if slots.logits is not None:
        logits = slots.logits.permute(0, 2, 1)[perms, cols].permute(0, 2, 1)
    return replace(slots, slots=mixed, attn=attn, logits=logits, init=None)


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
    vocab_size: int | None = None  # codebook entries of a VQ tokenizer (token_ids < this)
    latent_channels: int | None = None  # channels of a VAE latent a diffusion decoder denoises
    latent_grid: tuple[int, int] | None = None  # (h, w) of that latent


@dataclass(frozen=True)
class Progress:
    """Where training is, as objectives see it (schedules, warm-ups, stage switches)."""

    step: int  # 0-based optimiser step being computed
    total: int  # train.steps

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total > 0 else 1.0
