"""Named presets (bench/configs/presets/): official hyperparameters, loaded by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

import ocl_bench
from ocl_bench.api.errors import DataError
from ocl_bench.cli import main
from ocl_bench.run.config import load_config, preset_names

PRESETS = Path(ocl_bench.__file__).parent / "configs" / "presets"
EXPECTED = {
    "spot-coco",
    "spot-voc",
    "spot-coco-stage2",
    "dinosaur-mlp-coco",
    "dinosaur-transformer-coco",
}

# spot-coco shrunk to seconds on a CPU: shapes instead of COCO (switching dataset.name drops
# the coco params), a 2-block random ViT at patch 16 on 64px images (a 4x4 grid), a 1-block
# decoder. Everything else (orders, clipping, init, ...) stays as the preset has it.
SMOKE = [
    "dataset.name=shapes",
    "dataset.image_size=64",
    "dataset.train_size=8",
    "dataset.val_size=4",
    "encoder.random_init=true",
    "encoder.embed_dim=32",
    "encoder.depth=2",
    "encoder.num_heads=2",
    "encoder.image_size=64",
    "grouping.slot_dim=16",
    "grouping.mlp_hidden=32",
    "decoder.num_layers=1",
    "decoder.num_heads=2",
    "train.steps=2",
    "train.batch_size=2",
    "train.warmup_steps=1",
    "train.checkpoint_every=1",
    "train.device=cpu",
    "train.threads=1",
]


def test_the_presets_are_packaged() -> None:
    # Other method families add presets of their own (tested beside their plugins).
    assert EXPECTED <= set(preset_names())
    assert {p.stem for p in PRESETS.glob("*.toml")} == set(preset_names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_preset_resolves(name: str) -> None:
    cfg = load_config(name)
    assert cfg.encoder.name == "dino_vitb16"
    assert not cfg.encoder.params.random_init and not cfg.encoder.params.final_norm
    assert cfg.encoder.params.block == 12
    assert cfg.grouping.params.slot_dim == 256 and cfg.train.batch_size == 64


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_value_in_a_preset_names_its_source(name: str) -> None:
    text = (PRESETS / f"{name}.toml").read_text()
    assert text.startswith("# ")  # the summary `ocl-bench presets` prints
    for line in text.splitlines():
        if re.match(r"^\w+ = ", line) and not line.startswith("name ="):
            assert "#" in line, f"{name}: no source comment on '{line}'"


def test_spot_coco_has_the_official_values() -> None:
    cfg = load_config("spot-coco")
    g, d, t = cfg.grouping.params, cfg.decoder.params, cfg.train
    assert cfg.dataset.name == "coco" and cfg.decoder.name == "spot_ar"
    assert cfg.encoder.params.finetune_from == -1
    assert (g.num_slots, g.slot_dim, g.mlp_hidden, g.iterations) == (7, 256, 1024, 3)
    assert (g.init, g.truncation, g.pre_mlp) == ("shared_gaussian", "none", True)
    assert (d.num_layers, d.num_heads, d.orders, d.train_order) == (4, 6, "all", "random")
    assert d.eval_order == "all"
    assert (t.lr, t.weight_decay, t.grad_clip, t.grad_clip_norm) == (4e-4, 0.0, 0.3, "inf")
    per_epoch = 118287 // 64  # COCO train2017 at batch 64
    assert t.warmup_steps == int(10000 / (118287 / 64)) * per_epoch == 9240
    assert t.steps == 50 * per_epoch
    assert (t.schedule, t.min_lr) == ("cosine", 4e-7)
    od = next(c for c in cfg.tasks if c.name == "object_discovery").params
    assert od.masks == ["decoder", "attn"] and od.mask_size == 320
    assert [c.name for c in cfg.objectives] == ["reconstruction"]


def test_spot_voc_and_stage_two() -> None:
    voc = load_config("spot-voc")
    assert voc.dataset.name == "voc" and voc.grouping.params.num_slots == 6
    per_epoch = 10582 // 64  # VOC trainaug at batch 64
    assert voc.train.warmup_steps == int(10000 / (10582 / 64)) * per_epoch == 9900
    assert voc.train.steps == 560 * per_epoch
    for cfg in (voc, load_config("spot-coco-stage2")):
        assert (cfg.train.schedule, cfg.train.min_lr, cfg.train.lr) == ("cosine", 4e-7, 4e-4)

    s2 = load_config("spot-coco-stage2")
    assert s2.encoder.params.finetune_from == 8
    assert (s2.grouping.params.init, s2.grouping.params.truncation) == (
        "learned_queries",
        "bi-level",
    )
    objectives = {c.name: c.params for c in s2.objectives}
    assert set(objectives) == {"reconstruction", "spot_self_training"}
    assert objectives["spot_self_training"].weight == 5e-3
    assert objectives["spot_self_training"].teacher == ""  # set by override
    teacher = load_config("spot-coco-stage2", ["objectives.spot_self_training.teacher=runs/s1"])
    st = next(c for c in teacher.objectives if c.name == "spot_self_training")
    assert st.params.teacher == "runs/s1"


def test_dinosaur_presets() -> None:
    mlp = load_config("dinosaur-mlp-coco")
    assert mlp.decoder.name == "mlp"
    assert (mlp.decoder.params.hidden, mlp.decoder.params.layers) == (2048, 3)
    assert mlp.decoder.params.target == "features"
    tr = load_config("dinosaur-transformer-coco")
    assert tr.decoder.name == "dinosaur_transformer" and tr.decoder.params.orders == "standard"
    for cfg in (mlp, tr):
        t = cfg.train
        assert (t.steps, t.warmup_steps, t.decay_half_life) == (500_000, 10_000, 100_000)
        assert t.schedule == "half_life_after_warmup"
        assert (t.lr, t.grad_clip, t.grad_clip_norm) == (4e-4, 1.0, "2")
        assert cfg.grouping.params.num_slots == 7 and cfg.dataset.params.crowd == "drop"


def test_loading_by_name_equals_loading_by_path() -> None:
    for name in EXPECTED:
        assert load_config(name).digest() == load_config(PRESETS / f"{name}.toml").digest()
    over = ["train.steps=10", "train.warmup_steps=2"]
    assert (
        load_config("spot-coco", over).digest()
        == load_config(str(PRESETS / "spot-coco.toml"), over).digest()
    )


def test_an_existing_file_wins_over_a_preset_name(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("spot-coco").write_text((PRESETS / "spot-voc.toml").read_text())
    assert load_config("spot-coco").dataset.name == "voc"


def test_an_unknown_preset_lists_the_available_ones(tmp_path, capsys) -> None:
    with pytest.raises(DataError, match="config file not found: no-such-preset") as err:
        load_config("no-such-preset")
    assert all(name in str(err.value) for name in EXPECTED)
    assert main(["train", "no-such-preset", "--out", str(tmp_path / "run")]) == 2
    assert "spot-coco-stage2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_presets_command_lists_names_and_summaries(capsys) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in EXPECTED:
        assert name in out
    assert "SPOT stage 1, COCO 2017" in out


def test_spot_coco_shrunk_trains_one_step(tmp_path) -> None:
    from ocl_bench.run.train import train

    cfg = load_config("spot-coco", SMOKE)
    assert cfg.dataset.name == "shapes" and "root" not in cfg.raw["dataset"]
    assert cfg.train.grad_clip_norm == "inf" and cfg.decoder.params.orders == "all"
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.step == 2
    weights = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert any(k.startswith("decoder.bos_tokens") for k in weights)
    assert (tmp_path / "run" / "config.toml").is_file()
