"""The results database: one SQLite file (WAL mode), safe with several local writers.

A cell's metrics and its 'complete' status are written in one transaction, so a worker
killed mid-write leaves either nothing or the whole row.

A process runs a cell only while it holds the cell's lease (table `leases`: host, pid,
heartbeat, expiry), taken in one transaction with a look at the cell's status, so two
grids started together on one database never run the same cell at once. A lease whose
heartbeat stopped, or whose process is gone from this host, is taken over. Released
leases stay as the history of who ran what.

Besides each metric's value, table `per_image` keeps its value on every image (in the
order of the eval split; NULL where the image was skipped, as NaN), so a cell with one
seed still has an interval (bootstrap over images) and two cells can be compared image by
image. Databases made before it existed get the table on opening and read back no values.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np

from ocl_bench.api.errors import DataError

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
    protocol TEXT,
    UNIQUE (cell_id, task, metric, masks)
);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY,
    config_hash TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started REAL NOT NULL,
    heartbeat REAL NOT NULL,
    expires REAL NOT NULL,
    released REAL,
    outcome TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_lease ON leases (config_hash) WHERE released IS NULL;
CREATE TABLE IF NOT EXISTS per_image (
    cell_id INTEGER NOT NULL REFERENCES cells(id) ON DELETE CASCADE,
    task TEXT NOT NULL,
    metric TEXT NOT NULL,
    masks TEXT,
    image INTEGER NOT NULL,
    value REAL,
    UNIQUE (cell_id, task, metric, masks, image)
);
"""

# Columns added after a database may have been created, with their SQL type.
ADDED_COLUMNS = {"metrics": {"protocol": "TEXT"}}


def this_host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has that pid (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@dataclass
class Lease:
    """A process's claim on a cell while it runs it."""

    id: int
    config_hash: str
    host: str
    pid: int
    started: float
    heartbeat: float
    expires: float
    released: float | None = None
    outcome: str | None = None

    def holder(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {_when(self.started)}"

    def expired(self, now: float) -> str | None:
        """Why this live lease no longer holds its cell, or None while it does."""
        if self.host == this_host() and not pid_alive(self.pid):
            return f"expired: pid {self.pid} on {self.host} is gone"
        if self.expires < now:
            return f"expired: no heartbeat from {self.holder()} after {_when(self.heartbeat)}"
        return None


@dataclass
class Claim:
    """What claiming a cell found: our lease, another live holder's, or a finished cell."""

    lease: Lease | None = None  # ours: run the cell, then release it
    holder: Lease | None = None  # another live process runs the cell
    status: str | None = None  # "complete", or "failed" by another process (no lease taken)
    error: str | None = None
    last: Lease | None = None  # the newest lease of the cell, for saying who finished it"""


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
    # (task, metric, masks) -> the value on each image, NaN where skipped; filled only when
    # read with per_image=True (leaderboards of many cells need not load them all).
    per_image: dict[tuple[str, str, str | None], np.ndarray] = field(default_factory=dict)

    @property
    def error_line(self) -> str | None:
        """The error in one line: a stored traceback's last line says what went wrong."""
        if not self.error:
            return None
        if "Traceback (most recent call last)" in self.error:
            kind = self.error.split(":", 1)[0]
            last = [line.strip() for line in self.error.splitlines() if line.strip()][-1]
            return last if last.startswith(kind) else f"{kind}: {last}"
        return " ".join(self.error.split())

    def record(self, task: str, metric: str, masks: str | None = None) -> dict[str, Any] | None:
        """A stored metric's record (value, masks, resolution, images, protocol); with
        `masks` unset, the decoder masks' when there is one (what SPOT and DINOSAUR
        report), else the first recorded."""
        found = [m for m in self.metrics if m["task"] == task and m["metric"] == metric]
        if masks is not None:
            found = [m for m in found if m["masks"] == masks]
        found.sort(key=lambda m: m["masks"] != "decoder")
        return found[0] if found else None

    def value(self, task: str, metric: str, masks: str | None = None) -> float | None:
        found = self.record(task, metric, masks)
        return found["value"] if found else None

    def image_values(self, task: str, metric: str, masks: str | None = None) -> np.ndarray | None:
        """A metric's per-image values (NaN where skipped), picking masks as `record` does;
        None when none were stored (a database from before them, or not read)."""
        found = self.record(task, metric, masks)
        if found is None:
            return None
        return self.per_image.get((task, metric, found["masks"]))


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


SQLITE_HEADER = b"SQLite format 3\x00"

# What sqlite says when the file itself is bad (not when a query is): these become one line
# naming the file; anything else (locks, constraint violations) is left to the caller.
_BAD_FILE = ("not a database", "malformed", "unable to open", "disk i/o", "readonly", "encrypted")


def _unreadable(path: Path, err: sqlite3.Error) -> DataError:
    return DataError(
        f"results database {path} cannot be used ({err}); expected an SQLite file written by"
        " `ocl-bench grid` (pass another --db, or move this file away to start a new one)"
    )


def _stored_json(text: str | None, path: Path, where: str) -> Any:
    """A JSON column's value; a damaged one fails in one line naming the file and the row."""
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise DataError(
            f"results database {path} is damaged: {where} holds invalid JSON {text[:40]!r}"
        ) from None


def _absent_sidecars(path: Path) -> list[Path]:
    """The -wal/-shm files sqlite would create beside `path` that do not exist yet."""
    return [p for p in (Path(f"{path}-wal"), Path(f"{path}-shm")) if not p.exists()]


def _remove(paths: list[Path]) -> None:
    """Leave a refused database's folder as it was (sqlite made these to read a WAL file)."""
    for p in paths:
        p.unlink(missing_ok=True)


def _check_file(path: Path) -> None:
    """Refuse, before sqlite writes anything into it, a file that is not a results database.

    Opening would otherwise add our tables to any other SQLite file, and print a traceback
    for a file of random bytes."""
    if path.is_dir():
        raise DataError(f"results database {path} is a directory; expected an SQLite file")
    if not path.is_file() or path.stat().st_size == 0:
        return  # a new database
    try:
        with path.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as err:
        raise DataError(f"results database {path} cannot be read: {err.strerror}") from None
    if header != SQLITE_HEADER:
        raise DataError(
            f"results database {path} is not an SQLite file (corrupt, or another kind of file);"
            " expected one written by `ocl-bench grid`"
        )
    expected = sqlite3.connect(":memory:")
    expected.executescript(SCHEMA)
    fresh = _absent_sidecars(path)
    try:
        found = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            tables = {
                r[0] for r in found.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if not tables:
                return
            missing = []
            for table in ("cells", "metrics"):
                want = {r[1] for r in expected.execute(f"PRAGMA table_info({table})")}
                have = {r[1] for r in found.execute(f"PRAGMA table_info({table})")}
                late = set(ADDED_COLUMNS.get(table, {}))
                if not have:
                    missing.append(f"table {table}")
                else:
                    missing += [f"{table}.{c}" for c in sorted(want - have - late)]
        finally:
            found.close()
    except sqlite3.DatabaseError as err:
        _remove(fresh)
        raise _unreadable(path, err) from None
    finally:
        expected.close()
    if missing:
        raise DataError(
            f"results database {path} is an SQLite file but not an ocl-bench results database"
            f" (missing {', '.join(missing)}; tables found: {', '.join(sorted(tables))})"
        )


class ResultStore:
    """Cells (one per resolved config) and their metrics."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _check_file(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)
            self._add_columns(db)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        fresh = _absent_sidecars(self.path)
        try:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        except sqlite3.Error as err:
            raise _unreadable(self.path, err) from None
        bad: sqlite3.DatabaseError | None = None
        try:
            _wal(db)
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=60000")
            yield db
        except sqlite3.DatabaseError as err:
            if not any(s in str(err).lower() for s in _BAD_FILE):
                raise
            bad = err
        finally:
            db.close()
        if bad is not None:  # after close: sqlite keeps its -wal/-shm files while open
            _remove(fresh)
            raise _unreadable(self.path, bad) from None

    @staticmethod
    def _add_columns(db: sqlite3.Connection) -> None:
        """Bring a database made by an older version up to SCHEMA (ALTER TABLE, once)."""

        def missing() -> list[tuple[str, str, str]]:
            found = []
            for table, columns in ADDED_COLUMNS.items():
                have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                found += [(table, n, t) for n, t in columns.items() if n not in have]
            return found

        if not missing():  # the usual case takes no write lock
            return
        db.execute("BEGIN IMMEDIATE")  # two processes opening an old file add each column once
        for table, name, sql_type in missing():
            db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")
        db.execute("COMMIT")

    def claim(self, config_hash: str, timeout: float, failed_since: float | None = None) -> Claim:
        """Take the cell's lease unless it is complete, held by a live process, or (when
        `failed_since` is given) failed in another process since that time."""
        now = time.time()
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            db.execute("BEGIN IMMEDIATE")
            cell = db.execute(
                "SELECT status, error, ended FROM cells WHERE config_hash = ?", (config_hash,)
            ).fetchone()
            last = db.execute(
                "SELECT * FROM leases WHERE config_hash = ? ORDER BY id DESC LIMIT 1",
                (config_hash,),
            ).fetchone()
            last_lease = Lease(**dict(last)) if last else None
            finished = cell is not None and (
                cell["status"] == "complete"
                or (
                    cell["status"] == "failed"
                    and failed_since is not None
                    and (cell["ended"] or 0) >= failed_since
                )
            )
            if finished:
                db.execute("COMMIT")
                return Claim(status=cell["status"], error=cell["error"], last=last_lease)
            if last_lease is not None and last_lease.released is None:
                why = last_lease.expired(now)
                if why is None:
                    db.execute("COMMIT")
                    return Claim(holder=last_lease, last=last_lease)
                db.execute(
                    "UPDATE leases SET released = ?, outcome = ? WHERE id = ?",
                    (now, why, last_lease.id),
                )
            host, pid = this_host(), os.getpid()
            cursor = db.execute(
                "INSERT INTO leases (config_hash, host, pid, started, heartbeat, expires)"
                " VALUES (?,?,?,?,?,?)",
                (config_hash, host, pid, now, now, now + timeout),
            )
            db.execute("COMMIT")
        lease = Lease(cursor.lastrowid, config_hash, host, pid, now, now, now + timeout)
        return Claim(lease=lease, last=last_lease)

    def heartbeat(self, lease: Lease, timeout: float) -> bool:
        """Extend a lease we hold; False when it was taken over (we stalled too long)."""
        now = time.time()
        with self._connect() as db:
            changed = db.execute(
                "UPDATE leases SET heartbeat = ?, expires = ? WHERE id = ? AND released IS NULL",
                (now, now + timeout, lease.id),
            ).rowcount
        return changed == 1

    def release(self, lease: Lease, outcome: str) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE leases SET released = ?, outcome = ? WHERE id = ? AND released IS NULL",
                (time.time(), outcome, lease.id),
            )

    def leases(self, config_hash: str | None = None, live: bool = False) -> list[Lease]:
        """Every lease (or the unreleased ones) in the order taken; of one cell if given."""
        terms = [*(["config_hash = ?"] if config_hash else []), *(["released IS NULL"] * live)]
        where = f"WHERE {' AND '.join(terms)}" if terms else ""
        args = (config_hash,) if config_hash else ()
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(f"SELECT * FROM leases {where} ORDER BY id", args).fetchall()
        return [Lease(**dict(r)) for r in rows]

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
                "INSERT INTO metrics (cell_id, task, metric, masks, value, resolution,"
                " num_images, protocol) VALUES (?,?,?,?,?,?,?,?)",
                [
                    (
                        row[0],
                        r["task"],
                        r["metric"],
                        r.get("masks"),
                        r["value"],
                        json.dumps(r.get("resolution")),
                        r.get("num_images", 0),
                        None if r.get("protocol") is None else json.dumps(r["protocol"]),
                    )
                    for r in records
                ],
            )
            db.execute("DELETE FROM per_image WHERE cell_id = ?", (row[0],))
            db.executemany(
                "INSERT INTO per_image (cell_id, task, metric, masks, image, value)"
                " VALUES (?,?,?,?,?,?)",
                (
                    (row[0], r["task"], r["metric"], r.get("masks"), i, _real(v))
                    for r in records
                    for i, v in enumerate(r.get("per_image") or ())
                ),
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

    def cells(self, grid: str | None = None, per_image: bool = False) -> list[Cell]:
        if grid:
            return self._select("WHERE grid = ?", (grid,), per_image)
        return self._select("", (), per_image)

    def get(self, config_hash: str, per_image: bool = False) -> Cell | None:
        found = self._select("WHERE config_hash = ?", (config_hash,), per_image)
        return found[0] if found else None

    def _select(self, where: str, args: tuple[Any, ...], per_image: bool = False) -> list[Cell]:
        """The cells matching `where`, with their metrics only (not the whole table's), and
        with `per_image` their per-image values."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            db.execute("BEGIN")  # one snapshot: a cell's status and its metrics agree
            rows = db.execute(f"SELECT * FROM cells {where} ORDER BY id", args).fetchall()
            metrics = db.execute(
                f"SELECT * FROM metrics WHERE cell_id IN (SELECT id FROM cells {where})", args
            ).fetchall()
            images = (
                db.execute(
                    "SELECT cell_id, task, metric, masks, value FROM per_image"
                    f" WHERE cell_id IN (SELECT id FROM cells {where})"
                    " ORDER BY cell_id, task, metric, masks, image",
                    args,
                ).fetchall()
                if per_image
                else []
            )
            db.execute("COMMIT")
        by_cell: dict[int, list[dict[str, Any]]] = {}
        for m in metrics:
            entry = dict(m)
            where_m = f"metric {entry['task']}/{entry['metric']} of cell id {entry['cell_id']}"
            entry["resolution"] = _stored_json(entry["resolution"], self.path, where_m)
            entry["protocol"] = _stored_json(entry["protocol"], self.path, where_m)
            by_cell.setdefault(entry.pop("cell_id"), []).append(entry)
        values = _group_images([tuple(r) for r in images])
        out = []
        for r in rows:
            d = dict(r)
            cid = d.pop("id")
            d["config"] = _stored_json(d["config"], self.path, f"cell {d['config_hash']}")
            d["plugins"] = _stored_json(d["plugins"], self.path, f"cell {d['config_hash']}")
            out.append(Cell(**d, metrics=by_cell.get(cid, []), per_image=values.get(cid, {})))
        return out


def _real(value: float | None) -> float | None:
    """NaN as NULL: what SQLite would store anyway, said here so reading maps it back."""
    return None if value is None or value != value else float(value)


def _group_images(
    rows: list[tuple[int, str, str, str | None, float | None]],
) -> dict[int, dict[tuple[str, str, str | None], np.ndarray]]:
    """Rows sorted by (cell, task, metric, masks, image) -> per cell, per metric, an array
    of values in image order (NULL read back as NaN)."""
    out: dict[int, dict[tuple[str, str, str | None], np.ndarray]] = {}
    for key, group in groupby(rows, key=lambda r: r[:4]):
        out.setdefault(key[0], {})[key[1:]] = np.array([r[4] for r in group], dtype=np.float64)
    return out
