"""The results database: one SQLite file (WAL mode), safe with several local writers.

A cell's metrics and its 'complete' status are written in one transaction, so a worker
killed mid-write leaves either nothing or the whole row.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    id INTEGER PRIMARY KEY,
    config_hash TEXT NOT NULL UNIQUE,
    grid TEXT,
    label TEXT,
    config TEXT NOT NULL,
    plugins TEXT NOT NULL,
    dataset TEXT NOT NULL,
    split TEXT NOT NULL,
    seed INTEGER NOT NULL,
    code_version TEXT,
    run_dir TEXT,
    status TEXT NOT NULL CHECK (status IN ('running', 'complete', 'failed')),
    error TEXT,
    started REAL,
    ended REAL
);
CREATE TABLE IF NOT EXISTS metrics (
    cell_id INTEGER NOT NULL REFERENCES cells(id) ON DELETE CASCADE,
    task TEXT NOT NULL,
    metric TEXT NOT NULL,
    masks TEXT,
    value REAL,
    resolution TEXT,
    num_images INTEGER,
    UNIQUE (cell_id, task, metric, masks)
);
"""


@dataclass
class Cell:
    config_hash: str
    config: dict[str, Any]
    plugins: dict[str, str]
    dataset: str
    split: str
    seed: int
    status: str
    grid: str | None = None
    label: str | None = None
    code_version: str | None = None
    run_dir: str | None = None
    error: str | None = None
    started: float | None = None
    ended: float | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def value(self, task: str, metric: str, masks: str | None = None) -> float | None:
        """A stored metric; with `masks` unset, the decoder masks' value when there is one
        (what SPOT and DINOSAUR report), else the first recorded."""
        found = [m for m in self.metrics if m["task"] == task and m["metric"] == metric]
        if masks is not None:
            found = [m for m in found if m["masks"] == masks]
        found.sort(key=lambda m: m["masks"] != "decoder")
        return found[0]["value"] if found else None


def _wal(db: sqlite3.Connection, patience: float = 60.0) -> None:
    """Switch to WAL mode, waiting out other writers.

    On a file not yet in WAL mode the switch needs a write lock, and SQLite answers
    "database is locked" at once instead of waiting (busy_timeout does not apply), so two
    commands opening a new store together would fail without this retry."""
    deadline = time.monotonic() + patience
    delay = 0.01
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


class ResultStore:
    """Cells (one per resolved config) and their metrics."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            _wal(db)
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=60000")
            yield db
        finally:
            db.close()

    def start(self, cell: Cell) -> None:
        """Mark a cell running (a failed or interrupted earlier attempt is replaced)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "DELETE FROM cells WHERE config_hash = ? AND status != 'complete'",
                (cell.config_hash,),
            )
            db.execute(
                "INSERT OR IGNORE INTO cells (config_hash, grid, label, config, plugins, dataset,"
                " split, seed, code_version, run_dir, status, started)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    cell.config_hash,
                    cell.grid,
                    cell.label,
                    json.dumps(cell.config),
                    json.dumps(cell.plugins),
                    cell.dataset,
                    cell.split,
                    cell.seed,
                    cell.code_version,
                    cell.run_dir,
                    "running",
                    time.time(),
                ),
            )
            db.execute("COMMIT")

    def complete(self, config_hash: str, records: list[dict[str, Any]]) -> None:
        """Store every metric and mark the cell complete, atomically."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT id FROM cells WHERE config_hash = ?", (config_hash,)
            ).fetchone()
            if row is None:
                db.execute("ROLLBACK")
                raise KeyError(f"no cell with config hash {config_hash}")
            db.execute("DELETE FROM metrics WHERE cell_id = ?", (row[0],))
            db.executemany(
                "INSERT INTO metrics (cell_id, task, metric, masks, value, resolution, num_images)"
                " VALUES (?,?,?,?,?,?,?)",
                [
                    (
                        row[0],
                        r["task"],
                        r["metric"],
                        r.get("masks"),
                        r["value"],
                        json.dumps(r.get("resolution")),
                        r.get("num_images", 0),
                    )
                    for r in records
                ],
            )
            db.execute(
                "UPDATE cells SET status='complete', error=NULL, ended=? WHERE id=?",
                (time.time(), row[0]),
            )
            db.execute("COMMIT")

    def fail(self, config_hash: str, error: str) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE cells SET status='failed', error=?, ended=? WHERE config_hash=?",
                (error, time.time(), config_hash),
            )

    def status(self, config_hash: str) -> str | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT status FROM cells WHERE config_hash=?", (config_hash,)
            ).fetchone()
        return row[0] if row else None

    def cells(self, grid: str | None = None) -> list[Cell]:
        if grid:
            return self._select("WHERE grid = ?", (grid,))
        return self._select("", ())

    def get(self, config_hash: str) -> Cell | None:
        found = self._select("WHERE config_hash = ?", (config_hash,))
        return found[0] if found else None

    def _select(self, where: str, args: tuple[Any, ...]) -> list[Cell]:
        """The cells matching `where`, with their metrics only (not the whole table's)."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            db.execute("BEGIN")  # one snapshot: a cell's status and its metrics agree
            rows = db.execute(f"SELECT * FROM cells {where} ORDER BY id", args).fetchall()
            metrics = db.execute(
                f"SELECT * FROM metrics WHERE cell_id IN (SELECT id FROM cells {where})", args
            ).fetchall()
            db.execute("COMMIT")
        by_cell: dict[int, list[dict[str, Any]]] = {}
        for m in metrics:
            entry = dict(m)
            entry["resolution"] = json.loads(entry["resolution"]) if entry["resolution"] else None
            by_cell.setdefault(entry.pop("cell_id"), []).append(entry)
        out = []
        for r in rows:
            d = dict(r)
            cid = d.pop("id")
            d["config"] = json.loads(d["config"])
            d["plugins"] = json.loads(d["plugins"])
            out.append(Cell(**d, metrics=by_cell.get(cid, [])))
        return out
