"""SPOT's decoder: cross-attention folded into the slots equals the projected one."""

from __future__ import annotations

import pytest
import torch

from ocl_bench.api.contracts import Dims, Features, Slots
from ocl_bench.decoders.spot_ar import Attention, SpotARDecoder, SpotARParams


@pytest.mark.parametrize("bias", [False, True])
def test_folded_cross_attention_equals_projected_with_gradients(bias: bool) -> None:
    torch.manual_seed(0)
    attn = Attention(64, 4, bias=bias)
    if bias:  # nonzero biases, so the bias terms are exercised
        for proj in (attn.proj_q, attn.proj_k, attn.proj_v, attn.proj_o):
            torch.nn.init.normal_(proj.bias)
    x = torch.randn(3, 20, 64, requires_grad=True)
    slots = torch.randn(3, 5, 64, requires_grad=True)
    assert attn.folds(5) and not attn.folds(16)  # 4 heads x 16 keys = D: no saving
    results = []
    for fold in (False, True):
        attn.zero_grad()
        x.grad = slots.grad = None
        out, weights = attn(x, slots, explicit=True, fold=fold)
        (out.square().sum() + (weights * torch.arange(5.0)).sum()).backward()
        grads = [x.grad, slots.grad, *(q.grad for q in attn.parameters())]
        results.append((out, weights, [g.clone() for g in grads]))
    (out_p, w_p, g_p), (out_f, w_f, g_f) = results
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_f, w_p, atol=1e-6, rtol=1e-5)
    # float rounding relative to the gradients' scale: q's bias gradient is a sum over
    # slots of terms that cancel (softmax), so it is itself rounding-sized
    scale = max(float(g.abs().max()) for g in g_p)
    for a, b in zip(g_f, g_p):
        torch.testing.assert_close(a, b, atol=2e-6 * scale, rtol=1e-4)


def test_folding_is_used_only_for_cross_attention_and_is_a_param() -> None:
    dims = Dims(image_size=(32, 32), grid=(4, 4), token_dim=48, target_dim=48, slot_dim=16)
    calls = {"folded": 0}
    original = Attention.folded

    def counting(self, x, context):
        calls["folded"] += 1
        return original(self, x, context)

    slots = Slots(slots=torch.randn(2, 3, 16), attn=torch.full((2, 16, 3), 1 / 3))
    feats = Features(tokens=torch.randn(2, 16, 48), grid=(4, 4), targets=torch.randn(2, 16, 48))
    Attention.folded = counting
    try:
        for mode, expected in (("folded", 2), ("projected", 0)):
            calls["folded"] = 0
            params = SpotARParams(num_layers=2, num_heads=4, cross_attention=mode)
            SpotARDecoder(params, dims).eval()(slots, feats, None)
            assert calls["folded"] == expected  # one per block's cross-attention
    finally:
        Attention.folded = original
