"""Shared fixtures: a tiny run config that trains in seconds on a CPU; results stores on
both backends (an SQLite file, a PostgreSQL database)."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

TINY = [
    "dataset.image_size=32",
    "dataset.train_size=256",
    "dataset.val_size=32",
    "encoder.channels=16",
    "encoder.patch_size=4",
    "encoder.dim=32",
    "grouping.num_slots=4",
    "grouping.slot_dim=32",
    "grouping.mlp_hidden=64",
    "decoder.hidden=32",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.checkpoint_every=3",
    "train.threads=1",
    "eval.num_images=16",
    "eval.batch_size=8",
    "eval.figure_images=2",
    "tasks.property_prediction.train_images=32",
    "tasks.property_prediction.steps=20",
]


# The smallest default-config model (no training settings): composition and decoder tests.
TINY_MODEL = [
    "dataset.image_size=32",
    "encoder.channels=8",
    "encoder.patch_size=4",
    "encoder.dim=16",
    "grouping.num_slots=3",
    "grouping.slot_dim=16",
    "grouping.mlp_hidden=16",
]


def write_old_store(db: Path | str, schema: str) -> None:
    """A results database made with an older `schema` (SQLite's spelling), holding one
    complete cell 'old' with FG-ARI 0.25: what migration tests open with today's ResultStore.
    `db`: an SQLite path or a PostgreSQL URL (the schema translated to its types)."""
    if isinstance(db, str):
        from ocl_bench.run.store_postgres import postgres_schema

        schema = postgres_schema(schema)
    for statement in (s for s in schema.split(";") if s.strip()):
        execute(db, statement)
    execute(
        db,
        "INSERT INTO cells (config_hash, config, plugins, dataset, split, seed, status)"
        " VALUES ('old', '{}', '{}', 'shapes', 'val', 0, 'complete')",
    )  # the first id on both backends: 1
    execute(
        db,
        "INSERT INTO metrics (cell_id, task, metric, masks, value, resolution, num_images)"
        " VALUES (1, 'object_discovery', 'fg_ari', 'decoder', 0.25, '[32, 32]', 16)",
    )


def execute(db: Path | str, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
    """Run one statement on a store behind ResultStore's back (as another program, or an
    older version, would have written it): `?` placeholders on both backends; its rows."""
    if isinstance(db, str):
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            cur = conn.execute(sql.replace("?", "%s"), tuple(args))
            return cur.fetchall() if cur.description else []
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, tuple(args)).fetchall()


# A PostgreSQL database whose role may create schemas (.ci/postgres starts a server and prints
# one); without it the PostgreSQL half of the store tests skips, unless REQUIRE_POSTGRES is
# set (as CI does), which makes it fail.
POSTGRES_URL = "OCL_BENCH_TEST_POSTGRES"
REQUIRE_POSTGRES = "OCL_BENCH_REQUIRE_POSTGRES"


def _no_postgres(reason: str) -> None:
    if os.environ.get(REQUIRE_POSTGRES) == "1":
        pytest.fail(f"{reason} ({REQUIRE_POSTGRES}=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def store_url() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL results store: a schema of its own in the server's
    database, dropped afterwards (the same isolation as a database per test, for ~10 ms
    instead of the ~1 s checkpoint that CREATE/DROP DATABASE costs)."""
    url = os.environ.get(POSTGRES_URL)
    if not url:
        _no_postgres(f"no PostgreSQL server: set {POSTGRES_URL} (.ci/postgres prints one)")
    try:
        import psycopg
    except ImportError:
        _no_postgres("psycopg is not installed: pip install -e '.[test]'")
    name = f"test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f"CREATE SCHEMA {name}")
    except psycopg.Error as err:
        _no_postgres(f"no PostgreSQL server at {POSTGRES_URL}: {' '.join(str(err).split())}")
    yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{name}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture(params=["sqlite", "postgres"])
def store_db(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """A new results store on each backend: an SQLite path, then a PostgreSQL URL."""
    if request.param == "sqlite":
        return tmp_path / "r.sqlite"
    return request.getfixturevalue("store_url")


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)
