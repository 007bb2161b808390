"""The processes the store's concurrency tests start (tests/test_grid_workers.py): in a module
that imports only the store, so that each spawned process starts in a fraction of a second
instead of the seconds importing torch (through the grid and the CLI) takes."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from pathlib import Path

from ocl_bench.run.store import Cell, ResultStore

WRITERS = 4
CELLS_PER_WRITER = 24
SHARED = "shared-cell"


def records(writer: int, i: int) -> list[dict]:
    return [
        {
            "task": "object_discovery",
            "metric": metric,
            "masks": "decoder",
            "value": writer * 1000 + i + k / 10,
            "resolution": [32, 32],
            "num_images": 16,
        }
        for k, metric in enumerate(("fg_ari", "mbo_i", "miou"))
    ]


def writer_cell(config_hash: str, writer: int, i: int) -> Cell:
    return Cell(
        config_hash=config_hash,
        config={"writer": writer, "i": i},
        plugins={"encoder.cnn": "ocl-bench 0"},
        dataset="shapes",
        split="val",
        seed=i,
        status="running",
        grid="concurrent",
        label=config_hash,
    )


def cell_writer(db: str, errors: str, writer: int, barrier) -> None:
    """A worker process: its own cells (some failing), plus one cell every writer shares."""
    try:
        barrier.wait(timeout=120)
        store = ResultStore(db)
        for i in range(CELLS_PER_WRITER):
            digest = f"w{writer}-{i}"
            store.start(writer_cell(digest, writer, i))
            if i % 4 == 3:
                store.fail(digest, f"RuntimeError: cell {digest}")
            else:
                store.complete(digest, records(writer, i))
            if i == CELLS_PER_WRITER // 2:
                store.start(writer_cell(SHARED, writer, i))
                store.complete(SHARED, records(writer, i))
            store.cells(grid="concurrent")  # readers interleave with the writers
    except BaseException:
        (Path(errors) / f"writer{writer}.txt").write_text(traceback.format_exc())
        raise


def run_processes(target, args: list[tuple]) -> list[int | None]:
    """Start one spawned process per args tuple, released together; their exit codes."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(args))
    procs = [ctx.Process(target=target, args=(*a, barrier)) for a in args]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def claimer(db: str, results: str, index: int, barrier) -> None:
    """A process that claims the one shared cell the moment all are ready."""
    store = ResultStore(db)
    barrier.wait(timeout=120)
    claim = store.claim("shared", timeout=60)
    taken = "lease" if claim.lease is not None else f"held by {claim.holder.pid}"
    (Path(results) / f"{index}.txt").write_text(f"{os.getpid()} {taken}")


GRID_CELLS = 48


def grid_writer(db: str, results: str, writer: int, barrier) -> None:
    """A grid worker as run_cell drives the store: it opens the (new) store together with the
    others, then, once all have it open, claims every cell in an order of its own and runs
    (starts, a few ms of work, completes or fails, releases) those it gets."""
    try:
        since = time.time()  # as run_grid: a failure stored after this is not retried
        barrier.wait(timeout=120)
        store = ResultStore(db)
        # All claim together: a writer still connecting (psycopg's import, the first
        # connection) must not find every cell done by one that started first.
        barrier.wait(timeout=120)
        shift = writer * GRID_CELLS // WRITERS
        order = [(i + shift) % GRID_CELLS for i in range(GRID_CELLS)]
        ran = []
        for i in order[::-1] if writer % 2 else order:
            digest = f"cell-{i}"
            claim = store.claim(digest, timeout=60, failed_since=since)
            if claim.lease is None:
                continue
            store.start(writer_cell(digest, writer, i))
            time.sleep(0.005)  # the cell's training
            if i % 7 == 6:
                store.fail(digest, f"RuntimeError: cell {i}")
                store.release(claim.lease, "failed")
            else:
                store.complete(digest, records(writer, i))
                store.release(claim.lease, "complete")
            ran.append(digest)
        (Path(results) / f"{writer}.json").write_text(json.dumps(ran))
    except BaseException:
        (Path(results) / f"error{writer}.txt").write_text(traceback.format_exc())
        raise
