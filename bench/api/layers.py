"""Small building blocks shared by several plugins."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def mlp(sizes: list[int], final_activation: bool = False) -> nn.Sequential:
    """Linear layers with ReLU between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def grid_coords(h: int, w: int, device: torch.device | None = None) -> Tensor:
    """float[h*w, 4]: (y, x, 1-y, 1-x) in [0, 1], the Slot Attention position code."""
    ys = torch.linspace(0.0, 1.0, h, device=device)
    xs = torch.linspace(0.0, 1.0, w, device=device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([yy, xx], dim=-1).reshape(h * w, 2)
    return torch.cat([coords, 1.0 - coords], dim=-1)


class SoftPositionEmbed(nn.Module):
    """Adds a learned linear map of the grid coordinates to channel-last tokens."""

    def __init__(self, dim: int, grid: tuple[int, int]):
        super().__init__()
        self.proj = nn.Linear(4, dim)
        self.register_buffer("coords", grid_coords(*grid), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens + self.proj(self.coords)


def patchify(images: Tensor, grid: tuple[int, int]) -> Tensor:
    """float[B,C,H,W] -> float[B,h*w,C*ph*pw], row-major patches on `grid`."""
    b, c, height, width = images.shape
    h, w = grid
    ph, pw = height // h, width // w
    x = images.reshape(b, c, h, ph, w, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, h * w, c * ph * pw)


def unpatchify(tokens: Tensor, grid: tuple[int, int], channels: int = 3) -> Tensor:
    """Inverse of patchify."""
    b, n, d = tokens.shape
    h, w = grid
    side = int(round((d // channels) ** 0.5))
    x = tokens.reshape(b, h, w, channels, side, side).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, h * side, w * side)
