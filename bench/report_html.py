"""A self-contained HTML page for a leaderboard: tables and each measured row's figure."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ocl_bench.leaderboard import Leaderboard

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1em 0; }
"""


def _img(path: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def leaderboard_html(board: Leaderboard, headers: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in line) + "</tr>"
        for line in body
    )
    figures = "".join(
        f"<figure>{_img(path)}<figcaption>{html.escape(row.label)}</figcaption></figure>"
        for row in board.rows
        for path in row.figures
        if Path(path).is_file()
    )
    source = " ".join(str(v) for v in board.source.values())
    from ocl_bench.leaderboard import SPREAD_NOTE, protocol_notes

    several_seeds = any(s.n > 1 for r in board.rows for s in r.spreads.values())
    spread_note = f"<p class='spread'>{html.escape(SPREAD_NOTE)}</p>" if several_seeds else ""
    notes = protocol_notes(board)
    protocols = (
        "<section class='protocols'><h2>Protocols</h2><ul>"
        + "".join(f"<li>{html.escape(note)}</li>" for note in notes)
        + "</ul></section>"
        if notes
        else ""
    )
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
        f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
        f"{spread_note}{protocols}{figures}</body></html>"
    )
