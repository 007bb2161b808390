"""A protocol travels with a run: config.toml and metrics.json record it, `ocl-bench eval RUN
--protocol NAME` re-scores the checkpoint under another one beside the run's own results,
`ocl-bench results` shows each stored cell's, and a leaderboard never computes a difference
against a published number measured on another dataset or under another protocol."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from ocl_bench.cli import main
from ocl_bench.report.leaderboard import NOT_COMPARABLE, load_leaderboard
from ocl_bench.report.render import render
from ocl_bench.run.boards import read_rows, row_config
from ocl_bench.run.config import load_config, read_toml
from ocl_bench.run.evaluate import evaluate_run
from ocl_bench.run.store import Cell, ResultStore
from ocl_bench.run.train import train
from tests.official_protocol_data import write_coco

PROTOCOL = """
summary = "masks at 48 px, crowd dropped"
follows = "a test"
[coco.dataset]
mask_size = 48
crowd = "drop"
[coco.tasks.object_discovery]
mask_size = 48
"""
TINY_COCO = [
    "dataset.name=coco",
    "dataset.image_size=32",
    "encoder.channels=8",
    "encoder.patch_size=4",
    "encoder.dim=16",
    "grouping.num_slots=3",
    "grouping.slot_dim=16",
    "grouping.mlp_hidden=32",
    "decoder.hidden=16",
    "train.batch_size=2",
    "train.warmup_steps=0",
    "train.steps=2",
    "eval.num_images=4",
    "eval.batch_size=2",
    "eval.figure_images=0",
    'tasks.object_discovery.masks=["decoder"]',
]


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-step run on a small COCO (overlaps, crowd, odd sizes), under no protocol."""
    tmp = tmp_path_factory.mktemp("protocol_run")
    root = write_coco(tmp / "coco")
    shutil.copytree(root / "val2017", root / "train2017")
    ann = root / "annotations"
    shutil.copy(ann / "instances_val2017.json", ann / "instances_train2017.json")
    protocol = tmp / "p48.toml"
    protocol.write_text(PROTOCOL)
    run = tmp / "run"
    cfg = load_config(None, [*TINY_COCO, f'dataset.root="{root}"'])
    cfg.tasks = [t for t in cfg.tasks if t.name == "object_discovery"]
    train(cfg, run, progress=False)
    return run, protocol


def test_eval_rescoring_under_another_protocol_keeps_the_runs_own_results(coco_run) -> None:
    run, protocol = coco_run
    own = evaluate_run(run, progress=False)
    assert own["protocol"] == "" and read_toml(run / "config.toml")["protocol"] == ""
    record = next(r for r in own["records"] if r["metric"] == "fg_ari")
    assert record["resolution"] == [320, 320]  # the coco default

    again = evaluate_run(run, progress=False, protocol=str(protocol))
    out = run / "protocols" / "p48"
    assert again["protocol"] == str(protocol)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["protocol"] == str(protocol)
    record = next(r for r in saved["records"] if r["metric"] == "fg_ari")
    assert record["resolution"] == [48, 48]
    rescored = read_toml(out / "config.toml")
    assert rescored["protocol"] == str(protocol) and rescored["dataset"]["crowd"] == "drop"
    # the run's own evaluation is untouched, and back under no protocol equals it
    assert json.loads((run / "metrics.json").read_text())["protocol"] == ""
    none = evaluate_run(run, progress=False, protocol="")
    assert none["summary"] == own["summary"]
    assert read_toml(run / "protocols" / "none" / "config.toml")["dataset"]["crowd"] == "keep"


def test_the_cli_lists_shows_and_rescores_protocols(coco_run, capsys) -> None:
    run, protocol = coco_run
    assert main(["protocols"]) == 0
    listing = capsys.readouterr().out
    assert "glass" in listing and "spot" in listing
    assert main(["protocols", "glass"]) == 0
    shown = capsys.readouterr().out
    assert 'dataset.resize_library = "cv2"' in shown and "[voc]" in shown
    assert main(["eval", str(run), "-q", "--protocol", str(protocol)]) == 0
    assert f"under protocol {protocol}" in capsys.readouterr().out
    assert main(["eval", str(run), "-q", "--protocol", "nope"]) != 0
    assert "unknown protocol 'nope'; known protocols: " in capsys.readouterr().err


def test_results_show_each_cells_protocol_and_cells_stored_before_them(tmp_path, capsys) -> None:
    db = tmp_path / "r.sqlite"
    store = ResultStore(db)
    configs = {
        "a" * 16: {"seed": 0, "protocol": "glass"},
        "b" * 16: {"seed": 0, "protocol": ""},
        "c" * 16: {"seed": 0},  # stored before protocols existed
    }
    for digest, config in configs.items():
        store.start(Cell(digest, config, {}, "coco", "val", 0, "running"))
    assert main(["results", "--db", str(db)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert " glass " in lines["a" * 16]
    assert " none " in lines["b" * 16]
    assert "before protocols" in lines["c" * 16]


BOARD = """
name = "cmp"
title = "a published COCO number"
[source]
document = "test"
[[columns]]
key = "fg_ari"
task = "object_discovery"
dataset = "coco"
label = "FG-ARI"
[[rows]]
label = "SPOT"
preset = "spot-coco"
published = { fg_ari = 40.0 }
"""


def _board_with_cell(tmp_path: Path, overrides: list[str]) -> tuple[Path, Path]:
    """A board whose row's cell, as built with `overrides`, is stored with FG-ARI 0.5."""
    path = tmp_path / "cmp.toml"
    path.write_text(BOARD)
    db = tmp_path / "r.sqlite"
    row = read_rows(read_toml(path))[0]
    cfg = row_config(row, {}, "coco", overrides)
    store = ResultStore(db)
    store.start(Cell(cfg.digest(), cfg.to_dict(), {}, cfg.dataset.name, "val", 42, "running"))
    record = {"task": "object_discovery", "metric": "fg_ari", "masks": "decoder", "value": 0.5}
    store.complete(cfg.digest(), [record])
    return path, db


@pytest.mark.parametrize(
    ("overrides", "with_text"),
    [
        (["dataset.name=shapes"], "none on shapes"),
        (['protocol=""'], "none"),
        (["protocol=glass"], "glass"),
    ],
)
def test_a_cell_measured_on_another_dataset_or_protocol_is_not_compared(
    tmp_path: Path, overrides: list[str], with_text: str
) -> None:
    path, db = _board_with_cell(tmp_path, overrides)
    board = load_leaderboard(path, db, overrides=overrides)
    row = board.rows[0]
    assert row.measured["fg_ari"] == 0.5 and row.protocol == "spot"
    assert row.comparable == {"coco": False}
    md = render(board, "md")
    assert NOT_COMPARABLE in md and "-39.50" not in md and with_text in md
    assert " ".join(overrides) in md  # Measured with
    data = json.loads(render(board, "json"))
    assert data["rows"][0]["diff"]["fg_ari"] == NOT_COMPARABLE
    assert data["rows"][0]["stats"]["fg_ari"]["pub_in_ci"] is None
    line = next(csv.DictReader(io.StringIO(render(board, "csv"))))
    assert line["FG-ARI [coco] diff"] == NOT_COMPARABLE
    assert line["FG-ARI [coco] measured on"].endswith(f"protocol {with_text.split()[0]}")
    assert line["measured with"] == " ".join(overrides)
    assert with_text in line["evaluation protocol"]
    assert "not comparable" in render(board, "html")


def test_a_cell_measured_as_published_is_compared_and_names_its_protocol(tmp_path: Path) -> None:
    overrides = ["train.steps=10", "train.warmup_steps=1"]  # short, evaluated as SPOT does
    path, db = _board_with_cell(tmp_path, overrides)
    board = load_leaderboard(path, db, overrides=overrides)
    assert board.rows[0].comparable == {"coco": True}
    data = json.loads(render(board, "json"))
    assert data["rows"][0]["diff"]["fg_ari"] == pytest.approx(0.5 - 40.0)
    assert data["rows"][0]["measured_with"] == {"coco": {"dataset": "coco", "protocol": "spot"}}
    md = render(board, "md")
    assert "protocol spot: " in md  # the protocol is described under the table
    line = next(csv.DictReader(io.StringIO(render(board, "csv"))))
    assert line["FG-ARI [coco] measured on"] == "coco, protocol spot"
    assert float(line["FG-ARI [coco] diff"]) == pytest.approx(-39.5)
