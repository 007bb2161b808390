"""Grid expansion, the results store, resuming a killed grid, leaderboard rendering."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ocl_bench.api.errors import ConfigError, DataError
from ocl_bench.report.leaderboard import load_leaderboard
from ocl_bench.report.render import render
from ocl_bench.run.grid import _Heartbeat, load_grid, run_cell, run_grid, status_detail
from ocl_bench.run.store import SCHEMA, Cell, ResultStore, this_host
from tests.conftest import TINY as ALL_TINY
from tests.conftest import execute, write_old_store

# The grids below choose their own tasks.
TINY = [o for o in ALL_TINY if not o.startswith("tasks.")]


def write_grid(path: Path, steps: int = 2, extra: str = "") -> Path:
    path.write_text(
        f"""
name = "tiny"
columns = ["fg_ari", "mbo_i"]
[base]
tasks = {{ object_discovery = {{}} }}
[base.train]
steps = {steps}
[axes]
"grouping.num_slots" = [3, 4]
"grouping.init" = ["shared_gaussian", "learned_queries"]
[[exclude]]
"grouping.num_slots" = 4
"grouping.init" = "learned_queries"
{extra}
"""
    )
    return path  # the TINY overrides are passed alongside, as on the command line


def test_grid_expands_cross_product_minus_excludes(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path / "g.toml"), TINY)
    labels = [c.label for c in grid.cells]
    assert len(labels) == 3
    assert "grouping.num_slots=4, grouping.init=learned_queries" not in labels
    assert len({c.config.digest() for c in grid.cells}) == 3
    assert [t.name for t in grid.cells[0].config.tasks] == ["object_discovery"]
    assert grid.cells[0].config.train.steps == 2


def test_unknown_grid_key_and_bad_axis_are_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('nme = "x"\n[axes]\n"grouping.num_slots" = [3]\n')
    with pytest.raises(ConfigError, match="nme"):
        load_grid(bad)
    bad.write_text('[axes]\n"grouping.num_slots" = 3\n')
    with pytest.raises(ConfigError, match="non-empty list"):
        load_grid(bad)
    bad.write_text('[axes]\n"grouping.num_slotz" = [3]\n')
    with pytest.raises(ConfigError, match="grouping.num_slotz"):
        load_grid(bad)


def test_store_roundtrip_and_atomic_completion(store_db: Path | str) -> None:
    store = ResultStore(store_db)
    cell = Cell(
        "abc", {"seed": 0}, {"encoder.cnn": "ocl-bench 0.1.0"}, "shapes", "val", 0, "running"
    )
    store.start(cell)
    assert store.status("abc") == "running"
    records = [
        {
            "task": "object_discovery",
            "metric": "fg_ari",
            "masks": "decoder",
            "value": 0.5,
            "resolution": [64, 64],
            "num_images": 10,
        },
    ]
    store.complete("abc", records)
    got = store.get("abc")
    assert got.status == "complete" and got.value("object_discovery", "fg_ari", "decoder") == 0.5
    assert got.metrics[0]["resolution"] == [64, 64] and got.metrics[0]["num_images"] == 10
    # A bad record rolls the whole completion back: status and metrics stay as they were.
    store.start(Cell("def", {}, {}, "shapes", "val", 0, "running"))
    with pytest.raises(KeyError):
        store.complete("def", [{"metric": "no task key", "value": 1.0}])
    assert store.status("def") == "running"
    assert store.get("def").metrics == []
    if isinstance(store_db, Path):
        with sqlite3.connect(store_db) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_grid_runs_skips_completed_and_records_failures(
    tmp_path: Path, store_db: Path | str
) -> None:
    path = write_grid(tmp_path / "g.toml")
    grid = load_grid(path, TINY)
    db, runs = store_db, tmp_path / "runs"
    # Make one cell fail: an unreadable checkpoint directory in its run dir.
    failing = grid.cells[1].config.digest()
    (runs / failing / "checkpoint").mkdir(parents=True)
    (runs / failing / "checkpoint" / "COMPLETE").write_text("1")
    (runs / failing / "checkpoint" / "model.safetensors").write_bytes(b"junk")
    (runs / failing / "config.toml").write_text(grid.cells[1].config.to_toml())
    statuses = run_grid(grid, db, runs, progress=False)
    assert list(statuses.values()).count("failed") == 1
    store = ResultStore(db)
    failed = store.get(failing)
    assert failed.status == "failed" and "model.safetensors" in failed.error
    # rerun: complete cells are skipped, the failed one is retried (and fails again)
    again = run_grid(grid, db, runs, progress=False)
    assert list(again.values()).count("complete (stored)") == 2
    assert len(store.cells()) == 3
    board = load_leaderboard(path, db, overrides=TINY)
    measured = [r for r in board.rows if r.missing is None]
    assert len(measured) == 2
    assert all(0.0 <= r.measured["fg_ari"] <= 100.0 for r in measured)
    md = render(board, "md")
    assert "failed" in md and board.rows[0].label in md
    assert json.loads(render(board, "json"))["rows"][0]["label"] == board.rows[0].label
    html = render(board, "html")
    charts = html.count('<img class="chart"')  # one per measured column, beside the figures
    assert html.count("<img") - charts == 2 and charts >= 1 and "<table>" in html


def test_grid_killed_during_second_cell_ends_with_one_row_per_cell(
    tmp_path: Path, store_db: Path | str
) -> None:
    path = write_grid(tmp_path / "g.toml", steps=8)
    db, runs = store_db, tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "ocl_bench.cli",
        "grid",
        str(path),
        *TINY,
        "train.steps=8",
        "train.checkpoint_every=2",
        "--db",
        str(db),
        "--runs",
        str(runs),
        "-q",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if isinstance(db, str) or db.exists():
            try:
                cells = ResultStore(db).cells()
            except (sqlite3.OperationalError, DataError):  # the grid may be creating it
                cells = []
            if sum(c.status == "complete" for c in cells) == 1 and any(
                c.status == "running" and Path(c.run_dir, "checkpoint", "COMPLETE").exists()
                for c in cells
            ):
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = ResultStore(db).cells()
    assert sum(c.status == "complete" for c in before) == 1, "killed during the second cell"
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    cells = ResultStore(db).cells()
    assert len(cells) == 3 and all(c.status == "complete" for c in cells)
    assert len({c.config_hash for c in cells}) == 3


def test_submitit_local_executor_runs_each_cell_as_a_job(
    tmp_path: Path, store_db: Path | str
) -> None:
    pytest.importorskip("submitit")
    path = write_grid(tmp_path / "g.toml")
    grid = load_grid(path, TINY)
    grid.cells = grid.cells[:2]
    db, runs = store_db, tmp_path / "runs"
    statuses = run_grid(grid, db, runs, executor="submitit", slurm={"cluster": "local", "time": 10})
    assert list(statuses.values()) == ["complete", "complete"]
    # each cell ran as its own submitit job, with its own log folder entries
    assert len(list((runs / "submitit").glob("*_result.pkl"))) == 2
    assert all(c.status == "complete" for c in ResultStore(db).cells())


def test_grid_base_naming_another_plugin_replaces_the_stage(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        '[base]\ndecoder = { name = "spatial_broadcast", channels = 8 }\n'
        "grouping = { num_slots = 3 }\n[axes]\nseed = [0, 1]\n"
    )
    grid = load_grid(path)
    cfg = grid.cells[0].config
    # the default's mlp params (hidden, position, ...) are gone; its grouping params merged
    assert cfg.decoder.name == "spatial_broadcast" and cfg.decoder.params.channels == 8
    assert cfg.grouping.params.num_slots == 3 and cfg.grouping.params.slot_dim == 64
    assert [c.config.seed for c in grid.cells] == [0, 1]


def test_published_leaderboard_names_missing_plugins_and_renders(tmp_path: Path) -> None:
    board = load_leaderboard("thesis-table-5-1", tmp_path / "empty.sqlite")
    rows = {r.label: r for r in board.rows}
    # SLATE is built from its preset (decoders/slate.py): only the measurement is missing
    assert rows["SLATE"].missing == "not measured yet (run its grid)"
    # the thesis model builds from the thesis-stage2 preset (its teacher: @thesis-stage1)
    assert rows["Ours + Mage"].missing == "not measured yet (run its grid)"
    # SPOT on COCO can be built from existing plugins: only the measurement is missing
    assert rows["Spot + DINO ViT"].missing == "not measured yet (run its grid)"
    assert rows["Spot + DINO ViT"].published == {"mbo_i": 35, "mbo_c": 44.7, "fg_ari": 37}
    md = render(board, "md")
    assert "44.7" in md and "Ours + Mage" in md
    csv_text = render(board, "csv")
    assert csv_text.splitlines()[0].startswith("system,")
    assert len(csv_text.splitlines()) == 1 + len(board.rows)


def _hold(db: Path | str, config_hash: str, host: str, pid: int, heartbeat_age: float) -> None:
    """A live lease row as another process would have written it."""
    beat = time.time() - heartbeat_age
    execute(
        db,
        "INSERT INTO leases (config_hash, host, pid, started, heartbeat, expires)"
        " VALUES (?,?,?,?,?,?)",
        (config_hash, host, pid, beat - 5, beat, beat + 60),
    )


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_cell_is_leased_once_and_the_holder_is_named(store_db: Path | str) -> None:
    store = ResultStore(store_db)
    mine = store.claim("abc", timeout=60)
    assert mine.lease is not None and mine.holder is None
    assert (mine.lease.host, mine.lease.pid) == (this_host(), os.getpid())
    # A second claim (here from the same live process) finds the lease held, and by whom.
    again = store.claim("abc", timeout=60)
    assert again.lease is None and again.holder is not None
    assert again.holder.id == mine.lease.id
    assert f"pid {os.getpid()}" in again.holder.holder() and this_host() in again.holder.holder()
    store.release(mine.lease, "complete")
    after = store.claim("abc", timeout=60)
    assert after.lease is not None and after.lease.id != mine.lease.id
    assert [(lease.id, lease.outcome) for lease in store.leases("abc")] == [
        (mine.lease.id, "complete"),
        (after.lease.id, None),
    ]


def test_stale_leases_are_taken_over_and_live_ones_on_other_hosts_kept(
    store_db: Path | str,
) -> None:
    db = store_db
    store = ResultStore(db)
    dead = _dead_pid()
    _hold(db, "dead-pid", this_host(), dead, heartbeat_age=0)  # fresh heartbeat, pid gone
    _hold(db, "silent", "elsewhere.example", 4242, heartbeat_age=120)  # expired a minute ago
    _hold(db, "busy", "elsewhere.example", 4242, heartbeat_age=1)  # another host, alive

    taken = store.claim("dead-pid", timeout=60)
    assert taken.lease is not None
    old = store.leases("dead-pid")[0]
    assert old.released is not None
    assert old.outcome == f"expired: pid {dead} on {this_host()} is gone"
    taken = store.claim("silent", timeout=60)
    assert taken.lease is not None
    assert store.leases("silent")[0].outcome.startswith("expired: no heartbeat from host elsewhere")
    # A pid on another host cannot be checked here: only its heartbeat expires its lease.
    held = store.claim("busy", timeout=60)
    assert held.lease is None and held.holder.host == "elsewhere.example"
    assert [lease.outcome for lease in store.leases("busy")] == [None]


def test_claim_reports_finished_cells_instead_of_leasing_them(store_db: Path | str) -> None:
    store = ResultStore(store_db)
    for digest in ("done", "failed-before", "failed-after"):
        store.start(Cell(digest, {}, {}, "shapes", "val", 0, "running"))
    store.complete("done", [])
    store.fail("failed-before", "RuntimeError: old")
    since = time.time()
    store.fail("failed-after", "RuntimeError: in the other grid")

    done = store.claim("done", timeout=60, failed_since=since)
    assert (done.lease, done.holder, done.status) == (None, None, "complete")
    failed = store.claim("failed-after", timeout=60, failed_since=since)
    assert failed.lease is None and failed.status == "failed"
    assert failed.error == "RuntimeError: in the other grid"
    # A failure from before this grid started is retried.
    assert store.claim("failed-before", timeout=60, failed_since=since).lease is not None
    assert store.leases("done") == [] and store.leases("failed-after") == []


def test_heartbeat_extends_a_lease_and_notices_a_takeover(store_db: Path | str) -> None:
    store = ResultStore(store_db)
    lease = store.claim("abc", timeout=60).lease
    assert lease is not None
    with _Heartbeat(store, lease, timeout=0.25, label="abc"):
        time.sleep(0.6)
        beat = store.leases("abc")[0]
    assert beat.heartbeat > lease.heartbeat and beat.expires == pytest.approx(beat.heartbeat + 0.25)
    time.sleep(0.3)  # no heartbeat any more: expired
    assert store.claim("abc", timeout=60).lease is not None
    assert store.heartbeat(lease, 60) is False  # the first owner learns it lost the cell


def test_run_cell_releases_its_lease_when_interrupted_and_stores_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_db: Path | str
) -> None:
    import ocl_bench.run.grid

    grid = load_grid(write_grid(tmp_path / "g.toml"), TINY)
    cell = grid.cells[0]
    db, runs = store_db, tmp_path / "runs"

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ocl_bench.run.grid, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cell(cell, "tiny", runs, db, False)
    store = ResultStore(db)
    digest = cell.config.digest()
    assert [lease.outcome for lease in store.leases(digest)] == ["interrupted"]
    assert store.leases(digest, live=True) == []

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(ocl_bench.run.grid, "train", broken)
    assert run_cell(cell, "tiny", runs, db, False) == "failed"
    stored = store.get(digest)
    assert stored.status == "failed" and stored.error_line == "RuntimeError: disk full"
    assert [lease.outcome for lease in store.leases(digest)] == ["interrupted", "failed"]
    printed = status_detail(store, cell, "failed")
    assert printed == "RuntimeError: disk full"


def table_columns(db: Path | str, table: str) -> list[str]:
    """A table's columns as the database lists them (duplicates would show twice)."""
    if isinstance(db, str):
        return [
            r[0]
            for r in execute(
                db,
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = ?",
                (table,),
            )
        ]
    return [r[1] for r in execute(db, f"PRAGMA table_info({table})")]


def test_an_old_database_gains_the_protocol_column_and_keeps_its_rows(
    store_db: Path | str,
) -> None:
    path = store_db
    # The tables as they were before protocols and leases.
    without_protocol = SCHEMA.replace("    protocol TEXT,\n", "")
    old_schema = without_protocol.split("CREATE TABLE IF NOT EXISTS leases")[0]
    write_old_store(path, old_schema)
    store = ResultStore(path)
    old = store.get("old")
    assert old.value("object_discovery", "fg_ari") == 0.25
    assert old.record("object_discovery", "fg_ari")["protocol"] is None
    protocol = {"images": 64, "reference": "shapes/val", "extractor": {"sha256": "ab12"}}
    store.start(Cell("new", {}, {}, "shapes", "val", 0, "running"))
    record = {"task": "conditional_generation", "metric": "fid", "value": 12.5}
    store.complete("new", [{**record, "protocol": protocol}])
    assert store.get("new").record("conditional_generation", "fid")["protocol"] == protocol
    ResultStore(path)  # opening it again adds nothing twice
    assert table_columns(path, "metrics").count("protocol") == 1
