"""The pre-LN transformer decoder block of SLATE and SPOT: causal self-attention over the
sequence, cross-attention to the slots, ReLU FFN.

One implementation serves decoders/slate.py and decoders/spot_ar.py (and through the
latter OCLF's DINOSAUR decoder). The module names are those of the official code
(transformer.py of github.com/singhgautam/slate and of github.com/gkakogeorgiou/spot):
`self_attn_layer_norm`, `self_attn.proj_{q,k,v,o}`, `encoder_decoder_attn_layer_norm`,
`encoder_decoder_attn.proj_{q,k,v,o}`, `ffn_layer_norm`, `ffn.{0,2}`. Checkpoint importers
map official keys onto them and stored runs load by them: renaming or re-registering a
module here breaks both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def linear(
    d_in: int, d_out: int, *, bias: bool, kaiming: bool = False, gain: float = 1.0
) -> nn.Linear:
    """SLATE's and SPOT's init: xavier-uniform with `gain` (or kaiming-uniform), zero bias."""
    layer = nn.Linear(d_in, d_out, bias=bias)
    if kaiming:
        nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
    else:
        nn.init.xavier_uniform_(layer.weight, gain)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def causal_mask(n: int, device: torch.device | None = None) -> Tensor:
    """bool[n, n], True where attention is forbidden (above the diagonal), as SPOT stores it."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


class Attention(nn.Module):
    """Multi-head attention with q/k/v/o projections (SLATE/SPOT layout: no biases, unless
    `bias`, as torch's nn.MultiheadAttention)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dropout: float = 0.0,
        gain: float = 1.0,
        bias: bool = False,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.attn_dropout = nn.Dropout(dropout)
        self.output_dropout = nn.Dropout(dropout)
        self.proj_q = linear(dim, dim, bias=bias)
        self.proj_k = linear(dim, dim, bias=bias)
        self.proj_v = linear(dim, dim, bias=bias)
        self.proj_o = linear(dim, dim, bias=bias, gain=gain)

    def split(self, x: Tensor, proj: nn.Linear) -> Tensor:
        """proj(x) [B,N,D] split into heads: [B,heads,N,D/heads]."""
        b, n, _ = x.shape
        return proj(x).view(b, n, self.heads, -1).transpose(1, 2)

    def folds(self, context_len: int) -> bool:
        """Whether folding (see `folded`) costs fewer multiplications: heads x keys < D."""
        return self.heads * context_len < self.proj_q.in_features

    def folded(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """Non-causal attention to a few keys (slots) without projecting every query.

        With S keys, each head's logits are x Wq_h^T k_h^T = x (Wq_h^T k_h^T): one
        [D, S] matrix per head and image instead of Wq applied to all T queries; the
        output projection folds into the values the same way (sum_h P_h (v_h Wo_h^T)).
        The products are the same as `forward`'s up to float rounding, at about
        heads * S / D of the cost of the two T x D x D projections.

        Returns (output [B,T,D], the softmax weights [B,heads,T,S] before dropout).
        """
        b, t, d = x.shape
        s, h = context.shape[1], self.heads
        k = self.proj_k(context).view(b, s, h, -1)
        v = self.proj_v(context).view(b, s, h, -1)
        scale = k.shape[-1] ** -0.5
        wq = self.proj_q.weight.view(h, -1, d)
        keys = torch.einsum("hed,bshe->bdhs", wq, k * scale).reshape(b, d, h * s)
        logits = torch.bmm(x, keys).view(b, t, h, s)
        if self.proj_q.bias is not None:
            bq = self.proj_q.bias.view(h, -1)
            logits = logits + torch.einsum("he,bshe->bhs", bq, k * scale).unsqueeze(1)
        weights = logits.softmax(dim=-1)
        wo = self.proj_o.weight.view(d, h, -1)
        values = torch.einsum("bshe,dhe->bhsd", v, wo).reshape(b, h * s, d)
        out = torch.bmm(self.attn_dropout(weights).reshape(b, t, h * s), values)
        if self.proj_o.bias is not None:
            out = out + self.proj_o.bias
        return self.output_dropout(out), weights.transpose(1, 2)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool = False, explicit: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Queries [B,heads,T,D/heads] attend to keys/values [B,heads,S,D/heads], all
        split into heads as `split` gives them (keys and values cached in autoregressive
        decoding), causally (T == S) or not.

        Returns (output [B,T,D], the softmax weights [B,heads,T,S] before dropout when
        `explicit`, else None: the fused kernel never materialises them).
        """
        b, _, t, _ = q.shape
        weights = None
        if explicit:
            q = q * q.shape[-1] ** -0.5
            logits = q @ k.transpose(-1, -2)
            if causal:  # the official bool mask: True above the diagonal = blocked
                logits = logits.masked_fill(causal_mask(t, q.device), float("-inf"))
            weights = logits.softmax(dim=-1)
            out = self.attn_dropout(weights) @ v
        else:
            p = self.attn_dropout.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.output_dropout(self.proj_o(out)), weights

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        causal: bool = False,
        explicit: bool = False,
        fold: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x [B,T,D] attends to context [B,S,D] (see `attend`); `fold` takes the `folded`
        path where it is cheaper (non-causal only), which always returns the weights."""
        if fold and not causal and self.folds(context.shape[1]):
            return self.folded(x, context)
        q = self.split(x, self.proj_q)
        k, v = self.split(context, self.proj_k), self.split(context, self.proj_v)
        return self.attend(q, k, v, causal, explicit)


class DecoderBlock(nn.Module):
    """Pre-LN block: causal self-attention -> cross-attention to slots -> ReLU FFN.

    `norm_residual` is the official quirk of block 0 in SLATE and SPOT: the input itself
    is replaced by its LayerNorm, so the residual stream starts from LN(input).
    `queries_first` (SPOT) or not (SLATE): which self-attention projection is made first,
    the same numbers but gradients summed in another order (see `forward`).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        cross_heads: int,
        ffn_dim: int,
        dropout: float,
        gain: float,
        norm_residual: bool,
        attention_bias: bool = False,
        queries_first: bool = True,
    ):
        super().__init__()
        self.norm_residual = norm_residual
        self.queries_first = queries_first
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout, gain, attention_bias)
        self.encoder_decoder_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_decoder_attn = Attention(dim, cross_heads, dropout, gain, attention_bias)
        self.ffn_layer_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            linear(dim, ffn_dim, bias=True, kaiming=True),
            nn.ReLU(),
            linear(ffn_dim, dim, bias=True, gain=gain),
            nn.Dropout(dropout),
        )

    def memory(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """This block's cross-attention keys and values of slots [B,K,D], split into heads:
        computed once for all the steps of autoregressive decoding."""
        a = self.encoder_decoder_attn
        return a.split(slots, a.proj_k), a.split(slots, a.proj_v)

    def forward(
        self,
        x: Tensor,
        slots: Tensor | tuple[Tensor, Tensor],
        *,
        cache: list[Tensor] | None = None,
        explicit_self: bool = False,
        explicit_cross: bool = False,
        fold_cross: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x [B,T,D] -> (x, the cross-attention weights [B,heads,T,K] when explicit or
        folded, else None).

        `slots` are [B,K,D], or their `memory`. With `cache` ([keys, values] of the
        positions before x, updated in place) x holds only the new positions, which see
        all of the cache and themselves: nothing is masked.
        """
        if self.norm_residual:
            x = self.self_attn_layer_norm(x)
            h = x
        else:
            h = self.self_attn_layer_norm(x)
        a = self.self_attn
        # Autograd sums the gradients of h's three projections in reverse order of their
        # making: SPOT's code projects the queries first, SLATE's the keys and values
        # (for its cache); each order is kept, so both train to the same bits as before.
        q = a.split(h, a.proj_q) if self.queries_first else None
        k, v = a.split(h, a.proj_k), a.split(h, a.proj_v)
        if q is None:
            q = a.split(h, a.proj_q)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        x = x + a.attend(q, k, v, cache is None, explicit_self)[0]
        h = self.encoder_decoder_attn_layer_norm(x)
        if isinstance(slots, tuple):
            c = self.encoder_decoder_attn
            h, weights = c.attend(c.split(h, c.proj_q), *slots, False, explicit_cross)
        else:
            h, weights = self.encoder_decoder_attn(h, slots, False, explicit_cross, fold_cross)
        x = x + h
        return x + self.ffn(self.ffn_layer_norm(x)), weights

    @torch.no_grad()
    def load_torch_layer(self, layer: nn.TransformerDecoderLayer) -> None:
        """Copy the weights of a torch pre-LN nn.TransformerDecoderLayer into this block.

        torch keeps q/k/v stacked in `in_proj_weight` [3D, D] / `in_proj_bias` [3D]; the
        biases are copied only when this block has attention biases.
        """
        pairs = (
            (self.self_attn, layer.self_attn),
            (self.encoder_decoder_attn, layer.multihead_attn),
        )
        for ours, theirs in pairs:
            projs = (ours.proj_q, ours.proj_k, ours.proj_v)
            for proj, w in zip(projs, theirs.in_proj_weight.chunk(3)):
                proj.weight.copy_(w)
            ours.proj_o.weight.copy_(theirs.out_proj.weight)
            if ours.proj_o.bias is not None:
                assert theirs.in_proj_bias is not None and theirs.out_proj.bias is not None
                for proj, b in zip(projs, theirs.in_proj_bias.chunk(3)):
                    proj.bias.copy_(b)
                ours.proj_o.bias.copy_(theirs.out_proj.bias)
        norms = (
            (self.self_attn_layer_norm, layer.norm1),
            (self.encoder_decoder_attn_layer_norm, layer.norm2),
            (self.ffn_layer_norm, layer.norm3),
            (self.ffn[0], layer.linear1),
            (self.ffn[2], layer.linear2),
        )
        for ours, theirs in norms:
            ours.load_state_dict(theirs.state_dict())


__all__ = ["Attention", "DecoderBlock", "causal_mask", "linear"]
