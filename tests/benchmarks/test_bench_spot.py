"""Benchmark: SPOT's decoder, forward + backward at ViT-B sizes, fused SDPA vs explicit.

B=8 images, N=196 tokens (14x14), D=768, K=7 slots of 256, 4 blocks, 6 heads: SPOT's
COCO setting. "sdpa" uses F.scaled_dot_product_attention for the self-attention and
folds the cross-attention's query and output projections into the 7 slots
(cross_attention = "folded"); "explicit" materialises the attention matrices in every
block and projects every query (the official code's way).

Run with
    OMP_NUM_THREADS=1 python -m pytest tests/benchmarks/test_bench_spot.py \
        --benchmark-enable --benchmark-min-rounds=3
under plain pytest each body runs once as a test.
"""

from __future__ import annotations

import pytest
import torch

from ocl_bench.api.contracts import Dims, Features, Slots
from ocl_bench.decoders.spot_ar import SpotARDecoder, SpotARParams

B, GRID, D, K, DS = 8, (14, 14), 768, 7, 256
SHAPE = "B=8, N=196, D=768, K=7, Ds=256, 4 blocks x 6 heads (SPOT ViT-B/16 COCO)"
_means: dict[str, float] = {}


def _decoder(attention: str) -> SpotARDecoder:
    torch.manual_seed(0)
    dims = Dims(image_size=(224, 224), grid=GRID, token_dim=D, target_dim=D, slot_dim=DS)
    cross = "projected" if attention == "explicit" else "folded"
    params = SpotARParams(
        num_layers=4,
        num_heads=6,
        train_order="standard",
        attention=attention,
        cross_attention=cross,
    )
    return SpotARDecoder(params, dims).train()


def _inputs() -> tuple[Slots, Features]:
    g = torch.Generator().manual_seed(1)
    n = GRID[0] * GRID[1]
    slots = torch.randn(B, K, DS, generator=g, requires_grad=True)
    targets = torch.randn(B, n, D, generator=g)
    attn = torch.full((B, n, K), 1.0 / K)
    return Slots(slots=slots, attn=attn), Features(tokens=targets, grid=GRID, targets=targets)


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_spot_decoder_forward_backward(benchmark, attention: str) -> None:
    dec = _decoder(attention)
    slots, feats = _inputs()

    def step() -> float:
        dec.zero_grad(set_to_none=True)
        slots.slots.grad = None
        out = dec(slots, feats, None)
        loss = (out.reconstruction - out.target).pow(2).mean()
        loss.backward()
        return float(loss.detach())

    loss = benchmark(step)
    assert loss == loss and slots.slots.grad is not None
    info = benchmark.extra_info
    info["attention"] = attention
    info["shape"] = SHAPE
    info["torch_threads"] = torch.get_num_threads()
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # only when benchmarking is enabled
        _means[attention] = stats.stats.mean
        info[f"{attention}_mean_s"] = stats.stats.mean
        if attention == "explicit" and "sdpa" in _means:
            info["sdpa_mean_s"] = _means["sdpa"]
            info["explicit_over_sdpa"] = _means["explicit"] / _means["sdpa"]


def test_sdpa_and_explicit_agree_at_vit_b_sizes() -> None:
    slots, feats = _inputs()
    fused, naive = _decoder("sdpa").eval(), _decoder("explicit").eval()
    naive.load_state_dict(fused.state_dict())
    with torch.no_grad():
        a = fused(slots, feats, None)
        b = naive(slots, feats, None)
    torch.testing.assert_close(a.reconstruction, b.reconstruction, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.masks, b.masks, atol=1e-5, rtol=1e-4)
