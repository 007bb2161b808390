"""What differs between the results-store backends: SQLite refused on a network filesystem,
PostgreSQL's URL errors in one line, and copying a store from one backend to the other."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ocl_bench.api.errors import DataError, UserError
from ocl_bench.cli import main
from ocl_bench.run import store_sqlite
from ocl_bench.run.store import Cell, ResultStore, this_host
from ocl_bench.run.store_copy import copy_store
from ocl_bench.run.store_postgres import redacted
from tests.conftest import execute

MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
/dev/sda1 / ext4 rw,relatime 0 0
server:/export/home {home} nfs4 rw,relatime,vers=4.2 0 0
/dev/sdb1 {home}/scratch xfs rw,relatime 0 0
mds@tcp:/lab {lab}\\040results lustre rw,flock 0 0
"""


@pytest.fixture
def mounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake /proc/mounts: tmp_path/home on NFS, its scratch/ on a local disk again, and
    'tmp_path/lab results' (a space in the mount point) on Lustre."""
    fake = tmp_path / "mounts"
    fake.write_text(MOUNTS.format(home=tmp_path / "home", lab=tmp_path / "lab"))
    monkeypatch.setattr(store_sqlite, "MOUNTS", fake)
    return fake


def test_the_mount_holding_a_path_is_the_longest_mount_point_above_it(
    tmp_path: Path, mounts: Path
) -> None:
    home = tmp_path / "home"
    assert store_sqlite.filesystem_of(home / "runs" / "r.sqlite") == ("nfs4", str(home))
    assert store_sqlite.filesystem_of(home / "scratch" / "r.sqlite")[0] == "xfs"
    assert store_sqlite.filesystem_of(tmp_path / "lab results" / "r.sqlite") == (
        "lustre",
        str(tmp_path / "lab results"),
    )
    assert store_sqlite.filesystem_of(tmp_path / "elsewhere.sqlite")[0] == "ext4"
    assert store_sqlite.filesystem_of(home, tmp_path / "absent") is None  # no mounts file


@pytest.mark.parametrize("where", ["home/runs/r.sqlite", "lab results/r.sqlite"])
def test_an_sqlite_file_on_a_network_filesystem_is_refused(
    tmp_path: Path, mounts: Path, where: str
) -> None:
    path = tmp_path / where
    with pytest.raises(DataError) as err:
        ResultStore(path)
    kind = "nfs4" if where.startswith("home") else "lustre"
    assert f"network filesystem ({kind} at " in str(err.value)
    assert "--db postgresql://" in str(err.value)
    assert not path.parent.exists()  # nothing written
    ResultStore(tmp_path / "home" / "scratch" / "r.sqlite")  # a local disk inside it is fine


def test_the_cli_refuses_a_network_filesystem_in_one_line(
    tmp_path: Path, mounts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "home" / "r.sqlite")
    assert main(["grid", "--db", db, "--runs", str(tmp_path / "runs"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ocl-bench: error: results database") and "\n" not in err
    assert "nfs4" in err and "postgresql://" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("mysql://me@db.example/results", "unknown scheme 'mysql://'"),
        ("postgresql://me:secret@127.0.0.1:1/results", "Connection refused"),
        ("postgresql://me@127.0.0.1:notaport/results", "invalid integer value"),
    ],
)
def test_a_bad_or_unreachable_url_fails_in_one_line_without_its_password(
    url: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("psycopg")
    assert main(["results", "--db", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ocl-bench: error: results database") and "\n" not in err
    assert needle in err
    assert "secret" not in err and redacted(url) in err


def test_without_psycopg_a_postgresql_url_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` raises ImportError
    assert main(["results", "--db", "postgresql://me@localhost/results"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs psycopg 3" in err and "ocl-bench[postgres]" in err and "\n" not in err


def test_the_db_comes_from_the_environment_when_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "lab.sqlite"
    _fill(ResultStore(db))
    monkeypatch.setenv("OCL_BENCH_DB", str(db))
    assert main(["results"]) == 0
    assert "done-0" in capsys.readouterr().out


def test_another_programs_tables_in_a_postgresql_database_are_refused(store_url: str) -> None:
    execute(store_url, "CREATE TABLE cells (id INTEGER, name TEXT)")
    with pytest.raises(DataError, match=r"not an ocl-bench results database's \(missing cells"):
        ResultStore(store_url)


def test_a_search_path_naming_no_schema_is_refused(store_url: str) -> None:
    url = store_url.replace("search_path%3D", "search_path%3Dnowhere_")
    with pytest.raises(DataError, match="no schema to create the tables in"):
        ResultStore(url)


# ------------------------------------------------------------------ copying between stores


def _cell(digest: str, status: str = "running") -> Cell:
    return Cell(
        digest, {"seed": 0, "d": digest}, {"encoder.cnn": "ocl-bench 0"}, "shapes", "val", 0, status
    )


def _record(value: float, images: list[float] | None = None) -> dict:
    return {
        "task": "object_discovery",
        "metric": "fg_ari",
        "masks": "decoder",
        "value": value,
        "resolution": [32, 32],
        "num_images": 3,
        "protocol": {"images": 3},
        "per_image": images,
    }


def _fill(store: ResultStore) -> None:
    """Two complete cells (one with per-image values), a failed one, a live lease."""
    for i, images in enumerate(([0.25, float("nan"), 0.75], None)):
        lease = store.claim(f"done-{i}", timeout=60).lease
        store.start(_cell(f"done-{i}"))
        store.complete(f"done-{i}", [_record(0.5 + i, images)])
        store.release(lease, "complete")
    store.start(_cell("failed"))
    store.fail("failed", "RuntimeError: out of memory")
    store.claim("running", timeout=60)  # this process holds it: live


def _snapshot(store: ResultStore) -> dict:
    """What a copy must carry, without the ids each store assigns."""
    cells = {}
    for cell in store.cells(per_image=True):
        d = dict(cell.__dict__)
        # NaN (a skipped image) as None: NaN != NaN would make equal copies differ
        d["per_image"] = {
            k: [None if x != x else x for x in v.tolist()] for k, v in cell.per_image.items()
        }
        cells[cell.config_hash] = d
    leases = [
        {k: v for k, v in lease.__dict__.items() if k != "id"}
        for lease in store.leases()
        if lease.released is not None
    ]
    return {"cells": cells, "leases": leases}


@pytest.mark.parametrize("direction", ["sqlite->postgres", "postgres->sqlite", "sqlite->sqlite"])
def test_a_store_copies_to_the_other_backend_and_a_rerun_copies_nothing(
    tmp_path: Path, request: pytest.FixtureRequest, direction: str
) -> None:
    def target(kind: str, name: str) -> Path | str:
        return (
            tmp_path / f"{name}.sqlite"
            if kind == "sqlite"
            else request.getfixturevalue("store_url")
        )

    kinds = direction.split("->")
    a, b = ResultStore(target(kinds[0], "a")), ResultStore(target(kinds[1], "b"))
    _fill(a)
    report = copy_store(a, b)
    assert (report.copied, report.replaced, report.kept, report.leases, report.live) == (
        3,
        0,
        0,
        2,
        1,
    )
    assert _snapshot(b) == _snapshot(a)
    values = b.get("done-0", per_image=True).image_values("object_discovery", "fg_ari")
    np.testing.assert_array_equal(values, [0.25, np.nan, 0.75])
    assert b.leases(live=True) == []  # the live lease stays with the process that holds it
    again = copy_store(a, b)
    assert (again.copied, again.replaced, again.kept, again.leases) == (0, 0, 3, 0)
    assert _snapshot(b) == _snapshot(a)


def test_a_copy_keeps_complete_cells_and_replaces_failed_ones(tmp_path: Path) -> None:
    a, b = ResultStore(tmp_path / "a.sqlite"), ResultStore(tmp_path / "b.sqlite")
    _fill(a)
    b.start(_cell("done-0"))
    b.fail("done-0", "RuntimeError: here it failed")  # complete in A: replaced
    b.start(_cell("done-1"))
    b.complete("done-1", [_record(0.9)])  # complete in both: B's own result stays
    report = copy_store(a, b)
    assert (report.copied, report.replaced, report.kept) == (1, 1, 1)
    assert b.get("done-0").status == "complete" and b.get("done-0").value(
        "object_discovery", "fg_ari"
    ) == pytest.approx(0.5)
    assert b.get("done-1").value("object_discovery", "fg_ari") == pytest.approx(0.9)
    assert b.get("failed").error == "RuntimeError: out of memory"


def test_results_export_prints_what_it_copied_and_refuses_its_own_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = tmp_path / "a.sqlite"
    _fill(ResultStore(a))
    assert main(["results", "--db", str(a), "--export", str(tmp_path / "b.sqlite")]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"{a} -> {tmp_path / 'b.sqlite'}: 3 cells copied, 0 replaced")
    assert "1 live leases not copied" in out
    assert main(["results", "--db", str(a), "--export", str(a)]) == 2
    assert "names the store it reads" in capsys.readouterr().err
    with pytest.raises(UserError, match="names the store it reads"):
        copy_store(ResultStore(a), ResultStore(tmp_path / "." / "a.sqlite"))


def test_claims_on_another_host_are_kept_by_a_copy(tmp_path: Path) -> None:
    a, b = ResultStore(tmp_path / "a.sqlite"), ResultStore(tmp_path / "b.sqlite")
    execute(
        a.target,
        "INSERT INTO leases (config_hash, host, pid, started, heartbeat, expires, released,"
        " outcome) VALUES ('x', 'node7', 4242, 1.5, 2.5, 3.5, 4.5, 'complete')",
    )
    copy_store(a, b)
    (lease,) = b.leases()
    assert (lease.host, lease.pid, lease.started, lease.released) == ("node7", 4242, 1.5, 4.5)
    assert lease.host != this_host()
