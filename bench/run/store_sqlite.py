"""The results store in one SQLite file (WAL mode): the embedded default backend.

Safe with several writers on one machine: a write transaction starts with BEGIN IMMEDIATE,
which takes SQLite's one write lock before it reads anything, so a transaction's reads and
writes see no other writer in between. WAL needs memory shared by every process that opens
the file, which a network filesystem cannot give (SQLite's own documentation): a path on
one is refused, pointing at the PostgreSQL backend instead.

A file that is not a results database (another program's SQLite file, random bytes, a
truncated copy) is refused in one line before SQLite writes anything into it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ocl_bench.api.errors import DataError
from ocl_bench.run.store_sql import (
    SCHEMA,
    TABLES,
    Mode,
    expected_columns,
    missing_parts,
)

SQLITE_HEADER = b"SQLite format 3\x00"

# What sqlite says when the file itself is bad (not when a query is): these become one line
# naming the file; anything else (locks, constraint violations) is left to the caller.
_BAD_FILE = ("not a database", "malformed", "unable to open", "disk i/o", "readonly", "encrypted")

# Where the kernel lists mounted filesystems; tests point it at a file of their own.
MOUNTS = Path("/proc/mounts")

# Filesystem types (as /proc/mounts names them) that share a file between machines: SQLite's
# locks and WAL's shared memory do not work across those.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "lustre",
        "gpfs",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "fuse.ceph",
        "cephfs",
        "beegfs",
        "fuse.sshfs",
        "sshfs",
        "glusterfs",
        "fuse.glusterfs",
        "afs",
        "openafs",
        "9p",
        "panfs",
        "wekafs",
        "pvfs2",
        "orangefs",
        "quobyte",
        "fuse.quobyte",
        "davfs",
        "fuse.davfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.rclone",
        "fuse.juicefs",
        "gfs2",
        "ocfs2",
    }
)


def _unescape(field: str) -> str:
    r"""/proc/mounts writes space, tab, newline and backslash in paths as \040 and so on."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_of(path: Path, mounts: Path | None = None) -> tuple[str, str] | None:
    """(filesystem type, mount point) of the mount holding `path` (which may not exist
    yet), from `mounts` (default MOUNTS); None when that file cannot be read."""
    try:
        lines = (mounts or MOUNTS).read_text().splitlines()
    except OSError:
        return None  # not Linux: nothing to check against
    target = path.resolve()
    best: tuple[str, str] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1])
        if target.is_relative_to(point) and (best is None or len(point) >= len(best[1])):
            best = (fields[2], point)  # the last of equal mount points is the one on top
    return best


def refuse_network_filesystem(path: Path) -> None:
    """One line instead of a database that loses or duplicates cells on a shared disk."""
    found = filesystem_of(path)
    if found is None or found[0].lower() not in NETWORK_FILESYSTEMS:
        return
    kind, point = found
    raise DataError(
        f"results database {path} is on a network filesystem ({kind} at {point}), where"
        " SQLite's locking does not work (lost or duplicated cells, corrupt files); use a"
        " PostgreSQL server: --db postgresql://user@host/dbname (or $OCL_BENCH_DB), or"
        " a --db on a local disk"
    )


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


def _unreadable(path: Path, err: sqlite3.Error) -> DataError:
    return DataError(
        f"results database {path} cannot be used ({err}); expected an SQLite file written by"
        " `ocl-bench grid` (pass another --db, or move this file away to start a new one)"
    )


def _absent_sidecars(path: Path) -> list[Path]:
    """The -wal/-shm files sqlite would create beside `path` that do not exist yet."""
    return [p for p in (Path(f"{path}-wal"), Path(f"{path}-shm")) if not p.exists()]


def _remove(paths: list[Path]) -> None:
    """Leave a refused database's folder as it was (sqlite made these to read a WAL file)."""
    for p in paths:
        p.unlink(missing_ok=True)


def _read_header(path: Path) -> bytes | None:
    """The file's first bytes; None for a new (absent or empty) database."""
    if path.is_dir():
        raise DataError(f"results database {path} is a directory; expected an SQLite file")
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        with path.open("rb") as f:
            return f.read(len(SQLITE_HEADER))
    except OSError as err:
        raise DataError(f"results database {path} cannot be read: {err.strerror}") from None


def _found_columns(path: Path) -> dict[str, set[str]]:
    """table -> columns of an existing file (of our tables; others map to nothing), read
    without writing to it."""
    fresh = _absent_sidecars(path)
    try:
        found = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            listed = found.execute("SELECT name FROM sqlite_master WHERE type='table'")
            names = [r[0] for r in listed]
            # another program's tables: named, not looked into
            ours = {t for t in names if t in TABLES}
            return {
                t: {r[1] for r in found.execute(f"PRAGMA table_info({t})")} if t in ours else set()
                for t in names
            }
        finally:
            found.close()
    except sqlite3.DatabaseError as err:
        _remove(fresh)
        raise _unreadable(path, err) from None


def check_file(path: Path) -> None:
    """Refuse, before sqlite writes anything into it, a file that is not a results database.

    Opening would otherwise add our tables to any other SQLite file, and print a traceback
    for a file of random bytes."""
    header = _read_header(path)
    if header is None:
        return  # a new database
    if header != SQLITE_HEADER:
        raise DataError(
            f"results database {path} is not an SQLite file (corrupt, or another kind of file);"
            " expected one written by `ocl-bench grid`"
        )
    found = _found_columns(path)
    if not found:
        return
    missing = missing_parts({t: c for t, c in found.items() if c}, expected_columns())
    if missing:
        raise DataError(
            f"results database {path} is an SQLite file but not an ocl-bench results database"
            f" (missing {', '.join(missing)}; tables found: {', '.join(sorted(found))})"
        )


class SqliteSession:
    """A Session on one sqlite3 connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql, tuple(args))]

    def one(self, sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None:
        row = self.conn.execute(sql, tuple(args)).fetchone()
        return None if row is None else dict(row)

    def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, tuple(args)).rowcount

    def many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    def insert(self, sql: str, args: Sequence[Any]) -> int:
        return int(self.conn.execute(sql, tuple(args)).lastrowid or 0)


class SqliteBackend:
    """A results database in one SQLite file."""

    schema = SCHEMA

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        refuse_network_filesystem(path)
        check_file(path)
        path.parent.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def session(self, mode: Mode, key: str | None = None) -> Iterator[SqliteSession]:
        with self._connect() as conn:
            if mode == "auto":
                yield SqliteSession(conn)
                return
            # IMMEDIATE takes the write lock before the first read (a DEFERRED transaction
            # would fail with "database is locked" when it later tries to write).
            conn.execute("BEGIN IMMEDIATE" if mode == "write" else "BEGIN")
            try:
                yield SqliteSession(conn)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        fresh = _absent_sidecars(self.path)
        try:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        except sqlite3.Error as err:
            raise _unreadable(self.path, err) from None
        db.row_factory = sqlite3.Row
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

    def columns(self, db: SqliteSession, table: str) -> set[str]:
        assert table in TABLES
        return {r["name"] for r in db.rows(f"PRAGMA table_info({table})")}

    def sql_type(self, sqlite_type: str) -> str:
        return sqlite_type

    def close(self) -> None:
        """Nothing to close: every session opens and closes its own connection."""
