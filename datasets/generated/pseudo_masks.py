"""Pseudo semantic masks read from a text-to-image diffusion UNet's attention.

Part of the `generated` dataset (datasets/generated/dataset.py): while a diffusers
`UNet2DConditionModel` generates an image from a prompt, its attention layers say where each
word of a class prompt is. The recipe is Dataset Diffusion's (Nguyen et al., NeurIPS 2023,
the one GLASS uses; ../shared/reference/diffusion-and-glass.md section 3):

1. :func:`recording` installs a :class:`RecordingAttnProcessor` on every attention layer of
   the UNet (diffusers' attention-processor API) and restores the previous processors on
   exit, exception or not. Each processor still runs the processor it replaced (so the
   UNet's outputs are unchanged, bit for bit) and hands the layer's input to an
   :class:`AttentionRecorder`, which recomputes the attention probabilities with the layer's
   own `get_attention_scores` and sums them per (kind, resolution) over a window of denoising
   steps, layers and heads, for the conditional half of a classifier-free-guidance batch
   only. Resolutions are read from the latent size, never assumed to be 512-px SD's;
   maps wider than `max_side` are not kept (memory: a 96x96 self-attention is 340 MB an
   image).
2. :func:`class_prompt` tokenises the class words with the real tokenizer, so a word that
   is several BPE tokens is a span of tokens (its maps are averaged), not one "word index"
   (a known Dataset Diffusion pitfall).
3. :func:`class_scores` refines each class's cross-attention map with the self-attention
   affinity raised to a power (default 4), min-max normalises it, and :func:`label_map`
   upsamples to the image and thresholds: label = argmax + 1 where the best score is
   >= `fg_threshold` (0.6), 255 ("ignore") where it lies in [`ignore_threshold`, fg) =
   [0.5, 0.6), 0 (background) below.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = 255  # label of pixels no loss or metric may use

Key = tuple[str, int, int]  # (kind: "self" | "cross", rows, cols)


@dataclass
class AttentionRecorder:
    """Sums of attention probabilities per (kind, rows, cols), conditional half only.

    latent_size: (h, w) of the latents the UNet denoises; every map's resolution is read
        from it (a layer with N queries runs at latent / f where N = (h / f) * (w / f)).
    batch_size: images per prompt batch; a UNet call with 2 * batch_size samples is a
        classifier-free-guidance batch [uncond, cond] and only its second half is kept.
    max_side: maps with more than this many rows or columns are skipped (memory cap).
    start, stop: the step window [start, stop) recorded (stop None: to the end).
    class_embeds: [batch_size, T, C] text embeddings whose keys the cross-attention maps
        are computed against (a class prompt); None keeps the prompt's own keys.
    """

    latent_size: tuple[int, int]
    batch_size: int
    max_side: int = 64
    start: int = 0
    stop: int | None = None
    class_embeds: Tensor | None = None
    step: int = 0
    sums: dict[Key, Tensor] = field(default_factory=dict)
    counts: dict[Key, int] = field(default_factory=dict)
    skipped: dict[Key, int] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Whether the current step lies in the recorded window."""
        return self.step >= self.start and (self.stop is None or self.step < self.stop)

    def reset(self) -> None:
        self.step = 0
        self.sums.clear()
        self.counts.clear()
        self.skipped.clear()

    def on_step_end(self, pipeline: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        """`callback_on_step_end` of a diffusers pipeline: the next calls are step + 1.
        (Counting layer calls instead breaks whenever diffusers changes its blocks.)"""
        self.step = step + 1
        return kwargs

    def resolution(self, queries: int) -> tuple[int, int]:
        """(rows, cols) of a layer with `queries` positions, from the latent size."""
        h, w = self.latent_size
        factor = round(math.sqrt(h * w / queries))
        rows, cols = math.ceil(h / max(factor, 1)), math.ceil(w / max(factor, 1))
        if rows * cols != queries:
            raise ValueError(
                f"{queries} attention queries do not form a grid of the {h}x{w} latent"
            )
        return rows, cols

    def conditional(self, x: Tensor) -> Tensor:
        """The conditional half of a [uncond, cond] batch, or `x` itself without guidance."""
        if x.shape[0] == 2 * self.batch_size:
            return x[self.batch_size :]
        if x.shape[0] != self.batch_size:
            raise ValueError(
                f"attention batch of {x.shape[0]} is neither {self.batch_size} images nor "
                f"{2 * self.batch_size} (classifier-free guidance)"
            )
        return x

    @torch.no_grad()
    def observe(self, attn: Any, hidden_states: Tensor, context: Tensor | None) -> None:
        """Add the probabilities of layer `attn` on these inputs (one layer call)."""
        x = hidden_states
        if x.ndim == 4:  # [B,C,h,w] -> [B,hw,C], as the default processors do
            x = x.flatten(2).transpose(1, 2)
        kind = "self" if context is None else "cross"
        key = (kind, *self.resolution(x.shape[1]))
        if max(key[1], key[2]) > self.max_side:
            self.skipped[key] = self.skipped.get(key, 0) + 1
            return
        x = self.conditional(x)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        if context is None:
            context = x
        else:
            context = self.class_embeds if self.class_embeds is not None else context
            context = self.conditional(context).to(x.device, x.dtype)
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(x))
        keys = attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(query, keys, None)  # [B*heads, N, Nk]
        probs = probs.view(x.shape[0], attn.heads, *probs.shape[1:]).float().mean(1)
        if key in self.sums:
            self.sums[key] += probs
        else:
            self.sums[key] = probs
        self.counts[key] = self.counts.get(key, 0) + 1

    def average(self) -> dict[Key, Tensor]:
        """Mean map per key over the recorded steps, layers and heads: [B, N, Nk]."""
        return {k: s / self.counts[k] for k, s in self.sums.items()}


class RecordingAttnProcessor:
    """Runs the processor it replaces, then shows the layer's inputs to the recorder."""

    def __init__(self, recorder: AttentionRecorder, inner: Any):
        self.recorder = recorder
        self.inner = inner

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        out = self.inner(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            temb=temb,
            **kwargs,
        )
        if self.recorder.active:
            self.recorder.observe(attn, hidden_states, encoder_hidden_states)
        return out


@contextmanager
def recording(unet: Any, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
    """Record every attention layer of a diffusers UNet inside the block; the UNet's own
    processors are back afterwards, also when the block raises."""
    saved = unet.attn_processors
    # set_attn_processor pops entries from the dict it is given: hand it copies
    unet.set_attn_processor({k: RecordingAttnProcessor(recorder, p) for k, p in saved.items()})
    try:
        yield recorder
    finally:
        unet.set_attn_processor(dict(saved))


# class prompts ---------------------------------------------------------------------------


def class_prompt(
    tokenizer: Any, words: Sequence[str], length: int | None = None
) -> tuple[Tensor, list[tuple[int, int]]]:
    """Token ids long[length] of the class words in order ([BOS] w1 w2 ... [EOS] pad) and
    each word's token span [start, stop). Each word is tokenised alone by the real tokenizer,
    so a word of several BPE tokens gets a span of several positions."""
    length = length or int(min(tokenizer.model_max_length, 77))
    ids = [tokenizer.bos_token_id]
    spans = []
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        if not pieces:
            raise ValueError(f"the tokenizer turns class word {word!r} into no tokens")
        spans.append((len(ids), len(ids) + len(pieces)))
        ids.extend(pieces)
    ids.append(tokenizer.eos_token_id)
    if len(ids) > length:
        raise ValueError(
            f"class prompt {' '.join(words)!r} is {len(ids)} tokens, more than {length}"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids += [pad] * (length - len(ids))
    return torch.tensor(ids, dtype=torch.long), spans


# refinement ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefineSettings:
    """How recorded attention becomes a label map (Dataset Diffusion's thresholds)."""

    power: int = 4  # exponent of the self-attention affinity
    fg_threshold: float = 0.6  # best class score at or above: that class
    ignore_threshold: float = 0.5  # best score in [ignore, fg): 255 (ignore); below: background
    # GLASS averages the cross-attention of every recorded resolution; Dataset Diffusion
    # reads one ('single', at latent / cross_downsample)
    aggregate: Literal["single", "mean"] = "mean"
    self_downsample: int = 2  # self-attention at latent / this (512-px SD: 64 / 2 = 32)
    cross_downsample: int = 4  # 'single': cross-attention at latent / this (16 at 512 px)

    def __post_init__(self) -> None:
        if not 0 <= self.ignore_threshold <= self.fg_threshold <= 1:
            raise ValueError(
                "thresholds must satisfy 0 <= ignore_threshold <= fg_threshold <= 1, got "
                f"{self.ignore_threshold} and {self.fg_threshold}"
            )
        if self.power < 1:
            raise ValueError(f"power must be >= 1, got {self.power}")


def _at(maps: dict[Key, Tensor], kind: str, side: tuple[int, int]) -> Tensor:
    key = (kind, *side)
    if key not in maps:
        found = sorted(f"{r}x{c}" for k, r, c in maps if k == kind)
        raise ValueError(
            f"no {kind}-attention recorded at {side[0]}x{side[1]} (recorded: "
            f"{', '.join(found) or 'none'}); change the downsample settings or max_side"
        )
    return maps[key]


def class_scores(
    maps: dict[Key, Tensor],
    spans: Sequence[tuple[int, int]],
    latent_size: tuple[int, int],
    settings: RefineSettings,
) -> Tensor:
    """float[C, h, w]: one refined map per class span, min-max normalised to [0, 1], at the
    self-attention resolution. `maps` are one image's averaged maps ([N, Nk] or [1, N, Nk])."""
    maps = {k: (v[0] if v.ndim == 3 else v).float() for k, v in maps.items()}
    lh, lw = latent_size
    side = (lh // settings.self_downsample, lw // settings.self_downsample)
    affinity = torch.linalg.matrix_power(_at(maps, "self", side), settings.power)  # [N, N]
    if settings.aggregate == "single":
        cross_sides = [(lh // settings.cross_downsample, lw // settings.cross_downsample)]
        _at(maps, "cross", cross_sides[0])
    else:
        cross_sides = sorted({(r, c) for k, r, c in maps if k == "cross"})
    resized = []
    for rows, cols in cross_sides:
        cross = _at(maps, "cross", (rows, cols))  # [n, T]
        grid = cross.T.reshape(1, -1, rows, cols)
        if (rows, cols) != side:
            grid = F.interpolate(grid, size=side, mode="bicubic", align_corners=False)
        resized.append(grid[0].flatten(1).T)  # [N, T]
    cross = torch.stack(resized).mean(0)
    per_class = torch.stack([cross[:, a:b].mean(1) for a, b in spans], 1)  # [N, C]
    refined = affinity @ per_class
    low, high = refined.min(0).values, refined.max(0).values
    refined = (refined - low) / (high - low).clamp_min(1e-12)
    return refined.T.reshape(len(spans), *side)


def label_map(scores: Tensor, image_size: tuple[int, int], settings: RefineSettings) -> Tensor:
    """uint8[H, W]: scores [C, h, w] upsampled (bicubic) to the image, then label = argmax + 1
    where the best score >= fg_threshold, 255 in [ignore_threshold, fg_threshold), else 0."""
    if scores.shape[0] == 0:
        return torch.zeros(image_size, dtype=torch.uint8)
    up = F.interpolate(scores[None].float(), size=image_size, mode="bicubic", align_corners=False)
    best, which = up[0].max(0)
    labels = torch.zeros(image_size, dtype=torch.uint8)
    labels[best >= settings.ignore_threshold] = IGNORE
    fg = best >= settings.fg_threshold
    labels[fg] = (which[fg] + 1).to(torch.uint8)
    return labels


__all__ = [
    "IGNORE",
    "AttentionRecorder",
    "RecordingAttnProcessor",
    "RefineSettings",
    "class_prompt",
    "class_scores",
    "label_map",
    "recording",
]
