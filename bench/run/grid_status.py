"""What runs where, read from the results store: `ocl-bench status`, and the one progress
display of a grid whose cells run in worker processes or Slurm jobs. Both kinds report the
same way, through their lease's heartbeat (step, steps, seconds per step: progress.py,
store.heartbeat), so one reader serves a laptop's workers and a cluster's jobs alike.

On a terminal the display redraws its lines in place; anywhere else (CI logs, pipes) it
prints plain lines, a summary when the counts change and at most once a minute otherwise.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tabulate import tabulate

from ocl_bench.run.store import STORE_ERRORS, Lease, ResultStore, pid_alive, this_host


@dataclass
class Running:
    """A cell with a live lease, and what its heartbeat last said."""

    lease: Lease
    label: str
    grid: str | None
    stale: str | None  # why the lease no longer holds the cell (the next claim takes it)

    def step_text(self) -> str:
        lease = self.lease
        if lease.step is None or not lease.steps:
            return "starting"
        done = " (evaluating)" if lease.step >= lease.steps else ""
        return f"step {lease.step}/{lease.steps}{done}"

    def state(self) -> str:
        """running, or why not: the next claim of the cell takes a stale lease over."""
        if self.stale is None:
            return "running"
        lease = self.lease
        gone = lease.host == this_host() and not pid_alive(lease.pid)
        return "stale: its process is gone" if gone else "stale: no heartbeat in time"

    def where(self) -> str:
        job = f", job {self.lease.job}" if self.lease.job else ""
        return f"{self.lease.host} pid {self.lease.pid}{job}"


def running(store: ResultStore, states: dict[str, dict[str, Any]], now: float) -> list[Running]:
    """Every live lease, with its cell's label and grid (from `states`, store.states())."""
    out = []
    for lease in store.leases(live=True):
        state = states.get(lease.config_hash, {})
        label = state.get("label") or lease.config_hash[:12]
        out.append(Running(lease, label, state.get("grid"), lease.expired(now)))
    return out


def age(seconds: float) -> str:
    """A duration as a person reads it: 42 s, 7 min, 3 h 05 min."""
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def status_report(store: ResultStore, now: float | None = None) -> list[str]:
    """`ocl-bench status`: a summary line, then a table of the running cells."""
    now = time.time() if now is None else now
    states = store.states()
    cells = running(store, states, now)
    stale = sum(r.stale is not None for r in cells)
    counts = [s["status"] for s in states.values()]
    head = (
        f"{len(cells) - stale} running, {stale} stale; {counts.count('complete')} complete,"
        f" {counts.count('failed')} failed of {len(states)} cells in {store.where}"
    )
    if not cells:
        return [head]
    rows = [
        [
            r.label,
            r.grid or "",
            r.lease.host,
            r.lease.pid,
            r.lease.job or "",
            r.step_text(),
            "" if r.lease.step_time is None else f"{r.lease.step_time:.3g}",
            f"{age(now - r.lease.heartbeat)} ago",
            r.state(),
        ]
        for r in cells
    ]
    headers = ["cell", "grid", "host", "pid", "job", "progress", "s/step", "heartbeat", "state"]
    return [head, *tabulate(rows, headers=headers).splitlines()]


@dataclass
class Snapshot:
    """A grid's cells as the store has them at one moment."""

    name: str
    total: int
    done: list[str] = field(default_factory=list)  # labels
    failed: list[str] = field(default_factory=list)
    running: list[Running] = field(default_factory=list)
    eta: float | None = None  # seconds; None until a step time was measured

    @property
    def waiting(self) -> int:
        return self.total - len(self.done) - len(self.failed) - len(self.running)

    def counts(self) -> tuple[int, int, int]:
        return len(self.done), len(self.failed), len(self.running)

    def lines(self) -> list[str]:
        """The summary line, then one line per running cell."""
        left = self.waiting + len(self.running)
        eta = "" if not left else f"; ETA {age(self.eta)}" if self.eta is not None else ""
        head = (
            f"grid '{self.name}': {len(self.done)}/{self.total} done, {len(self.running)}"
            f" running, {len(self.failed)} failed, {self.waiting} waiting{eta}"
        )
        cells = []
        for r in self.running:
            speed = "" if r.lease.step_time is None else f", {r.lease.step_time:.3g} s/step"
            cells.append(f"  {r.label}: {r.step_text()}{speed} ({r.where()})")
        return [head, *cells]


def estimate(running: list[Running], queued_steps: list[int], lanes: int) -> float | None:
    """Seconds until the cells' training ends: each running cell's steps left at its
    measured step time, the queued cells' steps at the mean of those times, shared over
    `lanes` parallel runners; None before any step time was measured."""
    measured = [r.lease.step_time for r in running if r.lease.step_time]
    if not measured:
        return None
    per_step = sum(measured) / len(measured)
    left = [
        max((r.lease.steps or 0) - (r.lease.step or 0), 0) * (r.lease.step_time or per_step)
        for r in running
    ]
    total = sum(left) + sum(queued_steps) * per_step
    return max(max(left, default=0.0), total / max(lanes, len(running), 1))


def snapshot(
    store: ResultStore,
    name: str,
    cells: dict[str, tuple[str, int]],
    since: float,
    lanes: int,
    now: float | None = None,
) -> Snapshot:
    """The grid's `cells` (config hash -> (label, train steps)) in the store now: done,
    failed since `since` (older failures are rerun: waiting), running, and the ETA."""
    now = time.time() if now is None else now
    states = store.states()
    snap = Snapshot(name, len(cells))
    finished = set()
    for digest, (label, _) in cells.items():
        state = states.get(digest) or {}
        if state.get("status") == "complete":
            snap.done.append(label)
        elif state.get("status") == "failed" and (state.get("ended") or 0) >= since:
            snap.failed.append(label)
        else:
            continue
        finished.add(digest)
    for r in running(store, states, now):
        digest = r.lease.config_hash
        if digest in cells and digest not in finished and r.stale is None:
            r.label = cells[digest][0]
            snap.running.append(r)
    busy = finished | {r.lease.config_hash for r in snap.running}
    queued = [steps for digest, (_, steps) in cells.items() if digest not in busy]
    snap.eta = estimate(snap.running, queued, lanes)
    return snap


class GridProgress:
    """Shows a running grid's progress from a daemon thread that polls the store: on a
    terminal a block of lines redrawn in place, elsewhere plain lines. Each cell that ends
    gets a line of its own (`  complete: LABEL`), as the workers' results did before."""

    def __init__(
        self,
        db: str | Path,
        name: str,
        cells: dict[str, tuple[str, int]],
        lanes: int,
        stream: IO[str] | None = None,
        refresh: float | None = None,
        every: float = 60.0,
    ) -> None:
        self.db, self.name, self.cells, self.lanes = db, name, cells, lanes
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.refresh = refresh or (1.0 if self.interactive else 5.0)
        self.every = every  # plain output: a summary at least this often while steps move
        self.since = time.time()  # failures before the grid started are rerun: waiting
        self._drawn = 0  # lines of the last redraw (terminal)
        self._said: tuple[int, int, int] | None = None
        self._said_at = 0.0
        self._ended: set[str] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="grid-progress", daemon=True)

    def __enter__(self) -> GridProgress:
        self._store = ResultStore(self.db)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.update(final=True)
        self._store.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh):
            try:
                self.update()
            except STORE_ERRORS as err:  # the display waits for the store to come back
                print(f"warning: progress: {err}", file=self.stream)

    def update(self, final: bool = False) -> Snapshot:
        """Read the store and show what changed; the snapshot shown."""
        snap = snapshot(self._store, self.name, self.cells, self.since, self.lanes)
        ended = self._endings(snap)
        if self.interactive:
            self._redraw(ended, snap.lines(), final)
        else:
            self._plain(ended, snap, final, time.monotonic())
        self.stream.flush()
        return snap

    def _endings(self, snap: Snapshot) -> list[str]:
        """`  complete: LABEL` for each cell that ended since the last look (none the first
        time: cells stored before are not news)."""
        now = {f"  complete: {label}" for label in snap.done}
        now |= {f"  failed: {label}" for label in snap.failed}
        new = [] if self._ended is None else sorted(now - self._ended)
        self._ended = now
        return new

    def _redraw(self, ended: list[str], lines: list[str], final: bool) -> None:
        width = max(shutil.get_terminal_size().columns - 1, 20)
        out = [f"\x1b[{self._drawn}F\x1b[J"] if self._drawn else []  # up, then clear below
        out += [line + "\n" for line in ended]
        out += [line[:width] + "\n" for line in lines]  # no wrapping: the count stays right
        self.stream.write("".join(out))
        self._drawn = 0 if final else len(lines)

    def _plain(self, ended: list[str], snap: Snapshot, final: bool, now: float) -> None:
        for line in ended:
            self.stream.write(line + "\n")
        changed = snap.counts() != self._said
        due = now - self._said_at >= self.every and snap.running and not final
        if changed or due:
            self.stream.write("".join(line + "\n" for line in snap.lines()))
            self._said, self._said_at = snap.counts(), now
