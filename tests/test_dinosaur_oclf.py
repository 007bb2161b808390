"""DINOSAUR as OCLF builds it: the decoder and pre-MLP options and the DINOSAUR presets.

OCLF (amazon-science/object-centric-learning-framework) facts used here:
- ocl/neural_networks/convenience.py build_transformer_decoder: a stack of
  nn.TransformerDecoderLayer(norm_first=True, batch_first=True, ReLU, dim_feedforward
  4 * D, dropout 0.0), cloned by nn.TransformerDecoder;
- ocl/neural_networks/extensions.py TransformerDecoderWithAttention: norm=None, masks = the
  last layer's cross-attention weights (need_weights=True, averaged over heads);
- ocl/decoding.py AutoregressivePatchDecoder: inputs = inp_transform(cat[bos, targets[:, :-1]]),
  memory = cond_transform(slots), a float -inf causal mask, no output transform;
- configs/.../dinosaur/_base_feature_recon.yaml: pre-MLP = build_two_layer_mlp(768 -> 768
  -> feature_dim = object_dim, initial_layer_norm), slot attention on feature_dim inputs.

The reference below is written against torch's own layers, not our modules: our weights
are copied into nn.TransformerDecoderLayer instances key by key.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, Dims, Features, Slots
from ocl_bench.decoders.spot_ar import (
    DinosaurTransformerDecoder,
    DinosaurTransformerParams,
    SpotARParams,
)
from ocl_bench.groupings.slot_attention import SlotAttention, SlotAttentionParams
from ocl_bench.run.config import load_config
from tests.test_presets import SMOKE

D, DS, K, HEADS, LAYERS, G = 32, 16, 4, 4, 3, 4
N = G * G
OCLF = {"attention_bias": True, "final_norm": False, "first_block_norm_residual": False}


def dims() -> Dims:
    return Dims(image_size=(32, 32), grid=(G, G), token_dim=D, target_dim=D, slot_dim=DS)


def oclf_decoder(**kw: object) -> DinosaurTransformerDecoder:
    torch.manual_seed(0)
    params = DinosaurTransformerParams(num_layers=LAYERS, num_heads=HEADS, **{**OCLF, **kw})
    dec = DinosaurTransformerDecoder(params, dims())
    with torch.no_grad():  # every bias and LayerNorm non-trivial, so the check sees them all
        for name, p in dec.named_parameters():
            if name.endswith("bias") or "norm" in name or name.endswith(".1.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return dec.eval()


def inputs(b: int = 2) -> tuple[Slots, Features]:
    g = torch.Generator().manual_seed(1)
    slots = Slots(slots=torch.randn(b, K, DS, generator=g), attn=torch.rand(b, N, K, generator=g))
    targets = torch.randn(b, N, D, generator=g)
    return slots, Features(tokens=targets, grid=(G, G), targets=targets)


def torch_layers(dec: DinosaurTransformerDecoder) -> list[nn.TransformerDecoderLayer]:
    """torch pre-LN decoder layers holding our decoder's block weights (OCLF's layer)."""
    sd = dec.state_dict()
    layers = []
    for i in range(LAYERS):
        layer = nn.TransformerDecoderLayer(
            D, HEADS, 4 * D, dropout=0.0, activation="relu", batch_first=True, norm_first=True
        )
        p = f"blocks.{i}."
        state = {}
        for theirs, ours in (
            ("self_attn", "self_attn"),
            ("multihead_attn", "encoder_decoder_attn"),
        ):
            q, k, v, o = (f"{p}{ours}.proj_{w}" for w in "qkvo")
            state[f"{theirs}.in_proj_weight"] = torch.cat([sd[f"{x}.weight"] for x in (q, k, v)])
            state[f"{theirs}.in_proj_bias"] = torch.cat([sd[f"{x}.bias"] for x in (q, k, v)])
            state[f"{theirs}.out_proj.weight"] = sd[f"{o}.weight"]
            state[f"{theirs}.out_proj.bias"] = sd[f"{o}.bias"]
        for theirs, ours in (
            ("norm1", "self_attn_layer_norm"),
            ("norm2", "encoder_decoder_attn_layer_norm"),
            ("norm3", "ffn_layer_norm"),
            ("linear1", "ffn.0"),
            ("linear2", "ffn.2"),
        ):
            for w in ("weight", "bias"):
                state[f"{theirs}.{w}"] = sd[f"{p}{ours}.{w}"]
        layer.load_state_dict(state)
        layers.append(layer.eval())
    return layers


def oclf_forward(dec: DinosaurTransformerDecoder, slots: Tensor, targets: Tensor):
    """OCLF's AutoregressivePatchDecoder forward on torch layers: (recon, masks [B,N,K])."""
    sd = dec.state_dict()
    b = targets.shape[0]

    def ln(x: Tensor, prefix: str) -> Tensor:
        return F.layer_norm(x, (D,), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])

    memory = ln(slots @ sd["slot_proj.0.weight"].T, "slot_proj.1")
    x = torch.cat([sd["bos_tokens"][0].expand(b, 1, D), targets[:, :-1]], dim=1)
    x = ln(x @ sd["input_proj.0.weight"].T, "input_proj.1")
    mask = torch.triu(torch.full((N, N), float("-inf")), diagonal=1)
    weights = None
    for layer in torch_layers(dec):
        # OCLF's TransformerDecoderWithAttention reads the cross-attention weights (mean
        # over heads) through need_weights=True; the explicit steps are checked against
        # torch's own layer forward as well.
        h = layer.norm1(x)
        x1 = x + layer.self_attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        out, weights = layer.multihead_attn(layer.norm2(x1), memory, memory, need_weights=True)
        x2 = x1 + out
        x3 = x2 + layer.linear2(F.relu(layer.linear1(layer.norm3(x2))))
        torch.testing.assert_close(layer(x, memory, tgt_mask=mask), x3)
        x = x3
    assert weights is not None
    return x, weights  # no final norm (norm=None), no output transform


# ------------------------------------------------------------------ decoder


def test_defaults_are_spot() -> None:
    p = SpotARParams()
    assert (p.attention_bias, p.final_norm, p.init) == (False, True, "spot")
    dec = DinosaurTransformerDecoder(DinosaurTransformerParams(num_layers=2, num_heads=2), dims())
    keys = set(dec.state_dict())
    assert {"layer_norm.weight", "layer_norm.bias"} <= keys
    assert not any(".proj_" in k and k.endswith(".bias") for k in keys)


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_oclf_decoder_equals_torch_transformer_decoder_layers(attention: str) -> None:
    dec = oclf_decoder(attention=attention)
    keys = set(dec.state_dict())
    assert not any(k.startswith("layer_norm.") for k in keys)  # no final norm
    for i in range(LAYERS):
        for attn in ("self_attn", "encoder_decoder_attn"):
            for w in "qkvo":
                assert f"blocks.{i}.{attn}.proj_{w}.bias" in keys
    slots, feats = inputs()
    with torch.no_grad():
        out = dec(slots, feats, Batch(images=torch.zeros(2, 3, 32, 32)))
        recon, masks = oclf_forward(dec, slots.slots, feats.targets)
    torch.testing.assert_close(out.reconstruction, recon, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.masks, masks, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.masks.sum(-1), torch.ones(2, N))


def test_each_option_changes_the_output() -> None:
    """The reference above would also pass for a decoder ignoring an option if the option
    had no effect; each one does change the computation."""
    slots, feats = inputs()
    batch = Batch(images=torch.zeros(2, 3, 32, 32))
    with torch.no_grad():
        ref = oclf_decoder()(slots, feats, batch).reconstruction
        with_norm = oclf_decoder(final_norm=True)
        with_norm.load_state_dict(oclf_decoder().state_dict(), strict=False)
        assert not torch.allclose(with_norm(slots, feats, batch).reconstruction, ref)
        no_bias = oclf_decoder()
        for name, p in no_bias.named_parameters():
            if ".proj_" in name and name.endswith("bias"):
                p.zero_()
        assert not torch.allclose(no_bias(slots, feats, batch).reconstruction, ref)


def test_torch_init_clones_one_torch_layer() -> None:
    torch.manual_seed(0)
    params = DinosaurTransformerParams(num_layers=LAYERS, num_heads=HEADS, **OCLF, init="torch")
    dec = DinosaurTransformerDecoder(params, dims())
    blocks = [b.state_dict() for b in dec.blocks]
    for other in blocks[1:]:  # nn.TransformerDecoder deep-copies the one layer
        assert other.keys() == blocks[0].keys()
        assert all(torch.equal(other[k], blocks[0][k]) for k in other)
    first = blocks[0]
    for attn in ("self_attn", "encoder_decoder_attn"):
        # xavier-uniform over the stacked [3D, D] in_proj_weight: bound sqrt(6 / (D + 3D))
        qkv = torch.cat([first[f"{attn}.proj_{w}.weight"] for w in "qkv"])
        bound = math.sqrt(6 / (4 * D))
        assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
        for w in "qkvo":
            assert torch.count_nonzero(first[f"{attn}.proj_{w}.bias"]) == 0
        # out_proj keeps nn.Linear's kaiming-uniform(a=sqrt(5)): bound 1 / sqrt(D), no gain
        assert first[f"{attn}.proj_o.weight"].abs().max() <= D**-0.5
        assert first[f"{attn}.proj_o.weight"].abs().max() > 0.9 * D**-0.5
    # the FFN keeps nn.Linear's default init, uniform biases included (SPOT: zero biases)
    assert torch.count_nonzero(first["ffn.0.bias"]) > 0
    assert torch.count_nonzero(first["ffn.2.bias"]) > 0
    spot = DinosaurTransformerDecoder(dataclasses.replace(params, init="spot"), dims())
    assert torch.count_nonzero(spot.blocks[0].ffn[0].bias) == 0
    assert not torch.equal(spot.blocks[0].ffn[0].weight, spot.blocks[1].ffn[0].weight)


# ------------------------------------------------------------------ pre-MLP


def slot_attention(**kw: object) -> SlotAttention:
    torch.manual_seed(0)
    params = SlotAttentionParams(num_slots=K, slot_dim=DS, mlp_hidden=32, pre_mlp=True, **kw)
    return SlotAttention(params, Dims(image_size=(32, 32), grid=(G, G), token_dim=D))


def test_pre_mlp_out_changes_the_key_value_input_size() -> None:
    spot = slot_attention()
    assert spot.to_k.in_features == spot.to_v.in_features == D
    assert spot.pre_mlp[1][-1].out_features == D

    sa = slot_attention(pre_mlp_out=DS, init="learned_queries")
    assert sa.pre_mlp[1][0].in_features == sa.pre_mlp[1][0].out_features == D  # 32 -> 32
    assert sa.pre_mlp[1][-1].out_features == DS  # -> 16
    assert sa.to_k.in_features == sa.to_v.in_features == DS
    assert sa.norm_inputs.normalized_shape == (DS,)

    tokens = torch.randn(2, N, D, generator=torch.Generator().manual_seed(3))
    seen = {}
    sa.to_k.register_forward_hook(lambda m, args, out: seen.setdefault("k_in", args[0]))
    out = sa(Features(tokens=tokens, grid=(G, G)))
    assert out.slots.shape == (2, K, DS)
    # OCLF: LN(768) -> Linear -> ReLU -> Linear(-> feature_dim) -> norm_input -> to_k
    sd = sa.state_dict()
    x = F.layer_norm(tokens, (D,), sd["pre_mlp.0.weight"], sd["pre_mlp.0.bias"])
    x = F.relu(F.linear(x, sd["pre_mlp.1.0.weight"], sd["pre_mlp.1.0.bias"]))
    x = F.linear(x, sd["pre_mlp.1.2.weight"], sd["pre_mlp.1.2.bias"])
    x = F.layer_norm(x, (DS,), sd["norm_inputs.weight"], sd["norm_inputs.bias"])
    torch.testing.assert_close(seen["k_in"], x)


def test_pre_mlp_out_needs_the_pre_mlp() -> None:
    params = SlotAttentionParams(slot_dim=DS, pre_mlp=False, pre_mlp_out=DS)
    with pytest.raises(ValueError, match="pre_mlp_out and pre_mlp_hidden need pre_mlp"):
        SlotAttention(params, Dims(image_size=(32, 32), grid=(G, G), token_dim=D))


def test_zero_mlp_bias() -> None:
    def biases(sa: SlotAttention) -> list[Tensor]:
        mods = [*sa.pre_mlp.modules(), *sa.update_mlp.modules()]
        return [m.bias for m in mods if isinstance(m, nn.Linear)]

    assert len(biases(slot_attention())) == 4
    assert all(torch.count_nonzero(b) > 0 for b in biases(slot_attention()))
    assert all(torch.count_nonzero(b) == 0 for b in biases(slot_attention(zero_mlp_bias=True)))


# ------------------------------------------------------------------ presets


def test_mlp_decoder_zero_bias() -> None:
    from ocl_bench.decoders.mlp import MLPDecoder, MLPDecoderParams

    dims = Dims(image_size=(32, 32), channels=3, grid=(4, 4), slot_dim=16, target_dim=24)
    biases = {}
    for zero in (False, True):
        torch.manual_seed(0)
        params = MLPDecoderParams(hidden=32, target="features", zero_bias=zero)
        decoder = MLPDecoder(params, dims)
        biases[zero] = [m.bias for m in decoder.modules() if isinstance(m, nn.Linear)]
    assert len(biases[True]) == 4  # three hidden layers and the output layer
    assert all(torch.count_nonzero(b) == 0 for b in biases[True])
    assert all(torch.count_nonzero(b) > 0 for b in biases[False])


def test_dinosaur_presets_use_the_oclf_values() -> None:
    for name in ("dinosaur-transformer-coco", "dinosaur-mlp-coco"):
        g = load_config(name).grouping.params
        assert (g.pre_mlp, g.pre_mlp_out, g.zero_mlp_bias) == (True, g.slot_dim, True)
    assert load_config("dinosaur-mlp-coco").decoder.params.zero_bias
    d = load_config("dinosaur-transformer-coco").decoder.params
    assert (d.attention_bias, d.final_norm, d.init) == (True, False, "torch")
    assert not d.first_block_norm_residual and d.dropout == 0.0
    for name in ("spot-coco", "spot-voc", "spot-coco-stage2"):  # SPOT keeps SPOT's values
        cfg = load_config(name)
        assert (cfg.grouping.params.pre_mlp_out, cfg.grouping.params.zero_mlp_bias) == (0, False)
        d = cfg.decoder.params
        assert (d.attention_bias, d.final_norm, d.init) == (False, True, "spot")


def test_dinosaur_transformer_shrunk_trains_one_step(tmp_path) -> None:
    from ocl_bench.run.train import train

    # the preset's pre_mlp_out = slot_dim, shrunk with it
    cfg = load_config("dinosaur-transformer-coco", [*SMOKE, "grouping.pre_mlp_out=16"])
    assert cfg.decoder.params.init == "torch" and not cfg.decoder.params.final_norm
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.step == 2
    weights = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert "decoder.blocks.0.encoder_decoder_attn.proj_q.bias" in weights
    assert not any(k.startswith("decoder.layer_norm.") for k in weights)
    assert tuple(weights["grouping.pre_mlp.1.2.weight"].shape) == (16, 32)  # 32 -> 32 -> 16
    assert tuple(weights["grouping.norm_inputs.weight"].shape) == (16,)


def test_dinosaur_mlp_shrunk_trains_one_step(tmp_path) -> None:
    from ocl_bench.run.train import train

    over = [o for o in SMOKE if not o.startswith("decoder.")]
    cfg = load_config("dinosaur-mlp-coco", [*over, "grouping.pre_mlp_out=16", "decoder.hidden=32"])
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.step == 2
    weights = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert tuple(weights["grouping.to_k.weight"].shape) == (16, 16)
    assert tuple(weights["grouping.pre_mlp.1.2.weight"].shape) == (16, 32)
