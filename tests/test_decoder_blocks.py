"""The transformer decoder blocks SLATE and SPOT share (api/transformer.py): state_dict keys
and outputs stay those of the two decoders' former copies.

The keys are what checkpoint importers (importers/spot.py, the official SLATE mapping)
and stored runs load by; the checksums were computed with the decoders' own block classes
before they were merged into one, so a change of initialisation order, attention path or
residual layout shows as a different number.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from ocl_bench.api.contracts import Batch, Dims, Features, Slots
from ocl_bench.api.params import build_params
from ocl_bench.decoders.slate import SlateDecoder, SlateParams
from ocl_bench.decoders.spot_ar import SpotARDecoder, SpotARParams

SPOT_DIMS = Dims(image_size=(32, 32), grid=(4, 4), token_dim=32, target_dim=32, slot_dim=16)
SLATE_DIMS = Dims(image_size=(16, 16), slot_dim=8)

# name -> SpotARParams overrides; together they take every attention path of the block
SPOT_CASES: dict[str, dict] = {
    "spot": {},
    "explicit": {"attention": "explicit"},
    "projected": {"cross_attention": "projected", "eval_order": "all"},
    "cross_heads": {"num_cross_heads": 4, "first_block_uses_num_heads": False},
    "oclf": {
        "attention_bias": True,
        "final_norm": False,
        "init": "torch",
        "first_block_norm_residual": False,
    },
    "dropout": {"dropout": 0.1},
}


def keys_and_shapes(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def spot_outputs(overrides: dict) -> tuple[SpotARDecoder, dict[str, Tensor]]:
    """A seeded 2-block SPOT decoder, its weights, outputs and gradients (dropout in train
    mode when set)."""
    torch.manual_seed(0)
    params = SpotARParams(num_layers=2, num_heads=2, **overrides)
    dec = SpotARDecoder(params, SPOT_DIMS)
    g = torch.Generator().manual_seed(1)
    slots = torch.randn(2, 4, 16, generator=g, requires_grad=True)
    targets = torch.randn(2, 16, 32, generator=g)
    feats = Features(tokens=targets, grid=(4, 4), targets=targets)
    out: dict[str, Tensor] = {f"init.{k}": v.clone() for k, v in dec.state_dict().items()}
    dec.train(params.dropout > 0)
    torch.manual_seed(2)  # the random order in training, the dropout masks
    rec = dec(Slots(slots=slots, attn=torch.zeros(2, 16, 4)), feats, Batch(images=None))
    out["reconstruction"], out["masks"] = rec.reconstruction.detach(), rec.masks.detach()
    (rec.reconstruction.square().mean() + (rec.masks * torch.arange(4.0)).sum()).backward()
    out["grad.slots"] = slots.grad.clone()
    for k, p in dec.named_parameters():
        out[f"grad.{k}"] = p.grad.clone()
    return dec, out


def slate_outputs() -> tuple[SlateDecoder, dict[str, Tensor]]:
    """A seeded 2-block SLATE decoder: teacher-forced logits and masks (eval and with
    dropout), gradients, and generation with the key/value cache, greedy and sampled."""
    torch.manual_seed(0)
    base = {"d_model": 32, "num_layers": 2, "num_heads": 2, "vocab_size": 16}
    dec = SlateDecoder(
        build_params(SlateParams, {**base, "tokenizer_channels": 8}, "decoder"), SLATE_DIMS
    )
    out: dict[str, Tensor] = {f"init.{k}": v.clone() for k, v in dec.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    slots = torch.randn(2, 3, 8, generator=g)
    ids = torch.randint(16, (2, 16), generator=g)
    dec.eval()
    out["logits"], out["masks"] = dec.logits(slots, ids)
    out["greedy"] = dec.sample_ids(slots)
    dec.params = build_params(SlateParams, {**base, "sampling": "sample"}, "decoder")
    out["sampled"] = dec.sample_ids(slots, torch.Generator().manual_seed(3))
    dec.train()
    torch.manual_seed(2)
    logits, masks = dec.logits(slots.requires_grad_(), ids)
    out["train.logits"], out["train.masks"] = logits.detach(), masks.detach()
    (logits.logsumexp(-1).sum() + (masks * torch.arange(3.0)).sum()).backward()
    out["grad.slots"] = slots.grad.clone()
    for k, p in dec.named_parameters():
        if p.grad is not None:  # the dVAE takes no part in the transformer
            out[f"grad.{k}"] = p.grad.clone()
    return dec, out


def all_outputs() -> dict[str, tuple[torch.nn.Module, dict[str, Tensor]]]:
    cases: dict[str, Callable[[], tuple[torch.nn.Module, dict[str, Tensor]]]] = {
        f"spot.{name}": (lambda o=o: spot_outputs(o)) for name, o in SPOT_CASES.items()
    }
    cases["slate"] = slate_outputs
    return {name: make() for name, make in cases.items()}


def checksum(outputs: dict[str, Tensor]) -> tuple[float, float]:
    """(sum of squares, position-weighted sum) over every tensor, in float64: equal to the
    last digits on one machine, and within float rounding on another BLAS, where a hash of
    the bytes would not be."""
    squares = weighted = 0.0
    for i, (_, v) in enumerate(sorted(outputs.items())):
        x = v.detach().double().flatten()
        squares += x.square().sum().item()
        weighted += (i + 1) * (x * torch.linspace(1.0, 2.0, x.numel(), dtype=x.dtype)).sum().item()
    return squares, weighted


def keys_digest(module: torch.nn.Module) -> str:
    text = "\n".join(f"{k} {list(s)}" for k, s in keys_and_shapes(module))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# case -> (digest of the state_dict keys and shapes, tensors compared, checksum): computed
# with slate.py's Block/Attention and spot_ar.py's DecoderBlock/Attention before the merge
EXPECTED = {
    "spot.spot": ("c94b752931140c4d", 93, 7788.508006841118, 36025.990714575346),
    "spot.explicit": ("c94b752931140c4d", 93, 7788.50802229204, 36025.98997230858),
    "spot.projected": ("c94b752931140c4d", 93, 5316.75134007259, 35290.99905451803),
    "spot.cross_heads": ("c94b752931140c4d", 93, 5073.197730413838, 36506.012833551606),
    "spot.oclf": ("f992362b8e0c606c", 121, 4724.862158374988, 63480.57765098778),
    "spot.dropout": ("c94b752931140c4d", 93, 7499.023547067173, 36929.25804349059),
    "slate": ("3dc6aa6117e5aef6", 143, 27076.72343946925, 201748.945231749),
}

# one block's keys, the names the official checkpoints map onto (SPOT, SLATE)
BLOCK_KEYS = [
    "self_attn_layer_norm.weight",
    "self_attn_layer_norm.bias",
    "self_attn.proj_q.weight",
    "self_attn.proj_k.weight",
    "self_attn.proj_v.weight",
    "self_attn.proj_o.weight",
    "encoder_decoder_attn_layer_norm.weight",
    "encoder_decoder_attn_layer_norm.bias",
    "encoder_decoder_attn.proj_q.weight",
    "encoder_decoder_attn.proj_k.weight",
    "encoder_decoder_attn.proj_v.weight",
    "encoder_decoder_attn.proj_o.weight",
    "ffn_layer_norm.weight",
    "ffn_layer_norm.bias",
    "ffn.0.weight",
    "ffn.0.bias",
    "ffn.2.weight",
    "ffn.2.bias",
]


@pytest.fixture(scope="module")
def outputs() -> dict[str, tuple[torch.nn.Module, dict[str, Tensor]]]:
    return all_outputs()


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_keys_and_outputs_are_those_before_the_blocks_were_shared(case: str, outputs) -> None:
    module, out = outputs[case]
    keys, count, squares, weighted = EXPECTED[case]
    assert keys_digest(module) == keys, keys_and_shapes(module)
    assert len(out) == count
    assert checksum(out) == pytest.approx((squares, weighted), rel=1e-6)


@pytest.mark.parametrize("case", ["slate", "spot.spot"])
def test_block_keys_are_the_official_names(case: str, outputs) -> None:
    module, _ = outputs[case]
    block = [k[len("blocks.1.") :] for k in module.state_dict() if k.startswith("blocks.1.")]
    assert block == BLOCK_KEYS
