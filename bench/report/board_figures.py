"""A board's `[figure]` drawn from its measured values (the same `load_leaderboard` data
its table shows), for figures whose paper prints no numbers.

Kinds (the schema is boards.FIGURE_KEYS, checked by boards.check_figure):
- "bars": a panel per column dataset, a group of bars per column (metric), a bar per row;
  on a board with `axes` instead a panel per dataset and column, a line per board row
  over the axis values.
- "scatter": one marker per row and dataset at (x metric, y metric), the marker shape by
  dataset (`markers`); with `threshold_curve`, a second panel of `<metric>_iouNN` against
  the IoU threshold NN/100, a line per row and dataset.

Error bars are the half-width of the 95% interval over a row's seeds (as the table's
"±"), drawn only when a row has several seeds. A value not measured is never drawn as
zero: the bar or point is absent, marked "n/a" where a bar would stand, and listed in
the figure's note and in `Drawn.missing`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ocl_bench.api.drawing import save_figure
from ocl_bench.api.errors import UserError
from ocl_bench.report.leaderboard import Leaderboard
from ocl_bench.run.boards import Column, Row, list_leaderboards, threshold_columns
from ocl_bench.run.config import read_toml

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


# Notes listed on the figure itself; the rest are counted (all stay in Drawn.missing).
NOTE_LINES = 8


@dataclass
class Point:
    """One drawn value: its panel, its series (a bar's row, a line), where it stands and
    its error bars (None: not drawn)."""

    panel: str
    series: str
    dataset: str
    x: float | str
    y: float
    marker: str = "o"
    xerr: float | None = None
    yerr: float | None = None


@dataclass
class Drawn:
    """What a board figure plots: every point, and each value it leaves out and why."""

    kind: str
    points: list[Point] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    path: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": None if self.path is None else str(self.path),
            "points": [p.__dict__ for p in self.points],
            "missing": self.missing,
        }


def figure_boards(directory: Path | None = None) -> list[str]:
    """The packaged boards that have a `[figure]`."""
    return [p.stem for p in list_leaderboards(directory) if "figure" in read_toml(p)]


def _error(row: Row, key: str) -> float | None:
    """A column's 95%-interval half-width over the row's seeds; None with one seed."""
    spread = row.spreads.get(key)
    if spread is None or spread.n < 2:
        return None
    width = spread.half_width
    return None if width is None or math.isnan(width) else width


def _value(row: Row, key: str) -> float | None:
    value = row.measured.get(key)
    return None if value is None or math.isnan(value) else value


def _why(row: Row, key: str) -> str:
    if row.missing:
        return row.missing
    if key in row.undefined:
        # e.g. a probe's accuracy when no slot matched an object above the threshold
        return "measured, but undefined (NaN)"
    return "not measured"


def _missing(row: Row, ds: str, absent: list[Column]) -> str:
    """One line for a row's absent values on a dataset: the columns grouped by reason."""
    reasons: dict[str, list[str]] = {}
    for col in absent:
        reasons.setdefault(_why(row, col.key), []).append(col.label)
    parts = [f"{', '.join(labels)}: {why}" for why, labels in reasons.items()]
    return f"{row.label} [{ds}] " + "; ".join(parts)


def _datasets(board: Leaderboard) -> list[str]:
    return list(dict.fromkeys(c.dataset or "" for c in board.columns))


def _of(board: Leaderboard, ds: str) -> list[Column]:
    return [c for c in board.columns if (c.dataset or "") == ds]


def _measured(row: Row, ds: str, columns: list[Column], drawn: Drawn) -> list[tuple[Column, float]]:
    """The row's measured (column, value) pairs among `columns`; the absent ones go to
    `drawn.missing` as one line."""
    found, absent = [], []
    for col in columns:
        value = _value(row, col.key)
        if value is None:
            absent.append(col)
        else:
            found.append((col, value))
    if absent:
        drawn.missing.append(_missing(row, ds, absent))
    return found


def _bars(board: Leaderboard, drawn: Drawn) -> None:
    for ds in _datasets(board):
        for row in board.rows:
            for col, value in _measured(row, ds, _of(board, ds), drawn):
                drawn.points.append(
                    Point(ds, row.label, ds, col.label, value, yerr=_error(row, col.key))
                )


def _lines(board: Leaderboard, drawn: Drawn) -> None:
    (axis,) = board.axes
    for ds in _datasets(board):
        for row in board.rows:
            if axis not in row.axis:  # a published-only row: not on the axis
                continue
            for col, value in _measured(row, ds, _of(board, ds), drawn):
                panel = f"{col.label} [{ds}]" if ds else col.label
                x, err = row.axis[axis], _error(row, col.key)
                drawn.points.append(Point(panel, row.system, ds, x, value, yerr=err))


def _scatter(board: Leaderboard, drawn: Drawn) -> None:
    spec = board.figure
    markers: dict[str, str] = spec.get("markers", {})

    def column(metric: str, ds: str) -> Column | None:
        found = [c for c in _of(board, ds) if c.metric == metric]
        return found[0] if found else None

    for ds in _datasets(board):
        cx, cy = column(spec["x"], ds), column(spec["y"], ds)
        if cx is None or cy is None:
            continue
        for row in board.rows:
            pair = _measured(row, ds, [cx, cy], drawn)
            if len(pair) < 2:
                continue
            (_, x), (_, y) = pair
            drawn.points.append(
                Point(
                    "scatter",
                    row.label,
                    ds,
                    x,
                    y,
                    markers.get(ds, "o"),
                    _error(row, cx.key),
                    _error(row, cy.key),
                )
            )
    curve = spec.get("threshold_curve")
    if not curve:
        return
    thresholds = threshold_columns([c.__dict__ for c in board.columns], curve)
    for ds in _datasets(board):
        on_curve = [c for c in _of(board, ds) if c.metric in thresholds]
        for row in board.rows:
            for col, value in _measured(row, ds, on_curve, drawn):
                drawn.points.append(
                    Point(
                        "threshold",
                        f"{row.label} [{ds}]",
                        ds,
                        thresholds[col.metric],
                        value,
                        markers.get(ds, "o"),
                        yerr=_error(row, col.key),
                    )
                )


def plotted(board: Leaderboard) -> Drawn:
    """The points a board's `[figure]` draws (no drawing): what tests compare with the
    stored values."""
    if not board.figure:
        with_one = ", ".join(figure_boards()) or "none"
        raise UserError(f"leaderboard '{board.name}' has no [figure]; boards with one: {with_one}")
    kind = board.figure["kind"]
    drawn = Drawn("lines" if kind == "bars" and board.axes else kind)
    {"bars": _bars, "lines": _lines, "scatter": _scatter}[drawn.kind](board, drawn)
    return drawn


def draw(board: Leaderboard) -> tuple[Figure, Drawn]:
    """The board's figure (a matplotlib Figure without pyplot) and what it plots."""
    from matplotlib.figure import Figure

    drawn = plotted(board)
    panels = _panels(board, drawn.kind)
    columns = min(len(panels), 2 if drawn.kind == "scatter" else 5)
    grid_rows = math.ceil(len(panels) / columns)
    notes = _note_lines(drawn.missing)
    series = list(dict.fromkeys(p.series for p in drawn.points))
    key_lines = max(len(notes), len(series))  # the bottom row: notes left, one legend right
    heights = [1.0] * grid_rows + ([0.07 * key_lines] if key_lines else [])
    width = {"bars": 6.5, "lines": 3.2, "scatter": 5.0}[drawn.kind]
    fig = Figure(figsize=(width * columns, 3.4 * grid_rows + 0.22 * key_lines), facecolor="white")
    spec = fig.add_gridspec(len(heights), columns, height_ratios=heights)
    colours = _colours(board)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(spec[i // columns, i % columns])
        mine = [p for p in drawn.points if p.panel == panel]
        if not mine:  # an empty panel says so rather than showing empty axes as data
            ax.set_title(panel, fontsize=9)
            ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        elif drawn.kind == "bars":
            _draw_bars(ax, board, panel, mine, colours)
        elif drawn.kind == "lines":
            _draw_lines(ax, board, panel, mine, colours)
        else:
            _draw_scatter(ax, board, panel, mine, colours)
    if key_lines:
        key = fig.add_subplot(spec[-1, :])
        key.axis("off")
        key.text(0, 1, "\n".join(notes), va="top", ha="left", fontsize=7, color="dimgray")
        handles: dict[str, Any] = {}
        for ax in fig.axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        if handles:
            key.legend(handles.values(), handles.keys(), loc="upper right", fontsize=7)
    fig.suptitle(board.figure.get("title", board.title), fontsize=10)
    return fig, drawn


def write_board_figure(board: Leaderboard, path: Path) -> Drawn:
    """Draw a board's figure into `path` (a PNG, written atomically)."""

    fig, drawn = draw(board)
    drawn.path = save_figure(fig, Path(path), dpi=110)
    return drawn


def _panels(board: Leaderboard, kind: str) -> list[str]:
    """The panels a figure kind draws, measured or not (Point.panel names them)."""
    if kind == "bars":
        return _datasets(board)
    if kind == "lines":
        return [f"{c.label} [{c.dataset}]" if c.dataset else c.label for c in board.columns]
    return ["scatter", "threshold"] if board.figure.get("threshold_curve") else ["scatter"]


def _note_lines(missing: list[str]) -> list[str]:
    if not missing:
        return []
    lines = ["Not drawn (no measured value; never drawn as zero):", *missing[:NOTE_LINES]]
    if len(missing) > NOTE_LINES:
        lines.append(f"... and {len(missing) - NOTE_LINES} more")
    return lines


def _colours(board: Leaderboard) -> dict[str, Any]:
    """One colour per board row (a system keeps its colour across panels and datasets)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    systems = list(dict.fromkeys(r.system for r in board.rows))
    return {s: cmap(i % 10) for i, s in enumerate(systems)}


def _system(board: Leaderboard, series: str) -> str:
    """The board row a series label belongs to ('<row> [dataset]' on a threshold curve)."""
    for row in board.rows:
        if series in (row.label, row.system) or series.startswith(f"{row.label} ["):
            return row.system
    return series


def _draw_bars(
    ax: Axes, board: Leaderboard, ds: str, points: list[Point], colours: dict[str, Any]
) -> None:
    groups = [c.label for c in board.columns if (c.dataset or "") == ds]
    rows = [r.label for r in board.rows]
    width = 0.8 / max(len(rows), 1)
    at = {(p.series, p.x): p for p in points}
    for j, label in enumerate(rows):
        colour = colours[_system(board, label)]
        named = False  # a row enters the legend with its first drawn bar
        for g, group in enumerate(groups):
            x = g - 0.4 + width * (j + 0.5)
            point = at.get((label, group))
            if point is None:
                ax.text(
                    x, 0, " n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="gray"
                )
                continue
            ax.bar(x, point.y, width, color=colour, label=None if named else label)
            named = True
            if point.yerr is not None:
                ax.errorbar(x, point.y, yerr=point.yerr, color="black", capsize=2, fmt="none")
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_title(ds or board.name, fontsize=9)
    ax.set_ylabel("%" if any(c.scale == 100 for c in board.columns) else "value", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _draw_lines(
    ax: Axes, board: Leaderboard, panel: str, points: list[Point], colours: dict[str, Any]
) -> None:
    (axis,) = board.axes
    for system in dict.fromkeys(p.series for p in points):
        mine = sorted((p for p in points if p.series == system), key=lambda p: p.x)
        xs, ys = [p.x for p in mine], [p.y for p in mine]
        errs = [0.0 if p.yerr is None else p.yerr for p in mine]
        ax.errorbar(xs, ys, yerr=errs, marker="o", color=colours[system], label=system, capsize=2)
    ax.set_xticks(board.axes[axis])
    ax.set_xlabel(axis, fontsize=8)
    ax.set_ylabel("%" if any(c.scale == 100 for c in board.columns) else "value", fontsize=8)
    ax.set_title(panel, fontsize=9)
    ax.grid(alpha=0.3)


def _draw_scatter(
    ax: Axes, board: Leaderboard, panel: str, points: list[Point], colours: dict[str, Any]
) -> None:
    spec = board.figure
    if panel == "scatter":
        for p in points:
            ax.errorbar(
                p.x,
                p.y,
                xerr=p.xerr,
                yerr=p.yerr,
                marker=p.marker,
                markersize=8,
                color=colours[_system(board, p.series)],
                label=f"{p.series} [{p.dataset}]",
                capsize=2,
                linestyle="none",
            )
        ax.set_xlabel(_axis_label(board, spec["x"]), fontsize=8)
        ax.set_ylabel(_axis_label(board, spec["y"]), fontsize=8)
        ax.set_title(f"{spec['y']} against {spec['x']}", fontsize=9)
    else:
        for series in dict.fromkeys(p.series for p in points):
            mine = sorted((p for p in points if p.series == series), key=lambda p: p.x)
            ax.errorbar(
                [p.x for p in mine],
                [p.y for p in mine],
                yerr=[0.0 if p.yerr is None else p.yerr for p in mine],
                marker=mine[0].marker,
                color=colours[_system(board, series)],
                label=series,
                capsize=2,
            )
        ax.set_xlabel("IoU matching threshold", fontsize=8)
        ax.set_ylabel(_axis_label(board, spec["threshold_curve"]), fontsize=8)
        ax.set_title(f"{spec['threshold_curve']} against the IoU threshold", fontsize=9)
    ax.grid(alpha=0.3)


def _axis_label(board: Leaderboard, metric: str) -> str:
    found = [c for c in board.columns if c.metric == metric]
    if not found:
        return metric
    return f"{found[0].label} (%)" if found[0].scale == 100 else found[0].label
