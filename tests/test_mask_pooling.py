"""mask_pooling: hard pooling is the mean of each slot's argmax tokens, soft the
attention-weighted mean; slot attention's masks are kept for object discovery."""

from __future__ import annotations

import torch

from ocl_bench.api.contracts import Dims, Features
from ocl_bench.groupings.mask_pooling import MaskPooling, MaskPoolingParams, pool_tokens


def test_hard_pooling_is_the_mean_of_each_slots_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 12, 5, generator=gen)
    attn = torch.rand(2, 12, 3, generator=gen).softmax(-1)
    pooled = pool_tokens(tokens, attn, hard=True)
    owner = attn.argmax(-1)
    for b in range(2):
        for k in range(3):
            mine = tokens[b, owner[b] == k]
            expected = mine.mean(0) if len(mine) else torch.zeros(5)
            torch.testing.assert_close(pooled[b, k], expected)


def test_hard_pooling_gives_an_empty_slot_zeros() -> None:
    tokens = torch.randn(1, 4, 3)
    attn = torch.tensor([[[0.9, 0.1, 0.0]] * 4])
    pooled = pool_tokens(tokens, attn, hard=True)
    torch.testing.assert_close(pooled[0, 0], tokens[0].mean(0))
    assert torch.all(pooled[0, 1:] == 0)


def test_soft_pooling_is_the_attention_weighted_mean() -> None:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 9, 4, generator=gen)
    attn = torch.rand(2, 9, 3, generator=gen).softmax(-1)
    pooled = pool_tokens(tokens, attn, hard=False)
    for b in range(2):
        for k in range(3):
            w = attn[b, :, k]
            torch.testing.assert_close(pooled[b, k], (w[:, None] * tokens[b]).sum(0) / w.sum())


def test_straight_through_keeps_hard_values_and_passes_gradients() -> None:
    tokens = torch.randn(1, 6, 4)
    logits = torch.randn(1, 6, 3, requires_grad=True)
    attn = logits.softmax(-1)
    hard = pool_tokens(tokens, attn, hard=True)
    through = pool_tokens(tokens, attn, hard=True, straight_through=True)
    torch.testing.assert_close(through, hard)
    assert not hard.requires_grad
    through.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_grouping_pools_the_encoder_tokens_with_its_own_masks() -> None:
    torch.manual_seed(0)
    dims = Dims(image_size=(16, 16), token_dim=8)
    params = MaskPoolingParams(num_slots=3, slot_dim=6, mlp_hidden=12, hard=True)
    grouping = MaskPooling(params, dims)
    assert grouping.output_dims(Dims(image_size=(16, 16), token_dim=8)).slot_dim == 8
    features = Features(tokens=torch.randn(2, 16, 8), grid=(4, 4))
    slots = grouping(features)
    assert slots.slots.shape == (2, 3, 8)
    assert slots.attn.shape == (2, 16, 3) and slots.logits is not None
    torch.testing.assert_close(slots.slots, pool_tokens(features.tokens, slots.attn, True))
    soft = MaskPooling(MaskPoolingParams(num_slots=3, slot_dim=6, mlp_hidden=12, hard=False), dims)
    soft.load_state_dict(grouping.state_dict())
    torch.manual_seed(1)
    a = soft(features)
    torch.testing.assert_close(a.slots, pool_tokens(features.tokens, a.attn, False))
    # soft pooling trains slot attention through the slots; hard pooling does not
    a.slots.sum().backward()
    assert soft.to_q.weight.grad is not None and soft.to_q.weight.grad.abs().sum() > 0
    assert not grouping(features).slots.requires_grad
