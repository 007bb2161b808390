"""Seeds as a grid axis, and leaderboards that aggregate a row's seeds (mean ± 95% CI)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest

from ocl_bench.api.errors import ConfigError
from ocl_bench.cli import main
from ocl_bench.report.leaderboard import Leaderboard, Spread, best_rows, load_leaderboard
from ocl_bench.report.render import render, table
from ocl_bench.report.stats import summarize
from ocl_bench.run.boards import Column, Row, read_rows, row_config
from ocl_bench.run.config import read_toml
from ocl_bench.run.grid import load_grid, run_grid
from ocl_bench.run.store import Cell, ResultStore
from tests.conftest import TINY as ALL_TINY
from tests.test_leaderboard_runs import SPOT

TINY = [o for o in ALL_TINY if not o.startswith("tasks.")]

GRID = """
name = "seeded"
columns = ["fg_ari"]
{seeds}
[base]
tasks = {{ object_discovery = {{}} }}
[base.train]
steps = 1
[axes]
"grouping.num_slots" = [3, 4]
"""

BOARD = """
name = "published"
title = "published rows"
{seeds}
[source]
document = "test"
[[columns]]
key = "fg_ari"
task = "object_discovery"
dataset = "shapes"
label = "FG-ARI"
scale = 100
[[rows]]
label = "three seeds"
overrides = {{ "grouping.num_slots" = 4 }}
published = {{ fg_ari = 60.0 }}
[[rows]]
label = "three seeds, published outside"
overrides = {{ "grouping.num_slots" = 5 }}
published = {{ fg_ari = 90.0 }}
[[rows]]
label = "one seed"
overrides = {{ "grouping.num_slots" = 6 }}
published = {{ fg_ari = 40.0 }}
"""


def _grid_file(tmp_path: Path, seeds: str = "") -> Path:
    path = tmp_path / "seeded.toml"
    path.write_text(GRID.format(seeds=seeds))
    return path


def _store(
    db: Path, config: dict, seed: int, ari: float, per_image: list[float] | None = None
) -> None:
    """A complete cell of `config` under `seed` whose decoder FG-ARI is `ari` (and, when
    given, its per-image values)."""
    from ocl_bench.run.config import resolve

    cfg = dataclasses.replace(resolve(config), seed=seed)
    store = ResultStore(db)
    store.start(Cell(cfg.digest(), cfg.to_dict(), {}, "shapes", "val", seed, "running"))
    record = {"task": "object_discovery", "metric": "fg_ari", "masks": "decoder", "value": ari}
    if per_image is not None:
        record["per_image"] = per_image
    store.complete(cfg.digest(), [record])


def test_seeds_expand_each_cell_once_per_seed(tmp_path: Path) -> None:
    path = _grid_file(tmp_path)
    one = load_grid(path, TINY)
    three = load_grid(path, TINY, seeds=3)
    assert len(three.cells) == 3 * len(one.cells) == 6
    # one seed: labels and configs as before seeds existed (so stored cells still count)
    assert [c.label for c in one.cells] == ["grouping.num_slots=3", "grouping.num_slots=4"]
    assert [c.config.digest() for c in one.cells] == [
        c.config.digest() for c in three.cells if c.config.seed == 0
    ]
    assert [(c.row, c.config.seed) for c in three.cells[:3]] == [
        ("grouping.num_slots=3", 0),
        ("grouping.num_slots=3", 1),
        ("grouping.num_slots=3", 2),
    ]
    assert three.cells[1].label == "grouping.num_slots=3, seed=1"
    assert len({c.config.digest() for c in three.cells}) == 6
    assert len({c.label for c in three.cells}) == 6  # grid statuses are keyed by label
    # N seeds start at the base's own seed
    assert {c.config.seed for c in load_grid(path, [*TINY, "seed=7"], seeds=2).cells} == {7, 8}


def test_seeds_from_the_file_as_a_count_a_list_or_a_seed_axis(tmp_path: Path) -> None:
    assert {c.config.seed for c in load_grid(_grid_file(tmp_path, "seeds = 2")).cells} == {0, 1}
    listed = load_grid(_grid_file(tmp_path, "seeds = [5, 9]"))
    assert [c.config.seed for c in listed.cells] == [5, 9, 5, 9]
    # the command line's --seeds replaces the file's
    assert len(load_grid(_grid_file(tmp_path, "seeds = [5, 9]"), seeds=1).cells) == 2
    axis = tmp_path / "axis.toml"
    axis.write_text('[axes]\n"grouping.num_slots" = [3]\nseed = [0, 1]\n')
    assert [c.label for c in load_grid(axis).cells] == [
        "grouping.num_slots=3, seed=0",
        "grouping.num_slots=3, seed=1",
    ]
    axis.write_text("seeds = 2\n[axes]\nseed = [0, 1]\n")
    with pytest.raises(ConfigError, match="seeds once"):
        load_grid(axis)


@pytest.mark.parametrize("bad", ["0", "[]", "[1, 1]", '"3"', "true", "[1.5]"])
def test_bad_seeds_fail_in_one_line_naming_the_file(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="seeded.toml.*seeds"):
        load_grid(_grid_file(tmp_path, f"seeds = {bad}"))


def test_published_board_seeds_every_row_and_what_it_needs(tmp_path: Path) -> None:
    grid = load_grid("thesis-table-5-1", SPOT, seeds=2)
    # the SPOT row and its teacher (the other rows have tests of their own)
    by_label = {c.label: c for c in grid.cells if "spot" in c.label.lower()}
    assert set(by_label) == {
        "@spot-coco [shapes] seed=0",
        "@spot-coco [shapes] seed=1",
        "Spot + DINO ViT [coco as shapes] seed=0",
        "Spot + DINO ViT [coco as shapes] seed=1",
    }
    for seed in (0, 1):
        student = by_label[f"Spot + DINO ViT [coco as shapes] seed={seed}"]
        assert student.row == "Spot + DINO ViT [coco as shapes]"
        (teacher,) = student.needs.values()
        assert student.config.seed == teacher.config.seed == seed
    # one seed: the cells of before
    single = [c.label for c in load_grid("thesis-table-5-1", SPOT).cells if "pot" in c.label]
    assert single == ["@spot-coco [shapes]", "Spot + DINO ViT [coco as shapes]"]


def test_rerun_with_more_seeds_trains_only_the_new_seed(tmp_path: Path) -> None:
    path = _grid_file(tmp_path)
    db, runs = tmp_path / "r.sqlite", tmp_path / "runs"
    first = run_grid(load_grid(path, TINY, seeds=2), db, runs, progress=False)
    assert list(first.values()) == ["complete"] * 4
    again = run_grid(load_grid(path, TINY, seeds=3), db, runs, progress=False)
    assert sorted(again.values()) == ["complete"] * 2 + ["complete (stored)"] * 4
    assert {label for label, s in again.items() if s == "complete"} == {
        "grouping.num_slots=3, seed=2",
        "grouping.num_slots=4, seed=2",
    }
    stored = ResultStore(db).cells()
    assert len(stored) == 6
    assert sorted(c.seed for c in stored) == [0, 0, 1, 1, 2, 2]
    assert all(c.config["seed"] == c.seed for c in stored)

    board = load_leaderboard(path, db, overrides=TINY)
    assert [r.label for r in board.rows] == ["grouping.num_slots=3", "grouping.num_slots=4"]
    for row in board.rows:
        values = [
            100 * c.value("object_discovery", "fg_ari", "decoder")
            for c in stored
            if c.config["grouping"]["num_slots"] == int(row.label[-1])
        ]
        expected = summarize(values)
        spread = row.spreads["fg_ari"]
        assert spread.n == 3 and sorted(spread.seeds) == [0, 1, 2]
        assert row.measured["fg_ari"] == pytest.approx(expected.mean)
        assert (spread.ci_low, spread.ci_high) == pytest.approx((expected.ci_low, expected.ci_high))
    _, body = table(board)
    assert [line[1] for line in body] == ["3", "3"]


def test_cli_grid_seeds_option_runs_each_cell_per_seed(tmp_path: Path, capsys) -> None:
    path = tmp_path / "one.toml"
    path.write_text(GRID.format(seeds="").replace("[3, 4]", "[3]"))
    db = tmp_path / "r.sqlite"
    args = ["grid", str(path), *TINY, "--db", str(db), "--runs", str(tmp_path / "runs")]
    assert main([*args, "--seeds", "2", "-q", "--leaderboard"]) == 0
    out = capsys.readouterr()
    assert "2 cells" in out.err
    assert sorted(c.seed for c in ResultStore(db).cells()) == [0, 1]
    line = next(x for x in out.out.splitlines() if x.startswith("| grouping.num_slots=3"))
    cells = [x.strip() for x in line.strip("|").split("|")]
    assert cells[1] == "2" and "±" in cells[2]
    with pytest.raises(SystemExit):
        main([*args, "--seeds", "0"])


def _published(tmp_path: Path, values: dict[str, list[float]], seeds: str = "") -> tuple:
    """The board file and a store holding each row's FG-ARI under seeds 0, 1, ..."""
    path = tmp_path / "published.toml"
    path.write_text(BOARD.format(seeds=seeds))
    db = tmp_path / "r.sqlite"
    for row in read_rows(read_toml(path)):
        raw = row_config(row, {}, "shapes").raw
        for seed, value in enumerate(values.get(row.label, [])):
            _store(db, raw, seed, value)
    return path, db


VALUES = {
    "three seeds": [0.55, 0.60, 0.68],
    "three seeds, published outside": [0.55, 0.60, 0.68],
    "one seed": [0.42],
}


def test_published_board_shows_mean_and_interval_and_whether_published_is_inside(
    tmp_path: Path,
) -> None:
    path, db = _published(tmp_path, VALUES)
    board = load_leaderboard(path, db)
    rows = {r.label: r for r in board.rows}
    expected = summarize([55.0, 60.0, 68.0])
    spread = rows["three seeds"].spreads["fg_ari"]
    assert spread.mean == pytest.approx(expected.mean)
    assert spread.std == pytest.approx(expected.std)
    assert (spread.ci_low, spread.ci_high) == pytest.approx((expected.ci_low, expected.ci_high))
    assert spread.contains(60.0) and not spread.contains(90.0)
    one = rows["one seed"].spreads["fg_ari"]
    assert (one.n, one.mean, one.ci_low) == (1, pytest.approx(42.0), None)

    headers, body = table(board)
    assert headers[:2] == ["system", "n"]
    lines = {line[0]: line for line in body}
    width = (expected.ci_high - expected.ci_low) / 2
    assert lines["three seeds"][1:4] == [
        "3",
        "60.00",
        f"{expected.mean:.2f} ± {width:.2f}",
    ]
    assert lines["three seeds"][4].endswith("(in CI)")
    assert lines["three seeds, published outside"][4].endswith("(outside CI)")
    # one seed: the value as before, n=1, and no claim about an interval
    assert lines["one seed"][1:] == ["1", "40.00", "42.00", "2.00"]
    md = render(board, "md")
    assert f"{expected.mean:.2f} ± {width:.2f}" in md and "95%" in md

    data = json.loads(render(board, "json"))
    stats = {r["label"]: r["stats"]["fg_ari"] for r in data["rows"]}
    assert stats["three seeds"]["n"] == 3 and stats["three seeds"]["pub_in_ci"] is True
    assert stats["three seeds, published outside"]["pub_in_ci"] is False
    assert stats["three seeds"]["ci_low"] == pytest.approx(expected.ci_low)
    assert stats["one seed"]["n"] == 1 and stats["one seed"]["pub_in_ci"] is None
    assert data["rows"][0]["measured"]["fg_ari"] == pytest.approx(expected.mean)

    parsed = list(csv.DictReader(io.StringIO(render(board, "csv"))))
    by_label = {r["system"]: r for r in parsed}
    three = by_label["three seeds"]
    assert float(three["FG-ARI [shapes] mean"]) == pytest.approx(expected.mean)
    assert float(three["FG-ARI [shapes] std"]) == pytest.approx(expected.std)
    assert float(three["FG-ARI [shapes] ci_high"]) == pytest.approx(expected.ci_high)
    assert three["FG-ARI [shapes] n"] == "3" and three["FG-ARI [shapes] pub_in_ci"] == "true"
    assert by_label["three seeds, published outside"]["FG-ARI [shapes] pub_in_ci"] == "false"
    assert by_label["one seed"]["FG-ARI [shapes] ci_low"] == ""
    assert by_label["one seed"]["status"] == ""

    html = render(board, "html")
    assert f"{expected.mean:.2f} ± {width:.2f}" in html


def test_identical_seeds_have_a_zero_width_interval(tmp_path: Path) -> None:
    path, db = _published(tmp_path, {"three seeds": [0.6, 0.6, 0.6]})
    row = load_leaderboard(path, db).rows[0]
    spread = row.spreads["fg_ari"]
    assert (spread.n, spread.std, spread.half_width) == (3, 0.0, 0.0)
    assert spread.contains(60.0)
    assert table(load_leaderboard(path, db))[1][0][3] == "60.00 ± 0.00"


def test_a_board_file_may_name_its_seeds(tmp_path: Path) -> None:
    path, _ = _published(tmp_path, {}, seeds="seeds = [3, 4]")
    grid = load_grid(path)
    assert [c.config.seed for c in grid.cells] == [3, 4, 3, 4, 3, 4]
    assert grid.cells[0].label == "three seeds [shapes] seed=3"
    path.write_text(BOARD.format(seeds='seeds = "x"'))
    with pytest.raises(ConfigError, match="seeds"):
        load_grid(path)


# ------------------------------------------------------------------------------------------
# The best row of a column is marked only where its lead is resolved


def _marks(tmp_path: Path, values: dict[str, list[float]]) -> tuple[dict[str, int], object]:
    path, db = _published(tmp_path, values)
    board = load_leaderboard(path, db)
    return best_rows(board), board


def test_identical_rows_are_never_marked(tmp_path: Path) -> None:
    same = [0.55, 0.60, 0.68]
    marks, board = _marks(tmp_path, {"three seeds": same, "three seeds, published outside": same})
    assert marks == {}
    assert "**" not in render(board, "md")
    data = json.loads(render(board, "json"))
    assert not any(r["stats"].get("fg_ari", {}).get("best") for r in data["rows"])


def test_a_clearly_better_row_is_marked_in_every_format(tmp_path: Path) -> None:
    values = {"three seeds": [0.80, 0.81, 0.82], "three seeds, published outside": [0.55, 0.6]}
    # Two runner-up seeds: Student's t with one degree of freedom (12.7) makes its interval
    # reach past 0.81, so the lead is not resolved; a third seed narrows it enough.
    (tmp_path / "two").mkdir()
    assert _marks(tmp_path / "two", values)[0] == {}
    values["three seeds, published outside"].append(0.58)
    marks, board = _marks(tmp_path, values)
    assert marks == {"fg_ari": 0}
    best = table(board)[1][0][3]
    md = render(board, "md")
    assert f"**{best}**" in md and md.count("**") == 2 and "runner-up" in md
    data = json.loads(render(board, "json"))
    assert [r["stats"]["fg_ari"]["best"] for r in data["rows"][:2]] == [True, False]
    parsed = {r["system"]: r for r in csv.DictReader(io.StringIO(render(board, "csv")))}
    assert parsed["three seeds"]["FG-ARI [shapes] best"] == "true"
    assert parsed["three seeds, published outside"]["FG-ARI [shapes] best"] == "false"
    assert parsed["one seed"]["FG-ARI [shapes] best"] == ""  # not measured: no claim
    assert f"<strong>{best}</strong>" in render(board, "html")


def test_a_lead_inside_the_runner_ups_interval_is_not_marked(tmp_path: Path) -> None:
    runner_up = [0.55, 0.60, 0.68]
    interval = summarize([55.0, 60.0, 68.0])
    lead = [0.61, 0.62, 0.63]  # mean 62: ahead of 61, inside the runner-up's interval
    assert interval.mean < summarize([61.0, 62.0, 63.0]).mean < interval.ci_high
    marks, _ = _marks(tmp_path, {"three seeds": lead, "three seeds, published outside": runner_up})
    assert marks == {}


def test_one_seed_rows_keep_a_within_seed_interval_but_are_never_marked(tmp_path: Path) -> None:
    path = tmp_path / "published.toml"
    path.write_text(BOARD.format(seeds=""))
    rows = read_rows(read_toml(path))
    rng = np.random.default_rng(0)
    images = {  # per-image FG-ARI: 64 images each, means ~0.8 and ~0.5, spread ~0.05
        rows[0].label: 0.8 + 0.05 * rng.standard_normal(64),
        rows[1].label: 0.5 + 0.05 * rng.standard_normal(64),
    }
    with_images, without = tmp_path / "with.sqlite", tmp_path / "without.sqlite"
    for row in rows[:2]:
        raw = row_config(row, {}, "shapes").raw
        values = images[row.label]
        _store(with_images, raw, 0, float(values.mean()), list(values))
        _store(without, raw, 0, float(values.mean()))
    board = load_leaderboard(path, with_images)
    spread = board.rows[0].spreads["fg_ari"]
    assert spread.n == 1 and spread.images is not None and spread.images.n == 64
    assert spread.images.mean == pytest.approx(100 * images[rows[0].label].mean())
    # 30 points apart and far outside each other's per-image intervals, but those are
    # within-seed (one trained model each): one seed never earns a best mark
    assert best_rows(board) == {}
    stats = json.loads(render(board, "json"))["rows"][0]["stats"]["fg_ari"]
    assert stats["ci_low"] is None and stats["within_seed"]["images"] == 64
    assert stats["within_seed"]["ci_low"] == pytest.approx(spread.images.ci_low)
    assert best_rows(load_leaderboard(path, without)) == {}


def _board_of(spreads: list[Spread], higher_is_better: bool) -> Leaderboard:
    column = Column("fid", "fid", "conditional_generation", None, "fid", None, 1.0)
    column.higher_is_better = higher_is_better
    rows = [Row(f"row {i}", {}, {}, spreads={"fid": s}) for i, s in enumerate(spreads)]
    return Leaderboard("b", "", {}, [column], rows)


def test_the_column_direction_decides_which_row_is_best() -> None:
    low = Spread(10.0, 3, [0, 1, 2], 0.5, 9.5, 10.5, "bootstrap")
    high = Spread(20.0, 3, [0, 1, 2], 0.5, 19.5, 20.5, "bootstrap")
    assert best_rows(_board_of([low, high], higher_is_better=False)) == {"fid": 0}
    assert best_rows(_board_of([low, high], higher_is_better=True)) == {"fid": 1}
    # a row without any interval (one seed, nothing per image) leaves the column unjudged
    single = Spread(30.0, 1, [0])
    assert best_rows(_board_of([low, high, single], higher_is_better=True)) == {}
