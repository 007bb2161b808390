"""A ViT-style stem: non-overlapping patches, one linear map, a learned position table."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ocl_bench.api.contracts import Batch, Dims, Features
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.layers import patchify
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Encoder


@dataclass(frozen=True)
class PatchLinearParams:
    patch_size: int = param(4, "side of each square patch, in pixels", ge=1)
    dim: int = param(64, "token dimension", ge=1)


class PatchLinearEncoder(nn.Module, Encoder):
    """Linear patch embedding plus learned positions (no convolutions)."""

    kind = "encoder"
    name = "patch_linear"
    Params = PatchLinearParams
    # The tiny run the conformance suite checks it in: 4 px patches of width 16.
    conformance = {
        "encoder.patch_size": 4,
        "encoder.dim": 16,
    }
    provides = frozenset({"features.tokens"})

    def __init__(self, params: PatchLinearParams, dims: Dims):
        super().__init__()
        h, w = dims.image_size
        if h % params.patch_size or w % params.patch_size:
            raise ValueError(f"image {h}x{w} is not divisible by patch_size {params.patch_size}")
        self.grid = (h // params.patch_size, w // params.patch_size)
        self.dim = params.dim
        self.embed = nn.Linear(dims.channels * params.patch_size**2, params.dim)
        self.pos = nn.Parameter(torch.randn(1, self.grid[0] * self.grid[1], params.dim) * 0.02)
        self.norm = nn.LayerNorm(params.dim)

    def forward(self, batch: Batch) -> Features:
        tokens = self.embed(patchify(batch.images * 2 - 1, self.grid)) + self.pos
        return Features(tokens=self.norm(tokens), grid=self.grid)

    def output_dims(self, dims: Dims) -> Dims:
        dims.grid, dims.token_dim = self.grid, self.dim
        return dims


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [PatchLinearEncoder]
