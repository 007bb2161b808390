"""Opt-in: the slotdiffusion_vqvae tokenizer against SlotDiffusion's own VQ-VAE modules.

Needs a checkout of github.com/Wuziyi616/SlotDiffusion in $OCL_BENCH_SLOTDIFFUSION_REPO
(and einops). Only `video_based/models/vqvae/modules.py` and `quantize.py` are imported,
by file path: the package __init__ files pull in nerv and LPIPS, which the VQ-VAE itself
does not need; `video_based/models/unet` (the LDM UNetModel) is imported as a package and
compared through `ocl-bench import slotdiffusion`'s key conversion. The official VQ-VAE
modules are assembled with VQVAE.py's attribute names (encoder, decoder, quantize,
quant_conv, post_quant_conv), so their state_dict is an official checkpoint's layout.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ocl_bench.api.params import build_params
from ocl_bench.image_tokenizers.slotdiffusion_vqvae import (
    SlotDiffusionVQVAE,
    SlotDiffusionVQVAEParams,
)

REPO = os.environ.get("OCL_BENCH_SLOTDIFFUSION_REPO", "")
pytestmark = pytest.mark.skipif(
    not REPO, reason="set OCL_BENCH_SLOTDIFFUSION_REPO to a SlotDiffusion checkout"
)


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def official_vqvae(ch: int, ch_mult: list[int], blocks: int, z: int, n_embed: int) -> nn.Module:
    folder = Path(REPO) / "slotdiffusion" / "video_based" / "models" / "vqvae"
    modules = _module(folder / "modules.py", "sdf_vqvae_modules")
    quantize = _module(folder / "quantize.py", "sdf_vqvae_quantize")
    enc_dec = dict(
        resolution=32,
        in_channels=3,
        z_channels=z,
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=blocks,
        attn_resolutions=[],
        out_ch=3,
        dropout=0.0,
    )
    model = nn.Module()
    model.encoder = modules.Encoder(**enc_dec)
    model.decoder = modules.Decoder(**enc_dec)
    model.quantize = quantize.VectorQuantizer2(n_embed, z, beta=0.25, sane_index_shape=True)
    model.quant_conv = nn.Conv2d(z, z, 1)
    model.post_quant_conv = nn.Conv2d(z, z, 1)
    return model


def test_official_weights_give_the_same_latents_ids_images_and_loss(tmp_path) -> None:
    torch.manual_seed(0)
    theirs = official_vqvae(32, [1, 2], 1, 3, 64).eval()
    path = tmp_path / "vqvae.pth"
    torch.save({"state_dict": theirs.state_dict()}, path)
    values = {
        "channels": 32,
        "channel_mult": [1, 2],
        "layers_per_block": 1,
        "codebook_size": 64,
        "norm_groups": 32,
        "checkpoint": str(path),
    }
    ours = SlotDiffusionVQVAE(build_params(SlotDiffusionVQVAEParams, values, "t")).eval()
    images = torch.rand(2, 3, 32, 32)
    x = images * 2 - 1  # the official data pipeline: mean = std = 0.5
    with torch.no_grad():
        h = theirs.quant_conv(theirs.encoder(x))  # VQVAE.encode: the LDM's x0
        quant, quant_loss, (_, _, ids) = theirs.quantize(h)
        recon = theirs.decoder(theirs.post_quant_conv(quant))  # VQVAE.decode
        assert torch.allclose(ours.latents(images), h, atol=1e-5)
        assert torch.equal(ours.encode(images), ids)
        assert torch.allclose(ours.decode(ids), ((recon + 1) / 2).clamp(0, 1), atol=1e-5)
        mine, losses = ours.autoencode(images)
        assert torch.allclose(losses["vqvae_quant"], quant_loss, atol=1e-6)
        assert torch.allclose(losses["vqvae_recon"], (recon - x).abs().mean(), atol=1e-6)


def _package(folder: Path, name: str):
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_official_ldm_unet_through_the_importer_gives_the_same_prediction() -> None:
    """SlotDiffusion's LDM UNetModel (video_based/models/unet, needs einops), weights moved
    off init, renamed by `ocl-bench import slotdiffusion`'s ldm_unet_to_diffusers into the
    slotdiffusion decoder's diffusers UNet: the same epsilon prediction."""
    pytest.importorskip("einops")
    from ocl_bench.decoders.slotdiffusion import build_unet
    from ocl_bench.importers.slotdiffusion import ldm_unet_to_diffusers

    folder = Path(REPO) / "slotdiffusion" / "video_based" / "models" / "unet"
    unet_pkg = _package(folder, "sdf_unet")
    torch.manual_seed(0)
    theirs = unet_pkg.UNetModel(
        in_channels=3,
        model_channels=32,
        out_channels=3,
        num_res_blocks=2,
        attention_resolutions=(2, 4),
        channel_mult=(1, 2, 2),
        num_head_channels=32,
        context_dim=24,
    ).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = build_unet(
        [32, 64, 64],
        [False, True, True],
        2,
        32,
        32,
        channels=3,
        context_dim=24,
        dropout=0.0,
        sample_size=16,
    ).eval()
    ours.load_state_dict(ldm_unet_to_diffusers(theirs.state_dict(), 3, 2, [False, True, True]))
    x, context = torch.randn(2, 3, 16, 16), torch.randn(2, 5, 24)
    t = torch.tensor([7, 930])
    with torch.no_grad():
        expected = theirs(x, t, context=context)
        got = ours(x, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
