"""Progress a person can follow: `ocl-bench status` (running cells, host, pid or job, step,
heartbeat age), a grid's one progress display (counts, each running cell's step, an ETA
from measured step times), and the training -> heartbeat -> store path that feeds both."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from ocl_bench.cli import main
from ocl_bench.run.grid import load_grid, run_grid
from ocl_bench.run.grid_status import GridProgress, Running, estimate, snapshot, status_report
from ocl_bench.run.progress import StepProgress
from ocl_bench.run.store import SCHEMA, Cell, Lease, ResultStore, this_host, this_job
from tests.conftest import TINY, execute, write_old_store


def _start(store: ResultStore, digest: str, label: str) -> None:
    store.start(Cell(digest, {}, {}, "shapes", "val", 0, "running", grid="demo", label=label))


def _plant_lease(
    db: Path | str, digest: str, host: str, beat_age: float, progress: tuple, job: str | None
) -> None:
    """A live lease as a process elsewhere would have left it, with its last progress."""
    beat = time.time() - beat_age
    execute(
        db,
        "INSERT INTO leases (config_hash, host, pid, started, heartbeat, expires, job, step,"
        " steps, step_time) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (digest, host, 4242, beat - 600, beat, beat + 300, job, *progress),
    )


def _store_with_a_live_and_a_stale_cell(db: Path | str) -> ResultStore:
    store = ResultStore(db)
    _start(store, "live", "grouping.num_slots=3")
    lease = store.claim("live", timeout=60).lease  # this process: alive
    assert store.heartbeat(lease, 60, step=40, steps=100, step_time=0.5)
    _start(store, "stale", "grouping.num_slots=4")
    # a Slurm job on another host whose heartbeat stopped 10 minutes ago
    _plant_lease(db, "stale", "node7", 600, (120, 500, 2.0), "123456")
    return store


def test_status_lists_running_cells_and_names_the_stale_one(
    store_db: Path | str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store_with_a_live_and_a_stale_cell(store_db)
    head, header, rule, *rows = status_report(store)
    assert head.startswith("1 running, 1 stale; 0 complete, 0 failed of 2 cells in ")
    assert header.split() == [
        "cell",
        "grid",
        "host",
        "pid",
        "job",
        "progress",
        "s/step",
        "heartbeat",
        "state",
    ]
    live, stale = sorted(rows)
    assert live.split()[:4] == ["grouping.num_slots=3", "demo", this_host(), str(os.getpid())]
    assert "step 40/100" in live and " 0.5 " in live and "running" in live
    assert "s ago" in live  # beaten just now
    assert stale.split()[:5] == ["grouping.num_slots=4", "demo", "node7", "4242", "123456"]
    assert "step 120/500" in stale and "10 min ago" in stale
    assert stale.endswith("stale: no heartbeat in time")
    # the command prints the same, as plain lines (no redraws: its output is not a terminal)
    assert main(["status", "--db", str(store_db)]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out
    assert out.splitlines()[0] == head and len(out.splitlines()) == 5


def test_status_of_a_store_without_running_cells_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ResultStore(tmp_path / "r.sqlite")
    _start(store, "done", "a")
    store.complete("done", [])
    assert main(["status", "--db", str(tmp_path / "r.sqlite")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"0 running, 0 stale; 1 complete, 0 failed of 1 cells in {tmp_path / 'r.sqlite'}"
    ]
    assert main(["status", "--db", str(tmp_path / "absent.sqlite")]) == 2


def _grid_store(db: Path | str) -> tuple[ResultStore, dict[str, tuple[str, int]], float]:
    """A grid of seven 100- or 200-step cells: one complete, one failed since the grid began,
    one failed before it (rerun: waiting), two running with measured step times, one whose
    holder went silent (waiting again), one not started."""
    store = ResultStore(db)
    cells = {d: (f"cell {d}", 200 if d == "b" else 100) for d in "abcdefg"}
    _start(store, "f", "cell f")
    store.fail("f", "RuntimeError: before this grid")
    since = time.time()
    for digest in "acd":
        _start(store, digest, f"cell {digest}")
    store.complete("c", [])
    store.fail("d", "RuntimeError: in this grid")
    lease = store.claim("a", timeout=60).lease
    store.heartbeat(lease, 60, step=40, steps=100, step_time=0.5)
    _plant_lease(db, "b", "node3", 5, (50, 200, 1.0), "77")
    _plant_lease(db, "e", "node4", 900, (10, 100, 0.1), None)  # stale: counts as waiting
    return store, cells, since


def test_the_progress_line_counts_cells_and_estimates_the_time_left(
    store_db: Path | str,
) -> None:
    store, cells, since = _grid_store(store_db)
    snap = snapshot(store, "demo", cells, since, lanes=2)
    assert (len(snap.done), len(snap.failed), len(snap.running), snap.waiting) == (1, 1, 2, 3)
    # left: a 60 steps x 0.5 s = 30 s, b 150 x 1.0 = 150 s; queued e, f, g: 300 steps at the
    # running cells' mean 0.75 s/step = 225 s; 405 s on 2 lanes, and never below b's 150 s
    assert snap.eta == pytest.approx(202.5)
    head, *running = snap.lines()
    assert head == "grid 'demo': 1/7 done, 2 running, 1 failed, 3 waiting; ETA 3 min"
    assert sorted(running) == [
        f"  cell a: step 40/100, 0.5 s/step ({this_host()} pid {os.getpid()})",
        "  cell b: step 50/200, 1 s/step (node3 pid 4242, job 77)",
    ]


def _running(step: int | None, steps: int | None, step_time: float | None) -> Running:
    lease = Lease(1, "x", "h", 1, 0.0, 0.0, 0.0, step=step, steps=steps, step_time=step_time)
    return Running(lease, "x", None, None)


def test_the_estimate_waits_for_a_measured_step_and_shares_the_queue_over_lanes() -> None:
    assert estimate([], [100], lanes=4) is None
    assert estimate([_running(None, None, None)], [100], lanes=1) is None  # not measured yet
    one = _running(0, 100, 1.0)
    assert estimate([one], [100], lanes=1) == pytest.approx(200.0)
    assert estimate([one], [100, 100], lanes=3) == pytest.approx(100.0)
    # never below the slowest running cell's own time left
    assert estimate([_running(0, 1000, 1.0)], [10], lanes=8) == pytest.approx(1000.0)


def _display(store_db: Path | str, cells: dict, stream: io.StringIO) -> GridProgress:
    display = GridProgress(store_db, "demo", cells, lanes=2, stream=stream, refresh=3600)
    display._store = ResultStore(store_db)  # as __enter__ does, without its thread
    return display


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_output_is_lines_and_says_each_cell_that_ends(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    store, cells, since = _grid_store(db)
    out = io.StringIO()
    display = _display(db, cells, out)
    display.since = since
    display.update()
    first = out.getvalue()
    assert first.splitlines()[0].startswith("grid 'demo': 1/7 done, 2 running")
    display.update()  # nothing changed: nothing printed
    assert out.getvalue() == first
    store.complete("a", [])
    display.update()
    new = out.getvalue()[len(first) :].splitlines()
    assert new[0] == "  complete: cell a"
    assert new[1].startswith("grid 'demo': 2/7 done, 1 running, 1 failed, 3 waiting; ETA ")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_a_terminal_gets_the_block_redrawn_in_place(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    store, cells, since = _grid_store(db)
    out = _Terminal()
    display = _display(db, cells, out)
    display.since = since
    display.update()
    assert out.getvalue().count("\n") == 3 and "\x1b" not in out.getvalue()
    store.complete("a", [])
    display.update()
    assert out.getvalue().split("\n", 3)[3].startswith("\x1b[3F\x1b[J  complete: cell a\n")


def test_step_times_are_measured_between_reports_and_restart_with_a_new_run() -> None:
    clock = iter([0.0, 1.0, 3.0, 4.0, 100.0])
    progress = StepProgress(clock=lambda: next(clock))
    assert progress.columns() == {}
    progress.report(1, 10)
    assert progress.columns() == {"step": 1, "steps": 10, "step_time": None}
    progress.report(2, 10)  # 1 s for one step
    progress.report(4, 10)  # 2 s for two
    assert progress.columns()["step_time"] == pytest.approx(1.0)
    progress.report(5, 10)
    assert progress.columns()["step_time"] == pytest.approx(1.0)
    progress.report(1, 20)  # another run: nothing measured yet
    assert progress.columns() == {"step": 1, "steps": 20, "step_time": None}


def test_a_training_cell_reports_its_steps_through_its_heartbeat(
    tmp_path: Path, store_db: Path | str
) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        'name = "one"\n[base]\ntasks = { object_discovery = {} }\n[base.train]\nsteps = 30\n'
        '[axes]\n"grouping.num_slots" = [3]\n'
    )
    grid = load_grid(path, [o for o in TINY if not o.startswith("tasks.")])
    # beats every 0.2 s: several while the cell trains and evaluates
    statuses = run_grid(grid, store_db, tmp_path / "runs", progress=False, lease_timeout=1.0)
    assert list(statuses.values()) == ["complete"]
    (lease,) = ResultStore(store_db).leases()
    assert lease.steps == 30 and 1 <= lease.step <= 30
    assert lease.step_time is None or lease.step_time > 0


def test_an_old_database_gains_the_progress_columns(store_db: Path | str) -> None:
    progress = ",\n    job TEXT,\n    step INTEGER,\n    steps INTEGER,\n    step_time REAL"
    old = SCHEMA.replace(progress, "")
    assert "step_time" not in old
    write_old_store(store_db, old)
    execute(
        store_db,
        "INSERT INTO leases (config_hash, host, pid, started, heartbeat, expires)"
        " VALUES ('old', 'h', 1, 1.0, 2.0, 3.0)",
    )
    store = ResultStore(store_db)
    (lease,) = store.leases()
    assert (lease.job, lease.step, lease.steps, lease.step_time) == (None, None, None, None)
    assert status_report(store)[0].startswith("0 running, 1 stale")


def test_the_job_is_slurms_or_the_local_executors(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SUBMITIT_LOCAL_JOB_ID", raising=False)
    assert this_job() is None
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "999")
    assert this_job() == "local:999"
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert this_job() == "123"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert this_job() == "120_3"


def test_a_lease_a_job_beats_outlives_its_grid_process() -> None:
    # The grid process (this host, a pid that is gone) took the lease; a submitit job beats
    # it: the lease holds until its heartbeat runs out, not when the grid's pid dies.
    from ocl_bench.run.store import Lease, this_host

    gone = 2**22 + 12345  # above the default pid_max: no process has it
    now = time.time()
    grid_only = Lease(1, "h", this_host(), gone, now, now, now + 60)
    beaten = Lease(2, "h", this_host(), gone, now, now, now + 60, job="local:7")
    assert grid_only.expired(now) is not None
    assert beaten.expired(now) is None
    assert beaten.expired(now + 61) is not None


def _fake_squeue(folder: Path, states: dict[str, str]) -> None:
    """An `squeue` that knows `states` (job -> state) and fails on any other job, as
    Slurm's does for a job it has forgotten."""
    cases = "".join(f'  "{job}") echo {state} ;;\n' for job, state in states.items())
    script = folder / "squeue"
    script.write_text(
        "#!/bin/sh\n# called as: squeue --noheader --jobs JOB --format %T\n"
        f'case "$3" in\n{cases}  *) echo "slurm_load_jobs error: Invalid job id" >&2;'
        " exit 1 ;;\nesac\n"
    )
    script.chmod(0o755)


def test_a_queued_slurm_job_holds_its_lease_without_a_heartbeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cell's job waits in the queue (or is being requeued) while the grid process that
    submitted it is gone: no heartbeat, yet no other copy of the grid may take the cell,
    as long as Slurm still holds the job; a job Slurm forgot or ended frees it."""
    _fake_squeue(tmp_path, {"41": "PENDING", "42": "REQUEUED", "43": "RUNNING", "44": "CANCELLED"})
    now = time.time()

    def lease(job: str | None) -> Lease:
        return Lease(1, "h", "another-host", 1, now - 900, now - 900, now - 600, job=job)

    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for job in ("41", "42", "43"):
        assert lease(job).expired(now) is None, job
    for job in ("44", "99", "local:5", None):  # ended, forgotten, not Slurm's, no job
        assert lease(job).expired(now) is not None, job
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no squeue: the heartbeat decides
    assert lease("41").expired(now) is not None


def test_a_submitted_jobs_id_is_on_its_lease_at_once(store_db: Path | str) -> None:
    store = ResultStore(store_db)
    lease = store.claim("h", 60.0).lease
    assert lease is not None and lease.job is None
    store.assign_job(lease, "1234")
    (stored,) = store.leases("h")
    assert stored.job == lease.job == "1234"
    store.release(lease, "complete")
    store.assign_job(lease, "5678")  # a released lease keeps what it had
    assert store.leases("h")[0].job == "1234"


def test_a_claim_leaves_a_cell_whose_slurm_job_waits_in_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_db: Path | str
) -> None:
    """The same through ResultStore.claim, which asks squeue before its write lock."""
    _fake_squeue(tmp_path, {"41": "PENDING", "44": "CANCELLED"})
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    store = ResultStore(store_db)
    for digest, job in (("queued", "41"), ("cancelled", "44")):
        stale = store.claim(digest, timeout=-10.0).lease  # its heartbeat ran out at once
        assert stale is not None
        store.assign_job(stale, job)
    held = store.claim("queued", timeout=60.0)
    assert held.lease is None and held.holder is not None and held.holder.job == "41"
    taken = store.claim("cancelled", timeout=60.0)
    assert taken.lease is not None and taken.last is not None and taken.last.job == "44"
