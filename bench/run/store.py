"""The results database: an SQLite file (the default; WAL mode, safe with several writers on
one machine) or a PostgreSQL database (`postgresql://user@host/dbname`: many hosts, e.g. the
jobs of a Slurm grid). Both hold the same tables, with the same semantics; the SQL below is
shared, and store_sqlite.py / store_postgres.py adapt what differs (store_sql.py).

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
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np

from ocl_bench.api.errors import DataError, UserError
from ocl_bench.run.store_postgres import (
    SCHEMES,
    PostgresBackend,
    StoreUnavailable,
    is_postgres_url,
)
from ocl_bench.run.store_sql import (
    ADDED_COLUMNS,
    SCHEMA,
    SCHEMA_KEY,
    TABLES,
    Backend,
    Mode,
    Session,
    statements,
)
from ocl_bench.run.store_sqlite import SqliteBackend

__all__ = [
    "ADDED_COLUMNS",
    "SCHEMA",
    "STORE_ERRORS",
    "Cell",
    "Claim",
    "Lease",
    "ResultStore",
    "is_url",
    "store_exists",
    "this_host",
    "this_job",
]

# What a store operation may raise when the database is busy or away for a while (a lease
# heartbeat warns and tries again at its next beat).
STORE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, StoreUnavailable)


def is_url(target: str | Path | None) -> bool:
    """Whether a --db names a server (`scheme://...`) rather than an SQLite file."""
    return isinstance(target, str) and "://" in target


def store_exists(target: str | Path | None) -> bool:
    """Whether there may be results to read: an existing file, or any server URL (a server
    that cannot be reached says so when the store is opened)."""
    if target is None:
        return False
    return is_url(target) or Path(target).exists()


def open_backend(target: str | Path) -> Backend:
    """The backend a --db names: a postgresql:// URL or an SQLite file path."""
    if is_postgres_url(target):
        return PostgresBackend(str(target))
    if is_url(target):
        scheme = str(target).split("://", 1)[0]
        raise UserError(
            f"results database {target}: unknown scheme '{scheme}://'; use an SQLite file"
            f" path or {SCHEMES[0]}://user@host/dbname"
        )
    return SqliteBackend(Path(target))


def this_host() -> str:
    return socket.gethostname()


def this_job() -> str | None:
    """The Slurm job this process runs in (an array job's as JOB_TASK), or the job of
    submitit's local executor (as local:ID), if any."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    local = os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    return os.environ.get("SLURM_JOB_ID") or (f"local:{local}" if local else None)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has that pid (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# squeue's states of a job that is still queued, running or on its way back to the queue
# (https://slurm.schedmd.com/squeue.html#SECTION_JOB-STATE-CODES).
SLURM_LIVE_STATES = frozenset(
    {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED"}
    | {"REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}
)


def slurm_job_live(job: str) -> bool:
    """Whether Slurm still holds job `job` (queued, running or being requeued): False when
    squeue no longer lists it, names an ended state, or is not on this host (then only the
    heartbeat can tell)."""
    squeue = shutil.which("squeue")
    if squeue is None or not job or job.startswith("local:"):
        return False
    try:
        found = subprocess.run(
            [squeue, "--noheader", "--jobs", job, "--format", "%T"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = set(found.stdout.split()) if found.returncode == 0 else set()
    return bool(states & SLURM_LIVE_STATES)


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
    # What the heartbeat of the process training the cell last reported (None before it
    # did, or in a database older than these columns).
    job: str | None = None  # its Slurm job id
    step: int | None = None  # steps done
    steps: int | None = None  # of how many
    step_time: float | None = None  # recent wall seconds per step

    def holder(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {_when(self.started)}"

    def expired(self, now: float, job_live: Callable[[str], bool] = slurm_job_live) -> str | None:
        """Why this live lease no longer holds its cell, or None while it does. A lease of
        a submitit job (`job` set when it was submitted) outlives the grid process that
        took it: a new copy of the grid on that host must not take the cell while the job
        still trains it. Its heartbeat decides, and where squeue answers, a Slurm job that
        is still queued or being requeued holds the cell without one (`job_live` asks)."""
        if self.job is None and self.host == this_host() and not pid_alive(self.pid):
            return f"expired: pid {self.pid} on {self.host} is gone"
        if self.expires < now:
            if self.job is not None and job_live(self.job):
                return None
            return f"expired: no heartbeat from {self.holder()} after {_when(self.heartbeat)}"
        return None


def _last_lease(db: Session, config_hash: str) -> Lease | None:
    """The newest lease of a cell, released or not."""
    last = db.one(
        "SELECT * FROM leases WHERE config_hash = ? ORDER BY id DESC LIMIT 1", (config_hash,)
    )
    return Lease(**last) if last else None


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


def _stored_json(text: str | None, where: str, row: str) -> Any:
    """A JSON column's value; a damaged one fails in one line naming the store and the row."""
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise DataError(
            f"results database {where} is damaged: {row} holds invalid JSON {text[:40]!r}"
        ) from None


# The cells columns a Cell carries, in the order INSERT names them.
CELL_COLUMNS = (
    "config_hash",
    "grid",
    "label",
    "config",
    "plugins",
    "dataset",
    "split",
    "seed",
    "code_version",
    "run_dir",
    "status",
    "error",
    "started",
    "ended",
)


def insert_cell(db: Session, cell: Cell) -> int:
    """Insert a cell row as it is (status and times included); its id."""
    values = {**cell.__dict__, "config": json.dumps(cell.config)}
    values["plugins"] = json.dumps(cell.plugins)
    return db.insert(
        f"INSERT INTO cells ({', '.join(CELL_COLUMNS)})"
        f" VALUES ({', '.join('?' * len(CELL_COLUMNS))})",
        [values[c] for c in CELL_COLUMNS],
    )


def insert_metrics(db: Session, cell_id: int, records: list[dict[str, Any]]) -> None:
    """A cell's metric records (and their per-image values), replacing what it had."""
    db.run("DELETE FROM metrics WHERE cell_id = ?", (cell_id,))
    db.many(
        "INSERT INTO metrics (cell_id, task, metric, masks, value, resolution,"
        " num_images, protocol) VALUES (?,?,?,?,?,?,?,?)",
        [
            (
                cell_id,
                r["task"],
                r["metric"],
                r.get("masks"),
                _real(r["value"]),
                json.dumps(r.get("resolution")),
                r.get("num_images", 0),
                None if r.get("protocol") is None else json.dumps(r["protocol"]),
            )
            for r in records
        ],
    )
    db.run("DELETE FROM per_image WHERE cell_id = ?", (cell_id,))
    db.many(
        "INSERT INTO per_image (cell_id, task, metric, masks, image, value) VALUES (?,?,?,?,?,?)",
        [
            (cell_id, r["task"], r["metric"], r.get("masks"), i, _real(v))
            for r in records
            for i, v in enumerate(r.get("per_image") or ())
        ],
    )


class ResultStore:
    """Cells (one per resolved config) and their metrics, in an SQLite file or on a
    PostgreSQL server (`target`: a path, or a postgresql:// URL)."""

    def __init__(self, target: str | Path):
        self._backend = open_backend(target)
        self.where = self._backend.where  # the file, or the URL without its password
        self.target = target
        self._create()

    def close(self) -> None:
        """Close the store's connections (PostgreSQL; a dropped store closes them too)."""
        self._backend.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def session(self, mode: Mode, key: str | None = None) -> AbstractContextManager[Session]:
        """A Session inside a transaction (see store_sql.Mode): for copying stores."""
        return self._backend.session(mode, key)

    def _create(self) -> None:
        """Create the tables, or bring a database made by an older version up to SCHEMA,
        in one transaction (another process never sees half of them). The usual case, a
        database with everything, takes no write lock."""
        backend = self._backend

        def missing(db: Session) -> tuple[bool, list[tuple[str, str, str]]]:
            have = {t: backend.columns(db, t) for t in TABLES}
            absent = [(t, n, s) for t, cols in ADDED_COLUMNS.items() for n, s in cols.items()]
            late = [(t, n, s) for t, n, s in absent if have[t] and n not in have[t]]
            return not all(have.values()), late

        with backend.session("read") as db:
            tables, columns = missing(db)
        if not tables and not columns:
            return
        with backend.session("write", SCHEMA_KEY) as db:
            for statement in statements(backend.schema):
                db.run(statement)
            for table, name, sql_type in missing(db)[1]:
                db.run(f"ALTER TABLE {table} ADD COLUMN {name} {backend.sql_type(sql_type)}")

    @contextmanager
    def _write(self, config_hash: str) -> Iterator[Session]:
        with self._backend.session("write", config_hash) as db:
            yield db

    def claim(self, config_hash: str, timeout: float, failed_since: float | None = None) -> Claim:
        """Take the cell's lease unless it is complete, held by a live process, or (when
        `failed_since` is given) failed in another process since that time."""
        now = time.time()
        # squeue may take seconds: it is asked before the write lock, about the lease the
        # claim will find (one taken meanwhile is fresh and needs no answer).
        with self._backend.session("read") as db:
            seen = _last_lease(db, config_hash)
        queued = seen is not None and seen.released is None and seen.expires < now
        live = {seen.job} if queued and seen.job and slurm_job_live(seen.job) else set()
        with self._write(config_hash) as db:
            cell = db.one(
                "SELECT status, error, ended FROM cells WHERE config_hash = ?", (config_hash,)
            )
            last_lease = _last_lease(db, config_hash)
            finished = cell is not None and (
                cell["status"] == "complete"
                or (
                    cell["status"] == "failed"
                    and failed_since is not None
                    and (cell["ended"] or 0) >= failed_since
                )
            )
            if finished:
                return Claim(status=cell["status"], error=cell["error"], last=last_lease)
            if last_lease is not None and last_lease.released is None:
                why = last_lease.expired(now, job_live=live.__contains__)
                if why is None:
                    return Claim(holder=last_lease, last=last_lease)
                db.run(
                    "UPDATE leases SET released = ?, outcome = ? WHERE id = ?",
                    (now, why, last_lease.id),
                )
            host, pid, job = this_host(), os.getpid(), this_job()
            lease_id = db.insert(
                "INSERT INTO leases (config_hash, host, pid, started, heartbeat, expires, job)"
                " VALUES (?,?,?,?,?,?,?)",
                (config_hash, host, pid, now, now, now + timeout, job),
            )
        lease = Lease(lease_id, config_hash, host, pid, now, now, now + timeout, job=job)
        return Claim(lease=lease, last=last_lease)

    def heartbeat(
        self,
        lease: Lease,
        timeout: float,
        step: int | None = None,
        steps: int | None = None,
        step_time: float | None = None,
    ) -> bool:
        """Extend a lease we hold, with the training's progress when given (the process
        that reports it also records its Slurm job); False when the lease was taken over
        (we stalled too long). A beat without progress leaves the last one standing."""
        now = time.time()
        job = this_job() if step is not None else None
        with self._backend.session("auto") as db:
            changed = db.run(
                "UPDATE leases SET heartbeat = ?, expires = ?, job = COALESCE(?, job),"
                " step = COALESCE(?, step), steps = COALESCE(?, steps),"
                " step_time = COALESCE(?, step_time) WHERE id = ? AND released IS NULL",
                (now, now + timeout, job, step, steps, step_time, lease.id),
            )
        return changed == 1

    def assign_job(self, lease: Lease, job: str) -> None:
        """Record the submitit job that will run a leased cell, as soon as it is submitted:
        the lease then outlives the grid process that took it (Lease.expired)."""
        with self._backend.session("auto") as db:
            db.run("UPDATE leases SET job = ? WHERE id = ? AND released IS NULL", (job, lease.id))
        lease.job = job

    def release(self, lease: Lease, outcome: str) -> None:
        with self._backend.session("auto") as db:
            db.run(
                "UPDATE leases SET released = ?, outcome = ? WHERE id = ? AND released IS NULL",
                (time.time(), outcome, lease.id),
            )

    def leases(self, config_hash: str | None = None, live: bool = False) -> list[Lease]:
        """Every lease (or the unreleased ones) in the order taken; of one cell if given."""
        terms = [*(["config_hash = ?"] if config_hash else []), *(["released IS NULL"] * live)]
        where = f"WHERE {' AND '.join(terms)}" if terms else ""
        args = (config_hash,) if config_hash else ()
        with self._backend.session("auto") as db:
            rows = db.rows(f"SELECT * FROM leases {where} ORDER BY id", args)
        return [Lease(**r) for r in rows]

    def start(self, cell: Cell) -> None:
        """Mark a cell running (a failed or interrupted earlier attempt is replaced)."""
        with self._write(cell.config_hash) as db:
            db.run(
                "DELETE FROM cells WHERE config_hash = ? AND status != 'complete'",
                (cell.config_hash,),
            )
            if db.one("SELECT id FROM cells WHERE config_hash = ?", (cell.config_hash,)):
                return  # complete already: kept
            fresh = {"status": "running", "error": None, "started": time.time(), "ended": None}
            insert_cell(db, Cell(**{**cell.__dict__, **fresh}))

    def complete(self, config_hash: str, records: list[dict[str, Any]]) -> None:
        """Store every metric and mark the cell complete, atomically."""
        with self._write(config_hash) as db:
            row = db.one("SELECT id FROM cells WHERE config_hash = ?", (config_hash,))
            if row is None:
                raise KeyError(f"no cell with config hash {config_hash}")
            insert_metrics(db, row["id"], records)
            db.run(
                "UPDATE cells SET status='complete', error=NULL, ended=? WHERE id=?",
                (time.time(), row["id"]),
            )

    def fail(self, config_hash: str, error: str) -> None:
        with self._backend.session("auto") as db:
            db.run(
                "UPDATE cells SET status='failed', error=?, ended=? WHERE config_hash=?",
                (error, time.time(), config_hash),
            )

    def states(self) -> dict[str, dict[str, Any]]:
        """config hash -> the cell's grid, label, status and end time: what progress
        displays poll (without the metrics `cells()` reads)."""
        with self._backend.session("auto") as db:
            rows = db.rows("SELECT config_hash, grid, label, status, ended FROM cells")
        return {r.pop("config_hash"): r for r in rows}

    def status(self, config_hash: str) -> str | None:
        with self._backend.session("auto") as db:
            row = db.one("SELECT status FROM cells WHERE config_hash=?", (config_hash,))
        return row["status"] if row else None

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
        cells = f"SELECT id FROM cells {where}"
        with self._backend.session("read") as db:  # one snapshot: status and metrics agree
            rows = db.rows(f"SELECT * FROM cells {where} ORDER BY id", args)
            metrics = db.rows(f"SELECT * FROM metrics WHERE cell_id IN ({cells})", args)
            images = (
                db.rows(
                    "SELECT cell_id, task, metric, masks, value FROM per_image"
                    f" WHERE cell_id IN ({cells}) ORDER BY cell_id, task, metric, masks, image",
                    args,
                )
                if per_image
                else []
            )
        by_cell: dict[int, list[dict[str, Any]]] = {}
        for entry in metrics:
            where_m = f"metric {entry['task']}/{entry['metric']} of cell id {entry['cell_id']}"
            entry["resolution"] = _stored_json(entry["resolution"], self.where, where_m)
            entry["protocol"] = _stored_json(entry["protocol"], self.where, where_m)
            by_cell.setdefault(entry.pop("cell_id"), []).append(entry)
        values = _group_images([tuple(r.values()) for r in images])
        out = []
        for d in rows:
            cid = d.pop("id")
            d["config"] = _stored_json(d["config"], self.where, f"cell {d['config_hash']}")
            d["plugins"] = _stored_json(d["plugins"], self.where, f"cell {d['config_hash']}")
            out.append(Cell(**d, metrics=by_cell.get(cid, []), per_image=values.get(cid, {})))
        return out


def _real(value: float | None) -> float | None:
    """NaN as NULL: what SQLite stores anyway (PostgreSQL would keep a NaN), said here so
    both backends read it back the same."""
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
