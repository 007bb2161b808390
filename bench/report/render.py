"""A leaderboard as text: Markdown, CSV and JSON here, HTML by report_html; each prints,
per row, what its numbers were measured on and under which protocol."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from tabulate import tabulate

from ocl_bench.api.errors import UserError
from ocl_bench.report.leaderboard import (
    COMPARABLE_NOTE,
    FORMATS,
    MARK_NOTE,
    NOT_COMPARABLE,
    SPREAD_NOTE,
    WITHIN_SEED_NOTE,
    Leaderboard,
    Spread,
    best_rows,
    marked_cells,
    protocol_notes,
)
from ocl_bench.report.report_html import leaderboard_html
from ocl_bench.run.boards import (
    Column,
    Row,
)


def _fmt(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _measured_text(spread: Spread | None) -> str:
    """`mean ± half-width of the 95% interval`, or the value alone with one seed."""
    if spread is None:
        return ""
    width = spread.half_width
    if width is None or math.isnan(width) or math.isnan(spread.mean):
        return _fmt(spread.mean)
    return f"{spread.mean:.2f} ± {width:.2f}"


def _seed_count(row: Row) -> str:
    """How many seeds a row's numbers average: one number, or the range when its
    columns (datasets) differ."""
    counts = sorted({s.n for s in row.spreads.values()})
    if not counts:
        return ""
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def _inside_text(inside: bool | None) -> str:
    return {True: " (in CI)", False: " (outside CI)", None: ""}[inside]


def table(board: Leaderboard) -> tuple[list[str], list[list[str]]]:
    """Headers and cells: published, measured (mean ± 95% interval over seeds) and their
    difference per column, saying whether the published number lies in the interval, and
    each row's number of seeds; a board with no published numbers at all (a grid's) shows
    the measured values only. A row's status (why it has no numbers) is a last column of
    its own, present when any row has one."""
    published = any(r.published for r in board.rows)
    statuses = any(r.missing for r in board.rows)
    protocols = _protocols_matter(board)
    headers = ["system", "n"]
    for c in board.columns:
        label = f"{c.label} [{c.dataset}]" if c.dataset else c.label
        headers += [f"{label} pub", "meas", "diff"] if published else [label]
    body = []
    for r in board.rows:
        line = [r.label, _seed_count(r)]
        for c in board.columns:
            pub, meas = r.published.get(c.key), r.measured.get(c.key)
            spread = r.spreads.get(c.key)
            shown = _measured_text(spread) if meas is not None else ""
            shown = shown if r.missing is None or meas is not None else "-"
            if not published:
                line.append(shown)
                continue
            diff = None if pub is None or meas is None else meas - pub
            if diff is not None and not r.comparable.get(c.dataset or "", True):
                line += [_fmt(pub), shown, NOT_COMPARABLE]
                continue
            inside = spread.contains(pub) if spread is not None else None
            line += [_fmt(pub), shown, _fmt(diff) + _inside_text(inside)]
        if protocols:
            line.append(measured_with_text(r))
        if statuses:
            line.append(r.missing or "")
        body.append(line)
    if protocols:
        headers.append("protocol")
    if statuses:
        headers.append("status")
    return headers, body


def _protocols_matter(board: Leaderboard) -> bool:
    """Whether a row is scored under a named protocol, or a measured cell is not comparable
    with its published number: then the table says which protocol each row was scored under."""
    return any(
        any(p for _, p in r.measured_with.values()) or not all(r.comparable.values())
        for r in board.rows
    )


def measured_with_text(row: Row) -> str:
    """The protocol a row's cells are evaluated under ('none' when none applies), with the
    dataset evaluated where it is not the column's (`glass`, `none on shapes`)."""
    parts = []
    for ds, (evaluated, protocol) in row.measured_with.items():
        text = protocol or "none"
        if ds not in ("", "mixed") and evaluated != ds:
            text += f" on {evaluated}"
        parts.append(text)
    return ", ".join(dict.fromkeys(parts))


def render(board: Leaderboard, fmt: str = "md") -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}")
    headers, body = table(board)
    if fmt == "md":
        return _markdown(board, headers, body)
    if fmt == "csv":
        return _csv(board)
    if fmt == "json":
        return _json(board)
    return leaderboard_html(board, headers, body, marked_cells(board))


def _markdown(board: Leaderboard, headers: list[str], body: list[list[str]]) -> str:
    """The board as a GitHub table (best cells bold) under its source, with its notes."""
    for i, j in marked_cells(board):
        body[i][j] = f"**{body[i][j]}**"
    head = f"## {board.name}: {board.title}\n"
    if board.source:
        head += f"Published: {board.source.get('document', '')} {board.source.get('table', '')}\n"
    if board.overrides:
        head += f"Measured with: {' '.join(board.overrides)}\n"
    text = head + "\n" + tabulate(body, headers=headers, tablefmt="github")
    if any(s.n > 1 for r in board.rows for s in r.spreads.values()):
        text += f"\n\n{SPREAD_NOTE}"
    if any(r.spreads for r in board.rows):
        text += f"\n\n{MARK_NOTE}"
    if _protocols_matter(board):
        text += f"\n\n{COMPARABLE_NOTE}"
    if board.conclusion:
        text += "\n\nConclusion:\n" + "".join(f"- {line}\n" for line in board.conclusion)
    notes = protocol_notes(board)
    if notes:
        text += "\n\nProtocols:\n" + "".join(f"- {note}\n" for note in notes)
    return text


def _json(board: Leaderboard) -> str:
    best = best_rows(board)
    return json.dumps(
        {
            "name": board.name,
            "title": board.title,
            "source": board.source,
            "columns": [c.__dict__ for c in board.columns],
            "measured_with": board.overrides,
            "protocols": protocol_notes(board),
            "conclusion": board.conclusion,
            "rows": [_json_row(board, r, i, best) for i, r in enumerate(board.rows)],
        },
        indent=2,
    )


def _json_row(board: Leaderboard, r: Row, i: int, best: dict[str, int]) -> dict[str, Any]:
    """Row `i` of the JSON board; `best`: column key -> index of its best row."""
    return {
        "label": r.label,
        "published": r.published,
        "measured": r.measured,
        "missing": r.missing,
        "config_hashes": r.config_hashes,
        "protocol": r.protocols,
        "evaluation_protocol": r.protocol,
        "measured_with": {
            ds: {"dataset": evaluated, "protocol": protocol}
            for ds, (evaluated, protocol) in r.measured_with.items()
        },
        "diff": {c.key: _diff(r, c) for c in board.columns},
        "stats": {
            key: {
                **_stats_fields(spread, _comparable_published(r, key, board)),
                "best": best.get(key) == i,
            }
            for key, spread in r.spreads.items()
        },
    }


def _comparable_published(row: Row, key: str, board: Leaderboard) -> float | None:
    """The row's published value of a column, or None where its measured cell is not
    comparable with it (another dataset or protocol)."""
    col = next(c for c in board.columns if c.key == key)
    return row.published.get(key) if row.comparable.get(col.dataset or "", True) else None


def _diff(row: Row, col: Column) -> float | str | None:
    """measured - published, NOT_COMPARABLE where the cell was measured on another dataset or
    under another protocol, None where either number is missing."""
    pub, meas = row.published.get(col.key), row.measured.get(col.key)
    if pub is None or meas is None:
        return None
    return meas - pub if row.comparable.get(col.dataset or "", True) else NOT_COMPARABLE


def _stats_fields(spread: Spread | None, published: float | None) -> dict[str, Any]:
    """A measured column's numbers as separate fields (json, csv): mean, std, the 95%
    interval, the seeds, and whether the published number lies in the interval (null
    when there is no interval or no published number)."""
    if spread is None:
        keys = ("mean", "std", "ci_low", "ci_high", "n", "seeds", "pub_in_ci", "within_seed")
        return dict.fromkeys(keys)
    return {
        "mean": spread.mean,
        "std": spread.std,
        "ci_low": spread.ci_low,
        "ci_high": spread.ci_high,
        "n": spread.n,
        "seeds": spread.seeds,
        "method": spread.method,
        "pub_in_ci": spread.contains(published),
        "within_seed": _within_seed_fields(spread),
    }


def _within_seed_fields(spread: Spread) -> dict[str, Any] | None:
    """A one-seed row's interval over its stored images, named as what it is (json): a
    within-seed interval, never the seed interval (ci_low/ci_high stay null)."""
    images = spread.images
    if spread.n != 1 or images is None or images.n < 2:
        return None
    return {
        "mean": images.mean,
        "ci_low": images.ci_low,
        "ci_high": images.ci_high,
        "images": images.n,
        "method": images.method,
        "note": WITHIN_SEED_NOTE,
    }


def _csv(board: Leaderboard) -> str:
    """One field per number (a spreadsheet must not parse "56.9 ± 3.2"): per column its
    published value, mean, std, interval, seed count, difference and whether the published
    value is inside, and whether the row is marked best in the column; then the row's
    status and, when any, its protocols as JSON."""
    published = any(r.published for r in board.rows)
    fields = ["mean", "std", "ci_low", "ci_high", "n"]
    best = best_rows(board)
    headers = ["system"]
    for c in board.columns:
        label = f"{c.label} [{c.dataset}]" if c.dataset else c.label
        named = [*(f"{label} {f}" for f in fields), f"{label} best"]
        if published:
            named = [
                f"{label} pub",
                *named,
                f"{label} diff",
                f"{label} pub_in_ci",
                f"{label} measured on",
            ]
        headers += named
    with_protocols = any(r.protocols for r in board.rows)
    headers += ["evaluation protocol", "measured with", "status"]
    headers += ["protocol"] if with_protocols else []
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(headers)

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return str(value).lower() if isinstance(value, bool) else str(value)

    for i, r in enumerate(board.rows):
        line = [r.label]
        for c in board.columns:
            pub = r.published.get(c.key)
            stats = _stats_fields(r.spreads.get(c.key), _comparable_published(r, c.key, board))
            marked = None if stats["mean"] is None else best.get(c.key) == i
            numbers = [*(cell(stats[f]) for f in fields), cell(marked)]
            if not published:
                line += numbers
                continue
            evaluated, protocol = r.measured_with.get(c.dataset or "", ("", ""))
            on = f"{evaluated}, protocol {protocol or 'none'}" if r.measured_with else ""
            line += [cell(pub), *numbers, cell(_diff(r, c)), cell(stats["pub_in_ci"]), on]
        line += [measured_with_text(r), " ".join(board.overrides), r.missing or ""]
        if with_protocols:
            line.append(json.dumps(r.protocols) if r.protocols else "")
        writer.writerow(line)
    return buf.getvalue()
