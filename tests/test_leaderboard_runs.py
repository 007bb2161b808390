"""Published leaderboards run as grids: SPOT and DINOSAUR rows at tiny scale on shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ocl_bench.api.errors import ConfigError
from ocl_bench.cli import main
from ocl_bench.report.leaderboard import load_leaderboard
from ocl_bench.report.render import render
from ocl_bench.run.config import load_config, read_toml
from ocl_bench.run.grid import Grid, load_grid, run_grid
from ocl_bench.run.store import ResultStore
from tests.test_presets import SMOKE

# Every row's preset shrunk to seconds (the presets' smoke settings: shapes instead of
# COCO/VOC, a 2-block random ViT at patch 16 on 64px images, a 1-block decoder, 2 steps).
TINY_VIT = [*SMOKE, "eval.num_images=4", "eval.batch_size=4", "eval.figure_images=1"]
SPOT = [*TINY_VIT, "encoder.finetune_from=1"]
# StableLSD's row runs too, on random tiny UNet/VAE stand-ins at the dataset's size.
DINOSAUR = [
    *TINY_VIT,
    "decoder.hidden=32",
    "decoder.tiny=true",
    "decoder.image_size=0",
    "decoder.cache_latents=false",
    "train.precision=fp32",
]


# GLASS's rows generate their training set with tiny random Stable Diffusion stand-ins, and
# prompt with class names (GLASS's BLIP-2 captions need weights: GLASS runs as GLASS† here).
GLASS = [*DINOSAUR, "dataset.tiny=true", "dataset.steps=2", "dataset.captions=class_names"]


def spot_grid() -> Grid:
    """Table 5.1's SPOT row and its teacher (the other rows have tests of their own)."""
    grid = load_grid("thesis-table-5-1", SPOT)
    grid.cells[:] = [c for c in grid.cells if "spot" in c.label.lower()]
    return grid


def test_spot_row_trains_its_teacher_first_and_fills_the_table(tmp_path) -> None:
    grid = spot_grid()
    labels = [c.label for c in grid.cells]
    assert labels == ["@spot-coco [shapes]", "Spot + DINO ViT [coco as shapes]"]
    teacher, student = grid.cells
    assert student.needs == {"objectives.spot_self_training.teacher": teacher}
    assert teacher.config.grouping.params.init == "shared_gaussian"  # the stage-1 preset
    assert student.config.grouping.params.init == "learned_queries"  # the stage-2 preset
    assert student.config.encoder.params.finetune_from == 1 and teacher.config.train.steps == 2
    db, runs = tmp_path / "r.sqlite", tmp_path / "runs"
    statuses = run_grid(grid, db, runs, progress=False)
    assert set(statuses.values()) == {"complete"}

    store = ResultStore(db)
    t_cell, s_cell = (store.get(c.config.digest()) for c in grid.cells)
    # the stored config keeps the reference (so the leaderboard finds it); the run has the path
    stored = s_cell.config["objectives"]["spot_self_training"]["teacher"]
    assert stored == "@spot-coco"
    run_cfg = read_toml(Path(s_cell.run_dir) / "config.toml")
    used = run_cfg["objectives"]["spot_self_training"]["teacher"]
    assert Path(used) == Path(t_cell.run_dir).resolve()

    board = load_leaderboard("thesis-table-5-1", db, overrides=SPOT)
    row = next(r for r in board.rows if r.label == "Spot + DINO ViT")
    assert row.missing is None
    ari = s_cell.value("object_discovery", "fg_ari", "decoder")
    assert row.measured["fg_ari"] == pytest.approx(100 * ari)
    assert row.measured["mbo_i"] == pytest.approx(
        100 * s_cell.value("object_discovery", "mbo_i", "decoder")
    )
    # the row's figure is the newest mask figure (not the training curves beside it)
    assert [Path(f).name for f in row.figures] == ["step0000002_decoder.png"]
    assert (Path(s_cell.run_dir) / "figures" / "training.png").is_file()
    text = render(board, "md")
    assert "Measured with: dataset.name=shapes" in text
    # without the overrides the same rows are other configs: nothing measured
    plain = load_leaderboard("thesis-table-5-1", db)
    assert next(r for r in plain.rows if r.label == "Spot + DINO ViT").missing.startswith(
        "not measured"
    )
    # a second run finds every cell stored
    again = run_grid(spot_grid(), db, runs, progress=False)
    assert set(again.values()) == {"complete (stored)"}


def test_dinosaur_rows_run_per_dataset_column(tmp_path, capsys) -> None:
    grid = load_grid("glass-table-3", GLASS)
    by_label = {c.label: c.config for c in grid.cells}
    assert set(by_label) == {
        "SA [coco as shapes]",  # its COCO and VOC configs are one on shapes: one cell
        "DINOSAUR-MLP [coco as shapes]",
        "DINOSAUR-MLP [voc as shapes]",
        "DINOSAUR-Trans. [coco as shapes]",
        "DINOSAUR-Trans. [voc as shapes]",
        "StableLSD [coco as shapes]",
        "SLATE [coco as shapes]",
        "SLATE [voc as shapes]",
        "@slotdiffusion-vqvae-coco [shapes]",  # SlotDiffusion's first stage, per dataset
        "SlotDiffusion [coco as shapes]",
        "@slotdiffusion-vqvae-voc [shapes]",
        "SlotDiffusion [voc as shapes]",
        "GLASS† (ours) [coco as generated]",  # generated from shapes prompts, 7 slots
        "GLASS† (ours) [voc as generated]",  # 6 slots on VOC; GLASS's cells are these here
    }
    # an override reaches the rows whose plugins have that param, and says which did not;
    # rows whose plugins do not exist are skipped with the reason
    err = capsys.readouterr().err
    assert "DINOSAUR-MLP: its plugins have no decoder.num_layers=1 decoder.num_heads=2" in err
    assert "SA: its plugins have no encoder.random_init=true" in err
    (lsd,) = [line for line in err.splitlines() if line.startswith("StableLSD: its plugins")]
    assert "dataset.tiny=true" in lsd  # shapes has no generation params: left out
    glass = by_label["GLASS† (ours) [coco as generated]"]
    assert glass.dataset.params.source == "shapes" and glass.grouping.params.iterations == 3
    assert by_label["StableLSD [coco as shapes]"].decoder.name == "latent_diffusion"
    assert by_label["SA [coco as shapes]"].encoder.name == "cnn"
    assert by_label["DINOSAUR-Trans. [coco as shapes]"].decoder.params.num_heads == 2
    assert by_label["DINOSAUR-MLP [coco as shapes]"].decoder.params.hidden == 32
    assert by_label["DINOSAUR-MLP [voc as shapes]"].grouping.params.num_slots == 6
    assert by_label["DINOSAUR-MLP [coco as shapes]"].grouping.params.num_slots == 7
    assert by_label["DINOSAUR-MLP [coco as shapes]"].decoder.params.target == "features"
    assert by_label["DINOSAUR-Trans. [voc as shapes]"].decoder.params.orders == "standard"
    db = tmp_path / "r.sqlite"
    argv = ["grid", "glass-table-3", *GLASS, "--db", str(db), "--runs", str(tmp_path / "runs")]
    assert main([*argv, "-q"]) == 0
    assert main(["leaderboard", "glass-table-3", *GLASS, "--db", str(db), "--format", "json"]) == 0
    board = json.loads(capsys.readouterr().out)
    rows = {r["label"]: r for r in board["rows"]}
    for label in ("SA", "DINOSAUR-MLP", "DINOSAUR-Trans."):
        measured = rows[label]["measured"]
        for key in ("mbo_i_coco", "mbo_c_coco", "corloc_coco", "mbo_i_voc", "corloc_voc"):
            assert measured[key] is not None and 0 <= measured[key] <= 100, (label, key)
    assert rows["SA"]["measured"]["mbo_i_coco"] == rows["SA"]["measured"]["mbo_i_voc"]
    assert 0 <= rows["StableLSD"]["measured"]["mbo_i_coco"] <= 100
    for label in ("GLASS† (ours)", "GLASS (ours)"):
        assert 0 <= rows[label]["measured"]["mbo_i_voc"] <= 100
    assert board["measured_with"] == GLASS


def test_an_override_no_plugin_has_is_an_error_not_skipped() -> None:
    with pytest.raises(
        ConfigError, match=r"glass-table-3 row 'SA' \[coco\]: unknown key 'decoder.hiddn'"
    ):
        load_grid("glass-table-3", ["decoder.hiddn=3"])


def test_a_failed_teacher_fails_its_student_with_the_reason(tmp_path) -> None:
    grid = spot_grid()
    # The teacher fails once training begins: its train log's path is taken by a directory.
    teacher = grid.cells[0].config.digest()
    (tmp_path / "runs" / teacher / "train_log.jsonl").mkdir(parents=True)
    statuses = run_grid(grid, tmp_path / "r.sqlite", tmp_path / "runs", progress=False)
    assert statuses == {
        "@spot-coco [shapes]": "failed",
        "Spot + DINO ViT [coco as shapes]": "failed",
    }
    student = ResultStore(tmp_path / "r.sqlite").get(grid.cells[1].config.digest())
    assert "the run it needs (@spot-coco [shapes]) is failed" in student.error


def test_an_unresolved_reference_outside_a_grid_is_a_clear_error(tmp_path) -> None:
    from ocl_bench.run.train import train

    over = [*SPOT, "objectives.spot_self_training.teacher=@spot-coco"]
    cfg = load_config("spot-coco-stage2", over)
    with pytest.raises(ConfigError, match="names the run of preset 'spot-coco'"):
        train(cfg, tmp_path / "run", progress=False)
