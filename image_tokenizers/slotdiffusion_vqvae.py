"""SlotDiffusion's VQ-VAE: the first stage of its latent diffusion decoder.

Wu et al., "SlotDiffusion: Object-Centric Generative Modeling with Diffusion Models"
(NeurIPS 2023); official code github.com/Wuziyi616/SlotDiffusion,
`slotdiffusion/img_based/models/vqvae/` (facts in ../shared/reference/diffusion-and-glass.md,
section 2). The architecture is the taming/LDM autoencoder: base width 64, widths x[1, 2, 4]
(two downsamplings: 224 px -> 56 x 56 latents), 2 residual blocks per level (3 in the
decoder), one self-attention block in each middle block and none elsewhere, 3 latent
channels and a 4096-entry codebook of 3-d vectors. diffusers' `VQModel` is that
architecture, so it is built from diffusers blocks; official checkpoints load through a
key conversion (`official_to_diffusers`).

- `latents(images)`: the pre-quantisation features (encoder + quant_conv), what the
  diffusion model diffuses (official `VQVAE.encode`);
- `decode_latents(latents)`: quantise, then decode (official `quantize_decode`, used on the
  sampled latents);
- `losses(images)`: the first-stage training losses: L1 reconstruction (the official loss
  uses L1 whenever the perceptual weight is > 0, which all its configs set) and the VQ loss
  of taming's legacy `VectorQuantizer2` (||sg(z_q) - z||^2 + 0.25 ||z_q - sg(z)||^2, which
  diffusers' `VectorQuantizer(legacy=True)` computes the same way). The LPIPS(vgg)
  perceptual term of the official loss is left out: its VGG weights download at run time.

Images are in [0, 1] at the contract and in [-1, 1] inside (the official configs normalise
with mean 0.5 and std 0.5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch.nn.functional as F
from diffusers import VQModel
from torch import Tensor

from ocl_bench.api.errors import DataError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.tokenizing import ImageTokenizer
from ocl_bench.api.weights import read_state_dict, strict_load


@dataclass(frozen=True)
class SlotDiffusionVQVAEParams:
    channels: int = param(64, "base width of encoder and decoder (official ch 64)", ge=1)
    channel_mult: list[int] = param(
        [1, 2, 4], "width multiplier per level; len - 1 downsamplings (official [1, 2, 4])"
    )
    layers_per_block: int = param(2, "residual blocks per encoder level (official 2)", ge=1)
    latent_channels: int = param(3, "channels of the latents and codebook vectors", ge=1)
    codebook_size: int = param(4096, "codebook entries (official n_embed 4096)", ge=2)
    norm_groups: int = param(32, "GroupNorm groups (taming: 32)", ge=1)
    checkpoint: str = param(
        "",
        "weights file: an official SlotDiffusion VQ-VAE .pth or this tokenizer's own "
        "state dict ('' = random init, to train as the first stage)",
    )
    recon_loss: Literal["l1", "mse"] = param(
        "l1", "reconstruction loss: L1 (official with a perceptual term) or MSE (official without)"
    )
    recon_weight: float = param(1.0, "weight of the reconstruction loss (recon_loss_w)", ge=0)
    quant_weight: float = param(1.0, "weight of the VQ codebook + commitment loss", ge=0)


class SlotDiffusionVQVAE(ImageTokenizer):
    """SlotDiffusion's VQ-VAE (diffusers VQModel): images <-> 4x-downsampled latents / ids."""

    name = "slotdiffusion_vqvae"
    Params = SlotDiffusionVQVAEParams
    # Owned by SlotDiffusion's decoder at its tiny size, in stage 1 (the VQ-VAE trains
    # through the tokenizer_loss objective).
    conformance = {
        "decoder.name": "slotdiffusion",
        "decoder.tiny": True,
        "decoder.stage": "vqvae",
        "objectives": {"tokenizer_loss": {}},
    }
    trainable = True

    def __init__(self, params: SlotDiffusionVQVAEParams) -> None:
        super().__init__(params)
        levels = len(params.channel_mult)
        if levels < 1:
            raise ValueError("channel_mult needs at least one level")
        widths = tuple(params.channels * m for m in params.channel_mult)
        bad = [w for w in widths if w % params.norm_groups]
        if bad:
            raise ValueError(f"widths {widths} must divide by norm_groups={params.norm_groups}")
        self.model = VQModel(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=widths,
            layers_per_block=params.layers_per_block,
            latent_channels=params.latent_channels,
            num_vq_embeddings=params.codebook_size,
            vq_embed_dim=params.latent_channels,
            norm_num_groups=params.norm_groups,
        )
        # taming initialises the codebook uniformly in +-1/n (diffusers does the same)
        self.vocab_size = params.codebook_size
        self.downsample = 2 ** (levels - 1)
        if params.checkpoint:
            self.load_file(params.checkpoint)

    @property
    def latent_channels(self) -> int:
        return self.params.latent_channels

    def load_file(self, path: str | Path) -> None:
        """Load an official SlotDiffusion VQ-VAE checkpoint or this tokenizer's state dict."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(
                f"SlotDiffusion VQ-VAE checkpoint not found: {path} (train the first stage "
                "with `ocl-bench train slotdiffusion-vqvae-coco`, or give the official "
                "vqvae_coco_params-res224.pth)"
            )
        state = read_state_dict(path)
        self.load_state(state, str(path))

    def load_state(self, state: dict[str, Tensor], source: str) -> None:
        """Strict load of an official (taming keys) or own (diffusers keys) state dict."""
        state = {k: v for k, v in state.items() if not k.startswith("loss.")}
        if any(k.startswith(("encoder.down.", "decoder.up.")) for k in state):
            state = official_to_diffusers(state, len(self.params.channel_mult))
        if state and all(k.startswith("model.") for k in state):
            state = {k[len("model.") :]: v for k, v in state.items()}
        strict_load(self.model, state, source)

    def _pixels(self, images: Tensor) -> Tensor:
        return images * 2.0 - 1.0

    @staticmethod
    def _images(decoded: Tensor) -> Tensor:
        return ((decoded + 1.0) / 2.0).clamp(0.0, 1.0)

    def latents(self, images: Tensor) -> Tensor:
        """Pre-quantisation latents [B, C, h, w] of images [B, 3, H, W] in [0, 1]."""
        return self.model.encode(self._pixels(images)).latents

    def quantize(self, latents: Tensor) -> Tensor:
        """The nearest codebook vector of every latent (same shape)."""
        return self.model.quantize(latents)[0]

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images in [0, 1] from (unquantised) latents: quantise, then decode."""
        return self._images(self.model.decode(latents).sample)

    def encode(self, images: Tensor) -> Tensor:
        latents = self.latents(images)
        b, _, h, w = latents.shape
        ids = self.model.quantize(latents)[2][2]
        return ids.reshape(b, h, w)

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.quantize.embedding(ids).permute(0, 3, 1, 2).contiguous()

    def decode(self, ids: Tensor) -> Tensor:
        quant = self.embed(ids)
        return self._images(self.model.decode(quant, force_not_quantize=True).sample)

    def autoencode(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(reconstruction in [0, 1], weighted first-stage losses) of images in [0, 1]."""
        x = self._pixels(images)
        latents = self.model.encode(x).latents
        quant, quant_loss, _ = self.model.quantize(latents)
        recon = self.model.decode(quant, force_not_quantize=True).sample
        p = self.params
        if p.recon_loss == "l1":
            rec = (recon.float() - x.float()).abs().mean()
        else:
            rec = F.mse_loss(recon.float(), x.float())
        losses = {
            "vqvae_recon": p.recon_weight * rec,
            "vqvae_quant": p.quant_weight * quant_loss.float().mean(),
        }
        return self._images(recon), losses

    def losses(self, images: Tensor) -> dict[str, Tensor]:
        return self.autoencode(images)[1]


_RESNET = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.(.*)$")
_RESAMPLE = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(downsample|upsample)\.(.*)$")
_MID = re.compile(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)$")
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def official_to_diffusers(state: dict[str, Tensor], levels: int) -> dict[str, Tensor]:
    """Rename the official (taming) VQ-VAE keys to diffusers VQModel keys.

    taming numbers decoder levels by resolution (up.0 is the full-resolution level, run
    last); diffusers numbers them in execution order, so decoder level i is up_blocks
    levels - 1 - i. The middle attention's 1x1 convolutions become linear layers.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = key
        if m := _RESNET.match(key):
            part, kind, level, block, rest = m.groups()
            rest = rest.replace("nin_shortcut", "conv_shortcut")
            i = int(level) if kind == "down" else levels - 1 - int(level)
            new = f"{part}.{kind}_blocks.{i}.resnets.{block}.{rest}"
        elif m := _RESAMPLE.match(key):
            part, kind, level, which, rest = m.groups()
            i = int(level) if kind == "down" else levels - 1 - int(level)
            new = f"{part}.{kind}_blocks.{i}.{which}rs.0.{rest}"
        elif m := _MID.match(key):
            part, block, rest = m.groups()
            if block == "attn_1":
                name, _, suffix = rest.partition(".")
                new = f"{part}.mid_block.attentions.0.{_ATTN.get(name, name)}.{suffix}"
                if name in ("q", "k", "v", "proj_out") and value.ndim == 4:
                    value = value[:, :, 0, 0]
            else:
                index = 0 if block == "block_1" else 1
                new = f"{part}.mid_block.resnets.{index}.{rest}"
        elif key.startswith(("encoder.norm_out.", "decoder.norm_out.")):
            new = key.replace("norm_out", "conv_norm_out")
        out[new] = value
    return out


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [SlotDiffusionVQVAE]


__all__ = ["SlotDiffusionVQVAE", "SlotDiffusionVQVAEParams", "official_to_diffusers"]
