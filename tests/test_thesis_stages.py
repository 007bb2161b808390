"""Thesis stages 2 and 3 at tiny sizes: the auxiliary SPOT decoder, masked-slot training
over a slot library, and the masked-token reconstruction loss task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ocl_bench.api.contracts import Batch, ModelOutput, Progress, Slots, TokenPrediction
from ocl_bench.api.errors import ConfigError
from ocl_bench.api.tasking import EvalContext
from ocl_bench.objectives.masked_slots import MaskedSlots, MaskedSlotsParams
from ocl_bench.run.compose import build_model, build_objectives
from ocl_bench.run.config import load_raw, resolve
from ocl_bench.run.slot_library import SlotLibrary, nearest_centroids
from ocl_bench.tasks.token_reconstruction import TokenReconstruction, TokenReconstructionParams

TINY_STAGE2 = [
    "dataset.image_size=16",
    "encoder.name=mage_vitb16",
    "encoder.random_init=true",
    "encoder.image_size=16",  # the tiny tokenizer halves the side: an 8x8 grid
    "encoder.embed_dim=16",
    "encoder.depth=1",
    "encoder.num_heads=2",
    "encoder.masking=mage",
    "encoder.tokenizer.ch=8",
    "encoder.tokenizer.ch_mult=[1,2]",
    "encoder.tokenizer.n_embed=32",
    "encoder.tokenizer.embed_dim=8",
    "encoder.tokenizer.norm_groups=4",
    "grouping.name=mask_pooling",
    "grouping.num_slots=3",
    "grouping.slot_dim=8",
    "grouping.mlp_hidden=8",
    "decoder.name=mage",
    "decoder.depth=1",
    "decoder.num_heads=2",
]
AUX = {"decoder": {"name": "spot_ar", "num_layers": 1, "num_heads": 2}}


def stage2(objectives: dict, *extra: str, seed: int = 0):
    torch.manual_seed(seed)
    raw = load_raw(None, [*TINY_STAGE2, *extra])
    raw["objectives"] = objectives
    cfg = resolve(raw)
    model = build_model(cfg, (16, 16))
    return cfg, model


def images(n: int = 2) -> Batch:
    return Batch(images=torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(5)))


def grads(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_auxiliary_spot_decoder_trains_slot_attention_under_hard_pooling() -> None:
    objectives = {"token_cross_entropy": {"label_smoothing": 0.1}, "auxiliary_decoder": AUX}
    cfg, model = stage2(objectives)
    losses = build_objectives(cfg, model)
    aux = losses[1]
    assert aux.decoder is not None and aux.decoder.slot_proj[0].in_features == 8
    out = model(images())
    terms = {}
    for objective in losses:
        terms.update(objective(out, images(), Progress(0, 1)))
    assert set(terms) == {"token_cross_entropy", "auxiliary_reconstruction"}
    terms["token_cross_entropy"].backward(retain_graph=True)
    # hard-pooled slots carry no gradient into slot attention ...
    assert grads(model.grouping) == 0.0 and grads(model.decoder) > 0
    terms["auxiliary_reconstruction"].backward()
    # ... the auxiliary decoder on the slot-attention slots does
    assert grads(model.grouping) > 0 and grads(aux.decoder) > 0


def test_auxiliary_decoder_must_reconstruct() -> None:
    cfg, model = stage2({"auxiliary_decoder": {"decoder": {"name": "mage"}}})
    with pytest.raises(ConfigError, match="does not reconstruct"):
        build_objectives(cfg, model)


def library_for(slot_dim: int, size: int = 5) -> SlotLibrary:
    centroids = torch.randn(size, slot_dim, generator=torch.Generator().manual_seed(2)) * 3
    return SlotLibrary(centroids, {"centroids": size})


def test_masked_slot_inputs_hide_slots_and_target_nearest_centroids() -> None:
    cfg, model = stage2({"token_cross_entropy": {}})
    library = library_for(16)
    objective = MaskedSlots(MaskedSlotsParams(library="x"), library)
    objective.connect(model)
    torch.manual_seed(0)
    slots = torch.randn(64, 3, 16)
    inputs, hidden, ids = objective.masked_slot_inputs(slots)
    assert torch.equal(ids, nearest_centroids(slots, library.centroids))
    assert hidden.any(1).all()  # every image hides at least one slot
    assert hidden.all(1).any() and (~hidden).any()  # all hidden happens, and some visible
    torch.testing.assert_close(inputs[~hidden], library.centroids[ids[~hidden]])
    assert torch.equal(inputs[hidden], objective.mask_slot.expand(int(hidden.sum()), -1))


def test_masked_slot_branch_predicts_centroid_ids_from_the_decoder() -> None:
    cfg, model = stage2({"token_cross_entropy": {}})
    library = library_for(16, size=4)
    always_slots = MaskedSlots(MaskedSlotsParams(library="x", keep_prob=0.0), library)
    always_slots.connect(model)
    batch = images()
    out = model(batch)
    terms = always_slots(out, batch, Progress(0, 1))
    assert float(terms["masked_tokens_ce"]) == 0.0 and float(terms["masked_slots_ce"].detach()) > 0
    logits = always_slots.slot_logits(torch.randn(2, 3, 16))
    assert logits.shape == (2, 3, 4)
    terms["masked_slots_ce"].backward()
    assert grads(always_slots.head) > 0 and always_slots.mask_slot.grad is not None
    assert grads(model.decoder) > 0
    always_tokens = MaskedSlots(MaskedSlotsParams(library="x", keep_prob=1.0), library)
    always_tokens.connect(model)
    terms = {k: v.detach() for k, v in always_tokens(model(batch), batch, Progress(0, 1)).items()}
    d = model(batch).decoding
    assert float(terms["masked_slots_ce"]) == 0.0 and float(terms["masked_tokens_ce"]) > 0
    assert isinstance(d, TokenPrediction)


def test_masked_slots_refuses_a_library_of_another_slot_size() -> None:
    cfg, model = stage2({"token_cross_entropy": {}})
    objective = MaskedSlots(MaskedSlotsParams(library="x"), library_for(7))
    with pytest.raises(ConfigError, match="dimension 7"):
        objective.connect(model)
    with pytest.raises(ConfigError, match="library"):
        MaskedSlots(MaskedSlotsParams())


class _Fixed(EvalContext):
    """An evaluation context that yields given model outputs."""

    outputs: list[ModelOutput] = []

    def predictions(self, split=None, count=None, desc="eval"):
        for out in self.outputs:
            yield images(out.decoding.logits.shape[0]), out


def test_reconstruction_loss_averages_masked_positions_per_image() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 5, generator=gen)
    target = torch.randint(0, 5, (2, 6), generator=gen)
    predicted = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    decoding = TokenPrediction(logits=logits, target_ids=target, predicted=predicted)
    out = ModelOutput(
        features=None, slots=Slots(torch.zeros(2, 1, 1), torch.zeros(2, 6, 1)), decoding=decoding
    )
    ctx = _Fixed(
        model=None,
        dataset=None,
        split="val",
        num_images=2,
        batch_size=2,
        device=torch.device("cpu"),
    )
    ctx.outputs = [out]
    result = TokenReconstruction(TokenReconstructionParams(label_smoothing=0.1)).evaluate(ctx)
    got = {r.metric: r for r in result.records}
    per_image = [
        float(F.cross_entropy(logits[b][chosen], target[b][chosen], label_smoothing=0.1))
        for b, chosen in enumerate(predicted)
    ]
    assert got["reconstruction_loss"].per_image == pytest.approx(per_image)
    assert got["reconstruction_loss"].value == pytest.approx(sum(per_image) / 2)
    plain = F.cross_entropy(logits[0][predicted[0]], target[0][predicted[0]])
    assert got["masked_token_ce"].per_image[0] == pytest.approx(float(plain))
    assert got["reconstruction_loss"].value > got["masked_token_ce"].value - 1.0
    assert result.info["masked_positions"] == 6


def test_reconstruction_loss_on_a_tiny_stage2_model(tmp_path: Path) -> None:
    cfg, model = stage2({"token_cross_entropy": {}})
    task = TokenReconstruction(TokenReconstructionParams(label_smoothing=0.0))

    class _Data:
        def __init__(self) -> None:
            self.items = images(4)

        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> torch.Tensor:
            return self.items.images[i]

        def collate(self, items: list[torch.Tensor]) -> Batch:
            return Batch(images=torch.stack(items))

    ctx = EvalContext(
        model=model,
        dataset=lambda split: _Data(),
        split="val",
        num_images=4,
        batch_size=2,
        device=torch.device("cpu"),
        progress=False,
    )
    got = {r.metric: r.value for r in task.evaluate(ctx).records}
    # an untrained model over a 32-code vocabulary scores about ln 32 on masked tokens
    assert abs(got["masked_token_ce"] - torch.log(torch.tensor(32.0)).item()) < 1.5
    assert got["reconstruction_loss"] == pytest.approx(got["masked_token_ce"])


def test_masked_slots_from_a_stage2_run_builds_its_library_and_starts_from_it(
    tmp_path: Path,
) -> None:
    from ocl_bench.run.train import train

    raw = load_raw(None, [*TINY_STAGE2, "dataset.train_size=4", "dataset.val_size=2"])
    raw["objectives"] = {"token_cross_entropy": {}}
    raw["tasks"] = {}
    raw["train"].update(steps=1, batch_size=2, warmup_steps=0, threads=1)
    run = tmp_path / "s2"
    train(resolve(raw), run, progress=False)
    objective = MaskedSlots(MaskedSlotsParams(library=str(run), centroids=4))
    assert (run / "slot_library" / "k4.safetensors").is_file()
    assert objective.centroids.shape == (4, 16) and objective.provenance["slots"] == 4 * 3
    _, fresh = stage2({"token_cross_entropy": {}}, seed=1)
    from ocl_bench.run.evaluate import load_run

    _, trained, _ = load_run(run)
    before = fresh.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in trained.state_dict().items())
    objective.connect(fresh)
    for name, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
