"""Slot attention: attention normalisation, init modes, bi-level truncation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ocl_bench.api.contracts import Dims, Features
from ocl_bench.api.params import hashed_dict
from ocl_bench.groupings.slot_attention import SlotAttention, SlotAttentionParams


def make(**kw) -> SlotAttention:
    torch.manual_seed(0)
    params = dataclasses.replace(SlotAttentionParams(num_slots=5, slot_dim=16, mlp_hidden=32), **kw)
    return SlotAttention(params, Dims(image_size=(8, 8), grid=(4, 4), token_dim=12))


def features(b: int = 3) -> Features:
    g = torch.Generator().manual_seed(1)
    return Features(tokens=torch.randn(b, 16, 12, generator=g), grid=(4, 4))


def test_attention_is_softmax_over_slots_and_logits_match() -> None:
    out = make()(features())
    assert out.slots.shape == (3, 5, 16)
    assert out.attn.shape == (3, 16, 5)
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(3, 16))
    torch.testing.assert_close(out.attn, out.logits.softmax(-1))


def test_shared_gaussian_is_sampled_learned_queries_are_not() -> None:
    sa = make(init="shared_gaussian")
    f = features()
    assert not torch.equal(sa(f).slots, sa(f).slots)
    lq = make(init="learned_queries")
    torch.testing.assert_close(lq(f).slots, lq(f).slots)
    # every image starts from the same K queries
    init = lq(f).init
    torch.testing.assert_close(init[0], init[1])


def test_update_uses_weighted_mean_over_tokens() -> None:
    """With one iteration, the GRU input is attn renormalised over tokens times v."""
    sa = make(init="learned_queries", iterations=1)
    f = features(1)
    captured = {}
    sa.gru.register_forward_hook(lambda m, args, out: captured.setdefault("in", args[0]))
    out = sa(f)
    tokens = sa.norm_inputs(f.tokens)
    v = sa.to_v(tokens)
    w = out.attn + sa.params.eps
    w = w / w.sum(1, keepdim=True)
    expected = torch.einsum("bnk,bnd->bkd", w, v).reshape(-1, 16)
    torch.testing.assert_close(captured["in"], expected)


def test_bi_level_truncation_cuts_gradient_through_early_iterations() -> None:
    f = features()
    f.tokens.requires_grad_(True)

    def token_grad(truncation: str) -> torch.Tensor:
        sa = make(init="learned_queries", truncation=truncation, iterations=3)
        f.tokens.grad = None
        sa(f).slots.sum().backward()
        return f.tokens.grad.clone(), sa.queries.grad.clone()

    full_tok, full_q = token_grad("none")
    trunc_tok, trunc_q = token_grad("bi-level")
    # Same forward values, but a different gradient: only the last iteration is seen.
    assert not torch.allclose(full_tok, trunc_tok)
    # The queries still receive a (straight-through) gradient.
    assert trunc_q.abs().sum() > 0

    # The truncated gradient equals a one-iteration pass started from the detached slots.
    sa = make(init="learned_queries", truncation="bi-level", iterations=3)
    with torch.no_grad():
        tokens = sa.norm_inputs(f.tokens)
        k, v = sa.to_k(tokens) * sa.scale, sa.to_v(tokens)
        slots = sa.initial_slots(3, torch.device("cpu"))
        for _ in range(2):
            slots, _, _ = sa.step(slots, k, v)
    f.tokens.grad = None
    tokens = sa.norm_inputs(f.tokens)
    last, _, _ = sa.step(slots.detach(), sa.to_k(tokens) * sa.scale, sa.to_v(tokens))
    last.sum().backward()
    torch.testing.assert_close(f.tokens.grad, trunc_tok)


def test_forward_values_do_not_depend_on_truncation() -> None:
    f = features()
    a = make(init="learned_queries", truncation="none")(f)
    b = make(init="learned_queries", truncation="bi-level")(f)
    torch.testing.assert_close(a.slots, b.slots)
    torch.testing.assert_close(a.attn, b.attn)


def reference_multi_head(sa: SlotAttention, f: Features, heads: int) -> tuple:
    """MultiHeadSTEVESA's update written out head by head (learned queries, no position):
    per token one softmax over all (head, slot) logits; per head the weights renormalised
    over tokens, that head's value slice averaged; head updates concatenated."""
    tokens = sa.norm_inputs(f.tokens)
    k, v = sa.to_k(tokens) * sa.params.slot_dim**-0.5, sa.to_v(tokens)
    slots = sa.queries.expand(f.tokens.shape[0], -1, -1)
    d, n_slots = sa.params.slot_dim, sa.params.num_slots
    dh = d // heads
    for _ in range(sa.params.iterations):
        q = sa.to_q(sa.norm_slots(slots))
        logits = torch.stack(
            [
                k[..., i * dh : (i + 1) * dh] @ q[..., i * dh : (i + 1) * dh].transpose(1, 2)
                for i in range(heads)
            ],
            dim=2,
        )  # [B, N, H, K]
        attn = logits.reshape(*logits.shape[:2], -1).softmax(-1).reshape(logits.shape)
        updates = []
        for i in range(heads):
            w = attn[:, :, i] + sa.params.eps
            w = w / w.sum(1, keepdim=True)
            updates.append(w.transpose(1, 2) @ v[..., i * dh : (i + 1) * dh])
        update = torch.cat(updates, -1)
        slots = sa.gru(update.reshape(-1, d), slots.reshape(-1, d)).reshape(-1, n_slots, d)
        slots = slots + sa.update_mlp(sa.norm_mlp(slots))
    return slots, attn.sum(2)


def test_multi_head_attention_is_one_softmax_over_heads_and_slots() -> None:
    f = features()
    for heads in (1, 2, 4):
        sa = make(init="learned_queries", num_heads=heads)
        with torch.no_grad():
            out = sa(f)
            slots, attn = reference_multi_head(sa, f, heads)
        torch.testing.assert_close(out.slots, slots, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.attn, attn, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.attn.sum(-1), torch.ones(3, 16))  # still over slots
        torch.testing.assert_close(out.attn, out.logits.softmax(-1))
    # heads change the result (same weights: the parameters do not depend on num_heads)
    one, two = make(init="learned_queries"), make(init="learned_queries", num_heads=2)
    assert one.state_dict().keys() == two.state_dict().keys()
    assert not torch.allclose(one(f).slots, two(f).slots)


def test_new_params_keep_the_default_hash_and_check_their_values() -> None:
    hashed = hashed_dict(SlotAttentionParams())
    assert "num_heads" not in hashed and "pre_mlp_hidden" not in hashed
    assert hashed_dict(SlotAttentionParams(num_heads=2))["num_heads"] == 2
    with pytest.raises(ValueError, match="must divide by num_heads=3"):
        make(num_heads=3)
    with pytest.raises(ValueError, match="need pre_mlp = true"):
        make(pre_mlp_hidden=8)


def test_slotdiffusion_pre_mlp_and_linspace_position() -> None:
    sa = make(pre_mlp=True, pre_mlp_hidden=16, pre_mlp_out=16, position="linspace")
    # encoder_out_layer: LN(12) -> Linear(12, 16) -> ReLU -> Linear(16, 16)
    assert sa.pre_mlp[1][0].weight.shape == (16, 12) and sa.pre_mlp[1][2].weight.shape == (16, 16)
    code = sa.cartesian_code((3, 4), torch.device("cpu")).reshape(3, 4, 4)
    # SoftPositionEmbed's grid: linspace(0, 1) per axis, (row, col, 1 - row, 1 - col)
    torch.testing.assert_close(code[:, 0, 0], torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(code[0, :, 1], torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    torch.testing.assert_close(code[..., 2:], 1 - code[..., :2])
    cells = make(position="cartesian").cartesian_code((3, 4), torch.device("cpu"))
    assert not torch.allclose(cells, code.reshape(12, 4))
