"""SPOT's autoregressive transformer decoder, as the official code builds it.

Kakogeorgiou et al., "SPOT: Self-Training with Patch-Order Permutation for Object-Centric
Learning with Autoregressive Transformers" (CVPR 2024); the official code is
github.com/gkakogeorgiou/spot (spot.py, transformer.py). This module re-implements it
from the facts listed in ../shared/reference/spot-and-mage.md (section c):

- teacher forcing: the input is `input_proj(cat[BOS, target[:, perm][:, :-1]])` with
  `input_proj = Linear(D, D, bias=False) + LayerNorm`; the target is the (detached)
  encoder target features; no position embedding is added;
- `slot_proj = Linear(slot_dim, D, bias=False) + LayerNorm` gives the cross-attention
  keys/values; a pre-LN TransformerDecoder (causal self-attention, cross-attention to
  the slots, ReLU FFN) ends with a LayerNorm whose output *is* the reconstruction;
- A_dec is the last block's cross-attention softmax [B, heads, N, K] (before dropout),
  summed over heads and L1-normalised over slots, un-permuted back to raster order;
- 9 patch orders with one learned BOS token per order; training picks one random
  order per batch, evaluation uses "standard", "random" or the average over "all".

The official code's quirks are named params whose default is the official behaviour
(`first_block_norm_residual`, `first_block_uses_num_heads`, `bos_per_order`).

The module keys mirror the official ones (`input_proj`, `slot_proj`, `bos_tokens`,
`blocks.i.{self_attn,encoder_decoder_attn}.proj_{q,k,v,o}`, ...) so an official
checkpoint maps onto it by prefix (importers/spot.py); the official bool
`self_attn_mask` parameters are not stored (the causal mask is rebuilt on the fly). The
blocks are ocl_bench.api.transformer's DecoderBlock, which SLATE's decoder shares.

DINOSAUR's autoregressive decoder in OCLF (amazon-science/object-centric-learning-framework)
is the same architecture without the first-block quirk (`first_block_norm_residual =
false`: torch's layer has none) and with three more differences, each a named param whose
default is SPOT's behaviour (the dinosaur-transformer-coco preset sets the OCLF values):

- `attention_bias`: OCLF builds torch's `nn.TransformerDecoderLayer(norm_first=True,
  activation="relu", dim_feedforward=4 * D, dropout=0.0, batch_first=True)`
  (ocl/neural_networks/convenience.py build_transformer_decoder); its nn.MultiheadAttention
  has biases on the q/k/v (in_proj_bias) and output (out_proj.bias) projections;
- `final_norm`: OCLF's TransformerDecoderWithAttention is built with norm=None
  (ocl/neural_networks/extensions.py), so the last block's output is the reconstruction,
  with no final LayerNorm (and AutoregressivePatchDecoder adds no output transform,
  ocl/decoding.py, use_output_transform false);
- `init`: torch's own initialisation of that layer (xavier-uniform over the stacked
  [3D, D] in_proj_weight, zero attention biases, nn.Linear's default init for out_proj
  and the FFN) and nn.TransformerDecoder's `_get_clones`, which deep-copies one layer, so
  every block starts from the same weights. SPOT uses xavier per projection, kaiming for
  the FFN's first layer, a (3 * num_layers) ** -0.5 gain on the residual outputs, zero
  biases and independent blocks.

The rest matches OCLF's AutoregressivePatchDecoder (ocl/decoding.py) with the DINOSAUR
config (configs/experiment/projects/bridging/dinosaur/coco_feat_rec_dino_base16_auto.yaml):
one BOS token `randn * D ** -0.5` (`bos_std`), `use_input_transform` = Linear(D, D,
bias=False) + LayerNorm on cat[BOS, targets[:, :-1]], the slots projected to memory by
Linear(slot_dim, D, bias=False) + LayerNorm (decoder_cond_dim = D), no position
embedding, the causal mask on the self-attention, and `use_decoder_masks` with
attention_weight_type -1: the masks are the last block's cross-attention weights averaged
over heads (nn.MultiheadAttention's average_attn_weights), which equals the sum over
heads renormalised over slots used here. With dropout > 0 two details still differ:
torch's layer also drops out the FFN hidden units, and its returned attention weights
are taken after dropout (OCLF's DINOSAUR uses dropout 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, Dims, Features, ReconstructionOutput, Slots
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Decoder
from ocl_bench.api.transformer import Attention, DecoderBlock, causal_mask, linear
from ocl_bench.encoders.vit import TINY_VIT_ENCODER

# The official order of the 9 permutations (S:spot.py); index 0 is the raster order.
ORDER_NAMES = (
    "standard",  # rows top->bottom, columns left->right (raster)
    "top_left",  # columns left->right, rows top->bottom
    "top_right",  # columns right->left, rows top->bottom
    "right_top",  # rows top->bottom, columns right->left
    "bottom_right",  # columns right->left, rows bottom->top
    "right_bottom",  # rows bottom->top, columns right->left (reversed raster)
    "bottom_left",  # columns left->right, rows bottom->top
    "left_bottom",  # rows bottom->top, columns left->right
    "spiral",  # reversed clockwise spiral from the top-right corner: centre -> (0, w-1)
)


def spiral_order(h: int, w: int) -> Tensor:
    """SPOT's spiral: the clockwise spiral that starts at the top-right corner and runs
    down the last column, then reversed (so it starts at the centre and ends at (0, w-1)).

    Built by repeatedly taking the first row of the grid rotated 90 degrees
    counter-clockwise and rotating the rest again.
    """
    rest = torch.rot90(torch.arange(h * w).reshape(h, w), 1, (0, 1))
    pieces = []
    while rest.numel():
        pieces.append(rest[0])
        rest = torch.rot90(rest[1:], 1, (0, 1))
    return torch.cat(pieces).flip(0)


def patch_orders(h: int, w: int) -> list[Tensor]:
    """The 9 SPOT patch orders on an h x w grid; order[i] lists raster indices in the
    sequence the decoder visits them."""
    g = torch.arange(h * w).reshape(h, w)
    flipped_lr, flipped_ud = g.flip(1), g.flip(0)
    both = g.flip(0).flip(1)
    orders = [
        g.flatten(),
        g.t().flatten(),
        flipped_lr.t().flatten(),
        flipped_lr.flatten(),
        both.t().flatten(),
        both.flatten(),
        flipped_ud.t().flatten(),
        flipped_ud.flatten(),
        spiral_order(h, w),
    ]
    return [o.contiguous() for o in orders]


@dataclass(frozen=True)
class SpotARParams:
    num_layers: int = param(4, "transformer decoder blocks", ge=1)
    num_heads: int = param(6, "attention heads (head dim = D / heads; D = 768 gives 128)", ge=1)
    num_cross_heads: int = param(0, "cross-attention heads of blocks 1.. (0 = num_heads)", ge=0)
    first_block_uses_num_heads: bool = param(
        True, "official quirk: block 0's cross-attention uses num_heads, not num_cross_heads"
    )
    first_block_norm_residual: bool = param(
        True, "official quirk: block 0 replaces its input by LN(input) before the residual"
    )
    ffn_multiplier: int = param(4, "FFN hidden size = ffn_multiplier * D (ReLU)", ge=1)
    dropout: float = param(
        0.0, "dropout on attention weights, attention and FFN outputs", ge=0, lt=1
    )
    orders: Literal["standard", "all"] = param(
        "all", "patch orders enabled: the raster order only, or all 9 SPOT orders"
    )
    train_order: Literal["random", "standard", "all"] = param(
        "random",
        "orders used in training: one random enabled order per batch (SPOT), the raster "
        "order, or the average of all enabled orders",
    )
    eval_order: Literal["standard", "random", "all"] = param(
        "standard",
        "orders used in eval: raster (official script default), one random order per "
        "batch, or A_dec/reconstruction averaged over all enabled orders (SPOT's README "
        "numbers use 'all')",
    )
    bos_per_order: bool = param(
        True, "one learned BOS token per order, the only order signal (official)"
    )
    bos_std: float = param(0.02, "std of the BOS tokens at initialisation", ge=0)
    attention: Literal["sdpa", "explicit"] = param(
        "sdpa",
        "fused scaled_dot_product_attention (the last block's cross-attention is always "
        "explicit, for A_dec), or explicit attention matrices in every block",
    )
    cross_attention: Literal["folded", "projected"] = param(
        "folded",
        "cross-attention to the slots: 'folded' (the query and output projections folded"
        " into the K slots, heads * K / D of their cost, equal up to float rounding; used"
        " when heads * K < D) or 'projected' (every query token projected, the official way)",
    )
    attention_bias: bool = param(
        False,
        "biases on the q/k/v/out projections of every attention; false = SPOT (none), true ="
        " OCLF (torch nn.MultiheadAttention's in_proj_bias and out_proj.bias)",
    )
    final_norm: bool = param(
        True,
        "LayerNorm on the last block's output (SPOT); false = none, the last block's output"
        " is the reconstruction (OCLF: nn.TransformerDecoder with norm=None)",
    )
    init: Literal["spot", "torch"] = param(
        "spot",
        "block initialisation: 'spot' (xavier, kaiming FFN-in, (3 * num_layers) ** -0.5 gain"
        " on residual outputs, zero biases, independent blocks) or 'torch' (OCLF: torch's"
        " nn.TransformerDecoderLayer init, every block a copy of the first, as"
        " nn.TransformerDecoder clones it)",
    )


# One spot_ar block over the tiny ViT (its features are the targets): the conformance run
# of SPOT's decoder and of the objectives that train with it.
TINY_SPOT_RUN: dict[str, Any] = {
    **TINY_VIT_ENCODER,
    "decoder.name": "spot_ar",
    "decoder.num_layers": 1,
    "decoder.num_heads": 2,
}


class SpotARDecoder(nn.Module, Decoder):
    """SPOT's autoregressive transformer decoder over encoder features, 9 patch orders."""

    kind = "decoder"
    name = "spot_ar"
    Params = SpotARParams
    conformance = TINY_SPOT_RUN
    requires = frozenset({"features.targets", "slots.slots"})
    provides = frozenset({"decoding.masks"})

    def __init__(self, params: SpotARParams, dims: Dims):
        super().__init__()
        if dims.grid is None or dims.slot_dim is None:
            raise ValueError("the spot_ar decoder needs the token grid and the slot dimension")
        if dims.target_dim is None:
            raise ValueError("the spot_ar decoder needs an encoder that provides targets")
        if params.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {params.num_layers}")
        self.params = params
        self.grid = dims.grid
        d = self.dim = dims.target_dim
        cross = params.num_cross_heads or params.num_heads
        for heads in {params.num_heads, cross}:
            if heads < 1 or d % heads:
                raise ValueError(f"target dimension {d} is not divisible by {heads} heads")
        orders = patch_orders(*dims.grid)[: 9 if params.orders == "all" else 1]
        self.register_buffer("orders", torch.stack(orders), persistent=False)
        n_bos = len(orders) if params.bos_per_order else 1
        self.bos_tokens = nn.Parameter(torch.randn(n_bos, 1, 1, d) * params.bos_std)
        self.input_proj = nn.Sequential(linear(d, d, bias=False), nn.LayerNorm(d))
        self.slot_proj = nn.Sequential(linear(dims.slot_dim, d, bias=False), nn.LayerNorm(d))
        gain = (3 * params.num_layers) ** -0.5
        self.blocks = nn.ModuleList(
            DecoderBlock(
                d,
                params.num_heads,
                params.num_heads if i == 0 and params.first_block_uses_num_heads else cross,
                params.ffn_multiplier * d,
                params.dropout,
                gain,
                norm_residual=i == 0 and params.first_block_norm_residual,
                attention_bias=params.attention_bias,
            )
            for i in range(params.num_layers)
        )
        if params.init == "torch":
            # OCLF: one torch layer, deep-copied num_layers times by nn.TransformerDecoder
            layer = nn.TransformerDecoderLayer(
                d,
                params.num_heads,
                params.ffn_multiplier * d,
                dropout=0.0,
                batch_first=True,
                norm_first=True,
            )
            for block in self.blocks:
                block.load_torch_layer(layer)
        # no module (so no state_dict keys) without the final norm
        self.layer_norm = nn.LayerNorm(d) if params.final_norm else nn.Identity()

    def output_dims(self, dims: Dims) -> Dims:
        return dims

    @property
    def num_orders(self) -> int:
        return int(self.orders.shape[0])

    def order_ids(self, mode: str) -> list[int]:
        """Which orders one forward pass uses: 'standard', 'random' (one per batch) or 'all'."""
        if mode == "standard":
            return [0]
        if mode == "random":  # torch's RNG, so resumed runs draw the same orders
            return [int(torch.randint(self.num_orders, ()).item())]
        if mode == "all":
            return list(range(self.num_orders))
        raise ValueError(f"unknown order mode {mode!r}")

    def transformer(self, x: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        """(output [B,N,D] after the final LN if any, last block's cross-attention
        [B,heads,N,K])."""
        explicit = self.params.attention == "explicit"
        fold = self.params.cross_attention == "folded"
        weights = None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            cross = explicit or i == last
            x, weights = block(
                x, slots, explicit_self=explicit, explicit_cross=cross, fold_cross=fold
            )
        assert weights is not None
        return self.layer_norm(x), weights

    def decode(
        self, slots: Tensor, targets: Tensor, order_ids: list[int], grid: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Teacher-forced decoding in each order of `order_ids`, averaged.

        slots [B,K,Ds], targets [B,N,D] -> (reconstruction [B,N,D], A_dec [B,N,K]), both
        in raster order.
        """
        b, n, d = targets.shape
        orders = self.orders if tuple(grid) == tuple(self.grid) else None
        if orders is None:
            orders = torch.stack(patch_orders(*grid)[: self.num_orders]).to(targets.device)
        kv = self.slot_proj(slots)
        recons, masks = [], []
        for i in order_ids:
            perm = orders[i]
            inverse = torch.argsort(perm)
            bos = self.bos_tokens[i if self.params.bos_per_order else 0].expand(b, 1, d)
            x = self.input_proj(torch.cat([bos.to(targets.dtype), targets[:, perm[:-1]]], 1))
            out, weights = self.transformer(x, kv)
            a_dec = weights.sum(dim=1)
            a_dec = a_dec / a_dec.sum(dim=-1, keepdim=True)
            recons.append(out[:, inverse])
            masks.append(a_dec[:, inverse])
        if len(order_ids) == 1:
            return recons[0], masks[0]
        return torch.stack(recons).mean(0), torch.stack(masks).mean(0)

    def forward(self, slots: Slots, features: Features, batch: Batch) -> ReconstructionOutput:
        if features.targets is None:
            raise ValueError("the spot_ar decoder needs Features.targets")
        targets = features.targets.detach()  # SPOT's targets come from a frozen encoder
        mode = self.params.train_order if self.training else self.params.eval_order
        ids = self.order_ids(mode)
        recon, masks = self.decode(slots.slots, targets, ids, features.grid)
        return ReconstructionOutput(
            reconstruction=recon,
            target=targets,
            masks=masks,
            extras={"orders": torch.tensor(ids)},
        )


@dataclass(frozen=True)
class DinosaurTransformerParams(SpotARParams):
    orders: Literal["standard", "all"] = param(
        "standard", "patch orders enabled: the raster order only (DINOSAUR), or all 9"
    )
    train_order: Literal["random", "standard", "all"] = param(
        "standard", "orders used in training (DINOSAUR: the raster order)"
    )


class DinosaurTransformerDecoder(SpotARDecoder):
    """DINOSAUR's autoregressive transformer decoder: SPOT's decoder in raster order only.

    This is the DINOSAUR baseline as SPOT re-implements it
    (`train_spot.py --train_permutations standard`): one BOS token, raster order. With
    `attention_bias = true`, `final_norm = false`, `init = "torch"` and
    `first_block_norm_residual = false` it is OCLF's DINOSAUR decoder (module docstring).
    """

    name = "dinosaur_transformer"
    Params = DinosaurTransformerParams


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [SpotARDecoder, DinosaurTransformerDecoder]


__all__ = [
    "ORDER_NAMES",
    "Attention",
    "DecoderBlock",
    "DinosaurTransformerDecoder",
    "SpotARDecoder",
    "SpotARParams",
    "causal_mask",
    "patch_orders",
    "spiral_order",
]
