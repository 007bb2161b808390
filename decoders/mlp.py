"""DINOSAUR's MLP decoder: every slot decodes every token, alpha masks mix them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ocl_bench.api.contracts import Batch, Dims, Features, ReconstructionOutput, Slots
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.layers import grid_coords, mlp, patchify, unpatchify
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Decoder


@dataclass(frozen=True)
class MLPDecoderParams:
    hidden: int = param(256, "hidden width of the per-token MLP", ge=1)
    layers: int = param(3, "hidden layers of the MLP (0 = one Linear layer)", ge=0)
    position: Literal["learned", "coords", "relative"] = param(
        "learned",
        "free per-token embeddings (DINOSAUR); an MLP of the (y, x) coordinates; or an MLP "
        "of the coordinates relative to each slot's attention centroid and spread (as in "
        "invariant slot attention), which gives every slot a place to paint from step one",
    )
    attn_prior: bool = param(
        False,
        "add log(slot attention) to the alpha logits, so decoder masks start from the "
        "grouping's masks and reconstruction gradients reach the attention directly",
    )
    pos_std: float = param(0.02, "std of the learned position embedding at initialisation", ge=0)
    target: Literal["pixels", "features"] = param(
        "pixels", "reconstruct image patches on the token grid, or the encoder's targets"
    )
    zero_bias: bool = param(
        False, "start every Linear bias at zero, as OCLF's build_mlp does (DINOSAUR)"
    )


class MLPDecoder(nn.Module, Decoder):
    """Per-slot MLP over a learned position code, mixed by softmax alpha masks."""

    kind = "decoder"
    name = "mlp"
    Params = MLPDecoderParams
    # The suite's tiny base run decodes with this MLP (16 wide, 2 layers).
    conformance = {}
    requires = frozenset({"slots.slots"})
    provides = frozenset({"decoding.masks"})

    @classmethod
    def capabilities(cls, params: Any) -> tuple[set[str], set[str]]:
        needs, gives = super().capabilities(params)
        if params.target == "features":
            needs.add("features.targets")
        else:  # pixels on the token grid: an image from slots alone
            gives.add("generation.images")
        if params.position == "relative" or params.attn_prior:
            needs.add("slots.attn")
        return needs, gives

    def __init__(self, params: MLPDecoderParams, dims: Dims):
        super().__init__()
        assert dims.grid is not None and dims.slot_dim is not None
        self.params = params
        self.grid = dims.grid
        h, w = dims.grid
        if params.target == "pixels":
            ph, pw = dims.image_size[0] // h, dims.image_size[1] // w
            self.out_dim = dims.channels * ph * pw
        else:
            if dims.target_dim is None:
                raise ValueError("decoder target 'features' needs an encoder that provides targets")
            self.out_dim = dims.target_dim
        if params.position == "learned":
            self.pos = nn.Parameter(torch.randn(1, 1, h * w, dims.slot_dim) * params.pos_std)
        else:
            self.register_buffer("coords", grid_coords(h, w)[:, :2], persistent=False)
            self.coord_mlp = mlp([2, params.hidden, dims.slot_dim])
        self.net = mlp([dims.slot_dim] + [params.hidden] * params.layers + [self.out_dim + 1])
        self.channels = dims.channels
        if params.zero_bias:
            for layer in self.modules():
                if isinstance(layer, nn.Linear) and layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def output_dims(self, dims: Dims) -> Dims:
        return dims

    def position_code(self, slots: Slots) -> torch.Tensor:
        """[1 or B, 1 or K, N, Ds] added to every slot before the MLP."""
        if self.params.position == "learned":
            return self.pos
        if self.params.position == "coords":
            return self.coord_mlp(self.coords)[None, None]
        weights = slots.attn / slots.attn.sum(dim=1, keepdim=True).clamp(min=1e-8)  # [B,N,K]
        centre = torch.einsum("bnk,nc->bkc", weights, self.coords)
        offset = self.coords[None, None] - centre[:, :, None]  # [B,K,N,2]
        spread = torch.einsum("bnk,bknc->bkc", weights, offset.pow(2)).sqrt()
        return self.coord_mlp(offset / (spread[:, :, None] + 0.05))

    def render(self, slots: Slots) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction float[B,N,D], alpha float[B,K,N]) from the slots alone."""
        x = self.net(slots.slots.unsqueeze(2) + self.position_code(slots))  # [B,K,N,D+1]
        values, alpha_logits = x[..., :-1], x[..., -1]
        if self.params.attn_prior:
            alpha_logits = alpha_logits + slots.attn.transpose(1, 2).clamp(min=1e-6).log()
        alpha = alpha_logits.softmax(dim=1)  # over slots
        return torch.einsum("bkn,bknd->bnd", alpha, values), alpha

    def generate(
        self,
        slots: Slots,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Deterministic: the decoded patches are the sample (steps, guidance unused)."""
        if self.params.target != "pixels":
            raise ValueError("the mlp decoder generates images only with target='pixels'")
        recon = self.render(slots)[0]
        return unpatchify(recon, self.grid, self.channels).clamp(0, 1)

    def forward(self, slots: Slots, features: Features, batch: Batch) -> ReconstructionOutput:
        recon, alpha = self.render(slots)
        if self.params.target == "pixels":
            target = patchify(batch.images, self.grid)
        else:
            assert features.targets is not None
            target = features.targets
        extras = {}
        if self.params.target == "pixels":
            extras["image"] = unpatchify(recon.detach(), self.grid, self.channels).clamp(0, 1)
        return ReconstructionOutput(
            reconstruction=recon, target=target, masks=alpha.transpose(1, 2), extras=extras
        )


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [MLPDecoder]
