"""How a metric was measured (MetricRecord.protocol) travels from the store to every
leaderboard format."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ocl_bench.report.leaderboard import load_leaderboard
from ocl_bench.report.render import render
from ocl_bench.run.boards import read_rows, row_config
from ocl_bench.run.config import read_toml
from ocl_bench.run.store import Cell, ResultStore

BOARD = """
name = "generation"
title = "generation from slots"
[source]
document = "test"
[[columns]]
key = "fid"
task = "conditional_generation"
dataset = "shapes"
label = "FID"
[[columns]]
key = "fg_ari"
task = "object_discovery"
dataset = "shapes"
label = "FG-ARI"
scale = 100
[[rows]]
label = "four slots"
overrides = { "grouping.num_slots" = 4 }
published = { fid = 30.0 }
[[rows]]
label = "five slots"
overrides = { "grouping.num_slots" = 5 }
published = { fid = 25.0 }
[[rows]]
label = "six slots"
overrides = { "grouping.num_slots" = 6 }
published = { fid = 20.0 }
"""

FID_64 = {
    "images": 64,
    "resolution": [299, 299],
    "reference": "shapes/val",
    "extractor": {"name": "inception-v3", "sha256": "ab12"},
}
FID_32 = {**FID_64, "images": 32}
FID_64_TEXT = (
    "images=64, resolution=[299, 299], reference=shapes/val,"
    ' extractor={"name": "inception-v3", "sha256": "ab12"}'
)


def _store_board(tmp_path: Path, protocols: dict[str, dict | None]) -> tuple[Path, Path]:
    """The board file and a store whose cells hold each row's FID with that protocol."""
    path = tmp_path / "generation.toml"
    path.write_text(BOARD)
    db = tmp_path / "r.sqlite"
    store = ResultStore(db)
    for row in read_rows(read_toml(path)):
        if row.label not in protocols:
            continue
        digest = row_config(row, {}, "shapes").digest()
        store.start(Cell(digest, {}, {}, "shapes", "val", 0, "running"))
        fid = {"task": "conditional_generation", "metric": "fid", "value": 28.5}
        ari = {"task": "object_discovery", "metric": "fg_ari", "masks": "decoder", "value": 0.5}
        store.complete(digest, [{**fid, "protocol": protocols[row.label]}, ari])
    return path, db


def test_protocols_are_listed_under_the_table_and_carried_by_json_and_csv(
    tmp_path: Path,
) -> None:
    path, db = _store_board(tmp_path, {"four slots": FID_64, "five slots": FID_32})
    board = load_leaderboard(path, db)
    rows = {r.label: r for r in board.rows}
    assert rows["four slots"].protocols == {"fid": FID_64}  # fg_ari records no protocol
    assert rows["five slots"].protocols == {"fid": FID_32}
    assert rows["six slots"].protocols == {}  # not measured

    md = render(board, "md")
    table, notes = md.split("\n\nProtocols:\n")
    assert "28.50" in table and "| six slots" in table
    # The two rows were measured differently, so each line names its row.
    assert notes.splitlines() == [
        "- FID [shapes] (four slots): " + FID_64_TEXT,
        "- FID [shapes] (five slots): " + FID_64_TEXT.replace("images=64", "images=32"),
    ]

    data = json.loads(render(board, "json"))
    assert [r["protocol"] for r in data["rows"]] == [{"fid": FID_64}, {"fid": FID_32}, {}]
    assert data["protocols"] == [line[2:] for line in notes.splitlines()]

    parsed = list(csv.reader(io.StringIO(render(board, "csv"))))
    assert parsed[0][-1] == "protocol" and parsed[0][0] == "system"
    assert [json.loads(r[-1]) if r[-1] else {} for r in parsed[1:]] == [
        {"fid": FID_64},
        {"fid": FID_32},
        {},
    ]

    html = render(board, "html")
    section = html.split("</table>", 1)[1]
    assert section.startswith("<section class='protocols'><h2>Protocols</h2><ul><li>")
    assert section.count("<li>") == 2
    assert "FID [shapes] (four slots): images=64" in section
    assert "&quot;inception-v3&quot;" in section  # escaped, not raw JSON in the markup


def test_one_protocol_shared_by_every_row_is_said_once(tmp_path: Path) -> None:
    path, db = _store_board(tmp_path, {"four slots": FID_64, "five slots": FID_64})
    md = render(load_leaderboard(path, db), "md")
    notes = md.split("\n\nProtocols:\n")[1].splitlines()
    assert notes == [f"- FID [shapes]: {FID_64_TEXT}"]


def test_boards_without_protocols_render_as_before(tmp_path: Path) -> None:
    path, db = _store_board(tmp_path, {"four slots": None})
    board = load_leaderboard(path, db)
    assert board.rows[0].measured["fid"] == 28.5 and board.rows[0].protocols == {}
    assert "Protocols" not in render(board, "md")
    assert "protocols" not in render(board, "html")
    header = render(board, "csv").splitlines()[0]
    assert not header.endswith("protocol")
    assert json.loads(render(board, "json"))["protocols"] == []
