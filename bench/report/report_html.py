"""A self-contained HTML page for a leaderboard: tables, a chart of each measured column's
means and 95% intervals, and each measured row's figure (all images embedded as PNG)."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ocl_bench.report.board_figures import draw
from ocl_bench.report.leaderboard import (
    MARK_NOTE,
    SPREAD_NOTE,
    WITHIN_SEED_NOTE,
    Leaderboard,
    best_rows,
    judged,
    protocol_notes,
)
from ocl_bench.run.boards import Column

if TYPE_CHECKING:
    from matplotlib.figure import Figure


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1em 0; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
.charts figure { margin: 0; }
"""


def _img(path: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def _png(data: bytes, alt: str, css: str = "") -> str:
    encoded = base64.b64encode(data).decode()
    kind = f' class="{css}"' if css else ""
    return f'<img{kind} alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def column_chart(board: Leaderboard, column: Column, best: int | None) -> Figure | None:
    """One column's chart: each measured row's mean with its 95% interval as an error bar
    (over seeds, or with one seed the within-seed interval over its images, as the page's
    note says; a bare point when it has none), the
    marked row filled red; None when no row is measured. Rows read top to bottom as in the
    table. A matplotlib Figure without pyplot, so no global figure state is touched."""
    from matplotlib.figure import Figure

    points = []
    for i, row in enumerate(board.rows):
        spread = row.spreads.get(column.key)
        if spread is None or math.isnan(spread.mean):
            continue
        summary = judged(spread)
        if summary is None:
            points.append((i, row.label, spread.mean, 0.0, 0.0, False))
        else:  # a percentile interval need not be symmetric about the mean
            low = max(0.0, summary.mean - summary.ci_low)
            high = max(0.0, summary.ci_high - summary.mean)
            points.append((i, row.label, summary.mean, low, high, spread.n == 1))
    if not points:
        return None
    fig = Figure(figsize=(5.5, 1.2 + 0.35 * len(points)), facecolor="white")
    ax = fig.add_subplot()
    for y, (i, _, mean, low, high, within) in enumerate(points):
        marked = i == best
        bars = ax.errorbar(
            [mean],
            [y],
            xerr=[[low], [high]],
            fmt="o",
            color="tab:red" if marked else "tab:blue",
            markerfacecolor="tab:red" if marked else "white",
            capsize=3,
        )
        if within:  # one seed: the interval is over its images, not over training seeds
            bars[2][0].set_linestyle("--")
    names = [_short(p[1]) + (" (1 seed)" if p[5] else "") for p in points]
    ax.set_yticks(range(len(points)), names, fontsize=8)
    ax.set_ylim(len(points) - 0.5, -0.5)
    label = f"{column.label} [{column.dataset}]" if column.dataset else column.label
    better = "higher" if column.higher_is_better else "lower"
    ax.set_title(label, fontsize=9)
    within = any(p[5] for p in points)
    how = "over seeds; dashed: within one seed, over images" if within else "over seeds"
    ax.set_xlabel(f"mean and 95% interval {how} ({better} is better)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def _png_bytes(fig: Figure) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90)
    return out.getvalue()


def _short(label: str, limit: int = 48) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _charts(board: Leaderboard) -> str:

    best = best_rows(board)
    figures = []
    for column in board.columns:
        fig = column_chart(board, column, best.get(column.key))
        if fig is not None:
            caption = html.escape(column.label)
            png = _png_bytes(fig)
            figures.append(
                f"<figure>{_png(png, f'chart: {column.key}', 'chart')}"
                f"<figcaption>{caption}</figcaption></figure>"
            )
    if not figures:
        return ""
    return "<section class='charts'>" + "".join(figures) + "</section>"


def _board_figure(board: Leaderboard) -> str:
    """The board's `[figure]` drawn from its measured values, with what it leaves out."""
    if not board.figure:
        return ""

    fig, drawn = draw(board)
    fig.tight_layout()
    missing = "".join(f"<li>{html.escape(line)}</li>" for line in drawn.missing)
    notes = f"<p>Not drawn (no measured value):</p><ul>{missing}</ul>" if missing else ""
    return (
        f"<section class='board-figure'><figure>{_png(_png_bytes(fig), f'figure: {board.name}')}"
        f"<figcaption>{html.escape(board.figure.get('title', board.title))}</figcaption>"
        f"</figure>{notes}</section>"
    )


def leaderboard_html(
    board: Leaderboard,
    headers: list[str],
    body: list[list[str]],
    marked: set[tuple[int, int]] | None = None,
) -> str:
    """The page; `marked` (row, cell) positions of `body` are the resolved best rows."""
    table = _table_html(headers, body, marked or set())
    figures = "".join(
        f"<figure>{_img(path)}<figcaption>{html.escape(row.label)}</figcaption></figure>"
        for row in board.rows
        for path in row.figures
        if Path(path).is_file()
    )
    source = " ".join(str(v) for v in board.source.values())
    spread_note = _spread_notes(board)
    protocols = _list_section("protocols", "Protocols", protocol_notes(board))
    conclusion = _list_section("conclusion", "Conclusion", board.conclusion)
    measured_with = (
        f"<p>Measured with: <code>{html.escape(' '.join(board.overrides))}</code></p>"
        if board.overrides
        else ""
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(board.name)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(board.name)}</h1><p>{html.escape(board.title)}</p>"
        f"<p>Published numbers: {html.escape(source)}</p>{measured_with}"
        f"{table}"
        f"{_board_figure(board)}{conclusion}{protocols}{spread_note}{_charts(board)}{figures}"
        "</body></html>"
    )


def _table_html(headers: list[str], body: list[list[str]], marked: set[tuple[int, int]]) -> str:
    def cell(i: int, j: int, text: str) -> str:
        shown = html.escape(text)
        return f"<td><strong>{shown}</strong></td>" if (i, j) in marked else f"<td>{shown}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = "".join(
        "<tr>" + "".join(cell(i, j, text) for j, text in enumerate(line)) + "</tr>"
        for i, line in enumerate(body)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _spread_notes(board: Leaderboard) -> str:
    """What the ± intervals and the bold marks of the board's numbers mean."""
    several_seeds = any(s.n > 1 for r in board.rows for s in r.spreads.values())
    notes = f"<p class='spread'>{html.escape(SPREAD_NOTE)}</p>" if several_seeds else ""
    # the charts draw a one-seed row with its per-image interval: say it is within-seed
    if any(s.n == 1 and s.images is not None for r in board.rows for s in r.spreads.values()):
        notes += f"<p class='within-seed'>{html.escape(WITHIN_SEED_NOTE)}</p>"
    if any(r.spreads for r in board.rows):
        notes += f"<p class='marks'>{html.escape(MARK_NOTE)}</p>"
    return notes


def _list_section(css: str, title: str, lines: list[str]) -> str:
    """A titled bullet list, or nothing without lines."""
    if not lines:
        return ""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return f"<section class='{css}'><h2>{title}</h2><ul>{items}</ul></section>"
