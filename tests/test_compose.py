"""Composition: capability checks before training, and the shapes a composed model returns."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ocl_bench.api.contracts import Batch, ModelOutput, Progress
from ocl_bench.api.errors import IncompatiblePluginsError
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Plugin
from ocl_bench.run.compose import build_model, build_objectives, check_compatible
from ocl_bench.run.config import RunConfig, load_raw, resolve
from ocl_bench.run.registry import PluginInfo, Registry, registry
from tests.conftest import TINY_MODEL


def resolved(*overrides: str, reg: Registry | None = None) -> RunConfig:
    return resolve(load_raw(None, list(overrides)), reg)


@pytest.fixture(scope="module")
def batch() -> Batch:
    shapes = registry().get("dataset", "shapes")
    dataset = shapes(shapes.Params(image_size=32, val_size=4), "val")
    return dataset.collate([dataset[i] for i in range(3)])


# ------------------------------------------------------------------ check_compatible


def test_default_config_is_compatible() -> None:
    check_compatible(resolved())
    check_compatible(resolved("decoder.name=spatial_broadcast"))


def test_feature_decoder_on_pixel_encoder_names_both_and_capability() -> None:
    cfg = resolved("decoder.target=features")
    with pytest.raises(IncompatiblePluginsError) as err:
        check_compatible(cfg)
    msg = str(err.value)
    assert "'mlp'" in msg and "'cnn'" in msg
    assert "features.targets" in msg
    assert "features.tokens" in msg  # what the encoder does provide


def test_unlabelled_dataset_with_object_discovery_names_both_and_capability() -> None:
    cfg = resolved("dataset.name=image_folder")
    with pytest.raises(IncompatiblePluginsError) as err:
        check_compatible(cfg)
    msg = str(err.value)
    assert "'object_discovery'" in msg or "'property_prediction'" in msg
    assert "'image_folder'" in msg
    assert "batch.instance_masks" in msg
    # with object discovery alone, it is object discovery that is named
    raw = load_raw(None, ["dataset.name=image_folder"])
    raw["tasks"] = {"object_discovery": {}}
    with pytest.raises(IncompatiblePluginsError) as err:
        check_compatible(resolve(raw))
    msg = str(err.value)
    assert "'object_discovery'" in msg and "'image_folder'" in msg
    assert "batch.instance_masks" in msg


def test_unlabelled_dataset_without_tasks_is_compatible() -> None:
    raw = load_raw(None, ["dataset.name=image_folder"])
    raw["tasks"] = {}
    check_compatible(resolve(raw))


def test_build_model_checks_before_building() -> None:
    with pytest.raises(IncompatiblePluginsError, match="features.targets"):
        build_model(resolved(*TINY_MODEL, "decoder.target=features"), (32, 32))


@dataclass(frozen=True)
class _TargetsParams:
    dim: int = param(4, "token dimension")


class _TargetsEncoder(Plugin):
    """An encoder that provides targets (only its capabilities are used here)."""

    kind = "encoder"
    name = "with_targets"
    Params = _TargetsParams
    provides = frozenset({"features.tokens", "features.targets"})


class _TokenIdsDecoder(Plugin):
    """A decoder that needs discrete token ids."""

    kind = "decoder"
    name = "needs_ids"
    requires = frozenset({"slots.slots", "features.token_ids"})
    provides = frozenset({"decoding.masks"})


def _registry_with(*extra: type) -> Registry:
    infos = list(registry().infos)
    infos += [PluginInfo(c.kind, c.name, "test", "0", c) for c in extra]
    return Registry(infos)


def test_capability_provided_by_another_encoder_passes() -> None:
    reg = _registry_with(_TargetsEncoder)
    check_compatible(resolved("encoder.name=with_targets", "decoder.target=features", reg=reg))


def test_static_requirement_names_both_plugins() -> None:
    reg = _registry_with(_TokenIdsDecoder)
    cfg = resolved("decoder.name=needs_ids", reg=reg)
    with pytest.raises(IncompatiblePluginsError) as err:
        check_compatible(cfg)
    msg = str(err.value)
    assert "'needs_ids'" in msg and "'cnn'" in msg and "features.token_ids" in msg


# ------------------------------------------------------------------ the composed model


@pytest.mark.parametrize("decoder", ["mlp", "spatial_broadcast"])
def test_forward_returns_typed_output_with_normalised_masks(batch: Batch, decoder: str) -> None:
    torch.manual_seed(0)
    cfg = resolved(*TINY_MODEL, f"decoder.name={decoder}")
    model = build_model(cfg, (32, 32)).eval()
    with torch.no_grad():
        out = model(batch)
    assert isinstance(out, ModelOutput)
    b, k = batch.size, 3
    n = (32 // 4) * (32 // 4)
    assert out.features.grid == (8, 8)
    assert out.features.tokens.shape == (b, n, 16)
    assert out.slots.slots.shape == (b, k, 16)
    attn = out.slots.attn
    assert attn.shape == (b, n, k)
    assert torch.allclose(attn.sum(-1), torch.ones(b, n), atol=1e-5)
    assert (attn >= 0).all()
    masks = out.decoding.masks
    assert masks is not None
    assert masks.shape[0] == b and masks.shape[2] == k
    h, w = out.decoding.mask_grid or out.features.grid
    assert masks.shape[1] == h * w
    assert torch.allclose(masks.sum(-1), torch.ones(b, h * w), atol=1e-5)
    assert out.decoding.reconstruction.shape == out.decoding.target.shape
    assert torch.isfinite(out.decoding.reconstruction).all()
    # the masks a task scores: [B,K,h,w] from either source
    assert out.masks("attn").shape == (b, k, 8, 8)
    assert out.masks("decoder").shape == (b, k, h, w)
    # the objectives reduce the output to a finite scalar that reaches the encoder
    model.train()
    out = model(batch)
    losses = {}
    for objective in build_objectives(cfg):
        losses.update(objective(out, batch, Progress(0, 1)))
    total = sum(losses.values())
    assert total.ndim == 0 and torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_model_follows_num_slots(batch: Batch) -> None:
    model = build_model(resolved(*TINY_MODEL, "grouping.num_slots=5"), (32, 32)).eval()
    with torch.no_grad():
        out = model(batch)
    assert out.slots.attn.shape[-1] == 5
    assert out.decoding.masks.shape[-1] == 5
