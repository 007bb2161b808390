"""Running grids: every cell not yet stored is trained, evaluated and stored once.

What a grid is (a base run config plus axes, or a published leaderboard's buildable rows)
and how its cells are expanded lives in boards.py.

Several grids may share one database (a grid launched twice, several cluster jobs): a
process runs a cell only while it holds the cell's lease in the store, kept alive by a
heartbeat thread and released when the cell ends however it ends. A cell leased by a live
process elsewhere is skipped, or with `wait` waited for once everything else has run.

Under submitit (ocl_bench.run.cluster) the grid takes each cell's lease itself and keeps it
alive while the cell's job waits, runs, is preempted and requeued; the job's rank 0 beats
it too, and releases it with the cell's outcome. A job that ends without one (cancelled for
good, killed) has its lease released and its cell failed by the grid; if the grid is gone
too, the lease expires by its heartbeat timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ocl_bench.api.errors import ConfigError, UserError
from ocl_bench.api.runtime import resolve_device
from ocl_bench.run import cluster, distributed
from ocl_bench.run.boards import Grid, GridCell, demo_grid_path, load_grid
from ocl_bench.run.config import RunConfig, apply_overrides, resolve
from ocl_bench.run.evaluate import evaluate, load_run
from ocl_bench.run.progress import TRAINING
from ocl_bench.run.registry import registry
from ocl_bench.run.store import STORE_ERRORS, Cell, Claim, Lease, ResultStore
from ocl_bench.run.train import train

__all__ = ["Grid", "GridCell", "demo_grid_path", "load_grid", "run_cell", "run_grid"]

# Seconds without a heartbeat after which another process takes a cell over (a dead
# process on this host loses its cells at once: its pid is gone).
LEASE_TIMEOUT = 300.0
# At most this many seconds between a training cell's heartbeats: each carries its step,
# which `ocl-bench status` and the grid's progress display show.
PROGRESS_EVERY = 15.0

# What run_cell and run_grid report for a cell, besides "complete" and "failed" (its own run).
STORED = "complete (stored)"  # complete before this grid started
DONE_ELSEWHERE = "complete (elsewhere)"  # another process completed it while this grid ran
FAILED_ELSEWHERE = "failed (elsewhere)"  # another process failed it while this grid ran
RUNNING_ELSEWHERE = "running elsewhere"  # leased by a live process; not waited for
SKIPPED = "skipped"  # needs a cell that is running elsewhere


@dataclass(frozen=True)
class LeaseSettings:
    """How run_cell shares cells with other processes (picklable, for workers and jobs)."""

    timeout: float = LEASE_TIMEOUT
    wait: bool = False  # wait for a cell leased elsewhere instead of skipping it
    since: float | None = None  # a failure stored after this time is reported, not retried

    @property
    def poll(self) -> float:
        return min(2.0, self.timeout / 10)


class _Heartbeat:
    """Keeps a lease alive from a daemon thread while the cell trains, with the training's
    progress (progress.TRAINING, which the trainer of this process reports to)."""

    def __init__(self, store: ResultStore, lease: Lease, timeout: float, label: str) -> None:
        self.store, self.lease, self.timeout, self.label = store, lease, timeout, label
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        TRAINING.reset()  # what an earlier cell of this process reported is not this one's
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        # Several beats per timeout, so that one slow write does not lose the lease.
        while not self._stop.wait(min(self.timeout / 5, PROGRESS_EVERY)):
            try:
                held = self.store.heartbeat(self.lease, self.timeout, **TRAINING.columns())
            except STORE_ERRORS as err:  # busy or unreachable for now
                print(f"warning: lease heartbeat for '{self.label}': {err}", file=sys.stderr)
                continue
            if not held:
                print(
                    f"warning: the lease on '{self.label}' expired and was taken over; "
                    "another process may be running it too",
                    file=sys.stderr,
                )
                return


def _waves(cells: list[GridCell]) -> list[list[GridCell]]:
    """Cells grouped so that every cell runs in a later wave than the cells it needs."""
    depth: dict[str, int] = {}

    def level(cell: GridCell) -> int:
        key = cell.config.digest()
        if key not in depth:
            depth[key] = 1 + max((level(d) for d in cell.needs.values()), default=-1)
        return depth[key]

    waves: dict[int, list[GridCell]] = {}
    for cell in cells:
        waves.setdefault(level(cell), []).append(cell)
    return [waves[k] for k in sorted(waves)]


def code_version() -> str | None:
    """The git commit of the checkout, when there is one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def plugin_versions(cfg: RunConfig) -> dict[str, str]:

    reg = registry()
    out = {}
    choices = [cfg.dataset, cfg.encoder, cfg.grouping, cfg.decoder, *cfg.objectives, *cfg.tasks]
    for c in choices:
        info = reg.info(c.kind, c.name)
        out[f"{c.kind}.{c.name}"] = f"{info.distribution} {info.version}"
    return out


def run_cell(
    cell: GridCell,
    grid_name: str,
    runs_dir: Path,
    db_path: Path,
    progress: bool,
    leases: LeaseSettings | None = None,
) -> str:
    """Train and evaluate one cell into the store unless another process holds it;
    returns its status (see the constants above)."""
    leases = leases or LeaseSettings()
    store = ResultStore(db_path)
    claim = _claim(store, cell, leases)
    if claim.lease is None:
        return _unclaimed(claim)
    outcome = "interrupted"  # what the lease history says if neither status is reached
    try:
        with _Heartbeat(store, claim.lease, leases.timeout, cell.label):
            outcome = _run_claimed(cell, grid_name, runs_dir, store, progress)
    finally:
        store.release(claim.lease, outcome)
    return outcome


def _unclaimed(claim: Claim) -> str:
    """The status of a cell whose claim found no lease to take."""
    if claim.holder is not None:
        return RUNNING_ELSEWHERE
    return DONE_ELSEWHERE if claim.status == "complete" else FAILED_ELSEWHERE


def status_detail(store: ResultStore, cell: GridCell, status: str) -> str | None:
    """What to say under a cell's status: its error, who holds it, who finished it."""
    digest = cell.config.digest()
    if status in ("failed", FAILED_ELSEWHERE):
        stored = store.get(digest)
        error = stored.error_line if stored is not None else None
        return error or "failed without an error message (see `ocl-bench results`)"
    last = (store.leases(digest) or [None])[-1]
    if status == RUNNING_ELSEWHERE and last is not None:
        return f"held by {last.holder()}; --wait waits for it"
    if status == DONE_ELSEWHERE and last is not None:
        return f"run by host {last.host}, pid {last.pid}"
    if status == SKIPPED:
        held = [d.label for d in cell.needs.values()]
        return f"needs {', '.join(held)}, not complete here"
    return None


def _claim(store: ResultStore, cell: GridCell, leases: LeaseSettings) -> Claim:
    """The cell's lease, or what keeps us from it; with `wait`, waits out a live holder."""
    told = False
    while True:
        claim = store.claim(cell.config.digest(), leases.timeout, failed_since=leases.since)
        if claim.holder is None or not leases.wait:
            return claim
        if not told:
            print(f"waiting for '{cell.label}': {claim.holder.holder()}", file=sys.stderr)
            told = True
        time.sleep(leases.poll)


def _run_claimed(
    cell: GridCell, grid_name: str, runs_dir: Path, store: ResultStore, progress: bool
) -> str:
    run_dir = _start(cell, grid_name, runs_dir, store)
    try:
        cfg = _resolve_needs(cell, store, runs_dir)
        train(cfg, run_dir, progress=progress)
        metrics = _evaluated(run_dir, progress)
    except Exception as err:  # a failing cell is recorded and the grid goes on
        return _failed(store, cell, err)
    store.complete(cell.config.digest(), metrics["records"])
    return "complete"


def _start(cell: GridCell, grid_name: str, runs_dir: Path, store: ResultStore) -> Path:
    """Mark the cell running in the store; its run directory."""
    cfg = cell.config
    digest = cfg.digest()
    run_dir = runs_dir / digest
    store.start(
        Cell(
            config_hash=digest,
            config=cfg.to_dict(),
            plugins=plugin_versions(cfg),
            dataset=cfg.dataset.name,
            split=cfg.eval.split,
            seed=cfg.seed,
            status="running",
            grid=grid_name,
            label=cell.label,
            code_version=code_version(),
            run_dir=str(run_dir),
        )
    )
    return run_dir


def _evaluated(run_dir: Path, progress: bool) -> dict[str, Any]:
    """The metrics of the run trained into `run_dir`."""
    cfg, model, step = load_run(run_dir)
    return evaluate(cfg, model, run_dir, step, progress=progress)


def _failed(store: ResultStore, cell: GridCell, err: Exception) -> str:
    """Record the cell failed with `err` (inside its except block: the traceback is read)."""
    detail = str(err) if isinstance(err, UserError) else traceback.format_exc(limit=3)
    store.fail(cell.config.digest(), f"{type(err).__name__}: {detail}")
    return "failed"


def _resolve_needs(cell: GridCell, store: ResultStore, runs_dir: Path) -> RunConfig:
    """The cell's config with each "@PRESET" replaced by that (complete) run's directory."""
    if not cell.needs:
        return cell.config
    paths = []
    for key, dep in cell.needs.items():
        stored = store.get(dep.config.digest())
        if stored is None or stored.status != "complete":
            state = "not run" if stored is None else stored.status
            raise UserError(f"{key}: the run it needs ({dep.label}) is {state}")
        where = Path(stored.run_dir or runs_dir / dep.config.digest()).resolve()
        paths.append(f"{key}={json.dumps(str(where))}")
    return resolve(apply_overrides(cell.config.raw, paths))


def run_grid(
    grid: Grid,
    db_path: Path,
    runs_dir: Path,
    workers: int = 1,
    executor: str = "local",
    slurm: dict[str, Any] | None = None,
    progress: bool = True,
    wait: bool = False,
    lease_timeout: float = LEASE_TIMEOUT,
) -> dict[str, str]:
    """Run every cell not yet complete in the store; label -> status.

    Cells another live process holds are skipped, or with `wait` waited for after the
    rest of their wave has run (then reported as that process left them)."""
    if executor not in ("local", "submitit"):
        raise ConfigError(f"unknown executor '{executor}'; use 'local' or 'submitit'")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if lease_timeout <= 0:
        raise ConfigError(f"the lease timeout must be positive, got {lease_timeout}")
    check_jobs(grid, executor, slurm or {})
    leases = LeaseSettings(lease_timeout, wait=False, since=time.time())
    store = ResultStore(db_path)
    todo: list[GridCell] = []
    statuses: dict[str, str] = {}
    for cell in grid.cells:
        if store.status(cell.config.digest()) == "complete":
            statuses[cell.label] = STORED
        else:
            todo.append(cell)
    runner = _CellRunner(grid.name, db_path, runs_dir, workers, executor, slurm or {}, progress)
    for wave in _waves(todo):  # a cell's teacher runs (and is stored) before the cell
        ready = []
        for cell in wave:
            blocked = any(
                statuses.get(dep.label) in (RUNNING_ELSEWHERE, SKIPPED)
                for dep in cell.needs.values()
            )
            if blocked:
                statuses[cell.label] = SKIPPED
            else:
                ready.append(cell)
        statuses.update(runner.run(ready, leases))
        held = [c for c in ready if statuses[c.label] == RUNNING_ELSEWHERE]
        if wait and held:
            statuses.update(runner.run(held, replace(leases, wait=True)))
    return statuses


@dataclass(frozen=True)
class _CellRunner:
    """How run_grid runs a wave of cells: in this process, in a pool of worker processes,
    or as submitit jobs."""

    grid_name: str
    db_path: Path
    runs_dir: Path
    workers: int
    executor: str
    slurm: dict[str, Any]
    progress: bool

    def run(self, cells: list[GridCell], leases: LeaseSettings) -> dict[str, str]:
        """label -> status of each of `cells`, in their order."""
        if self.executor == "submitit":
            return _run_submitit(
                self.grid_name, cells, self.db_path, self.runs_dir, self.slurm, leases
            )
        if self.workers > 1:
            return self._in_pool(cells, leases)
        return {
            cell.label: run_cell(
                cell, self.grid_name, self.runs_dir, self.db_path, self.progress, leases
            )
            for cell in cells
        }

    def _in_pool(self, cells: list[GridCell], leases: LeaseSettings) -> dict[str, str]:
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from multiprocessing import get_context

        with ProcessPoolExecutor(
            self.workers,
            mp_context=get_context("spawn"),
            initializer=share_cores,
            initargs=(self.workers,),
        ) as pool:
            futures = {
                cell.label: pool.submit(
                    run_cell, cell, self.grid_name, self.runs_dir, self.db_path, False, leases
                )
                for cell in cells
            }
            if self.progress:  # workers draw no progress bars: say when each cell ends
                print(f"{len(cells)} cells on {self.workers} workers", file=sys.stderr)
                for fut in as_completed(futures.values()):
                    label = next(k for k, v in futures.items() if v is fut)
                    print(f"  {fut.result()}: {label}", file=sys.stderr)
            return {label: fut.result() for label, fut in futures.items()}


def share_cores(workers: int) -> None:
    """Give one of `workers` local processes its share of the CPU cores as torch threads.

    Each process would otherwise start one thread per core: on 2 cores, 2 processes of 2
    threads each wait on each other's threads, while 1 thread each keeps both cores busy
    with no synchronisation (small CPU models gain little from a second intra-op thread).
    A cell's own train.threads, when set, still wins (train() applies it later)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // workers))


def check_jobs(grid: Grid, executor: str, slurm: dict[str, Any]) -> None:
    """Refuse job settings no cell can run with, before anything runs."""
    if executor != "submitit":
        if slurm.get("gpus") or (slurm.get("nodes") or 1) > 1:
            raise ConfigError(
                "gpus and nodes are for --executor submitit (the local executor runs each"
                " cell in one process; --executor submitit --cluster local runs jobs here)"
            )
        return
    jobs = cluster.JobResources.from_settings(slurm)
    for cell in grid.cells:
        t = cell.config.train
        if t.batch_size % (jobs.tasks * t.accumulate):
            raise ConfigError(
                f"'{cell.label}': train.batch_size ({t.batch_size}) does not split into"
                f" {jobs.tasks} processes ({jobs.nodes} node(s) x {jobs.tasks_per_node}) x"
                f" train.accumulate ({t.accumulate}) equal micro-batches"
            )


def _run_submitit(
    name: str,
    cells: list[GridCell],
    db_path: Path,
    runs_dir: Path,
    slurm: dict[str, Any],
    leases: LeaseSettings,
) -> dict[str, str]:
    """One submitit job per cell ('local' cluster: local processes), each of nodes x
    tasks_per_node processes; this process holds the cells' leases until their jobs end."""
    submitter = cluster.executor(runs_dir / "submitit", cluster.JobResources.from_settings(slurm))
    store = ResultStore(db_path)
    statuses: dict[str, str] = {}
    running: dict[str, tuple[Any, Lease]] = {}
    with _JobLeases(store, leases.timeout) as kept:
        try:
            for cell in cells:
                claim = _claim(store, cell, leases)
                if claim.lease is None:
                    statuses[cell.label] = _unclaimed(claim)
                    continue
                kept.add(claim.lease)
                call = cluster.Requeueable(
                    _job_cell, cell, name, runs_dir, db_path, claim.lease, leases.timeout
                )
                submitter.update_parameters(name=cluster.job_name(name, cell.label))
                job = submitter.submit(call)
                store.assign_job(claim.lease, cluster.job_key(submitter, job))
                running[cell.label] = (job, claim.lease)
            jobs = {label: job for label, (job, _) in running.items()}
            for label, result, error in cluster.finished(jobs, leases.poll):
                lease = running.pop(label)[1]
                kept.drop(lease)
                statuses[label] = _job_ended(store, lease, result, error)
        except BaseException:  # stopped (Ctrl-C, SIGTERM): its jobs go with it
            for job, lease in running.values():
                cluster.cancel(job)
                store.release(lease, "interrupted: the grid stopped and cancelled its job")
            raise
    return {cell.label: statuses[cell.label] for cell in cells}


class _JobLeases:
    """Keeps alive, from one daemon thread, the leases of cells whose jobs have not ended:
    nothing else beats a lease while its job waits in the queue, or between a preemption
    and the requeued job's start. A lease no longer held (its job released it) is dropped
    quietly: the job's own heartbeat warns if it was taken over."""

    def __init__(self, store: ResultStore, timeout: float) -> None:
        self.store, self.timeout = store, timeout
        self._leases: dict[int, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="job-leases", daemon=True)

    def __enter__(self) -> _JobLeases:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._leases[lease.id] = lease

    def drop(self, lease: Lease) -> None:
        with self._lock:
            self._leases.pop(lease.id, None)

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout / 5):  # several beats per timeout, as _Heartbeat
            with self._lock:
                leases = list(self._leases.values())
            for lease in leases:
                try:
                    held = self.store.heartbeat(lease, self.timeout)
                except Exception as err:  # noqa: BLE001 - a failed beat must not end the thread
                    print(f"warning: lease heartbeat: {err}", file=sys.stderr)
                    continue
                if not held:
                    self.drop(lease)


def _job_ended(store: ResultStore, lease: Lease, result: Any, error: str | None) -> str:
    """A cell's status once its job ended; a job that ended without reporting (cancelled,
    killed, out of requeues) leaves its cell failed with why, and its lease released."""
    if error is None and isinstance(result, str):
        return result
    why = error or f"the job returned {result!r}"
    if store.status(lease.config_hash) != "complete":
        store.fail(lease.config_hash, f"JobEnded: {why}")
    store.release(lease, f"failed: {why}")
    return "failed"


def _job_cell(
    cell: GridCell,
    grid_name: str,
    runs_dir: Path,
    db_path: Path,
    lease: Lease,
    timeout: float,
) -> str:
    """A cell on one task of its submitit job (cluster.Requeueable calls it on every task,
    in one process group). Every rank trains; rank 0 alone writes the store and the run
    directory, beats the lease the grid took, evaluates and releases the lease."""
    world, _ = distributed.setup(resolve_device(cell.config.train.device))
    store = ResultStore(db_path) if world.main else None
    beat = _Heartbeat(store, lease, timeout, cell.label) if store else contextlib.nullcontext()
    with beat:
        start = _job_start(cell, grid_name, runs_dir, store, lease, timeout) if store else None
        status, cfg = distributed.from_main(start)
        if cfg is not None:
            status = _job_train(cell, cfg, runs_dir, store, world.rank)
    if store is not None:  # after the heartbeat stopped (a no-op on a lease taken over)
        store.release(lease, status)
    return status


def _job_train(
    cell: GridCell, cfg: RunConfig, runs_dir: Path, store: ResultStore | None, rank: int
) -> str:
    """Train on every rank; rank 0 then evaluates into the store. Raises Preempted to have
    the job requeued."""
    run_dir = runs_dir / cell.config.digest()
    try:
        try:
            train(cfg, run_dir, progress=False)
        finally:
            distributed.teardown()
    except Exception as err:
        if store is None:
            raise
        return _failed(store, cell, err)
    if store is None:
        return f"trained (rank {rank})"
    if distributed.stop_asked():  # the signal came as training ended: evaluate after requeue
        raise distributed.Preempted(cfg.train.steps)
    return _evaluate_into(store, cell, run_dir)


def _job_start(
    cell: GridCell, grid_name: str, runs_dir: Path, store: ResultStore, lease: Lease, timeout: float
) -> tuple[str, RunConfig | None]:
    """Rank 0 of a cell's job: ("running", the config to train) once the cell is marked
    running, or (its status, None) when it is not to run here."""
    if not store.heartbeat(lease, timeout):  # taken over while the job waited
        return RUNNING_ELSEWHERE, None
    _start(cell, grid_name, runs_dir, store)
    try:
        return "running", _resolve_needs(cell, store, runs_dir)
    except Exception as err:
        return _failed(store, cell, err), None


def _evaluate_into(store: ResultStore, cell: GridCell, run_dir: Path) -> str:
    """Evaluate a trained cell into the store; its status."""
    try:
        metrics = _evaluated(run_dir, False)
    except Exception as err:
        return _failed(store, cell, err)
    store.complete(cell.config.digest(), metrics["records"])
    return "complete"
