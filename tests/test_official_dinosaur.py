"""DINOSAUR (presets dinosaur-mlp-coco, dinosaur-transformer-coco) against OCLF's own modules.

Opt-in: point OCL_BENCH_OCLF_REPO at a checkout of
github.com/amazon-science/object-centric-learning-framework (needs hydra-core). OCLF's
DINOSAUR model is built the way its COCO experiments compose it: the `experiment`, `models`
and `losses` of configs/experiment/projects/bridging/dinosaur/_base_feature_recon.yaml,
overlaid by coco_feat_rec_dino_base16.yaml (PatchDecoder, an MLP) or
coco_feat_rec_dino_base16_auto.yaml (AutoregressivePatchDecoder, a transformer), in their
Hydra defaults order (the dataset, preprocessing and metrics partials touch none of these
keys), instantiated with hydra.utils.instantiate into OCLF's routed classes and run through
ocl.utils.routing.Combined, as ocl.combined_model.CombinedModel runs `models`; the loss is
its `losses.mse` (ReconstructionLoss) on that output.

Only sizes and pretrained=false are overridden (`_oclf_config`): a 2-block ViT/16 of
width 32 at 64 px, registered with timm under a new name (TimmFeatureExtractor calls
timm.create_model(model_name) and keeps the patch tokens of block `feature_level`, CLS
dropped, final LayerNorm unused), feature_level 2 (the last block, as 12 of 12), 4 slots of
16 dims, 16 patches, the MLP decoder's [2048] * 3 as [24] * 3, the transformer's 4 layers x
8 heads as 2 x 4. Our presets get the same sizes as overrides. Every OCLF weight is moved
away from its init (LayerNorms included), copied into our model through the key map in this
file, and both get the same image and the same slot-initialisation noise (the same seed before each
forward; both draw one [B, K, D] normal sample, asserted equal).

Compared, OCLF's output against ours: patch features, initial slots, slots, slot-attention
masks, decoder masks, reconstruction and loss. One difference is by design and asserted:
OCLF's feature extractor takes ImageNet-normalised images (its preprocessing normalises;
tests/test_official_oclf_protocol.py checks that part), ours takes [0, 1] images and
normalises inside the encoder.

Stand-ins: `torchtyping` (TensorType only annotates) and `pytorch_lightning` (ocl/losses.py
names LightningModule in annotations) when not installed; `timm.models.registry` is imported
first (OCLF uses it as an attribute, which timm >= 0.9 no longer sets on import).

    git --git-dir=/work/.mirror/amazon-science+object-centric-learning-framework/repo \
        archive HEAD | tar -x -C /tmp/oclf && pip install hydra-core
    OCL_BENCH_OCLF_REPO=/tmp/oclf python -m pytest tests/test_official_dinosaur.py
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from ocl_bench.api.contracts import Batch, ModelOutput, Progress
from ocl_bench.encoders.vit import IMAGENET_MEAN, IMAGENET_STD
from ocl_bench.run.compose import build_model, build_objectives
from ocl_bench.run.config import load_config
from tests.official_checkout import (
    checkout_from_env,
    checkout_on_path,
    omegaconf_resolvers_restored,
)

REPO, pytestmark = checkout_from_env(
    "OCL_BENCH_OCLF_REPO",
    "ocl/decoding.py",
    "github.com/amazon-science/object-centric-learning-framework",
)
DINOSAUR = Path(REPO) / "configs" / "experiment" / "projects" / "bridging" / "dinosaur"
EXPERIMENTS = {
    "mlp": "coco_feat_rec_dino_base16.yaml",
    "transformer": "coco_feat_rec_dino_base16_auto.yaml",
}
PRESETS = {"mlp": "dinosaur-mlp-coco", "transformer": "dinosaur-transformer-coco"}

IMAGE, WIDTH, DEPTH, VIT_HEADS = 64, 32, 2, 2
N = (IMAGE // 16) ** 2
K, DS, B = 4, 16, 2
MLP_HIDDEN, DEC_LAYERS, DEC_HEADS = 24, 2, 4
TINY_VIT = "vit_ocl_bench_dinosaur_tiny"  # a new timm name: TimmFeatureExtractor needs "vit*"

OURS = [
    "encoder.random_init=true",
    f"encoder.embed_dim={WIDTH}",
    f"encoder.depth={DEPTH}",
    f"encoder.num_heads={VIT_HEADS}",
    f"encoder.image_size={IMAGE}",
    f"encoder.block={DEPTH}",
    f"grouping.num_slots={K}",
    f"grouping.slot_dim={DS}",
    f"grouping.mlp_hidden={4 * DS}",  # OCLF ff_mlp: 4 * object_dim
    f"grouping.pre_mlp_out={DS}",  # OCLF: feature_dim = object_dim
]
OURS_DECODER = {
    "mlp": [f"decoder.hidden={MLP_HIDDEN}"],
    "transformer": [f"decoder.num_layers={DEC_LAYERS}", f"decoder.num_heads={DEC_HEADS}"],
}


# ------------------------------------------------------------------ OCLF, built from its YAML


def _stand_ins() -> dict[str, types.ModuleType]:
    torchtyping = types.ModuleType("torchtyping")

    class TensorType:  # OCLF only annotates with TensorType[...]
        def __class_getitem__(cls, item: Any) -> type:
            return Tensor

    torchtyping.TensorType = TensorType
    lightning = types.ModuleType("pytorch_lightning")
    lightning.LightningModule = type("LightningModule", (), {})
    return {"torchtyping": torchtyping, "pytorch_lightning": lightning}


@contextmanager
def _missing_modules_replaced(stand_ins: dict[str, types.ModuleType]) -> Iterator[None]:
    import importlib.util

    added = [n for n in stand_ins if n not in sys.modules and importlib.util.find_spec(n) is None]
    sys.modules.update({n: stand_ins[n] for n in added})
    try:
        yield
    finally:
        for n in added:
            sys.modules.pop(n, None)


def _register_tiny_vit() -> None:
    import timm
    from timm.models import register_model

    if TINY_VIT in timm.list_models(TINY_VIT):
        return

    def factory(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        # the DINO ViT-B/16 of the configs, shrunk
        return timm.create_model(
            "vit_base_patch16_224.dino",
            pretrained=False,
            img_size=IMAGE,
            embed_dim=WIDTH,
            depth=DEPTH,
            num_heads=VIT_HEADS,
            **kwargs,
        )

    factory.__name__ = TINY_VIT
    register_model(factory)


@pytest.fixture(scope="module")
def oclf() -> Iterator[Any]:
    pytest.importorskip("omegaconf")
    pytest.importorskip("hydra")
    import timm.models.registry  # noqa: F401  (OCLF reads timm.models.registry)

    _register_tiny_vit()
    with (
        _missing_modules_replaced(_stand_ins()),
        checkout_on_path(REPO, package="ocl"),
        checkout_on_path(REPO, package="routed"),
        omegaconf_resolvers_restored(),
    ):
        import hydra.utils
        from omegaconf import OmegaConf

        # registers eval_lambda (the ff_mlp's hidden_dim), unless a test importing it before
        # left them registered: a second registration fails
        if not OmegaConf.has_resolver("eval_lambda"):
            import ocl.cli._config  # noqa: F401
        import ocl.conditioning  # noqa: F401  (imported here, not inside the first test)
        import ocl.decoding  # noqa: F401
        import ocl.feature_extractors.timm  # noqa: F401
        import ocl.losses  # noqa: F401
        import ocl.perceptual_grouping  # noqa: F401
        import routed  # noqa: F401  (the configs' `routed.ocl...` targets; imports torchmetrics)
        from ocl.utils.routing import Combined

        yield types.SimpleNamespace(
            OmegaConf=OmegaConf, instantiate=hydra.utils.instantiate, Combined=Combined
        )


def _oclf_config(oclf: Any, variant: str) -> Any:
    OmegaConf = oclf.OmegaConf
    keys = ("experiment", "models", "losses")
    parts = [
        OmegaConf.load(DINOSAUR / f) for f in ("_base_feature_recon.yaml", EXPERIMENTS[variant])
    ]
    cfg = OmegaConf.merge(*[OmegaConf.masked_copy(p, [k for k in keys if k in p]) for p in parts])
    sizes = [
        f"experiment.input_feature_dim={WIDTH}",
        f"models.feature_extractor.model_name={TINY_VIT}",
        "models.feature_extractor.pretrained=false",
        f"models.feature_extractor.feature_level={DEPTH}",
        f"models.conditioning.n_slots={K}",
        f"models.conditioning.object_dim={DS}",
        f"models.object_decoder.num_patches={N}",
    ]
    if variant == "mlp":
        sizes.append(
            f"models.object_decoder.decoder.features=[{MLP_HIDDEN},{MLP_HIDDEN},{MLP_HIDDEN}]"
        )
    else:
        sizes += [
            f"models.object_decoder.decoder.n_layers={DEC_LAYERS}",
            f"models.object_decoder.decoder.n_heads={DEC_HEADS}",
        ]
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(sizes))


def _oclf_model(oclf: Any, variant: str) -> tuple[Any, Any]:
    """(the Combined model, its `losses.mse`)."""
    cfg = _oclf_config(oclf, variant)
    models = oclf.instantiate(cfg.models, _convert_="all")
    losses = oclf.instantiate(cfg.losses, _convert_="all")
    model = oclf.Combined(**models).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # nothing at its init value: every LayerNorm, bias, embedding moved
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model, losses["mse"]


# ------------------------------------------------------------------ weights: OCLF -> ours

RENAMES = (  # prefixes, the first match wins
    ("feature_extractor.model.", "encoder.vit."),
    ("conditioning.slots_mu", "grouping.mu"),
    ("conditioning.slots_logsigma", "grouping.log_sigma"),
    # Sequential(DummyPositionEmbed, build_two_layer_mlp(initial_layer_norm)):
    # LN, Linear, ReLU, Linear
    ("perceptual_grouping.positional_embedding.layers.1.0.", "grouping.pre_mlp.0."),
    ("perceptual_grouping.positional_embedding.layers.1.1.", "grouping.pre_mlp.1.0."),
    ("perceptual_grouping.positional_embedding.layers.1.3.", "grouping.pre_mlp.1.2."),
    ("perceptual_grouping.slot_attention.norm_input.", "grouping.norm_inputs."),
    # Residual(LN, Linear, ReLU, Linear)
    ("perceptual_grouping.slot_attention.ff_mlp.module.0.", "grouping.norm_mlp."),
    ("perceptual_grouping.slot_attention.ff_mlp.module.1.", "grouping.update_mlp.0."),
    ("perceptual_grouping.slot_attention.ff_mlp.module.3.", "grouping.update_mlp.2."),
    ("perceptual_grouping.slot_attention.", "grouping."),  # to_q/k/v, gru, norm_slots
    ("object_decoder.pos_embed", "decoder.pos"),  # [1, N, D] -> [1, 1, N, D]
    ("object_decoder.decoder.layers.", "decoder.blocks."),
    ("object_decoder.decoder.", "decoder.net."),  # build_mlp: Linear, ReLU, ... Linear
    ("object_decoder.bos_token", "decoder.bos_tokens"),  # [1, 1, D] -> [1, 1, 1, D]
    ("object_decoder.cond_transform.", "decoder.slot_proj."),
    ("object_decoder.inp_transform.", "decoder.input_proj."),
)
TORCH_LAYER = (  # nn.TransformerDecoderLayer -> our DecoderBlock
    ("norm1.", "self_attn_layer_norm."),
    ("norm2.", "encoder_decoder_attn_layer_norm."),
    ("norm3.", "ffn_layer_norm."),
    ("linear1.", "ffn.0."),
    ("linear2.", "ffn.2."),
    ("self_attn.out_proj.", "self_attn.proj_o."),
    ("multihead_attn.out_proj.", "encoder_decoder_attn.proj_o."),
)


def _ours_from_oclf(theirs: dict[str, Tensor], ours: dict[str, Tensor]) -> dict[str, Tensor]:
    """OCLF's state dict in our keys and shapes; every OCLF weight is used."""
    out: dict[str, Tensor] = {}
    for key, value in theirs.items():
        if key == "object_decoder.mask":  # its causal mask buffer; ours builds its own
            continue
        new = next(ours_p + key[len(p) :] for p, ours_p in RENAMES if key.startswith(p))
        if new.startswith("decoder.blocks."):
            i, rest = new[len("decoder.blocks.") :].split(".", 1)
            stem = f"decoder.blocks.{i}."
            if rest.endswith(("in_proj_weight", "in_proj_bias")):
                attn = "self_attn" if rest.startswith("self_attn") else "encoder_decoder_attn"
                kind = "weight" if rest.endswith("weight") else "bias"
                for w, part in zip("qkv", value.chunk(3)):  # torch stacks q, k, v
                    out[f"{stem}{attn}.proj_{w}.{kind}"] = part
                continue
            new = stem + next(o + rest[len(t) :] for t, o in TORCH_LAYER if rest.startswith(t))
        assert new in ours, f"{key} -> {new}: no such key in our model"
        assert value.numel() == ours[new].numel(), (key, new)
        out[new] = value.reshape(ours[new].shape)
    return out


def _our_model(variant: str, oclf_model: Any) -> tuple[Any, Any]:
    cfg = load_config(PRESETS[variant], [*OURS, *OURS_DECODER[variant]])
    model = build_model(cfg, (IMAGE, IMAGE)).eval()
    state = _ours_from_oclf(oclf_model.state_dict(), model.state_dict())
    model.load_state_dict(state, strict=True)  # every key of ours comes from OCLF
    return model, build_objectives(cfg, model)


# ------------------------------------------------------------------ the comparison


def _images() -> Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(B, 3, IMAGE, IMAGE, generator=g)


def _normalised(images: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return (images - mean) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _run_both(oclf: Any, variant: str) -> tuple[dict[str, Any], Tensor, ModelOutput, Tensor, Any]:
    theirs, loss_fn = _oclf_model(oclf, variant)
    ours, objectives = _our_model(variant, theirs)
    images = _images()
    with torch.no_grad():
        torch.manual_seed(11)  # the slot-initialisation noise: one normal [B, K, DS] draw each
        out = theirs({"input": {"image": _normalised(images), "batch_size": B}})
        their_loss = loss_fn(inputs=out)
        torch.manual_seed(11)
        batch = Batch(images=images)
        mine = ours(batch)
        (objective,) = objectives
        my_loss = objective(mine, batch, Progress(step=0, total=1))["reconstruction"]
    return out, their_loss, mine, my_loss, theirs


def _close(a: Tensor, b: Tensor, name: str) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("variant", ["mlp", "transformer"])
def test_dinosaur_equals_oclfs_modules(oclf: Any, variant: str) -> None:
    out, their_loss, mine, my_loss, _ = _run_both(oclf, variant)
    features = out["feature_extractor"].features
    assert features.shape == (B, N, WIDTH)
    _close(mine.features.tokens, features, "patch features")
    _close(mine.decoding.target, out["object_decoder"].target, "reconstruction target")
    assert torch.equal(mine.slots.init, out["conditioning"])  # the same initial slots
    grouping = out["perceptual_grouping"]
    _close(mine.slots.slots, grouping.objects, "slots")
    _close(mine.slots.attn, grouping.feature_attributions.transpose(1, 2), "attention masks")
    decoded = out["object_decoder"]
    assert decoded.masks.shape == (B, K, N)
    _close(mine.decoding.masks, decoded.masks.transpose(1, 2), "decoder masks")
    _close(mine.decoding.reconstruction, decoded.reconstruction, "reconstruction")
    _close(my_loss, their_loss, "loss")
    # the slots compete: neither masks are uniform, so a swapped weight would show
    assert decoded.masks.std() > 0.02 and grouping.feature_attributions.std() > 0.02


def test_oclfs_extractor_expects_normalised_images(oclf: Any) -> None:
    """The one difference by design: OCLF's TimmFeatureExtractor gets ImageNet-normalised
    images from its preprocessing; our encoder normalises [0, 1] images itself."""
    out, _, mine, _, theirs = _run_both(oclf, "mlp")
    with torch.no_grad():
        raw = theirs["feature_extractor"](video=_images()).features
    assert (raw - mine.features.tokens).abs().max() > 0.1
    _close(mine.features.tokens, out["feature_extractor"].features, "patch features")
