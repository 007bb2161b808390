"""Leaderboards: published numbers beside measured ones, from the results database."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from ocl_bench.boards import (
    Column,
    Row,
    board_path,
    check_spec,
    grid_columns,
    leaderboard_dir,
    list_leaderboards,
    load_grid,
    read_columns,
    read_rows,
    row_config,
)
from ocl_bench.config import read_toml
from ocl_bench.errors import ConfigError, UnknownPluginError, UserError
from ocl_bench.store import ResultStore

FORMATS = ("md", "csv", "html", "json")
__all__ = ["Leaderboard", "leaderboard_dir", "list_leaderboards", "load_leaderboard", "render"]


@dataclass
class Leaderboard:
    name: str
    title: str
    source: dict[str, str]
    columns: list[Column]
    rows: list[Row]
    overrides: list[str] = field(default_factory=list)  # applied to every measured row

    @property
    def runnable(self) -> int:
        return sum(
            1 for r in self.rows if r.missing is None or r.missing.startswith("not measured")
        )


def load_leaderboard(
    name_or_path: str | Path,
    db: Path | None = None,
    dataset: str | None = None,
    overrides: list[str] | None = None,
) -> Leaderboard:
    """Read a leaderboard TOML and fill in what the database measured.

    `overrides` are the command-line overrides the board's cells were run with
    (`ocl-bench grid NAME overrides...`): a grid file's base takes them, and a published
    board's rows take them last, so the same overrides find the same stored cells.
    """
    path = board_path(name_or_path)
    spec = check_spec(read_toml(path), path)
    if "axes" in spec:  # a grid file: its cells are the rows
        return _from_grid(path, db, overrides)
    columns = read_columns(spec)
    if dataset:
        columns = [c for c in columns if c.dataset in (dataset, None, "mixed")]
    rows = read_rows(spec)
    store = ResultStore(db) if db is not None and Path(db).exists() else None
    base = dict(spec.get("base", {}))
    for row in rows:
        _measure(row, columns, base, store, overrides)
    return Leaderboard(
        spec.get("name", path.stem),
        spec.get("title", ""),
        spec.get("source", {}),
        columns,
        rows,
        list(overrides or []),
    )


def _measure(
    row: Row,
    columns: list[Column],
    base: dict[str, Any],
    store: ResultStore | None,
    overrides: list[str] | None = None,
) -> None:
    if not row.buildable:
        row.missing = "no ocl-bench recipe (published only)"
        return
    cells = {}
    for ds in sorted({c.dataset or "" for c in columns}):
        try:
            cfg = row_config(row, base, ds or None, overrides)
        except UnknownPluginError as err:
            row.missing = f"needs plugin: {str(err).split(';')[0].replace('unknown ', '')}"
            return
        except ConfigError as err:
            row.missing = f"needs: {err}"
            return
        row.config_hashes[ds] = cfg.digest()
        cells[ds] = store.get(cfg.digest()) if store else None
    shown = None  # the figure comes from the last column's measured cell
    for col in columns:
        cell = cells.get(col.dataset or "")
        if cell is None or cell.status != "complete":
            row.measured[col.key] = None
            continue
        _take(row, col, cell)
        shown = cell
    if shown is not None:
        row.figures = _latest_figure(shown)
    if all(v is None for v in row.measured.values()):
        row.missing = "not measured yet (run its grid)"


def _take(row: Row, col: Column, cell: Any) -> None:
    """A complete cell's value for a column (scaled), and how it was measured."""
    record = cell.record(col.task, col.metric, col.masks)
    value = None if record is None else record["value"]
    row.measured[col.key] = None if value is None else value * col.scale
    if record is not None and record.get("protocol"):
        row.protocols[col.key] = record["protocol"]


def _protocol_text(protocol: dict[str, Any]) -> str:
    def show(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v, separators=(", ", ": "))

    return ", ".join(f"{k}={show(v)}" for k, v in protocol.items())


def protocol_notes(board: Leaderboard) -> list[str]:
    """One line per column and distinct protocol, naming the rows when they differ: what
    a reader needs to compare a measured number with a published one (e.g. FID's
    reference set and extractor)."""
    notes = []
    for col in board.columns:
        rows_by_text: dict[str, list[str]] = {}
        for row in board.rows:
            if row.protocols.get(col.key):
                text = _protocol_text(row.protocols[col.key])
                rows_by_text.setdefault(text, []).append(row.label)
        name = f"{col.label} [{col.dataset}]" if col.dataset else col.label
        for text, labels in rows_by_text.items():
            which = f" ({', '.join(labels)})" if len(rows_by_text) > 1 else ""
            notes.append(f"{name}{which}: {text}")
    return notes


def _latest_figure(cell: Any) -> list[str]:
    """The newest mask figure of a stored cell's run directory, then its generated images
    (none if absent)."""
    if not cell.run_dir:
        return []
    figures = Path(cell.run_dir) / "figures"
    masks = sorted(str(p) for p in figures.glob("step*.png"))[-1:]
    return masks + [str(p) for p in figures.glob("conditional_generation.png")]


def _from_grid(path: Path, db: Path | None, overrides: list[str] | None) -> Leaderboard:
    spec = read_toml(path)
    grid = load_grid(path, overrides)
    columns = grid_columns(spec)
    store = ResultStore(db) if db is not None and Path(db).exists() else None
    rows = []
    for cell in grid.cells:
        row = Row(cell.label, {}, {})
        stored = store.get(cell.config.digest()) if store else None
        for col in columns:
            if stored is not None and stored.status == "complete":
                _take(row, col, stored)
            else:
                row.measured[col.key] = None
        if stored is None:
            row.missing = "not measured yet (run its grid)"
        elif stored.status == "failed":
            row.missing = f"failed: {(stored.error_line or '')[:120]}"
        else:
            row.figures = _latest_figure(stored)
        rows.append(row)
    return Leaderboard(
        grid.name, spec.get("title", grid.name), {"document": str(path.name)}, columns, rows
    )


def _fmt(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def table(board: Leaderboard) -> tuple[list[str], list[list[str]]]:
    """Headers and cells: published, measured and their difference per column; a board
    with no published numbers at all (a grid's) shows the measured values only."""
    published = any(r.published for r in board.rows)
    headers = ["system"]
    for c in board.columns:
        label = f"{c.label} [{c.dataset}]" if c.dataset else c.label
        headers += [f"{label} pub", "meas", "diff"] if published else [label]
    body = []
    for r in board.rows:
        line = [r.label]
        for c in board.columns:
            pub, meas = r.published.get(c.key), r.measured.get(c.key)
            shown = _fmt(meas) if r.missing is None or meas is not None else "-"
            if not published:
                line.append(shown)
                continue
            diff = None if pub is None or meas is None else meas - pub
            line += [_fmt(pub), shown, _fmt(diff)]
        if r.missing:
            line[-1] = (line[-1] + " " if line[-1] else "") + f"({r.missing})"
        body.append(line)
    return headers, body


def render(board: Leaderboard, fmt: str = "md") -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}")
    headers, body = table(board)
    if fmt == "md":
        head = f"## {board.name}: {board.title}\n"
        if board.source:
            head += (
                f"Published: {board.source.get('document', '')} {board.source.get('table', '')}\n"
            )
        if board.overrides:
            head += f"Measured with: {' '.join(board.overrides)}\n"
        text = head + "\n" + tabulate(body, headers=headers, tablefmt="github")
        notes = protocol_notes(board)
        if notes:
            text += "\n\nProtocols:\n" + "".join(f"- {note}\n" for note in notes)
        return text
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        # The protocols as one JSON field per row (column key -> protocol), when any.
        with_protocols = any(r.protocols for r in board.rows)
        writer.writerow([*headers, "protocol"] if with_protocols else headers)
        for r, line in zip(board.rows, body):
            extra = [json.dumps(r.protocols) if r.protocols else ""] if with_protocols else []
            writer.writerow([*line, *extra])
        return buf.getvalue()
    if fmt == "json":
        return json.dumps(
            {
                "name": board.name,
                "title": board.title,
                "source": board.source,
                "columns": [c.__dict__ for c in board.columns],
                "measured_with": board.overrides,
                "protocols": protocol_notes(board),
                "rows": [
                    {
                        "label": r.label,
                        "published": r.published,
                        "measured": r.measured,
                        "missing": r.missing,
                        "config_hashes": r.config_hashes,
                        "protocol": r.protocols,
                    }
                    for r in board.rows
                ],
            },
            indent=2,
        )
    from ocl_bench.report_html import leaderboard_html

    return leaderboard_html(board, headers, body)
