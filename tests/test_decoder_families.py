"""Decoder output families: capabilities from fields, objectives per family, generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ocl_bench.api.contracts import (
    Batch,
    Denoising,
    GenerativeDecoder,
    ModelOutput,
    ReconstructionOutput,
    Slots,
    TokenPrediction,
    recombine_slots,
)
from ocl_bench.api.errors import IncompatiblePluginsError
from ocl_bench.api.plugin import Plugin
from ocl_bench.objectives.denoising import DenoisingLoss, DenoisingParams
from ocl_bench.objectives.token_cross_entropy import TokenCrossEntropy, TokenCrossEntropyParams
from ocl_bench.run.compose import build_model, check_compatible
from ocl_bench.run.config import RunConfig, load_raw, resolve
from ocl_bench.run.registry import PluginInfo, Registry, registry
from tests.conftest import TINY_MODEL

TINY = [*TINY_MODEL, "decoder.hidden=16"]


class _TokenDecoder(Plugin):
    kind = "decoder"
    name = "fake_tokens"
    requires = frozenset({"slots.slots"})
    output = TokenPrediction


class _DiffusionDecoder(Plugin):
    kind = "decoder"
    name = "fake_diffusion"
    requires = frozenset({"slots.slots"})
    provides = frozenset({"generation.images"})
    output = Denoising


def _reg() -> Registry:
    infos = list(registry().infos)
    infos += [
        PluginInfo(c.kind, c.name, "test", "0", c) for c in (_TokenDecoder, _DiffusionDecoder)
    ]
    return Registry(infos)


def _cfg(*overrides: str, objectives: dict | None = None, tasks: dict | None = None) -> RunConfig:
    raw = load_raw(None, list(overrides))
    if objectives is not None:
        raw["objectives"] = objectives
    if tasks is not None:
        raw["tasks"] = tasks
    return resolve(raw, _reg())


def test_family_fields_are_the_required_fields() -> None:
    assert ReconstructionOutput.family_fields() == {"decoding.reconstruction", "decoding.target"}
    assert TokenPrediction.family_fields() == {
        "decoding.logits",
        "decoding.target_ids",
        "decoding.predicted",
    }
    assert Denoising.family_fields() == {
        "decoding.prediction",
        "decoding.target",
        "decoding.timesteps",
    }
    _, gives = _TokenDecoder.capabilities(None)
    assert "decoding.logits" in gives and "decoding.reconstruction" not in gives


def test_available_lists_only_set_fields() -> None:
    out = TokenPrediction(
        logits=torch.zeros(1, 4, 8),
        target_ids=torch.zeros(1, 4, dtype=torch.long),
        predicted=torch.ones(1, 4, dtype=torch.bool),
    )
    assert out.available() == {"decoding.logits", "decoding.target_ids", "decoding.predicted"}


def test_reconstruction_objective_rejects_token_decoder_in_one_line() -> None:
    cfg = _cfg("decoder.name=fake_tokens", objectives={"reconstruction": {}}, tasks={})
    with pytest.raises(IncompatiblePluginsError) as err:
        check_compatible(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert "'reconstruction'" in msg and "'fake_tokens'" in msg
    assert "decoding.reconstruction" in msg and "decoding.logits" in msg  # needed vs provided


def test_token_objective_accepts_token_decoder_and_rejects_pixel_decoder() -> None:
    check_compatible(
        _cfg("decoder.name=fake_tokens", objectives={"token_cross_entropy": {}}, tasks={})
    )
    with pytest.raises(IncompatiblePluginsError, match="decoding.logits"):
        check_compatible(_cfg(objectives={"token_cross_entropy": {}}, tasks={}))


def test_denoising_objective_needs_a_denoising_decoder() -> None:
    check_compatible(_cfg("decoder.name=fake_diffusion", objectives={"denoising": {}}, tasks={}))
    with pytest.raises(IncompatiblePluginsError, match="decoding.timesteps"):
        check_compatible(_cfg(objectives={"denoising": {}}, tasks={}))


def _output(decoding: object) -> ModelOutput:
    return ModelOutput(features=None, slots=None, decoding=decoding)  # type: ignore[arg-type]


def test_token_cross_entropy_scores_predicted_positions_only() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 10, generator=g)
    ids = torch.randint(0, 10, (2, 6), generator=g)
    predicted = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    objective = TokenCrossEntropy(TokenCrossEntropyParams(label_smoothing=0.1))
    batch = Batch(images=torch.zeros(2, 3, 4, 4))
    loss = objective(
        _output(TokenPrediction(logits=logits, target_ids=ids, predicted=predicted)), batch
    )
    expected = F.cross_entropy(logits[predicted], ids[predicted], label_smoothing=0.1)
    torch.testing.assert_close(loss["token_cross_entropy"], expected)
    # what the decoder says at unpredicted positions does not matter
    other = logits.clone()
    other[~predicted] = 100.0
    loss2 = objective(
        _output(TokenPrediction(logits=other, target_ids=ids, predicted=predicted)), batch
    )
    torch.testing.assert_close(loss2["token_cross_entropy"], expected)


def test_denoising_loss_is_mse_with_weight() -> None:
    pred, target = torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    out = Denoising(prediction=pred, target=target, timesteps=torch.tensor([1, 2]))
    loss = DenoisingLoss(DenoisingParams(weight=0.5))(_output(out), Batch(images=pred))
    assert float(loss["denoising"]) == pytest.approx(0.5)


# ------------------------------------------------------------------ generation


@pytest.fixture(scope="module")
def batch() -> Batch:
    shapes = registry().get("dataset", "shapes")
    dataset = shapes(shapes.Params(image_size=32, val_size=4), "val")
    return dataset.collate([dataset[i] for i in range(4)])


@pytest.mark.parametrize("decoder", ["mlp", "spatial_broadcast"])
def test_pixel_decoders_generate_what_they_decode(batch: Batch, decoder: str) -> None:
    torch.manual_seed(0)
    overrides = TINY if decoder == "mlp" else [*TINY[:-1], "decoder.name=spatial_broadcast"]
    cfg = resolve(load_raw(None, overrides))
    assert "generation.images" in cfg.decoder.cls.capabilities(cfg.decoder.params)[1]
    model = build_model(cfg, (32, 32)).eval()
    with torch.no_grad():
        out = model(batch)
        images = model.decoder.generate(out.slots, steps=5, generator=torch.Generator())
    assert isinstance(model.decoder, GenerativeDecoder)
    assert images.shape == batch.images.shape
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, out.decoding.extras["image"])


def test_feature_decoders_do_not_generate() -> None:
    for overrides in (["decoder.target=features"], ["decoder.name=spot_ar"]):
        cfg = resolve(load_raw(None, overrides))
        assert "generation.images" not in cfg.decoder.cls.capabilities(cfg.decoder.params)[1]


def test_recombined_slots_keep_each_slot_with_its_attention() -> None:
    g = torch.Generator().manual_seed(1)
    b, n, k, d = 5, 6, 4, 3
    attn = torch.rand(b, n, k, generator=g).softmax(-1)
    slots = Slots(slots=torch.randn(b, k, d, generator=g), attn=attn, logits=attn.log())
    mixed = recombine_slots(slots, torch.Generator().manual_seed(2))
    sources = set()
    for i in range(b):
        for j in range(k):
            src = [s for s in range(b) if torch.equal(slots.slots[s, j], mixed.slots[i, j])]
            assert len(src) == 1
            torch.testing.assert_close(mixed.attn[i, :, j], attn[src[0], :, j])
            torch.testing.assert_close(mixed.logits[i, :, j], slots.logits[src[0], :, j])
            sources.add((i, src[0]))
    # each slot position is a permutation of the batch, and images do get others' slots
    for j in range(k):
        column = {
            int((mixed.slots[:, j : j + 1] == slots.slots[:, j][None]).all(-1).nonzero()[0, 1])
        }
        assert column
    assert any(i != s for i, s in sources)
