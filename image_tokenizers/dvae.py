"""SLATE's discrete VAE: a Gumbel-softmax tokenizer trained with its own pixel MSE.

Singh et al., "Illiterate DALL-E Learns to Compose" (ICLR 2022); the official code is
github.com/singhgautam/slate (dvae.py, utils.py, slate.py, train.py). Facts used here:

- encoder: a 4x4 stride-4 conv block, six 1x1 conv blocks (64 channels), a 1x1 conv to
  `vocab_size` logits per cell; decoder: a 1x1 block from the vocabulary, then two stages
  of (3x3 block, two 1x1 blocks, a 1x1 block to 4 * 64 channels, PixelShuffle(2)), and a
  1x1 conv to 3 channels. A "block" is conv without bias (kaiming-uniform) -> GroupNorm
  with one group and its own affine `weight` / `bias` -> ReLU; the plain convs are
  xavier-uniform with zero bias. So a token covers 4x4 pixels.
- training: z = GumbelSoftmax(log_softmax(logits), tau) over the vocabulary (soft unless
  `hard`, then straight-through), decoded to pixels; loss sum((image - recon)^2) / B
  (slate.py). tau follows a cosine from tau_start to tau_final over tau_steps steps
  (train.py cosine_anneal: 1.0 -> 0.1 over 30k steps), then stays at tau_final.
- tokens: hard one-hot tokens (argmax, or Gumbel-argmax samples in SLATE's training);
  decoding ids feeds their one-hot vectors to the decoder.

The module keys mirror the official ones (`encoder.0.m.weight`, `encoder.0.weight`,
`encoder.7.bias`, `decoder.5` = PixelShuffle, ...), so the `dvae.*` part of an official
SLATE checkpoint, or a SlotDiffusion dVAE checkpoint, loads as is (`weights`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocl_bench.api.contracts import Progress
from ocl_bench.api.errors import ConfigError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.tokenizing import ImageTokenizer
from ocl_bench.api.weights import read_state_dict, strict_load, strip_wrappers
from ocl_bench.decoders.slate import TINY_SLATE_RUN

WEIGHTS_ENV = "OCL_BENCH_DVAE"


def cosine_anneal(step: int, start: float, final: float, steps: int) -> float:
    """`start` at step 0 to `final` at `steps` along half a cosine, `final` afterwards."""
    if steps <= 0 or step >= steps:
        return final
    return 0.5 * (start - final) * math.cos(math.pi * step / steps) + 0.5 * (start + final)


def gumbel_softmax(
    log_probs: Tensor,
    tau: float,
    hard: bool,
    dim: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Relaxed one-hot samples of a categorical; `hard` gives one-hot values with the soft
    sample's gradient (straight-through)."""
    uniform = torch.rand(log_probs.shape, generator=generator, device=log_probs.device)
    tiny = torch.finfo(log_probs.dtype).tiny
    gumbels = -torch.log((-torch.log(uniform.clamp_min(tiny))).clamp_min(tiny))
    soft = F.softmax((log_probs + gumbels.to(log_probs.dtype)) / tau, dim)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding)
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ConvBlock(nn.Module):
    """Conv (no bias, kaiming) -> one-group GroupNorm with its own affine -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.m = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        nn.init.kaiming_uniform_(self.m.weight, nonlinearity="relu")
        self.weight = nn.Parameter(torch.ones(c_out))
        self.bias = nn.Parameter(torch.zeros(c_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(F.group_norm(self.m(x), 1, self.weight, self.bias))


@dataclass(frozen=True)
class DVAEParams:
    vocab_size: int = param(4096, "codebook size (SLATE: 4096; its 3D-Shapes script 1024)", ge=2)
    channels: int = param(64, "channels of every hidden conv (official: 64)", ge=1)
    tau_start: float = param(1.0, "Gumbel-softmax temperature at step 0", gt=0)
    tau_final: float = param(0.1, "temperature after tau_steps", gt=0)
    tau_steps: int = param(30000, "steps of the cosine from tau_start to tau_final", ge=0)
    hard: bool = param(
        False, "straight-through hard one-hot samples for the pixel decoder (official: soft)"
    )
    loss_reduction: Literal["sum_per_image", "mean"] = param(
        "sum_per_image",
        "pixel MSE summed over pixels and channels, averaged over images (SLATE) or averaged "
        "over every element (SlotDiffusion)",
    )
    weights: str = param(
        "", f"dVAE checkpoint (official key layout; '' reads ${WEIGHTS_ENV}, unset = random)"
    )


class DVAE(ImageTokenizer):
    """SLATE's Gumbel-softmax discrete VAE (4x4 pixels per token), trained alongside."""

    name = "dvae"
    Params = DVAEParams
    # Owned by SLATE's decoder, which trains it through the tokenizer_loss objective.
    conformance = TINY_SLATE_RUN
    trainable = True
    downsample = 4

    def __init__(self, params: DVAEParams):
        super().__init__(params)
        if params.tau_final > params.tau_start:
            raise ConfigError(
                f"dvae: tau_final ({params.tau_final}) must not exceed tau_start "
                f"({params.tau_start}); the temperature anneals downwards"
            )
        self.vocab_size = params.vocab_size
        c, v = params.channels, params.vocab_size
        self.encoder = nn.Sequential(
            ConvBlock(3, c, 4, 4),
            *(ConvBlock(c, c, 1) for _ in range(6)),
            _conv(c, v, 1),
        )
        self.decoder = nn.Sequential(
            ConvBlock(v, c, 1),
            ConvBlock(c, c, 3, 1, 1),
            ConvBlock(c, c, 1),
            ConvBlock(c, c, 1),
            ConvBlock(c, 4 * c, 1),
            nn.PixelShuffle(2),
            ConvBlock(c, c, 3, 1, 1),
            ConvBlock(c, c, 1),
            ConvBlock(c, c, 1),
            ConvBlock(c, 4 * c, 1),
            nn.PixelShuffle(2),
            _conv(c, 3, 1),
        )
        self.tau = params.tau_start
        path = params.weights or os.environ.get(WEIGHTS_ENV, "")
        if path:
            self.load(path)

    def load(self, path: str) -> None:
        """Official weights: a dVAE state dict, or a whole SLATE model's (`dvae.` prefix)."""
        state, _ = strip_wrappers(read_state_dict(path), ("module.", "dvae."))
        strict_load(self, state, path, f" (a SLATE dVAE with vocab_size {self.vocab_size})")

    def set_progress(self, progress: Progress) -> None:
        """The trainer's per-step hook: the temperature follows the step."""
        self.tau = self.temperature(progress.step)

    def temperature(self, step: int) -> float:
        p = self.params
        return cosine_anneal(step, p.tau_start, p.tau_final, p.tau_steps)

    def log_probs(self, images: Tensor) -> Tensor:
        """log-softmax over the vocabulary [B, V, h, w] of images in [0, 1]."""
        self.grid(tuple(images.shape[-2:]))
        return F.log_softmax(self.encoder(images), dim=1)

    def encode(self, images: Tensor) -> Tensor:
        return self.encoder(images).argmax(1)

    def sample(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Token ids drawn from the dVAE's categorical (Gumbel-argmax), as SLATE's training
        targets are; argmax is `encode`."""
        log_probs = self.log_probs(images)
        return gumbel_softmax(log_probs, 1.0, False, 1, generator).argmax(1)

    def one_hot(self, ids: Tensor) -> Tensor:
        return F.one_hot(ids, self.vocab_size).permute(0, 3, 1, 2).to(self.encoder[-1].weight)

    def embed(self, ids: Tensor) -> Tensor:
        """One-hot vectors [B, V, h, w]: what the pixel decoder reads."""
        return self.one_hot(ids)

    def decode(self, ids: Tensor) -> Tensor:
        return self.decoder(self.one_hot(ids)).clamp(0.0, 1.0)

    def losses(self, images: Tensor) -> dict[str, Tensor]:
        """Pixel MSE of the relaxed tokens at the current temperature."""
        return self.losses_and_sample(images)[0]

    def losses_and_sample(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """`losses` and `sample` from one encoder pass, as SLATE's training step draws both
        (with independent Gumbel noise) from the same logits; the ids are detached."""
        log_probs = self.log_probs(images)
        with torch.no_grad():
            ids = gumbel_softmax(log_probs, 1.0, False, 1).argmax(1)
        z = gumbel_softmax(log_probs, self.tau, self.params.hard, 1)
        recon = self.decoder(z)
        err = (images.float() - recon.float()).pow(2)
        if self.params.loss_reduction == "mean":
            return {"dvae_mse": err.mean()}, ids
        return {"dvae_mse": err.sum() / images.shape[0]}, ids


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [DVAE]


__all__ = ["DVAE", "DVAEParams", "cosine_anneal", "gumbel_softmax"]
