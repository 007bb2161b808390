"""Decoders: mask normalisation, output shapes, pixel targets."""

from __future__ import annotations

import torch

from ocl_bench.api.contracts import Batch, Dims, Features, Slots
from ocl_bench.api.layers import patchify, unpatchify
from ocl_bench.decoders.mlp import MLPDecoder, MLPDecoderParams
from ocl_bench.decoders.spatial_broadcast import SpatialBroadcastDecoder, SpatialBroadcastParams


def _inputs(b: int = 2, k: int = 3, d: int = 16, size: int = 32, grid: int = 8):
    g = torch.Generator().manual_seed(0)
    slots = Slots(
        slots=torch.randn(b, k, d, generator=g), attn=torch.full((b, grid * grid, k), 1 / k)
    )
    feats = Features(tokens=torch.randn(b, grid * grid, 8, generator=g), grid=(grid, grid))
    batch = Batch(images=torch.rand(b, 3, size, size, generator=g))
    dims = Dims(image_size=(size, size), grid=(grid, grid), token_dim=8, slot_dim=d, num_slots=k)
    return slots, feats, batch, dims


def test_patchify_roundtrip_and_layout() -> None:
    images = torch.rand(2, 3, 16, 16)
    tokens = patchify(images, (4, 4))
    assert tokens.shape == (2, 16, 48)
    torch.testing.assert_close(unpatchify(tokens, (4, 4)), images)
    # token 1 is the patch in row 0, column 1
    torch.testing.assert_close(tokens[0, 1].reshape(3, 4, 4), images[0, :, 0:4, 4:8])


def test_mlp_decoder_masks_and_pixel_target() -> None:
    slots, feats, batch, dims = _inputs()
    torch.manual_seed(0)
    dec = MLPDecoder(MLPDecoderParams(hidden=32), dims)
    out = dec(slots, feats, batch)
    assert out.masks.shape == (2, 64, 3)
    torch.testing.assert_close(out.masks.sum(-1), torch.ones(2, 64))
    assert out.reconstruction.shape == out.target.shape == (2, 64, 48)
    torch.testing.assert_close(out.target, patchify(batch.images, (8, 8)))
    assert out.extras["image"].shape == batch.images.shape


def test_mlp_decoder_feature_target_requires_targets() -> None:
    needs, _ = MLPDecoder.capabilities(MLPDecoderParams(target="features"))
    assert "features.targets" in needs
    needs, _ = MLPDecoder.capabilities(MLPDecoderParams(target="pixels"))
    assert "features.targets" not in needs


def test_spatial_broadcast_decoder_composites_slots() -> None:
    slots, feats, batch, dims = _inputs()
    torch.manual_seed(0)
    dec = SpatialBroadcastDecoder(SpatialBroadcastParams(channels=8), dims)
    out = dec(slots, feats, batch)
    assert out.reconstruction.shape == batch.images.shape
    assert out.mask_grid == (32, 32)
    assert out.masks.shape == (2, 32 * 32, 3)
    torch.testing.assert_close(out.masks.sum(-1), torch.ones(2, 1024))
    # Swapping two slots permutes the masks but leaves the composite unchanged.
    swapped = Slots(slots=slots.slots[:, [1, 0, 2]], attn=slots.attn)
    out2 = dec(swapped, feats, batch)
    torch.testing.assert_close(out2.reconstruction, out.reconstruction, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2.masks[..., 0], out.masks[..., 1], atol=1e-6, rtol=1e-5)
