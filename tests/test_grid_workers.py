"""`grid --workers N`: cells run in spawned worker processes that share one results store."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ocl_bench.cli import main
from ocl_bench.run.grid import load_grid, run_grid
from ocl_bench.run.store import Cell, ResultStore
from tests.conftest import TINY as ALL_TINY
from tests.conftest import execute
from tests.store_workers import (
    CELLS_PER_WRITER,
    GRID_CELLS,
    SHARED,
    WRITERS,
    cell_writer,
    claimer,
    grid_writer,
    records,
    run_processes,
    writer_cell,
)

# The grids below choose their own tasks; runs are a few steps on a few images.
TINY = [o for o in ALL_TINY if not o.startswith("tasks.")]
assert "train.threads=1" in TINY


def write_grid(path: Path, axes: str, extra: str = "") -> Path:
    path.write_text(
        f"""
name = "workers"
[base]
tasks = {{ object_discovery = {{}} }}
[base.train]
steps = 2
[axes]
{axes}
{extra}
"""
    )
    return path


def metric_values(cell: Cell) -> dict[tuple[str, str, str | None], float]:
    return {(m["task"], m["metric"], m["masks"]): m["value"] for m in cell.metrics}


STATUSES = (
    "complete (stored)",
    "complete (elsewhere)",
    "failed (elsewhere)",
    "running elsewhere",
    "complete",
    "failed",
    "skipped",
)


def status_lines(stderr: str) -> dict[str, str]:
    """label -> status, from the `  STATUS  LABEL` lines `ocl-bench grid` prints."""
    out = {}
    for line in stderr.splitlines():
        for status in STATUSES:
            if line.startswith(f"  {status} "):
                out[line[len(status) + 2 :].strip()] = status
                break
    return out


def detail_lines(stderr: str) -> dict[str, str]:
    """label -> the indented line `ocl-bench grid` prints under a cell's status."""
    lines = stderr.splitlines()
    out = {}
    for i, line in enumerate(lines[:-1]):
        for status in STATUSES:
            if line.startswith(f"  {status} ") and lines[i + 1].startswith("   " + " " * 20):
                out[line[len(status) + 2 :].strip()] = lines[i + 1].strip()
                break
    return out


def test_two_workers_store_every_cell_with_the_metrics_of_a_serial_run(tmp_path: Path) -> None:
    path = write_grid(
        tmp_path / "g.toml",
        '"grouping.num_slots" = [3, 4]\n"grouping.init" = ["shared_gaussian", "learned_queries"]',
    )
    grid = load_grid(path, TINY)
    assert len(grid.cells) == 4
    digests = {c.label: c.config.digest() for c in grid.cells}
    assert len(set(digests.values())) == 4

    serial_db, parallel_db = tmp_path / "serial.sqlite", tmp_path / "parallel.sqlite"
    serial = run_grid(grid, serial_db, tmp_path / "serial", workers=1, progress=False)
    parallel = run_grid(grid, parallel_db, tmp_path / "parallel", workers=2, progress=False)
    assert serial == parallel == {label: "complete" for label in digests}

    expected = {c.config_hash: c for c in ResultStore(serial_db).cells()}
    got = ResultStore(parallel_db).cells(grid="workers")
    assert sorted(c.config_hash for c in got) == sorted(digests.values())  # one row per cell
    for cell in got:
        assert cell.status == "complete" and cell.error is None
        assert cell.label is not None and digests[cell.label] == cell.config_hash
        assert cell.run_dir == str(tmp_path / "parallel" / cell.config_hash)
        assert (Path(cell.run_dir) / "metrics.json").is_file()
        assert cell.started is not None and cell.ended is not None
        assert cell.started <= cell.ended
        values = metric_values(cell)
        assert ("object_discovery", "fg_ari", "decoder") in values
        assert ("object_discovery", "fg_ari", "attn") in values
        # The runs are seeded: a worker process computes what the serial loop computed.
        want = metric_values(expected[cell.config_hash])
        assert values.keys() == want.keys()
        for key, value in want.items():
            assert values[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # The cells differ, so their metrics do too (the comparison above is not vacuous).
    assert len({metric_values(c)[("object_discovery", "fg_ari", "decoder")] for c in got}) > 1

    # A rerun with workers finds every cell stored and starts no work.
    again = run_grid(grid, parallel_db, tmp_path / "parallel", workers=2, progress=False)
    assert again == {label: "complete (stored)" for label in digests}
    assert len(ResultStore(parallel_db).cells()) == 4


def test_failing_cells_under_workers_are_stored_failed_and_the_rest_complete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # encoder.patch_size=3 resolves but the cnn encoder refuses it when the model is built.
    path = write_grid(
        tmp_path / "g.toml",
        '"grouping.num_slots" = [2, 3, 4]\n"encoder.patch_size" = [4, 3]',
        '[[exclude]]\n"grouping.num_slots" = 2\n"encoder.patch_size" = 3\n'
        '[[exclude]]\n"grouping.num_slots" = 4\n"encoder.patch_size" = 3\n',
    )
    db, runs = tmp_path / "r.sqlite", tmp_path / "runs"
    cells = {c.label: c for c in load_grid(path, TINY).cells}
    build_fails = "grouping.num_slots=3, encoder.patch_size=3"
    train_fails = "grouping.num_slots=3, encoder.patch_size=4"
    assert set(cells) == {
        "grouping.num_slots=2, encoder.patch_size=4",
        train_fails,
        build_fails,
        "grouping.num_slots=4, encoder.patch_size=4",
    }
    # Another cell fails once training has begun, with an error that is not a user error
    # (so its traceback is stored): its train log path is taken by a directory.
    (runs / cells[train_fails].config.digest() / "train_log.jsonl").mkdir(parents=True)

    argv = ["grid", str(path), *TINY, "--db", str(db), "--runs", str(runs), "--workers", "2"]
    assert main([*argv, "-q"]) == 1  # not every cell completed
    err = capsys.readouterr().err
    printed = status_lines(err)
    assert printed == {label: "complete" for label in cells} | {
        build_fails: "failed",
        train_fails: "failed",
    }
    # Each failed cell's error is printed under it, in one line (a traceback's last line).
    details = detail_lines(err)
    assert set(details) == {build_fails, train_fails}
    assert details[build_fails].startswith("ConfigError: ")
    assert "power of two" in details[build_fails]
    assert details[train_fails].startswith("IsADirectoryError: [Errno 21]")
    assert "train_log.jsonl" in details[train_fails]

    store = ResultStore(db)
    stored = {c.label: c for c in store.cells()}
    assert set(stored) == set(cells)
    assert {label: c.config_hash for label, c in stored.items()} == {
        label: c.config.digest() for label, c in cells.items()
    }
    built = stored[build_fails]
    assert built.status == "failed" and built.metrics == [] and built.ended is not None
    assert built.error.startswith("ConfigError: ")
    assert "power of two" in built.error and "Traceback" not in built.error
    assert not Path(built.run_dir).exists()  # a model that cannot be built leaves no run dir
    trained = stored[train_fails]
    assert trained.status == "failed" and trained.metrics == []
    assert trained.error.startswith("IsADirectoryError: Traceback")
    assert "train_log.jsonl" in trained.error
    done = [c for c in stored.values() if c.status == "complete"]
    assert len(done) == 2
    for cell in done:
        assert cell.error is None
        assert ("object_discovery", "fg_ari", "decoder") in metric_values(cell)

    # Rerun: the complete cells are skipped, the failed ones retried (and failing again).
    assert main([*argv, "-q"]) == 1
    printed = status_lines(capsys.readouterr().err)
    assert sorted(printed.values()) == ["complete (stored)"] * 2 + ["failed"] * 2
    assert len(store.cells()) == 4
    assert store.get(cells[build_fails].config.digest()).status == "failed"


def test_concurrent_writer_processes_lose_no_cell_and_never_hit_a_lock(
    tmp_path: Path, store_db: Path | str
) -> None:
    db, errors = store_db, tmp_path / "errors"
    errors.mkdir()
    ResultStore(db)  # as run_grid does before it starts its workers
    codes = run_processes(cell_writer, [(str(db), str(errors), w) for w in range(WRITERS)])
    reports = sorted(p.read_text() for p in errors.iterdir())
    assert reports == [], reports[0]  # e.g. sqlite3.OperationalError: database is locked
    assert codes == [0] * WRITERS

    cells = {c.config_hash: c for c in ResultStore(db).cells(grid="concurrent")}
    assert len(cells) == WRITERS * CELLS_PER_WRITER + 1
    for w in range(WRITERS):
        for i in range(CELLS_PER_WRITER):
            cell = cells[f"w{w}-{i}"]
            assert cell.config == {"writer": w, "i": i}
            if i % 4 == 3:
                assert cell.status == "failed" and cell.error == f"RuntimeError: cell w{w}-{i}"
                assert cell.metrics == []
            else:
                assert cell.status == "complete" and cell.error is None
                assert metric_values(cell) == {
                    (r["task"], r["metric"], r["masks"]): r["value"] for r in records(w, i)
                }
    # The shared cell: one row, whose metrics are one writer's complete set (not a mix).
    shared = cells[SHARED]
    assert shared.status == "complete" and len(shared.metrics) == 3
    values = sorted(metric_values(shared).values())
    w = int(values[0]) // 1000
    assert values == [r["value"] for r in records(w, CELLS_PER_WRITER // 2)]


def test_opening_a_new_store_waits_for_another_writer_instead_of_failing(tmp_path: Path) -> None:
    # Two processes that open the same new store at once (two `grid` commands given the
    # same new --db) meet like this: one converts the file to WAL while the other opens it.
    path = tmp_path / "r.sqlite"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    result: dict[str, object] = {}

    def open_store() -> None:
        try:
            result["cells"] = ResultStore(path).cells()
        except sqlite3.OperationalError as err:
            result["error"] = err

    thread = threading.Thread(target=open_store)
    thread.start()
    time.sleep(0.5)
    other.execute("COMMIT")
    other.close()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert "error" not in result, result["error"]
    assert result["cells"] == []


def test_processes_claiming_one_cell_together_get_one_lease(
    tmp_path: Path, store_db: Path | str
) -> None:
    db, results = store_db, tmp_path / "results"
    results.mkdir()
    ResultStore(db)
    codes = run_processes(claimer, [(str(db), str(results), i) for i in range(4)])
    assert codes == [0] * 4
    said = [p.read_text().split(" ", 1) for p in sorted(results.iterdir())]
    winners = [pid for pid, taken in said if taken == "lease"]
    assert len(winners) == 1
    # The others were told who holds it (that process has exited by now, which is why
    # a later claim would take the cell over).
    assert sorted(taken for _, taken in said if taken != "lease") == [f"held by {winners[0]}"] * 3
    assert [(lease.pid, lease.released) for lease in ResultStore(db).leases()] == [
        (int(winners[0]), None)
    ]


def test_four_writers_claiming_a_grid_run_every_cell_exactly_once(
    tmp_path: Path, store_db: Path | str
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    codes = run_processes(grid_writer, [(str(store_db), str(results), w) for w in range(WRITERS)])
    errors = sorted(p.read_text() for p in results.glob("error*.txt"))
    assert errors == [], errors[0]
    assert codes == [0] * WRITERS
    ran = {w: json.loads((results / f"{w}.json").read_text()) for w in range(WRITERS)}
    everything = [digest for digests in ran.values() for digest in digests]
    assert sorted(everything) == sorted(f"cell-{i}" for i in range(GRID_CELLS))  # none twice
    assert sum(bool(digests) for digests in ran.values()) > 1  # the writers did share the work

    store = ResultStore(store_db)
    runner = {digest: w for w, digests in ran.items() for digest in digests}
    cells = {c.config_hash: c for c in store.cells(grid="concurrent")}
    assert len(cells) == GRID_CELLS
    leases = store.leases()
    assert sorted(lease.config_hash for lease in leases) == sorted(cells)  # one lease each
    for lease in leases:
        i, w = int(lease.config_hash.split("-")[1]), runner[lease.config_hash]
        cell = cells[lease.config_hash]
        want = "failed" if i % 7 == 6 else "complete"
        assert (cell.status, lease.outcome, cell.config) == (want, want, {"writer": w, "i": i})
        assert lease.released is not None
        if want == "complete":
            expected = {(r["task"], r["metric"], r["masks"]): r["value"] for r in records(w, i)}
            assert metric_values(cell) == expected


def _grid_command(path: Path, db: Path | str, runs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ocl_bench.cli", "grid", str(path), *TINY] + [
        "--db",
        str(db),
        "--runs",
        str(runs),
        "-q",
        *extra,
    ]


def test_two_grids_started_together_run_each_cell_once(
    tmp_path: Path, store_db: Path | str
) -> None:
    path = write_grid(tmp_path / "g.toml", '"grouping.num_slots" = [2, 3, 4]', "")
    digests = {c.label: c.config.digest() for c in load_grid(path, [*TINY, "train.steps=6"]).cells}
    db, runs = store_db, tmp_path / "runs"
    cmd = _grid_command(path, db, runs, "train.steps=6")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    errs = [err for _, err in outputs]
    assert [p.returncode for p in procs] == [0, 0], errs

    store = ResultStore(db)
    leases = store.leases()
    # Each cell was run by exactly one process, once, and completed.
    assert sorted(lease.config_hash for lease in leases) == sorted(digests.values())
    assert all(lease.outcome == "complete" and lease.released for lease in leases)
    assert {c.config_hash: c.status for c in store.cells()} == dict.fromkeys(
        digests.values(), "complete"
    )
    for digest in digests.values():  # one training run per directory: each step once
        steps = [json.loads(line)["step"] for line in (runs / digest / "train_log.jsonl").open()]
        assert steps == list(range(1, 7))
    # Neither copy reports a failure; for every cell one copy ran it and the other saw it
    # done or running (naming the process that held it).
    printed = [status_lines(err) for err in errs]
    for label in digests:
        seen = sorted(p[label] for p in printed)
        assert seen.count("complete") == 1, (label, seen)
        assert not any(s.startswith("failed") for s in seen)
    pids = {lease.pid for lease in leases}
    for err, lines in zip(errs, printed):
        for label, detail in detail_lines(err).items():
            if lines[label] == "running elsewhere":
                assert re.search(r"held by host .+, pid (\d+), since ", detail)
                assert int(re.search(r"pid (\d+)", detail).group(1)) in pids


def test_grid_skips_a_cell_another_process_holds_and_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], store_db: Path | str
) -> None:
    path = write_grid(tmp_path / "g.toml", '"grouping.num_slots" = [3]', "")
    (cell,) = load_grid(path, TINY).cells
    db = store_db
    holder = ResultStore(db).claim(cell.config.digest(), timeout=60).lease  # this process
    assert main(["grid", str(path), *TINY, "--db", str(db), "--runs", str(tmp_path), "-q"]) == 0
    err = capsys.readouterr().err
    assert status_lines(err) == {cell.label: "running elsewhere"}
    detail = detail_lines(err)[cell.label]
    assert detail.startswith(f"held by host {holder.host}, pid {os.getpid()}, since ")
    assert "1 cell(s) are running in other processes" in err
    assert ResultStore(db).get(cell.config.digest()) is None  # nothing ran, nothing written
    assert not (tmp_path / cell.config.digest()).exists()


def test_grid_wait_waits_for_the_holder_and_reports_its_result(
    tmp_path: Path, store_db: Path | str
) -> None:
    path = write_grid(tmp_path / "g.toml", '"grouping.num_slots" = [3]', "")
    (cell,) = load_grid(path, TINY).cells
    digest = cell.config.digest()
    db, runs = store_db, tmp_path / "runs"
    store = ResultStore(db)
    lease = store.claim(digest, timeout=60).lease
    cmd = _grid_command(path, db, runs, "--wait")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waiting = proc.stderr.readline()
    while waiting and not waiting.startswith("waiting for"):
        waiting = proc.stderr.readline()
    assert waiting.startswith(f"waiting for '{cell.label}': host ")
    time.sleep(1.0)
    assert proc.poll() is None  # still waiting for us
    # This process finishes the cell (as another grid would) and lets go of it.
    store.start(writer_cell(digest, 0, 0))
    store.complete(digest, records(0, 0))
    store.release(lease, "complete")
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest
    assert status_lines(rest) == {cell.label: "complete (elsewhere)"}
    assert detail_lines(rest)[cell.label] == f"run by host {lease.host}, pid {os.getpid()}"
    assert [lease.pid for lease in store.leases(digest)] == [os.getpid()]  # it never ran it
    assert not (runs / digest).exists()


def test_grid_takes_over_a_cell_whose_holder_died(tmp_path: Path, store_db: Path | str) -> None:
    path = write_grid(tmp_path / "g.toml", '"grouping.num_slots" = [3]', "")
    (cell,) = load_grid(path, TINY).cells
    digest = cell.config.digest()
    db, runs = store_db, tmp_path / "runs"
    ResultStore(db)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    execute(  # a lease whose heartbeat is fresh but whose pid is gone
        db,
        "INSERT INTO leases (config_hash, host, pid, started, heartbeat, expires)"
        " VALUES (?,?,?,?,?,?)",
        (digest, socket.gethostname(), dead.pid, now, now, now + 600),
    )
    statuses = run_grid(load_grid(path, TINY), db, runs, progress=False)
    assert statuses == {cell.label: "complete"}
    leases = ResultStore(db).leases(digest)
    assert [lease.pid for lease in leases] == [dead.pid, os.getpid()]
    assert leases[0].outcome.startswith(f"expired: pid {dead.pid} ")
    assert leases[1].outcome == "complete"
    assert ResultStore(db).get(digest).status == "complete"
