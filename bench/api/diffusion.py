"""Diffusion helpers shared by plugins that use diffusers: the latent-diffusion decoders and
the GLASS image generator both build their tiny CPU stand-ins here, so neither reaches
into the other."""

from __future__ import annotations

from typing import Any


def tiny_unet_and_vae(width: int, latent_side: int, image_side: int) -> tuple[Any, Any]:
    """(UNet2DConditionModel, AutoencoderKL), random, drawn from the global RNG, at the sizes
    the reference verified on CPU: a 2-level UNet (width, 2 * width) with cross-attention
    width `width`, and a VAE with scale factor 2 and 4 latent channels. The tiny generation
    pipeline and the tiny `latent_diffusion` decoder both use these stand-ins."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=latent_side,
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 32],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_side,
    )
    return unet, vae
