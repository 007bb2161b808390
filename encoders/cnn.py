"""A small convolutional encoder trained from scratch (Slot Attention style)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ocl_bench.api.contracts import Batch, Dims, Features
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.layers import SoftPositionEmbed, mlp
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Encoder


@dataclass(frozen=True)
class CNNParams:
    channels: int = param(64, "channels of every convolution", ge=1)
    layers: int = param(4, "number of 5x5 convolutions", ge=1)
    patch_size: int = param(
        2, "total stride: each token covers patch_size x patch_size pixels", ge=1
    )
    dim: int = param(64, "token dimension after the position MLP", ge=1)


class CNNEncoder(nn.Module, Encoder):
    """CNN + soft position embedding + MLP; tokens on an (H/p) x (W/p) grid."""

    kind = "encoder"
    name = "cnn"
    Params = CNNParams
    # The suite's tiny base run uses this encoder at 8 channels, 2 layers, 4 px patches.
    conformance = {}
    provides = frozenset({"features.tokens"})

    def __init__(self, params: CNNParams, dims: Dims):
        super().__init__()
        p = params.patch_size
        if p < 1 or p & (p - 1):
            raise ValueError(f"encoder.patch_size must be a power of two, got {p}")
        strides = []
        remaining = p
        for _ in range(params.layers):
            s = 2 if remaining > 1 else 1
            strides.append(s)
            remaining //= s
        if remaining != 1:
            raise ValueError(f"encoder.layers={params.layers} is too few for patch_size={p}")
        convs: list[nn.Module] = []
        cin = dims.channels
        for s in strides:
            convs += [nn.Conv2d(cin, params.channels, 5, stride=s, padding=2), nn.ReLU()]
            cin = params.channels
        self.convs = nn.Sequential(*convs)
        h, w = dims.image_size
        self.grid = (h // p, w // p)
        self.pos = SoftPositionEmbed(params.channels, self.grid)
        self.norm = nn.LayerNorm(params.channels)
        self.head = mlp([params.channels, params.dim, params.dim])
        self.out_dim = params.dim

    def forward(self, batch: Batch) -> Features:
        x = self.convs(batch.images * 2.0 - 1.0)
        tokens = x.flatten(2).transpose(1, 2)
        tokens = self.head(self.norm(self.pos(tokens)))
        return Features(tokens=tokens, grid=self.grid)

    def output_dims(self, dims: Dims) -> Dims:
        dims.grid, dims.token_dim = self.grid, self.out_dim
        return dims


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [CNNEncoder]


__all__ = ["CNNEncoder", "CNNParams"]
