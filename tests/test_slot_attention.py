"""Slot attention: attention normalisation, init modes, bi-level truncation."""

from __future__ import annotations

import dataclasses

import torch

from ocl_bench.contracts import Dims, Features
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
