"""The thesis presets and leaderboards: Table 5.3 runs end to end at tiny scale from one
grid command (stage-1 teacher first, then slots / soft / hard mask pooling) and lands in
its leaderboard beside the published numbers; every row of Tables 5.2-5.5 resolves."""

from __future__ import annotations

import pytest

from ocl_bench.report.leaderboard import load_leaderboard
from ocl_bench.report.render import render
from ocl_bench.run.boards import board_path, read_rows, row_config
from ocl_bench.run.config import load_config, read_toml
from ocl_bench.run.grid import load_grid, run_grid
from ocl_bench.run.store import ResultStore

# Shapes at 16 px, a random 1-block MAGE over a tiny random VQGAN (an 8x8 token grid), tiny
# slot attention and decoders, two training steps per cell.
TINY_THESIS = [
    "dataset.name=shapes",
    "dataset.image_size=16",
    "dataset.train_size=8",
    "dataset.val_size=4",
    "encoder.random_init=true",
    "encoder.image_size=16",
    "encoder.embed_dim=24",
    "encoder.depth=1",
    "encoder.num_heads=2",
    "encoder.tokenizer.ch=8",
    "encoder.tokenizer.ch_mult=[1,2]",
    "encoder.tokenizer.n_embed=32",
    "encoder.tokenizer.embed_dim=8",
    "encoder.tokenizer.norm_groups=4",
    "grouping.slot_dim=8",
    "grouping.mlp_hidden=8",
    "decoder.pretrained=false",
    "decoder.depth=1",
    "decoder.num_heads=2",
    "decoder.num_layers=1",
    "train.steps=2",
    "train.batch_size=2",
    "train.warmup_steps=1",
    "train.threads=1",
    "eval.num_images=4",
    "eval.batch_size=4",
    "eval.figure_images=1",
]


def test_stage_presets_carry_the_thesis_optimiser_settings() -> None:
    for name, epochs in (("thesis-stage2", 30), ("thesis-stage3", None)):
        cfg = load_config(name)
        t = cfg.train
        assert tuple(t.betas) == (0.9, 0.95) and t.weight_decay == 0.05 and t.batch_size == 32
        assert cfg.grouping.name == "mask_pooling" and cfg.grouping.params.hard
        assert cfg.grouping.params.num_slots == 7
        assert cfg.encoder.name == "mage_vitb16" and cfg.encoder.params.size == "base"
        assert cfg.encoder.params.masking == "mage" and cfg.decoder.name == "mage"
        if epochs is not None:  # COCO train2017 at batch 32: 3696 steps per epoch
            assert t.steps == epochs * (118287 // 32)
    assert [o.name for o in load_config("thesis-stage3").objectives] == ["masked_slots"]
    stage3 = read_toml("thesis-stage3")
    assert stage3["objectives"]["masked_slots"]["centroids"] == 4096


@pytest.mark.parametrize("table", ["5-2", "5-3", "5-4", "5-5"])
def test_every_row_of_the_thesis_tables_resolves(table: str) -> None:
    spec = read_toml(board_path(f"thesis-table-{table}"))
    for row in read_rows(spec):
        cfg = row_config(row, spec.get("base", {}), "coco")
        assert cfg.encoder.name == "mage_vitb16" and cfg.decoder.name == "mage", row.label
        names = {o.name for o in cfg.objectives}
        assert "token_cross_entropy" in names, row.label
        if row.label in ("Second Stage + Spot Decoder", "Second Stage only"):
            assert "auxiliary_decoder" in names
        if row.label == "Second Stage only":
            assert "spot_self_training" not in names  # no stage-1 guidance
        else:
            teacher = next(o for o in cfg.objectives if o.name == "spot_self_training")
            assert teacher.params.teacher == "@thesis-stage1"


def test_table_5_3_runs_at_tiny_scale_and_fills_its_leaderboard(tmp_path) -> None:
    grid = load_grid("thesis-table-5-3", TINY_THESIS)
    labels = [c.label for c in grid.cells]
    assert labels[0] == "@thesis-stage1 [shapes]" and len(labels) == 4
    groupings = [c.config.grouping for c in grid.cells[1:]]
    assert [g.name for g in groupings] == ["slot_attention", "mask_pooling", "mask_pooling"]
    assert [g.params.hard for g in groupings[1:]] == [False, True]
    db, runs = tmp_path / "t.sqlite", tmp_path / "runs"
    statuses = run_grid(grid, db, runs, progress=False)
    assert set(statuses.values()) == {"complete"}, statuses

    board = load_leaderboard("thesis-table-5-3", db, overrides=TINY_THESIS)
    store = ResultStore(db)
    for row, cell in zip(board.rows, grid.cells[1:], strict=True):
        assert row.missing is None, row.label
        stored = store.get(cell.config.digest())
        for key in ("mbo_i", "mbo_i_attn", "reconstruction_loss"):
            assert row.measured[key] is not None, (row.label, key)
        assert row.measured["mbo_i"] == pytest.approx(
            100 * stored.value("object_discovery", "mbo_i", "decoder")
        )
        assert row.measured["mbo_i_attn"] == pytest.approx(
            100 * stored.value("object_discovery", "mbo_i", "attn")
        )
        # an untrained model over a 32-code vocabulary: the smoothed CE is near ln 32
        assert 2.0 < row.measured["reconstruction_loss"] < 5.0
    published = {r.label: r.published["reconstruction_loss"] for r in board.rows}
    assert published == {"Slots": 4.5, "Soft mask pooling": 4.2, "Hard mask pooling": 4.2}
    text = render(board, "md")
    assert "Reconstruction Loss" in text and "Measured with: dataset.name=shapes" in text
