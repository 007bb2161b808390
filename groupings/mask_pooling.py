"""Mask pooling: slot attention's masks pool the encoder tokens into the slots (thesis 5.5.2).

The MSc thesis (../shared/seeds/000, sections 4.1.2 and 5.5.2, Table 5.3) conditions the
MAGE decoder on one of three slot sources computed from the unmasked branch:

- "Slots": the slot-attention slots themselves (the `slot_attention` grouping);
- "Soft mask pooling": each slot is the mean of the encoder tokens weighted by its
  attention column, attn[:, :, k] / sum_n attn[n, k] (every token feeds every slot);
- "Hard mask pooling" (the thesis default): each token goes to its argmax slot only and
  each slot is the plain mean of its tokens; a slot that wins no token is zero.

The thesis does not project the pooled tokens, so the slots keep the encoder's token
dimension (768 for MAGE ViT-B/16); the decoder's own slot projection maps them to its
width. The tokens pooled are `Features.tokens` as the encoder gives them (before slot
attention's LayerNorm and k/v projections). `attn` and `logits` stay slot attention's own,
so object discovery scores the same masks that pooled the slots.

Hard pooling has no gradient into slot attention through the slots (argmax), so slot
attention then learns only from losses on its masks (stage-1 teacher distillation,
`spot_self_training`) or from an auxiliary decoder on the slot-attention slots. The thesis
is silent on a straight-through estimator; `straight_through = true` adds one
(forward: hard weights; backward: the soft weights' gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ocl_bench.api.contracts import Dims, Features, Slots
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.groupings.slot_attention import SlotAttention, SlotAttentionParams


@dataclass(frozen=True)
class MaskPoolingParams(SlotAttentionParams):
    hard: bool = param(
        True, "true: mean of the tokens whose argmax slot is k; false: attention-weighted mean"
    )
    straight_through: bool = param(
        False, "hard pooling only: backpropagate through the soft weights (not in the thesis)"
    )


def pool_tokens(tokens: Tensor, attn: Tensor, hard: bool, straight_through: bool = False) -> Tensor:
    """Slots float[B,K,D] pooled from tokens float[B,N,D] under attn float[B,N,K].

    Soft: sum_n attn[n,k] x_n / sum_n attn[n,k]. Hard: the mean of the tokens whose argmax
    over slots is k (zeros for a slot with no token)."""
    if hard:
        weights = F.one_hot(attn.argmax(dim=-1), attn.shape[-1]).to(tokens.dtype)
        if straight_through:
            weights = weights + attn - attn.detach()
        counts = weights.detach().sum(dim=1).clamp_min(1.0)
    else:
        weights = attn.to(tokens.dtype)
        counts = weights.sum(dim=1).clamp_min(torch.finfo(tokens.dtype).tiny)
    return torch.einsum("bnk,bnd->bkd", weights, tokens) / counts.unsqueeze(-1)


@dataclass
class PooledSlots(Slots):
    """Slots pooled from the tokens, plus the slot-attention slots that made the masks
    (attention_slots float[B,K,Ds]): what an auxiliary decoder on slot attention reads."""

    attention_slots: Tensor | None = None


class MaskPooling(SlotAttention):
    """Slot attention whose slots are its masks' hard or soft pooling of the encoder tokens."""

    name = "mask_pooling"
    Params = MaskPoolingParams
    # The base run's sizes (switching grouping drops slot attention's).
    conformance = {
        "grouping.num_slots": 3,
        "grouping.slot_dim": 16,
        "grouping.mlp_hidden": 16,
        "grouping.iterations": 2,
    }
    provides = frozenset({"slots.slots", "slots.attn", "slots.logits"})

    def __init__(self, params: MaskPoolingParams, dims: Dims):
        super().__init__(params, dims)
        self.token_dim = dims.token_dim

    def output_dims(self, dims: Dims) -> Dims:
        dims.slot_dim, dims.num_slots = self.token_dim, self.params.num_slots
        return dims

    def forward(self, features: Features) -> Slots:
        grouped = super().forward(features)
        p = self.params
        pooled = pool_tokens(features.tokens, grouped.attn, p.hard, p.straight_through)
        # init is left out: it lives in slot attention's space, not the pooled tokens'
        return PooledSlots(
            slots=pooled,
            attn=grouped.attn,
            logits=grouped.logits,
            attention_slots=grouped.slots,
        )


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [MaskPooling]


__all__ = ["MaskPooling", "MaskPoolingParams", "PooledSlots", "pool_tokens"]
