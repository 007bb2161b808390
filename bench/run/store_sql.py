"""What the two results-store backends (SQLite, PostgreSQL) share: the schema, and the small
interface through which ResultStore (store.py) runs its SQL on either.

The SQL is written once, in the spelling both accept, with `?` placeholders; a backend
(store_sqlite.py, store_postgres.py) adapts only what differs: placeholders, column types,
how a transaction excludes other writers, new row ids, and how it lists tables and columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

# SQLite's spelling; store_postgres.postgres_schema() turns it into PostgreSQL's.
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
    outcome TEXT,
    job TEXT,
    step INTEGER,
    steps INTEGER,
    step_time REAL
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

# Columns added after a database may have been created, with their (SQLite) type. A lease's
# progress (the Slurm job, the step reached of how many, seconds per step) comes with its
# heartbeat, for `ocl-bench status` and a grid's progress display.
ADDED_COLUMNS: dict[str, dict[str, str]] = {
    "metrics": {"protocol": "TEXT"},
    "leases": {"job": "TEXT", "step": "INTEGER", "steps": "INTEGER", "step_time": "REAL"},
}

# The tables a results database must have (the others are added when missing).
REQUIRED_TABLES = ("cells", "metrics")
TABLES = ("cells", "metrics", "leases", "per_image")

# The lock key of transactions that change the schema (cells lock their config hash).
SCHEMA_KEY = "ocl-bench schema"

# "read": one consistent snapshot; "write": a transaction no other writer of the same key
# interleaves with (SQLite: no other writer at all); "auto": each statement on its own.
Mode = Literal["read", "write", "auto"]


def statements(schema: str) -> list[str]:
    """The schema's statements one by one (neither backend runs a script with parameters)."""
    return [s.strip() for s in schema.split(";") if s.strip()]


class Session(Protocol):
    """One connection's statements, rows as dicts; SQL uses `?` placeholders."""

    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    def one(self, sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None: ...

    def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run a statement; the number of rows it changed."""
        ...

    def many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def insert(self, sql: str, args: Sequence[Any]) -> int:
        """Run an INSERT of one row; the new row's id."""
        ...


class Backend(Protocol):
    """Where a ResultStore keeps its tables."""

    where: str  # the file, or the URL without its password: what messages name
    schema: str  # SCHEMA in this backend's types

    def session(self, mode: Mode, key: str | None = None) -> AbstractContextManager[Session]:
        """A connection inside a transaction of `mode`; a write one excludes other writers
        of `key` (a cell's config hash; None: every writer)."""
        ...

    def columns(self, db: Session, table: str) -> set[str]:
        """The columns `table` has (empty when there is no such table)."""
        ...

    def sql_type(self, sqlite_type: str) -> str: ...

    def close(self) -> None: ...


def missing_parts(found: dict[str, set[str]], expected: dict[str, set[str]]) -> list[str]:
    """What a database lacks of the required tables' columns (columns added later do not
    count: opening adds them), e.g. ["table metrics", "cells.config"]."""
    missing: list[str] = []
    for table in REQUIRED_TABLES:
        late = set(ADDED_COLUMNS.get(table, {}))
        if not found.get(table):
            missing.append(f"table {table}")
        else:
            missing += [f"{table}.{c}" for c in sorted(expected[table] - found[table] - late)]
    return missing


def expected_columns() -> dict[str, set[str]]:
    """Each table's columns as SCHEMA (and ADDED_COLUMNS) declare them."""
    out: dict[str, set[str]] = {}
    for statement in statements(SCHEMA):
        words = statement.split()
        if words[:2] != ["CREATE", "TABLE"]:
            continue
        table = words[5]
        body = statement[statement.index("(") + 1 : statement.rindex(")")]
        names = {line.split()[0] for line in body.splitlines() if line.strip()}
        out[table] = {n for n in names if n not in ("UNIQUE", "CHECK")}
        out[table] |= set(ADDED_COLUMNS.get(table, {}))
    return out
