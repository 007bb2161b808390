"""Figures drawn from measured grids (GLASS Fig. 4a and 4b): boards whose rows expand
over `axes`, and a `[figure]` drawn from the stored values the board's table shows."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from scipy import stats

from ocl_bench.api.errors import ConfigError
from ocl_bench.cli import main
from ocl_bench.report.board_figures import plotted, write_board_figure
from ocl_bench.report.leaderboard import load_leaderboard
from ocl_bench.report.render import render
from ocl_bench.run.boards import board_rows, check_spec, load_grid, read_rows, row_config
from ocl_bench.run.config import read_toml
from ocl_bench.run.store import Cell, ResultStore

PP = "property_prediction"
BOARDS = Path(__file__).resolve().parents[1] / "leaderboards"


def _columns(datasets: tuple[str, ...], metrics: list[tuple[str, str]], task: str) -> str:
    return "".join(
        f'[[columns]]\nkey = "{m}_{ds}"\nmetric = "{m}"\ntask = "{task}"\ndataset = "{ds}"\n'
        f'label = "{label}"\nscale = 100\n'
        for ds in datasets
        for m, label in metrics
    )


# Rows on the embedded default config: resolving them is quick and needs no data.
ROWS = """
[[rows]]
label = "four"
overrides = { "grouping.num_slots" = 4 }
published = {}

[[rows]]
label = "five"
overrides = { "grouping.num_slots" = 5 }
published = {}

[[rows]]
label = "unmeasured"
overrides = { "grouping.num_slots" = 6 }
published = {}
"""

SCATTER = (
    'name = "probe"\ntitle = "probe"\nsource = { document = "test", figure = "Fig. 4b" }\n'
    'dataset = "mixed"\n\n[figure]\nkind = "scatter"\nx = "detection_rate"\n'
    'y = "category_acc"\nmarkers = { coco = "s", voc = "D" }\n'
    'threshold_curve = "category_acc"\n\n'
    + _columns(
        ("coco", "voc"),
        [
            ("category_acc", "Top-1"),
            ("detection_rate", "DetRate"),
            ("category_acc_iou50", "acc@0.5"),
            ("category_acc_iou70", "acc@0.7"),
            ("category_acc_iou90", "acc@0.9"),
        ],
        PP,
    )
    + ROWS
)

OD = [("mbo_i", "mBO_i"), ("corloc", "CorLoc")]
BARS = (
    'name = "wsl"\ntitle = "wsl"\nsource = { document = "test", figure = "Fig. 4a" }\n'
    'dataset = "mixed"\n\n[figure]\nkind = "bars"\n\n'
    + _columns(("coco", "voc"), OD, "object_discovery")
    + ROWS
)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def _fill(db: Path, path: Path, values: dict[tuple[str, str, int], dict[str, float]]) -> None:
    """Store, through the store's own API, (row label, dataset, seed) -> {metric: value}
    for the board's rows, each under the config hash the leaderboard recomputes."""
    store = ResultStore(db)
    rows = {r.label: r for r in board_rows(read_toml(path), path)}
    task = {c["key"].rsplit("_", 1)[0]: c["task"] for c in read_toml(path)["columns"]}
    for (label, ds, seed), metrics in values.items():
        cfg = dataclasses.replace(row_config(rows[label], {}, ds), seed=seed)
        digest = cfg.digest()
        store.start(Cell(digest, {}, {}, ds, "val", seed, "running"))
        store.complete(
            digest,
            [
                {"task": task[m], "metric": m, "masks": "attn", "value": v}
                for m, v in metrics.items()
            ],
        )


def test_axes_expand_each_row_after_its_dataset_overrides_and_name_the_value() -> None:
    grid = load_grid("glass-fig-4a-slots")
    rows = ["StableLSD", "StableLSD-BBox", "StableLSD-Dynamic", "GLASS† (ours)", "GLASS (ours)"]
    assert len(grid.cells) == len(rows) * 4 * 2  # x 4, 6, 7, 10 slots x COCO, VOC
    by_label = {c.label: c.config for c in grid.cells}
    dynamic = by_label["StableLSD-Dynamic, 4 slots [coco]"]
    assert dynamic.grouping.params.num_slots == 4 and dynamic.grouping.params.dynamic_slots
    assert by_label["StableLSD-BBox, 10 slots [voc]"].grouping.params.init == "boxes"
    # the axis beats GLASS's VOC 6 slots; the rest of its VOC settings stay
    glass = by_label["GLASS† (ours), 10 slots [voc as generated]"]
    assert glass.grouping.params.num_slots == 10 and glass.train.steps == 250000
    assert glass.dataset.params.captions == "class_names"
    assert by_label["GLASS (ours), 4 slots [coco as generated]"].dataset.params.captions == "blip2"
    # At GLASS's own slot counts a row is the very run of Table 6 (one stored cell serves
    # both); Table 6's cells keep their labels.
    table6 = {c.label: c.config.digest() for c in load_grid("glass-table-6").cells}
    assert "StableLSD-Bbox Init [coco]" in table6 and "GLASS† (ours) [voc as generated]" in table6
    assert (
        by_label["StableLSD-BBox, 7 slots [coco]"].digest() == table6["StableLSD-Bbox Init [coco]"]
    )
    assert (
        by_label["GLASS† (ours), 6 slots [voc as generated]"].digest()
        == table6["GLASS† (ours) [voc as generated]"]
    )
    assert by_label["StableLSD, 7 slots [coco]"].digest() == table6["StableLSD [coco]"]
    # glass-fig-4a, the figure as printed, is the sweep at GLASS's own slot counts (7 on
    # COCO, 6 on VOC): its every cell is one of the sweep's stored runs
    printed = {c.label: c.config.digest() for c in load_grid("glass-fig-4a").cells}
    assert len(printed) == len(rows) * 2
    for label, digest in printed.items():
        row, where = label.split(" [")
        slots = 6 if where.startswith("voc") and row.startswith("GLASS") else 7
        assert by_label[f"{row}, {slots} slots [{where}"].digest() == digest, label


def test_a_board_without_axes_keeps_its_rows(tmp_path: Path) -> None:
    spec = read_toml(BOARDS / "glass-table-6.toml")
    path = Path("glass-table-6.toml")
    assert [r.__dict__ for r in board_rows(spec, path)] == [r.__dict__ for r in read_rows(spec)]
    assert all(r.system == r.label and r.axis == {} for r in board_rows(spec, path))


def test_the_fig_4b_board_writes_the_agreed_probe_settings() -> None:
    spec = read_toml(BOARDS / "glass-fig-4b.toml")
    base = {k.removeprefix(f"tasks.{PP}."): v for k, v in spec["base"].items()}
    assert base == {
        "properties": ["category"],
        "masks": "attn",
        "steps": 6000,
        "val_images": 1000,
        "iou_thresholds": [0.5, 0.6, 0.7, 0.8, 0.9],
    }
    assert [r["label"] for r in spec["rows"]] == ["StableLSD", "GLASS† (ours)", "GLASS (ours)"]
    for row in spec["rows"]:
        coco, voc = row["dataset_overrides"]["coco"], row["dataset_overrides"]["voc"]
        assert (coco[f"tasks.{PP}.train_images"], coco["eval.num_images"]) == (10000, 5000)
        assert (voc[f"tasks.{PP}.train_images"], voc["eval.num_images"]) == (4000, 1000)
        assert (coco[f"tasks.{PP}.match_on"], voc[f"tasks.{PP}.match_on"]) == (
            "instances",
            "classes",
        )
    # the property_prediction task takes them: every cell resolves with the probe's settings
    for cell in load_grid("glass-fig-4b").cells:
        probe = next(t.params for t in cell.config.tasks if t.name == PP)
        voc = "[voc" in cell.label
        assert probe.match_on == ("classes" if voc else "instances")
        assert probe.iou_thresholds == [0.5, 0.6, 0.7, 0.8, 0.9] and probe.val_images == 1000
        assert cell.config.eval.num_images == (1000 if voc else 5000)
    metrics = {c.get("metric", c["key"]) for c in spec["columns"]}
    assert {"category_acc", "detection_rate"} | {
        f"category_acc_iou{t}" for t in (50, 60, 70, 80, 90)
    } == metrics


def test_scatter_plots_the_stored_values_markers_by_dataset_and_seed_error_bars(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, "probe", SCATTER)
    db = tmp_path / "r.sqlite"
    four = {"category_acc": 0.61, "detection_rate": 0.30, "category_acc_iou50": 0.61}
    four |= {"category_acc_iou70": 0.52, "category_acc_iou90": 0.40}
    _fill(
        db,
        path,
        {
            ("four", "coco", 0): four,
            ("four", "voc", 0): {"category_acc": 0.70, "detection_rate": 0.55},
            ("five", "coco", 0): {"category_acc": 0.58, "detection_rate": 0.40},
            ("five", "coco", 1): {"category_acc": 0.62, "detection_rate": 0.44},
        },
    )
    board = load_leaderboard(path, db)
    drawn = plotted(board)
    scatter = {(p.series, p.dataset): p for p in drawn.points if p.panel == "scatter"}
    assert set(scatter) == {("four", "coco"), ("four", "voc"), ("five", "coco")}
    p = scatter[("four", "voc")]
    assert (p.x, p.y, p.marker, p.xerr, p.yerr) == pytest.approx((55.0, 70.0, "D", None, None))
    assert scatter[("four", "coco")].marker == "s"
    # two seeds: the mean, and the half-width of the t interval of the mean as error bars
    five = scatter[("five", "coco")]
    t = stats.t.ppf(0.975, 1)
    assert (five.x, five.y) == pytest.approx((42.0, 60.0))
    assert five.xerr == pytest.approx(t * stats.tstd([40.0, 44.0]) / 2**0.5)
    assert five.yerr == pytest.approx(t * stats.tstd([58.0, 62.0]) / 2**0.5)
    curve = sorted((p.x, p.y) for p in drawn.points if p.series == "four [coco]")
    assert [v for point in curve for v in point] == pytest.approx([0.5, 61, 0.7, 52, 0.9, 40])
    assert all(p.panel == "threshold" for p in drawn.points if p.series == "four [coco]")
    # absent values are listed, never drawn (no zero stands in for them)
    assert all(p.y != 0 for p in drawn.points)
    assert any(
        m.startswith("unmeasured [coco] DetRate, Top-1: not measured") for m in drawn.missing
    )
    assert any(m.startswith("four [voc] acc@0.5, acc@0.7, acc@0.9") for m in drawn.missing)
    assert not any(m.startswith("five [coco] Top-1") for m in drawn.missing)


def test_bars_draw_each_metric_per_dataset_and_write_the_png_atomically(tmp_path: Path) -> None:
    path = _write(tmp_path, "wsl", BARS)
    db = tmp_path / "r.sqlite"
    _fill(
        db,
        path,
        {
            ("four", "coco", 0): {"mbo_i": 0.25, "corloc": 0.5},
            ("five", "coco", 0): {"mbo_i": 0.31},
            ("five", "voc", 0): {"mbo_i": 0.44, "corloc": 0.81},
            ("four", "voc", 0): {"mbo_i": float("nan")},  # stored, but undefined
        },
    )
    board = load_leaderboard(path, db)
    out = tmp_path / "figs" / "wsl.png"
    drawn = write_board_figure(board, out)
    assert drawn.kind == "bars" and drawn.path == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and list(out.parent.iterdir()) == [out]
    got = {(p.panel, p.series, p.x): p.y for p in drawn.points}
    assert got == pytest.approx(
        {
            ("coco", "four", "mBO_i"): 25.0,
            ("coco", "four", "CorLoc"): 50.0,
            ("coco", "five", "mBO_i"): 31.0,
            ("voc", "five", "mBO_i"): 44.0,
            ("voc", "five", "CorLoc"): 81.0,
        }
    )
    # each value is the one the table shows for that row and column
    for row in board.rows:
        for p in (p for p in drawn.points if p.series == row.label):
            assert p.y == row.measured[f"{_key(p.x)}_{p.panel}"]
    assert "five [coco] CorLoc: not measured" in drawn.missing
    assert "four [voc] mBO_i: measured, but undefined (NaN); CorLoc: not measured" in drawn.missing
    assert any(m.startswith("unmeasured [coco]") for m in drawn.missing)


def _key(label: str) -> str:
    return {label: metric for metric, label in OD}[label]


def test_axes_turn_bars_into_a_line_per_row_over_the_axis(tmp_path: Path) -> None:
    text = BARS.replace(
        'dataset = "mixed"\n', 'dataset = "mixed"\naxes = { "grouping.iterations" = [1, 2] }\n'
    )
    path = _write(tmp_path, "wsl", text)
    rows = [r.label for r in board_rows(read_toml(path), path)]
    assert rows[:2] == ["four, grouping.iterations=1", "four, grouping.iterations=2"]
    db = tmp_path / "r.sqlite"
    _fill(
        db,
        path,
        {
            ("four, grouping.iterations=1", "coco", 0): {"mbo_i": 0.20},
            ("four, grouping.iterations=2", "coco", 0): {"mbo_i": 0.30},
            ("five, grouping.iterations=2", "coco", 0): {"mbo_i": 0.35},
        },
    )
    drawn = write_board_figure(load_leaderboard(path, db), tmp_path / "lines.png")
    assert drawn.kind == "lines"
    line = {(p.series, p.x): p.y for p in drawn.points if p.panel == "mBO_i [coco]"}
    assert line == pytest.approx({("four", 1): 20.0, ("four", 2): 30.0, ("five", 2): 35.0})
    unmeasured = "five, grouping.iterations=1 [coco] mBO_i, CorLoc: not measured yet (run its grid)"
    assert unmeasured in drawn.missing


@pytest.mark.parametrize(
    ("figure", "error"),
    [
        ('kind = "pie"', "figure.kind is 'pie', expected one of bars, scatter"),
        ('kind = "bars"\nx = "mbo_i"', "figure.x is no key of a 'bars' figure; allowed: kind"),
        ('kind = "scatter"\ny = "mbo_i"', "a 'scatter' figure needs figure.x"),
        ('kind = "scatter"\nx = "fid"\ny = "mbo_i"', "figure.x = 'fid' is no column's metric"),
        ('kind = "scatter"\nx = "corloc"\ny = "mbo_i"\nmarkers = { kitti = "s" }', "markers.kitti"),
        (
            'kind = "scatter"\nx = "corloc"\ny = "mbo_i"\nthreshold_curve = "mbo_i"',
            "no 'mbo_i_iouNN'",
        ),
        ('kind = "bars"\ntitle = 3', "figure.title is 3, expected a string"),
    ],
)
def test_figure_schema_errors_are_one_line_naming_the_file(
    tmp_path: Path, figure: str, error: str
) -> None:
    text = BARS.replace('[figure]\nkind = "bars"', f"[figure]\n{figure}")
    path = _write(tmp_path, "wsl", text)
    with pytest.raises(ConfigError, match=re.escape(error)) as caught:
        check_spec(read_toml(path), path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_bars_take_one_axis(tmp_path: Path) -> None:
    axes = 'axes = { "grouping.iterations" = [1, 2], "grouping.num_slots" = [3, 4] }\n'
    path = _write(
        tmp_path, "wsl", BARS.replace('dataset = "mixed"\n', f'dataset = "mixed"\n{axes}')
    )
    with pytest.raises(ConfigError, match="draws lines over one axis; the board has 2"):
        check_spec(read_toml(path), path)


def test_figure_command_html_and_a_board_without_figure(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, "wsl", BARS)
    db = tmp_path / "r.sqlite"
    _fill(db, path, {("four", "coco", 0): {"mbo_i": 0.25, "corloc": 0.5}})
    png = tmp_path / "wsl.png"
    assert main(["figure", str(path), "--db", str(db), "--out", str(png), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {(p["series"], p["x"], p["y"]) for p in shown["points"]} == {
        ("four", "mBO_i", 25.0),
        ("four", "CorLoc", 50.0),
    }
    assert png.is_file() and shown["path"] == str(png)
    page = render(load_leaderboard(path, db), "html")
    assert 'alt="figure: wsl"' in page and "five [coco] mBO_i, CorLoc: not measured" in page
    # a board without [figure]: one line naming the boards that have one
    assert main(["figure", "glass-table-6", "--db", str(db), "--out", str(png)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "has no [figure]; boards with one: glass-fig-4a-slots, glass-fig-4a, glass-fig-4b" in err
    assert "glass-table" not in err.split("boards with one:")[1]
    missing_db = str(tmp_path / "none.sqlite")
    assert main(["figure", "glass-table-6", "--db", missing_db, "--out", str(png)]) == 2
    assert "has no [figure]" in capsys.readouterr().err  # the board's problem comes first
    assert main(["figure", "glass-fig-4a", "--db", missing_db, "--out", str(png)]) == 2
    assert f"results database not found: {missing_db}" in capsys.readouterr().err
