"""GLASS Fig. 4a from a real tiny grid: two of its rows over two slot counts, run with
`ocl-bench grid` on shapes with tiny random stand-ins, then drawn by `ocl-bench figure`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ocl_bench.cli import main
from ocl_bench.run.boards import load_grid
from ocl_bench.run.store import ResultStore
from tests.test_leaderboard_runs import GLASS

BOARDS = Path(__file__).resolve().parents[1] / "leaderboards"
ROWS = ("StableLSD", "StableLSD-Dynamic")
PP = "property_prediction"


def _two_rows_of_fig_4a(tmp_path: Path) -> Path:
    """glass-fig-4a-slots's own text with only ROWS, the COCO columns and 2 or 3 slots."""
    text = (BOARDS / "glass-fig-4a-slots.toml").read_text(encoding="utf-8")
    head, *blocks = text.split("\n[[")
    head = head.replace("[4, 6, 7, 10]", "[2, 3]")
    head = head.split("\nlabels = ")[0] + "\n" + head.split("\nlabels = ")[1].split("\n", 1)[1]
    kept = [
        b
        for b in blocks
        if (b.startswith("columns]]") and 'dataset = "coco"' in b)
        or (b.startswith("rows]]") and any(f'label = "{r}"\n' in b for r in ROWS))
    ]
    path = tmp_path / "fig4a-two-rows.toml"
    path.write_text(head + "".join(f"\n[[{b}" for b in kept), encoding="utf-8")
    return path


def test_two_rows_of_fig_4a_run_and_the_figure_draws_what_they_measured(
    tmp_path: Path, capsys
) -> None:
    path = _two_rows_of_fig_4a(tmp_path)
    grid = load_grid(path, GLASS)
    labels = [c.label for c in grid.cells]
    assert labels == [
        "StableLSD, grouping.num_slots=2 [coco as shapes]",
        "StableLSD, grouping.num_slots=3 [coco as shapes]",
        "StableLSD-Dynamic, grouping.num_slots=2 [coco as shapes]",
        "StableLSD-Dynamic, grouping.num_slots=3 [coco as shapes]",
    ]
    db, runs = tmp_path / "r.sqlite", tmp_path / "runs"
    argv = ["grid", str(path), *GLASS, "--db", str(db), "--runs", str(runs), "-q"]
    assert main(argv) == 0
    capsys.readouterr()
    png = tmp_path / "fig4a.png"
    argv = ["figure", str(path), *GLASS, "--db", str(db), "--out", str(png), "--json"]
    assert main(argv) == 0
    drawn = json.loads(capsys.readouterr().out)
    assert drawn["kind"] == "lines" and png.read_bytes()[:4] == b"\x89PNG"
    store = ResultStore(db)
    for cell in grid.cells:
        stored = store.get(cell.config.digest())
        assert stored.status == "complete"
        system, slots = cell.row.split(", grouping.num_slots=")
        slots = int(slots.split(" ")[0])
        assert stored.config["grouping"]["num_slots"] == slots
        assert stored.config["grouping"]["dynamic_slots"] == (system == "StableLSD-Dynamic")
        for metric, label in (("mbo_i", "mBO_i"), ("corloc", "CorLoc")):
            (point,) = [
                p
                for p in drawn["points"]
                if p["series"] == system and p["x"] == slots and p["panel"] == f"{label} [coco]"
            ]
            value = stored.value("object_discovery", metric)
            assert point["y"] == pytest.approx(100 * value)
    # every metric of every cell is drawn: nothing is missing
    assert drawn["missing"] == [] and len(drawn["points"]) == 4 * 5


# The A.2 probe shrunk to seconds; after 2 training steps no slot overlaps an object by
# IoU > 0.5, so the scatter matches at IoU > 0.01 (the threshold curve keeps 0.5-0.9).
PROBE = [
    f"tasks.property_prediction.{k}"
    for k in ("iou_threshold=0.01", "train_images=4", "val_images=4", "steps=2", "hidden=8")
]


def test_fig_4b_stablelsd_row_runs_its_probe_and_the_scatter_draws_it(
    tmp_path: Path, capsys
) -> None:
    text = (BOARDS / "glass-fig-4b.toml").read_text(encoding="utf-8")
    head, *blocks = text.split("\n[[")
    kept = [b for b in blocks if b.startswith("columns]]") or 'label = "StableLSD"\n' in b]
    path = tmp_path / "fig4b-one-row.toml"
    path.write_text(head + "".join(f"\n[[{b}" for b in kept), encoding="utf-8")
    over = [*GLASS, *PROBE]
    db, runs = tmp_path / "r.sqlite", tmp_path / "runs"
    assert main(["grid", str(path), *over, "--db", str(db), "--runs", str(runs), "-q"]) == 0
    capsys.readouterr()
    png = tmp_path / "fig4b.png"
    assert main(["figure", str(path), *over, "--db", str(db), "--out", str(png), "--json"]) == 0
    drawn = json.loads(capsys.readouterr().out)
    store = ResultStore(db)
    grid = load_grid(path, over)
    assert [c.label for c in grid.cells] == [
        "StableLSD [coco as shapes]",
        "StableLSD [voc as shapes]",
    ]
    for cell, ds, marker in zip(grid.cells, ("coco", "voc"), ("s", "D")):
        stored = store.get(cell.config.digest())
        probe = stored.config["tasks"]["property_prediction"]
        assert probe["match_on"] == ("instances" if ds == "coco" else "classes")
        (point,) = [p for p in drawn["points"] if p["panel"] == "scatter" and p["dataset"] == ds]
        assert point["marker"] == marker
        assert point["x"] == pytest.approx(100 * stored.value(PP, "detection_rate"))
        assert point["y"] == pytest.approx(100 * stored.value(PP, "category_acc"))
        for t in (50, 60, 70, 80, 90):  # measured: drawn as stored; not measured: listed
            value = stored.value(PP, f"category_acc_iou{t}")
            curve = [p for p in drawn["points"] if p["series"] == f"StableLSD [{ds}]"]
            at = [p["y"] for p in curve if p["x"] == pytest.approx(t / 100)]
            if value is None or math.isnan(value):
                assert at == [] and any(m.startswith(f"StableLSD [{ds}]") for m in drawn["missing"])
            else:
                assert at == [pytest.approx(100 * value)]
