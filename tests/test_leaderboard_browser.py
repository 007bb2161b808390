"""The HTML leaderboard, opened in a real headless Chromium (through Playwright).

Checked in the browser, not by string matching: every table has one header row plus one
body row per leaderboard row, the header cells carry the column labels, every embedded
figure decoded (`complete && naturalWidth > 0`) and arrived whole (its bottom pixel row
is painted), there is one image per measured row with a figure, the page title is the
board's name, and the page asks for nothing over the network. Needs the Debian
`chromium` package (/usr/bin/chromium) and the `playwright` Python package (no
`playwright install`: the system Chromium is used). Without them the tests skip, or
fail when OCL_BENCH_REQUIRE_BROWSER=1 (as CI sets it).
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ocl_bench.report.leaderboard import Leaderboard, load_leaderboard, marked_cells
from ocl_bench.report.render import render, table
from ocl_bench.run.grid import load_grid, run_grid
from tests.conftest import TINY as ALL_TINY

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TINY = [o for o in ALL_TINY if not o.startswith("tasks.")]  # the grid chooses its task

# A PNG cut short after its header still reports its full naturalWidth, and Chromium
# leaves the undecoded part transparent. The figures are opaque (matplotlib, white face),
# so one whose bottom pixel row is not fully painted did not arrive whole.
BOTTOM_PAINTED = """img => {
  const c = document.createElement('canvas');
  c.width = img.naturalWidth;
  c.height = img.naturalHeight;
  const g = c.getContext('2d');
  g.drawImage(img, 0, 0);
  const px = g.getImageData(0, c.height - 1, c.width, 1).data;
  for (let k = 3; k < px.length; k += 4) if (px[k] === 0) return false;
  return true;
}"""

# Everything the checks need, read from the DOM in one evaluation.
PAGE_FACTS = (
    """() => {
  const bottomPainted = """
    + BOTTOM_PAINTED
    + """;
  return {
    title: document.title,
    tables: Array.from(document.querySelectorAll('table')).map(t => ({
      rows: t.rows.length,
      headRows: t.tHead ? t.tHead.rows.length : 0,
      bodyRows: Array.from(t.tBodies).reduce((n, b) => n + b.rows.length, 0),
      headers: Array.from(t.querySelectorAll('thead th')).map(th => th.textContent),
      firstCells: Array.from(t.tBodies).flatMap(b => Array.from(b.rows))
        .map(r => r.cells.length ? r.cells[0].textContent : null),
      cells: Array.from(t.tBodies).flatMap(b => Array.from(b.rows))
        .map(r => Array.from(r.cells).map(c => c.textContent)),
      bold: Array.from(t.querySelectorAll('tbody td strong')).map(b => b.textContent),
    })),
    images: Array.from(document.images).map(img => ({
      alt: img.alt,
      chart: img.classList.contains('chart'),
      complete: img.complete,
      naturalWidth: img.naturalWidth,
      naturalHeight: img.naturalHeight,
      bottomPainted: img.complete && img.naturalWidth > 0 ? bottomPainted(img) : null,
    })),
  };
}"""
)


def _missing(reason: str) -> None:
    msg = f"browser test needs {reason}"
    if os.environ.get("OCL_BENCH_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{msg} (OCL_BENCH_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file() or not os.access(CHROMIUM, os.X_OK):
        _missing(f"{CHROMIUM} (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright Python package (pip install playwright; no browser download)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[Leaderboard, Path]:
    """A 2-cell grid, 2 training steps each, object discovery only, into a tmp database."""
    tmp = tmp_path_factory.mktemp("browser_board")
    grid_file = tmp / "g.toml"
    grid_file.write_text(
        """
name = "tiny-browser"
title = "two tiny cells"
columns = ["fg_ari", "mbo_i"]
[base]
tasks = { object_discovery = {} }
[base.train]
steps = 2
[axes]
"grouping.num_slots" = [3, 4]
"""
    )
    db = tmp / "r.sqlite"
    statuses = run_grid(load_grid(grid_file, TINY), db, tmp / "runs", progress=False)
    assert list(statuses.values()) == ["complete", "complete"], statuses
    return load_leaderboard(grid_file, db, overrides=TINY), db


def _write_html(board: Leaderboard, path: Path) -> Path:
    path.write_text(render(board, "html"), encoding="utf-8")
    return path


def _open(browser: Any, path: Path) -> dict[str, Any]:
    """Load a file:// page (load waits for the images) and read its DOM facts."""
    page = browser.new_page()
    remote: list[str] = []

    def block(route: Any) -> None:  # the page must be self-contained: refuse the network
        remote.append(route.request.url)
        route.abort()

    page.route(re.compile(r"^(https?|wss?|ftp)://"), block)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(path.as_uri(), wait_until="load", timeout=30_000)
        facts = page.evaluate(PAGE_FACTS)
    finally:
        page.close()
    facts["remote"], facts["errors"] = remote, errors
    return facts


def _check(board: Leaderboard, facts: dict[str, Any]) -> None:
    assert facts["title"] == board.name
    assert facts["remote"] == [] and facts["errors"] == []
    headers, body = table(board)
    assert facts["tables"], "no <table> in the page"
    for t in facts["tables"]:
        assert t["headRows"] == 1 and t["bodyRows"] == len(board.rows)
        assert t["rows"] == 1 + len(board.rows)
        assert t["headers"] == headers
        for col in board.columns:
            assert any(col.label in h for h in t["headers"]), f"no header for {col.label!r}"
        assert t["firstCells"] == [r.label for r in board.rows]
        assert t["cells"] == body  # every cell as rendered, none empty or doubled
        # a row's status sits in a column of its own, never inside a measured/diff cell
        if any(r.missing for r in board.rows):
            assert t["headers"][-1] == "status"
            assert [cells[-1] for cells in t["cells"]] == [r.missing or "" for r in board.rows]
        for r, cells in zip(board.rows, t["cells"]):
            if r.missing:
                assert not any(r.missing in c for c in cells[:-1]), cells
    charts = [i for i in facts["images"] if i["chart"]]
    measured_columns = [c for c in board.columns if any(c.key in r.spreads for r in board.rows)]
    assert [i["alt"] for i in charts] == [f"chart: {c.key}" for c in measured_columns]
    broken = [i for i in facts["images"] if not (i["complete"] and i["naturalWidth"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    cut = [i for i in facts["images"] if not i["bottomPainted"]]
    assert not cut, f"images cut short (bottom row not painted): {cut}"
    with_figures = [r for r in board.rows if r.missing is None and r.figures]
    assert len(facts["images"]) - len(charts) == len(with_figures)


def test_measured_leaderboard_in_chromium(
    browser: Any, measured: tuple[Leaderboard, Path], tmp_path: Path
) -> None:
    board, _ = measured
    assert sum(1 for r in board.rows if r.missing is None and r.figures) == 2
    facts = _open(browser, _write_html(board, tmp_path / "measured.html"))
    _check(board, facts)
    assert all(i["naturalHeight"] > 0 for i in facts["images"])


def test_published_leaderboard_in_chromium(
    browser: Any, measured: tuple[Leaderboard, Path], tmp_path: Path
) -> None:
    _, db = measured
    board = load_leaderboard("thesis-table-5-1", db)
    assert board.rows and all(r.missing is not None for r in board.rows)  # nothing measured
    facts = _open(browser, _write_html(board, tmp_path / "published.html"))
    _check(board, facts)
    assert facts["images"] == []


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda png: b"not a png", "images that did not load"),
        (lambda png: png[: len(png) // 2], "images cut short"),
    ],
    ids=["garbage", "truncated"],
)
def test_broken_figure_is_caught(
    browser: Any, measured: tuple[Leaderboard, Path], tmp_path: Path, damage: Any, error: str
) -> None:
    """The image checks are live: a corrupted or cut-short embedded PNG is reported."""
    board, _ = measured
    page = render(board, "html")
    first = re.search(r"data:image/png;base64,([^\"']+)", page)
    assert first is not None
    junk = base64.b64encode(damage(base64.b64decode(first.group(1)))).decode()
    path = tmp_path / "broken.html"
    path.write_text(page[: first.start(1)] + junk + page[first.end(1) :], encoding="utf-8")
    with pytest.raises(AssertionError, match=error):
        _check(board, _open(browser, path))


def test_named_rows_status_column_marks_and_charts_in_chromium(
    browser: Any, measured: tuple[Leaderboard, Path], tmp_path: Path
) -> None:
    """The measured grid again with a third, unrun row and names for its rows: the names
    are the first cells, the unrun row's status is its own last cell, bold cells are the
    marked ones, and each measured column has its chart."""
    _, db = measured
    grid_file = tmp_path / "named.toml"
    grid_file.write_text(
        """
name = "tiny-browser"
title = "two tiny cells and one not run"
columns = ["fg_ari", "mbo_i"]
[base]
tasks = { object_discovery = {} }
[base.train]
steps = 2
[axes]
"grouping.num_slots" = [3, 4, 5]
[labels."grouping.num_slots"]
3 = "three slots"
4 = "four slots"
"""
    )
    board = load_leaderboard(grid_file, db, overrides=TINY)
    assert [r.label for r in board.rows] == ["three slots", "four slots", "grouping.num_slots=5"]
    assert [r.missing for r in board.rows][:2] == [None, None]
    assert board.rows[2].missing.startswith("not measured yet")
    # one seed each: the interval is over the stored per-image values
    assert all(r.spreads["fg_ari"].images is not None for r in board.rows[:2])
    facts = _open(browser, _write_html(board, tmp_path / "named.html"))
    _check(board, facts)
    (t,) = facts["tables"]
    _, body = table(board)
    assert sorted(t["bold"]) == sorted(body[i][j] for i, j in marked_cells(board))
    assert sum(1 for i in facts["images"] if i["chart"]) == 2


def _error_bars(fig: Any) -> list[tuple[float, float, float]]:
    """(mean, low end, high end) of each error bar drawn, top row first."""
    (ax,) = fig.axes
    out = []
    for container in ax.containers:
        (point,) = container.lines[0].get_xdata()
        (segment,) = container.lines[2][0].get_segments()
        out.append((float(point), float(segment[0][0]), float(segment[1][0])))
    return out


def test_column_chart_draws_each_rows_mean_and_interval() -> None:
    from ocl_bench.report.leaderboard import Spread
    from ocl_bench.report.report_html import column_chart
    from ocl_bench.report.stats import summarize
    from ocl_bench.run.boards import Column, Row

    images = summarize([40.0, 50.0, 45.0, 55.0])
    rows = [
        Row("seeds", {}, {}, spreads={"m": Spread(60.0, 3, [0, 1, 2], 2.0, 57.0, 64.0, "b")}),
        Row("one seed, per image", {}, {}, spreads={"m": Spread(47.0, 1, [0], images=images)}),
        Row("not measured", {}, {}, missing="not measured yet (run its grid)"),
    ]
    column = Column("m", "m", "object_discovery", None, "m")
    board = Leaderboard("b", "", {}, [column], rows)
    fig = column_chart(board, column, best=0)
    drawn = [x for bar in _error_bars(fig) for x in bar]
    assert drawn == pytest.approx([60.0, 57.0, 64.0, images.mean, images.ci_low, images.ci_high])
    names = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert names == ["seeds", "one seed, per image (1 seed)"]
    # the one-seed row's interval is over its images: drawn dashed and said so
    styles = [c.lines[2][0].get_linestyle()[0][1] for c in fig.axes[0].containers]
    assert styles[0] is None and styles[1] is not None
    assert "higher is better" in fig.axes[0].get_xlabel()
    assert "dashed: within one seed" in fig.axes[0].get_xlabel()
    column.higher_is_better = False
    assert "lower is better" in column_chart(board, column, best=None).axes[0].get_xlabel()
    empty = Leaderboard("b", "", {}, [column], [rows[2]])
    assert column_chart(empty, column, best=None) is None
