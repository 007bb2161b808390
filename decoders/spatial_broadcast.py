"""Slot Attention's spatial broadcast decoder: each slot paints an RGBA image."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ocl_bench.api.contracts import Batch, Dims, Features, ReconstructionOutput, Slots
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.layers import SoftPositionEmbed
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Decoder


@dataclass(frozen=True)
class SpatialBroadcastParams:
    channels: int = param(32, "channels of the transposed convolutions", ge=1)
    broadcast_size: int = param(8, "side of the grid each slot is broadcast to", ge=1)


class SpatialBroadcastDecoder(nn.Module, Decoder):
    """Broadcast, upsample with transposed convs to the image, alpha-composite the slots."""

    kind = "decoder"
    name = "spatial_broadcast"
    Params = SpatialBroadcastParams
    # 8 channels from an 8x8 broadcast grid.
    conformance = {
        "decoder.channels": 8,
        "decoder.broadcast_size": 8,
    }
    requires = frozenset({"slots.slots"})
    provides = frozenset({"decoding.masks", "generation.images"})

    def __init__(self, params: SpatialBroadcastParams, dims: Dims):
        super().__init__()
        assert dims.slot_dim is not None
        h, w = dims.image_size
        s = params.broadcast_size
        if h != w or h % s or (h // s) & (h // s - 1):
            raise ValueError(
                f"spatial_broadcast needs a square image whose side is broadcast_size ({s}) "
                f"times a power of two; got {h}x{w}"
            )
        self.size = s
        self.image_size = (h, w)
        self.pos = SoftPositionEmbed(dims.slot_dim, (s, s))
        layers: list[nn.Module] = []
        cin, side = dims.slot_dim, s
        while side < h:
            layers += [
                nn.ConvTranspose2d(cin, params.channels, 5, 2, padding=2, output_padding=1),
                nn.ReLU(),
            ]
            cin, side = params.channels, side * 2
        layers += [
            nn.Conv2d(cin, params.channels, 5, padding=2),
            nn.ReLU(),
            nn.Conv2d(params.channels, dims.channels + 1, 3, padding=1),
        ]
        self.net = nn.Sequential(*layers)

    def output_dims(self, dims: Dims) -> Dims:
        return dims

    def render(self, slots: Slots) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float[B,3,H,W], alpha float[B,K,1,H,W]) decoded from the slots alone."""
        b, k, d = slots.slots.shape
        x = slots.slots.reshape(b * k, 1, d).expand(-1, self.size * self.size, -1)
        x = self.pos(x).transpose(1, 2).reshape(b * k, d, self.size, self.size)
        out = self.net(x).reshape(b, k, -1, *self.image_size)
        rgb, alpha = out[:, :, :-1], out[:, :, -1:].softmax(dim=1)
        return (alpha * rgb).sum(dim=1), alpha

    def generate(
        self,
        slots: Slots,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Deterministic: the decoded image is the sample (steps, guidance unused)."""
        return self.render(slots)[0].clamp(0, 1)

    def forward(self, slots: Slots, features: Features, batch: Batch) -> ReconstructionOutput:
        recon, alpha = self.render(slots)
        masks = alpha.squeeze(2).flatten(2).transpose(1, 2)  # [B,H*W,K]
        return ReconstructionOutput(
            reconstruction=recon,
            target=batch.images,
            masks=masks,
            mask_grid=self.image_size,
            extras={"image": recon.detach().clamp(0, 1)},
        )


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [SpatialBroadcastDecoder]
