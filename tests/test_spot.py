"""SPOT: the autoregressive decoder, patch orders, self-training and the checkpoint importer.

Everything is tiny (D=32, 4 slots, a 4x4 grid, 2 heads). The reference implementations
below are written from ../shared/reference/spot-and-mage.md (section SPOT) and work on
state_dicts in the *official* key layout, so they check our modules and the importer's
key mapping at once.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ocl_bench.run.config
from ocl_bench.api.contracts import (
    Batch,
    Dims,
    Features,
    ModelOutput,
    Progress,
    ReconstructionOutput,
    Slots,
)
from ocl_bench.api.errors import DataError
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Plugin
from ocl_bench.cli import main
from ocl_bench.decoders.spot_ar import (
    ORDER_NAMES,
    DinosaurTransformerDecoder,
    SpotARDecoder,
    SpotARParams,
    patch_orders,
)
from ocl_bench.groupings.slot_attention import SlotAttention, SlotAttentionParams
from ocl_bench.importers.spot import import_spot
from ocl_bench.objectives.spot_self_training import (
    SpotSelfTraining,
    SpotSelfTrainingParams,
    cosine_weight,
    match_slots,
)
from ocl_bench.run.compose import SlotModel
from ocl_bench.run.evaluate import load_run
from ocl_bench.run.registry import PluginInfo, Registry, registry

D, DS, K, HID, LAYERS, HEADS, G = 32, 16, 4, 32, 2, 2, 4
N = G * G
IMAGE, PATCH = 32, 8


# ------------------------------------------------------------------ helpers


def dims() -> Dims:
    return Dims(image_size=(IMAGE, IMAGE), grid=(G, G), token_dim=D, target_dim=D, slot_dim=DS)


def decoder(**kw) -> SpotARDecoder:
    torch.manual_seed(0)
    params = replace(SpotARParams(num_layers=LAYERS, num_heads=HEADS), **kw)
    dec = SpotARDecoder(params, dims())
    with torch.no_grad():  # non-trivial LayerNorms, so the checks see every parameter
        for name, p in dec.named_parameters():
            if "norm" in name or name.endswith((".1.weight", ".1.bias")):
                p.add_(0.1 * torch.randn_like(p))
    return dec.eval()


def inputs(b: int = 2, seed: int = 1) -> tuple[Slots, Features]:
    g = torch.Generator().manual_seed(seed)
    slots = Slots(slots=torch.randn(b, K, DS, generator=g), attn=torch.rand(b, N, K, generator=g))
    targets = torch.randn(b, N, D, generator=g)
    return slots, Features(tokens=targets, grid=(G, G), targets=targets)


def official_decoder_state(dec: SpotARDecoder) -> dict[str, Tensor]:
    """Our decoder's weights under the official SPOT keys (dec.*, input_proj, ...)."""
    out = {}
    for key, value in dec.state_dict().items():
        out[("dec." + key) if key.startswith(("blocks.", "layer_norm.")) else key] = value
    for i in range(dec.params.num_layers):
        out[f"dec.blocks.{i}.self_attn_mask"] = torch.ones(N, N, dtype=torch.bool).triu(1)
    return out


def _ln(sd: dict[str, Tensor], x: Tensor, prefix: str, eps: float = 1e-5) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _mha(sd, prefix, x, ctx, heads, mask=None):
    """SLATE/SPOT MultiHeadAttention with explicit weights: q scaled, masked_fill, softmax."""
    b, t, d = x.shape
    split = lambda y, w: (y @ sd[f"{prefix}.proj_{w}.weight"].T).view(b, -1, heads, d // heads)  # noqa: E731
    q, k, v = (split(y, w).transpose(1, 2) for y, w in ((x, "q"), (ctx, "k"), (ctx, "v")))
    q = q * (d // heads) ** -0.5
    logits = q @ k.transpose(-1, -2)
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    attn = logits.softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(b, t, d)
    return out @ sd[f"{prefix}.proj_o.weight"].T, attn


def reference_decode(sd, slots, targets, order: int, heads: int, layers: int):
    """Official SPOT forward_decoder for one order: (recon [B,N,D], A_dec [B,N,K])."""
    b, n, d = targets.shape
    perm = patch_orders(G, G)[order]
    x = torch.cat([sd["bos_tokens"][order].expand(b, 1, d), targets[:, perm][:, :-1]], 1)
    x = _ln(sd, x @ sd["input_proj.0.weight"].T, "input_proj.1")
    s = _ln(sd, slots @ sd["slot_proj.0.weight"].T, "slot_proj.1")
    attn = None
    for i in range(layers):
        p = f"dec.blocks.{i}"
        mask = sd[p + ".self_attn_mask"][:n, :n]
        if i == 0:  # is_first: the input is replaced by its LayerNorm
            x = _ln(sd, x, p + ".self_attn_layer_norm")
            h = x
        else:
            h = _ln(sd, x, p + ".self_attn_layer_norm")
        x = x + _mha(sd, p + ".self_attn", h, h, heads, mask)[0]
        out, attn = _mha(
            sd,
            p + ".encoder_decoder_attn",
            _ln(sd, x, p + ".encoder_decoder_attn_layer_norm"),
            s,
            heads,
        )
        x = x + out
        h = _ln(sd, x, p + ".ffn_layer_norm")
        h = F.relu(h @ sd[p + ".ffn.0.weight"].T + sd[p + ".ffn.0.bias"])
        x = x + h @ sd[p + ".ffn.2.weight"].T + sd[p + ".ffn.2.bias"]
    x = _ln(sd, x, "dec.layer_norm")
    a = attn.sum(1)
    a = a / a.sum(-1, keepdim=True)
    inverse = torch.argsort(perm)
    return x[:, inverse], a[:, inverse]


def reference_slot_attention(sd, x, noise: Tensor | None, iters: int = 3):
    """Official SlotAttentionEncoder (1 head): (slots, A_slot, logits of the last iteration)."""
    p, q = "slot_attn.", "slot_attn.slot_attention."
    x = _ln(sd, x, p + "layer_norm")
    x = F.relu(x @ sd[p + "mlp.0.weight"].T + sd[p + "mlp.0.bias"])
    x = x @ sd[p + "mlp.2.weight"].T + sd[p + "mlp.2.bias"]
    x = _ln(sd, x, q + "norm_inputs")
    ds = sd[q + "project_q.weight"].shape[0]
    k = (x @ sd[q + "project_k.weight"].T) * ds**-0.5
    v = x @ sd[q + "project_v.weight"].T
    if noise is None:
        slots = sd[p + "slots_init.weight"].expand(x.shape[0], -1, -1)
    else:
        slots = sd[p + "slot_mu"] + sd[p + "slot_log_sigma"].exp() * noise
    for _ in range(iters):
        prev = slots
        qq = _ln(sd, slots, q + "norm_slots") @ sd[q + "project_q.weight"].T
        logits = k @ qq.transpose(1, 2)
        attn = logits.softmax(-1)
        w = attn + 1e-8
        w = w / w.sum(1, keepdim=True)
        upd = w.transpose(1, 2) @ v
        gi = upd @ sd[q + "gru.weight_ih"].T + sd[q + "gru.bias_ih"]
        gh = prev @ sd[q + "gru.weight_hh"].T + sd[q + "gru.bias_hh"]
        (ir, iz, i_n), (hr, hz, hn) = gi.chunk(3, -1), gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        slots = (1 - z) * torch.tanh(i_n + r * hn) + z * prev
        h = F.relu(_ln(sd, slots, q + "norm_mlp") @ sd[q + "mlp.0.weight"].T + sd[q + "mlp.0.bias"])
        slots = slots + h @ sd[q + "mlp.2.weight"].T + sd[q + "mlp.2.bias"]
    return slots, attn, logits


# ------------------------------------------------------------------ patch orders


def test_nine_orders_are_the_official_permutations() -> None:
    h = w = G
    idx = lambda r, c: r * w + c  # noqa: E731
    rows, cols = range(h), range(w)
    expected = [
        [idx(r, c) for r in rows for c in cols],  # standard
        [idx(r, c) for c in cols for r in rows],  # top_left
        [idx(r, c) for c in reversed(cols) for r in rows],  # top_right
        [idx(r, c) for r in rows for c in reversed(cols)],  # right_top
        [idx(r, c) for c in reversed(cols) for r in reversed(rows)],  # bottom_right
        [idx(r, c) for r in reversed(rows) for c in reversed(cols)],  # right_bottom
        [idx(r, c) for c in cols for r in reversed(rows)],  # bottom_left
        [idx(r, c) for r in reversed(rows) for c in cols],  # left_bottom
        # reversed clockwise spiral from the top-right corner (worked by hand for 4x4)
        [5, 9, 10, 6, 2, 1, 0, 4, 8, 12, 13, 14, 15, 11, 7, 3],
    ]
    orders = patch_orders(h, w)
    assert len(orders) == len(ORDER_NAMES) == 9
    for name, order, want in zip(ORDER_NAMES, orders, expected):
        assert order.tolist() == want, name
        assert sorted(order.tolist()) == list(range(N)), name
        raster = torch.arange(N) * 10
        assert torch.equal(raster[order][torch.argsort(order)], raster), name
    assert len({tuple(o.tolist()) for o in orders}) == 9


def test_spiral_on_the_official_grid_runs_from_the_centre_to_the_top_right() -> None:
    spiral = patch_orders(14, 14)[8]
    assert divmod(int(spiral[0]), 14) == (6, 6) and divmod(int(spiral[-1]), 14) == (0, 13)
    # consecutive patches are neighbours
    steps = [divmod(int(a), 14) for a in spiral]
    assert all(abs(r1 - r2) + abs(c1 - c2) == 1 for (r1, c1), (r2, c2) in itertools.pairwise(steps))


def test_orders_and_bos_tokens_of_spot_and_dinosaur() -> None:
    assert decoder().orders.shape == (9, N) and decoder().bos_tokens.shape == (9, 1, 1, D)
    assert decoder(orders="standard").bos_tokens.shape == (1, 1, 1, D)
    dino = DinosaurTransformerDecoder(DinosaurTransformerDecoder.Params(num_heads=2), dims())
    assert dino.name == "dinosaur_transformer" and dino.num_orders == 1
    slots, feats = inputs()
    assert dino.train()(slots, feats, None).extras["orders"].tolist() == [0]
    names = {i.name: i for i in registry().infos}
    assert names["spot_ar"].cls is SpotARDecoder
    assert names["dinosaur_transformer"].cls is DinosaurTransformerDecoder
    assert "slot_attn_mask" not in "".join(decoder().state_dict())  # rebuilt, not stored


def test_training_draws_one_random_order_per_batch_from_torch_rng() -> None:
    dec = decoder().train()
    slots, feats = inputs()
    torch.manual_seed(3)
    drawn = [dec(slots, feats, None).extras["orders"].tolist() for _ in range(30)]
    assert all(len(d) == 1 for d in drawn) and len({d[0] for d in drawn}) > 3
    torch.manual_seed(3)
    assert drawn == [dec(slots, feats, None).extras["orders"].tolist() for _ in range(30)]
    out = dec(slots, feats, None)
    (i,) = out.extras["orders"].tolist()
    recon, masks = dec.decode(slots.slots, feats.targets, [i], (G, G))
    torch.testing.assert_close(out.masks, masks)
    torch.testing.assert_close(out.reconstruction, recon)
    assert out.target is not None and not out.target.requires_grad


# ------------------------------------------------------------------ decoder maths


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_teacher_forcing_is_causal_in_every_order(attention: str) -> None:
    dec = decoder(attention=attention)
    slots, feats = inputs()
    i = 6
    for order, perm in enumerate(patch_orders(G, G)):
        recon, masks = dec.decode(slots.slots, feats.targets, [order], (G, G))
        bumped = feats.targets.clone()
        bumped[:, perm[i:]] += torch.randn_like(bumped[:, perm[i:]])
        recon2, masks2 = dec.decode(slots.slots, bumped, [order], (G, G))
        seen = perm[: i + 1]  # output at sequence position j <= i sees targets perm[:j]
        torch.testing.assert_close(recon2[:, seen], recon[:, seen])
        torch.testing.assert_close(masks2[:, seen], masks[:, seen])
        assert not torch.allclose(recon2[:, perm[i + 1]], recon[:, perm[i + 1]])


def test_a_dec_is_the_head_mean_of_the_last_cross_attention() -> None:
    dec = decoder()
    slots, feats = inputs()
    captured = {}
    last = dec.blocks[-1].encoder_decoder_attn

    def grab(module, args):
        captured["x"], captured["ctx"] = args[0], args[1]

    handle = last.register_forward_pre_hook(grab)
    order = 8
    _, masks = dec.decode(slots.slots, feats.targets, [order], (G, G))
    handle.remove()
    b, n, _ = captured["x"].shape
    dh = D // HEADS
    q = last.proj_q(captured["x"]).view(b, n, HEADS, dh).transpose(1, 2)
    k = last.proj_k(captured["ctx"]).view(b, K, HEADS, dh).transpose(1, 2)
    manual = (q @ k.transpose(-1, -2) / dh**0.5).softmax(-1).mean(1)  # [B,N,K]
    manual = manual[:, torch.argsort(patch_orders(G, G)[order])]
    torch.testing.assert_close(masks, manual)
    torch.testing.assert_close(masks.sum(-1), torch.ones(b, n))


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_decoder_equals_the_official_explicit_attention_reference(attention: str) -> None:
    dec = decoder(attention=attention)
    sd = official_decoder_state(dec)
    slots, feats = inputs()
    for order in range(9):
        recon, masks = dec.decode(slots.slots, feats.targets, [order], (G, G))
        want_recon, want_masks = reference_decode(
            sd, slots.slots, feats.targets, order, HEADS, LAYERS
        )
        torch.testing.assert_close(recon, want_recon, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(masks, want_masks, atol=1e-5, rtol=1e-4)


def test_quirk_switches_change_the_computation() -> None:
    slots, feats = inputs()
    base = decoder().decode(slots.slots, feats.targets, [0], (G, G))[0]
    plain = decoder(first_block_norm_residual=False).decode(
        slots.slots, feats.targets, [0], (G, G)
    )[0]
    assert not torch.allclose(base, plain)
    # block 0's cross-attention keeps num_heads unless told otherwise
    dec = decoder(num_cross_heads=4)
    assert dec.blocks[0].encoder_decoder_attn.heads == HEADS
    assert dec.blocks[1].encoder_decoder_attn.heads == 4
    assert (
        decoder(num_cross_heads=4, first_block_uses_num_heads=False)
        .blocks[0]
        .encoder_decoder_attn.heads
        == 4
    )


def test_eval_order_all_is_the_mean_over_single_orders() -> None:
    dec = decoder(eval_order="all")
    slots, feats = inputs()
    out = dec(slots, feats, None)
    singles = [dec.decode(slots.slots, feats.targets, [i], (G, G)) for i in range(9)]
    torch.testing.assert_close(out.masks, torch.stack([m for _, m in singles]).mean(0))
    torch.testing.assert_close(out.reconstruction, torch.stack([r for r, _ in singles]).mean(0))
    torch.testing.assert_close(out.masks.sum(-1), torch.ones(2, N))
    assert out.extras["orders"].tolist() == list(range(9))
    standard = decoder(eval_order="standard")(slots, feats, None)
    torch.testing.assert_close(standard.masks, singles[0][1])


def test_gradients_reach_slots_and_every_decoder_parameter() -> None:
    dec = decoder().train()
    slots, feats = inputs()
    slots.slots.requires_grad_(True)
    out = dec(slots, feats, None)
    (out.reconstruction - out.target).pow(2).mean().backward()
    assert slots.slots.grad is not None and slots.slots.grad.abs().sum() > 0
    (used,) = out.extras["orders"].tolist()
    for name, p in dec.named_parameters():
        assert p.grad is not None, name
    assert dec.bos_tokens.grad[used].abs().sum() > 0
    others = [i for i in range(9) if i != used]
    assert dec.bos_tokens.grad[others].abs().sum() == 0


# ------------------------------------------------------------------ self-training


def test_matching_maximises_iou_and_empty_teacher_slots_take_the_rest() -> None:
    # teacher: slots 0,1,2 cover rows; slot 3 is empty
    teacher = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 1, 1]])
    # student: the same regions under other ids, slightly off
    student = torch.tensor([[2, 2, 2, 3, 3, 3, 0, 0, 1, 1, 1, 1, 1, 1, 3, 3]])
    perm, iou = match_slots(student, teacher, K)
    t1 = F.one_hot(teacher[0], K).bool()
    s1 = F.one_hot(student[0], K).bool()

    def total(p):
        return sum(
            ((t1[:, t] & s1[:, s]).sum() / (t1[:, t] | s1[:, s]).sum()).item()
            for t, s in enumerate(p)
            if t1[:, t].any()
        )

    best = max(itertools.permutations(range(K)), key=total)
    assert total(perm[0].tolist()) == pytest.approx(total(best))
    assert perm[0, :3].tolist() == [2, 3, 1]  # the max-IoU partners of the real teacher slots
    assert perm[0, 3].item() == 0  # the empty teacher slot takes the student slot left over
    assert sorted(perm[0].tolist()) == list(range(K))
    assert iou.shape == (1, K, K) and iou[0, 3].sum() == 0


class _FixedTeacher(nn.Module):
    """A teacher whose decoder always returns the given A_dec."""

    def __init__(self, a_dec: Tensor):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))
        self.a_dec = a_dec
        self.encoder = lambda batch: Features(tokens=batch.images, grid=(G, G))
        self.grouping = lambda f: Slots(slots=f.tokens, attn=f.tokens)
        self.decoder = lambda s, f, b: ReconstructionOutput(
            reconstruction=self.p, target=self.p, masks=self.a_dec
        )


def test_self_training_loss_is_cross_entropy_on_matched_logits() -> None:
    g = torch.Generator().manual_seed(0)
    b = 3
    a_dec = torch.rand(b, N, K, generator=g).softmax(-1)
    a_dec[..., 3] = 0  # an empty teacher slot
    logits = torch.randn(b, N, K, generator=g, requires_grad=True)
    attn = torch.randn(b, N, K, generator=g).softmax(-1)
    obj = SpotSelfTraining(SpotSelfTrainingParams(weight=0.5), teacher=_FixedTeacher(a_dec))
    out = ModelOutput(
        features=None,
        slots=Slots(slots=torch.zeros(b, K, DS), attn=attn, logits=logits),
        decoding=None,
    )
    loss = obj(out, Batch(images=torch.zeros(b, 1)), Progress(0, 1))["spot_ce"]
    labels, student = a_dec.argmax(-1), attn.argmax(-1)
    manual = 0.0
    for i in range(b):
        t1, s1 = F.one_hot(labels[i], K).bool(), F.one_hot(student[i], K).bool()

        def total(p, t1=t1, s1=s1):
            return sum(
                ((t1[:, t] & s1[:, s]).sum() / (t1[:, t] | s1[:, s]).sum().clamp(min=1)).item()
                for t, s in enumerate(p)
                if t1[:, t].any()
            )

        best = max(itertools.permutations(range(K)), key=total)
        logp = logits[i].log_softmax(-1)
        manual += -sum(logp[n, best[labels[i, n]]] for n in range(N)) / N
    torch.testing.assert_close(loss, 0.5 * manual / b)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # the teacher is frozen and kept out of this objective's state
    assert set(obj.state_dict()) == set() and not any(
        p.requires_grad for p in obj.teacher.parameters()
    )


def test_cosine_weight_follows_the_training_progress() -> None:
    assert cosine_weight(5e-3, 1e-3, 0, 100) == pytest.approx(5e-3)
    assert cosine_weight(5e-3, 1e-3, 50, 100) == pytest.approx(3e-3)
    assert cosine_weight(5e-3, 1e-3, 10**6, 100) == pytest.approx(1e-3, rel=1e-3)
    teacher = _FixedTeacher(torch.rand(1, N, K).softmax(-1))
    obj = SpotSelfTraining(SpotSelfTrainingParams(final_weight=0.0), teacher=teacher)
    out = ModelOutput(
        None, Slots(torch.zeros(1, K, DS), torch.rand(1, N, K), torch.randn(1, N, K)), None
    )
    batch = Batch(images=torch.zeros(1, 1))
    weights = [obj.current_weight(Progress(s, 4)) for s in range(4)]
    assert weights[0] == pytest.approx(5e-3) and weights[0] > weights[1] > weights[2] > 0
    # the loss takes the weight of the step the trainer reports, with no state of its own
    torch.manual_seed(0)
    late = obj(out, batch, Progress(2, 4))["spot_ce"]
    torch.manual_seed(0)
    early = obj(out, batch, Progress(0, 4))["spot_ce"]
    torch.testing.assert_close(late / early, torch.tensor(weights[2] / weights[0]))


def test_objective_without_teacher_is_a_config_error() -> None:
    from ocl_bench.api.errors import ConfigError

    with pytest.raises(ConfigError, match="teacher"):
        SpotSelfTraining(SpotSelfTrainingParams())


# ------------------------------------------------------------------ the importer


def _vit(dim: int = D, depth: int = 2) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=IMAGE,
        patch_size=PATCH,
        embed_dim=dim,
        depth=depth,
        num_heads=2,
        qkv_bias=True,
        num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


def _vit_tokens(vit: nn.Module, images: Tensor) -> Tensor:
    """DINO patch tokens as SPOT takes them: last block, no final norm, CLS dropped."""
    x = vit._pos_embed(vit.patch_embed(images))
    for blk in vit.blocks:
        x = blk(x)
    return x[:, 1:]


@dataclass(frozen=True)
class TinyDinoParams:
    finetune_from: int = param(-1, "-1 frozen; >= 0 keeps a frozen copy for the targets")
    random_init: bool = param(False, "set by the importer (weights come from the file)")
    final_norm: bool = param(False, "apply the final norm")


class TinyDino(nn.Module, Plugin):
    """A tiny timm ViT laid out like encoders/vit.py (vit, target_vit), for the tests."""

    kind = "encoder"
    name = "tiny_dino"
    Params = TinyDinoParams
    provides = frozenset({"features.tokens", "features.targets"})

    def __init__(self, params: TinyDinoParams, dims: Dims):
        super().__init__()
        self.params = params
        self.vit = _vit()
        if not params.final_norm:
            self.vit.norm = nn.Identity()
        self.target_vit = copy.deepcopy(self.vit) if params.finetune_from >= 0 else None
        self.grid = (IMAGE // PATCH, IMAGE // PATCH)

    def output_dims(self, dims: Dims) -> Dims:
        dims.grid, dims.token_dim, dims.target_dim = self.grid, D, D
        return dims

    def forward(self, batch: Batch) -> Features:
        tokens = _vit_tokens(self.vit, batch.images)
        frozen = self.vit if self.target_vit is None else self.target_vit
        with torch.no_grad():
            targets = _vit_tokens(frozen, batch.images)
        return Features(tokens=tokens, grid=self.grid, targets=targets)


@pytest.fixture
def with_tiny_dino(monkeypatch) -> Registry:
    base = registry()
    infos = [i for i in base.infos if i.name != "dino_vitb16"]  # as if encoders/vit.py were absent
    reg = Registry(infos + [PluginInfo("encoder", "tiny_dino", "tests", "0", TinyDino)])
    monkeypatch.setattr(ocl_bench.run.config, "registry", lambda: reg)
    return reg


def official_state(stage: int = 1, seed: int = 0, orders: int = 9) -> dict[str, Tensor]:
    """Random tensors in the official SPOT key layout at tiny sizes."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.3) -> Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd: dict[str, Tensor] = {}
    encoders = ["encoder."] + (["second_encoder."] if stage == 2 else [])
    for prefix in encoders:
        for key, value in _vit().state_dict().items():
            sd[prefix + key] = r(*value.shape, scale=0.1) + (
                1.0 if "norm" in key and key.endswith("weight") else 0.0
            )
    sa, q = "slot_attn.", "slot_attn.slot_attention."
    norms = {sa + "layer_norm": D, q + "norm_inputs": D, q + "norm_slots": DS, q + "norm_mlp": DS}
    for name, size in norms.items():
        sd[name + ".weight"], sd[name + ".bias"] = 1 + r(size), r(size)
    sd[sa + "mlp.0.weight"], sd[sa + "mlp.0.bias"] = r(D, D), r(D)
    sd[sa + "mlp.2.weight"], sd[sa + "mlp.2.bias"] = r(D, D), r(D)
    if stage == 1:
        sd[sa + "slot_mu"], sd[sa + "slot_log_sigma"] = r(1, 1, DS), r(1, 1, DS)
    else:
        sd[sa + "slots_init.weight"] = r(K, DS)
    sd[q + "project_q.weight"], sd[q + "project_k.weight"] = r(DS, DS), r(DS, D)
    sd[q + "project_v.weight"] = r(DS, D)
    sd[q + "gru.weight_ih"], sd[q + "gru.weight_hh"] = r(3 * DS, DS), r(3 * DS, DS)
    sd[q + "gru.bias_ih"], sd[q + "gru.bias_hh"] = r(3 * DS), r(3 * DS)
    sd[q + "mlp.0.weight"], sd[q + "mlp.0.bias"] = r(HID, DS), r(HID)
    sd[q + "mlp.2.weight"], sd[q + "mlp.2.bias"] = r(DS, HID), r(DS)
    sd["input_proj.0.weight"], sd["slot_proj.0.weight"] = r(D, D), r(D, DS)
    for name in ("input_proj.1", "slot_proj.1", "dec.layer_norm"):
        sd[name + ".weight"], sd[name + ".bias"] = 1 + r(D), r(D)
    sd["bos_tokens"] = r(orders, 1, 1, D)
    for i in range(LAYERS):
        p = f"dec.blocks.{i}."
        sd[p + "self_attn_mask"] = torch.ones(N, N, dtype=torch.bool).triu(1)
        for attn in ("self_attn", "encoder_decoder_attn"):
            for w in "qkvo":
                sd[f"{p}{attn}.proj_{w}.weight"] = r(D, D)
        for norm in ("self_attn_layer_norm", "encoder_decoder_attn_layer_norm", "ffn_layer_norm"):
            sd[p + norm + ".weight"], sd[p + norm + ".bias"] = 1 + r(D), r(D)
        sd[p + "ffn.0.weight"], sd[p + "ffn.0.bias"] = r(4 * D, D), r(4 * D)
        sd[p + "ffn.2.weight"], sd[p + "ffn.2.bias"] = r(D, 4 * D), r(D)
    return sd


def write_official(path: Path, sd: dict[str, Tensor], legacy: bool = False) -> Path:
    if legacy:  # older runs saved the decoder as tf_dec.*
        sd = {("tf_dec." + k[4:] if k.startswith("dec.") else k): v for k, v in sd.items()}
    torch.save({"model": sd, "optimizer": {}, "epoch": 3, "best_val_loss": 0.5}, path)
    return path


def reference_spot(sd: dict[str, Tensor], images: Tensor, noise: Tensor | None):
    """The official SPOT forward in eval with eval_permutations='all'."""
    vit = _vit()
    vit.load_state_dict(
        {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    )
    target_vit = vit
    if any(k.startswith("second_encoder.") for k in sd):
        target_vit = _vit()
        target_vit.load_state_dict(
            {
                k[len("second_encoder.") :]: v
                for k, v in sd.items()
                if k.startswith("second_encoder.")
            }
        )
    with torch.no_grad():
        tokens, targets = _vit_tokens(vit, images), _vit_tokens(target_vit, images)
        slots, a_slot, logits = reference_slot_attention(sd, tokens, noise)
        outs = [reference_decode(sd, slots, targets, o, HEADS, LAYERS) for o in range(9)]
    recon = torch.stack([o[0] for o in outs]).mean(0)
    a_dec = torch.stack([o[1] for o in outs]).mean(0)
    return a_slot, a_dec, recon, logits


def _images(b: int = 2) -> Tensor:
    return torch.rand(b, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))


IMPORT_ARGS = dict(encoder="tiny_dino", num_heads=HEADS)
OVERRIDES = [f"dataset.image_size={IMAGE}", "dataset.val_size=8", "eval.num_images=4"]


@pytest.mark.parametrize("legacy", [False, True])
def test_import_stage1_matches_the_official_forward(tmp_path, with_tiny_dino, legacy) -> None:
    sd = official_state(stage=1)
    path = write_official(tmp_path / "checkpoint.pt.tar", sd, legacy)
    result = import_spot(path, tmp_path / "run", OVERRIDES, num_slots=K, **IMPORT_ARGS)
    lay = result.layout
    assert (lay.stage, lay.dim, lay.slot_dim, lay.num_slots, lay.num_layers) == (
        1,
        D,
        DS,
        K,
        LAYERS,
    )
    assert (lay.mlp_hidden, lay.num_orders, lay.num_tokens, lay.encoder_depth) == (HID, 9, N, 2)
    cfg, model, step = load_run(tmp_path / "run")
    assert step == 0
    assert (
        cfg.grouping.params.init == "shared_gaussian" and cfg.grouping.params.truncation == "none"
    )
    assert cfg.decoder.params.eval_order == "all" and cfg.decoder.params.num_heads == HEADS
    assert cfg.train.grad_clip == 0.3 and cfg.train.grad_clip_norm == "inf"
    model.eval()
    images = _images()
    torch.manual_seed(11)
    with torch.no_grad():
        out = model(Batch(images=images))
    torch.manual_seed(11)
    noise = torch.randn(2, K, DS)
    a_slot, a_dec, recon, logits = reference_spot(sd, images, noise)
    torch.testing.assert_close(out.slots.attn, a_slot, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.slots.logits, logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.decoding.masks, a_dec, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.decoding.reconstruction, recon, atol=1e-5, rtol=1e-4)
    provenance = json.loads((tmp_path / "run" / "import.json").read_text())
    assert provenance["layout"]["stage"] == 1
    assert any("final norm" in n for n in result.notes)  # encoder.norm.* is not used


def test_import_stage2_maps_both_encoders(tmp_path, with_tiny_dino) -> None:
    sd = official_state(stage=2, seed=4)
    path = write_official(tmp_path / "spot.pt", sd)
    result = import_spot(path, tmp_path / "run", OVERRIDES, **IMPORT_ARGS)
    assert result.layout.stage == 2 and result.layout.num_slots == K
    cfg, model, _ = load_run(tmp_path / "run")
    assert cfg.grouping.params.init == "learned_queries"
    assert cfg.grouping.params.truncation == "bi-level"
    assert cfg.encoder.params.finetune_from == 8 and cfg.encoder.params.random_init
    torch.testing.assert_close(
        model.encoder.vit.blocks[1].attn.qkv.weight, sd["encoder.blocks.1.attn.qkv.weight"]
    )
    torch.testing.assert_close(model.encoder.target_vit.pos_embed, sd["second_encoder.pos_embed"])
    images = _images()
    with torch.no_grad():
        out = model.eval()(Batch(images=images))
    a_slot, a_dec, recon, _ = reference_spot(sd, images, None)
    torch.testing.assert_close(out.slots.attn, a_slot, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.decoding.masks, a_dec, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.decoding.reconstruction, recon, atol=1e-5, rtol=1e-4)


def test_import_reports_missing_unexpected_and_misshapen_keys(tmp_path, with_tiny_dino) -> None:
    sd = official_state(stage=1)
    del sd["dec.blocks.1.ffn.2.bias"]
    sd["dec.blocks.1.extra.weight"] = torch.zeros(1)
    path = write_official(tmp_path / "bad.pt", sd)
    with pytest.raises(DataError) as err:
        import_spot(path, tmp_path / "run", OVERRIDES, num_slots=K, **IMPORT_ARGS)
    msg = str(err.value)
    assert "missing keys (1): dec.blocks.1.ffn.2.bias" in msg
    assert "unexpected keys (1): dec.blocks.1.extra.weight" in msg
    assert not (tmp_path / "run").exists()
    sd = official_state(stage=1)
    sd["slot_proj.0.weight"] = torch.zeros(D, DS + 1)
    with pytest.raises(DataError, match="wrong shapes: slot_proj.0.weight"):
        import_spot(
            write_official(tmp_path / "bad2.pt", sd),
            tmp_path / "run",
            OVERRIDES,
            num_slots=K,
            **IMPORT_ARGS,
        )


def test_import_needs_num_slots_for_stage1_and_the_vit_plugin(tmp_path, with_tiny_dino) -> None:
    path = write_official(tmp_path / "s1.pt", official_state(stage=1))
    with pytest.raises(DataError, match="--num-slots"):
        import_spot(path, tmp_path / "run", OVERRIDES, **IMPORT_ARGS)
    with pytest.raises(DataError, match=r"dino_vitb16.*encoders/vit\.py"):
        import_spot(path, tmp_path / "run", OVERRIDES, num_slots=K)
    # a stage-2 file needs an encoder with a separate target backbone
    path2 = write_official(tmp_path / "s2.pt", official_state(stage=2))
    with pytest.raises(DataError, match="second_encoder"):
        import_spot(
            path2, tmp_path / "run", [*OVERRIDES, "encoder.finetune_from=-1"], **IMPORT_ARGS
        )
    not_spot = tmp_path / "other.pt"
    torch.save({"model": {"head.weight": torch.zeros(2)}}, not_spot)
    with pytest.raises(DataError, match="missing keys"):
        import_spot(not_spot, tmp_path / "run", OVERRIDES, num_slots=K, **IMPORT_ARGS)


def test_cli_import_then_eval(tmp_path, with_tiny_dino, capsys) -> None:
    path = write_official(tmp_path / "spot.pt", official_state(stage=1))
    run = tmp_path / "run"
    argv = ["import", "spot", str(path), "--out", str(run), "--encoder", "tiny_dino"]
    assert main([*argv, "--num-slots", str(K), "--num-heads", str(HEADS), *OVERRIDES]) == 0
    assert "stage-1" in capsys.readouterr().out
    assert main([*argv, "--num-slots", str(K)]) == 2  # the run exists: one-line error
    assert "already holds a run" in capsys.readouterr().err
    overrides = ["eval.batch_size=4", "eval.figure_images=0", "decoder.eval_order=standard"]
    assert main(["eval", str(run), "-q", *overrides]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert any(r["masks"] == "decoder" for r in metrics["records"])


def test_self_training_with_an_imported_teacher_trains_the_student(
    tmp_path, with_tiny_dino
) -> None:
    path = write_official(tmp_path / "teacher.pt", official_state(stage=1))
    import_spot(path, tmp_path / "teacher", OVERRIDES, num_slots=K, **IMPORT_ARGS)
    obj = SpotSelfTraining(SpotSelfTrainingParams(teacher=str(tmp_path / "teacher")))
    torch.manual_seed(0)
    student = SlotModel(
        TinyDino(TinyDinoParams(finetune_from=1), dims()),
        SlotAttention(
            SlotAttentionParams(
                num_slots=K,
                slot_dim=DS,
                mlp_hidden=HID,
                init="learned_queries",
                truncation="bi-level",
                pre_mlp=True,
            ),
            dims(),
        ),
        SpotARDecoder(SpotARParams(num_layers=LAYERS, num_heads=HEADS), dims()),
    ).train()
    out = student(Batch(images=_images()))
    loss = obj(out, Batch(images=_images()), Progress(0, 1))["spot_ce"]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert student.grouping.queries.grad is not None
    assert student.grouping.to_k.weight.grad.abs().sum() > 0
    assert student.encoder.vit.blocks[1].attn.qkv.weight.grad is not None
    assert student.decoder.input_proj[0].weight.grad is None  # CE reaches slot attention only


def test_import_into_the_real_vit_plugin_when_installed(tmp_path, monkeypatch) -> None:
    info = next((i for i in registry().infos if i.name == "dino_vitb16"), None)
    if info is None or info.broken:
        pytest.skip("encoders/vit.py (dino_vitb16) is not installed")
    from timm.models.vision_transformer import VisionTransformer

    def vit(dim: int = D, depth: int = 2) -> nn.Module:  # the timm layout at dino_vitb16's patch 16
        return VisionTransformer(
            img_size=64,
            patch_size=16,
            embed_dim=dim,
            depth=depth,
            num_heads=2,
            qkv_bias=True,
            num_classes=0,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )

    monkeypatch.setitem(globals(), "_vit", vit)
    sd = official_state(stage=2)
    path = write_official(tmp_path / "spot.pt", sd)
    enc = [
        "encoder.embed_dim=32",
        "encoder.depth=2",
        "encoder.num_heads=2",
        "encoder.image_size=64",
        "encoder.finetune_from=1",  # SPOT fine-tunes blocks 8.. of 12; here 1.. of 2
    ]
    import_spot(path, tmp_path / "run", [*OVERRIDES, *enc], num_heads=HEADS)
    cfg, model, _ = load_run(tmp_path / "run")
    assert cfg.encoder.name == "dino_vitb16"
    torch.testing.assert_close(
        model.encoder.vit.blocks[0].mlp.fc1.weight, sd["encoder.blocks.0.mlp.fc1.weight"]
    )
    torch.testing.assert_close(model.encoder.target_vit.cls_token, sd["second_encoder.cls_token"])
