"""Copying one results store into another, across backends (`ocl-bench results --db A
--export B`): many laptops' SQLite files into one lab PostgreSQL database, or a server's
results into a file to take along.

A merge by config hash, safe to rerun (a second run copies nothing new):
- a cell the target lacks is copied as it is: status, error, times, run directory,
  metrics and per-image values;
- a cell complete in the target is kept (a cell is run once: its first complete result
  stays), and so is one the source has not completed;
- a cell the target has as failed or running is replaced by the source's complete one.
Released leases (the history of who ran what) are added unless the target has the same
one (cell, host, pid, start); live leases are not copied: their processes still report to
the source store.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ocl_bench.api.errors import UserError
from ocl_bench.run.store import Cell, Lease, ResultStore, insert_cell, insert_metrics, is_url

# What a merged cell became in the target.
COPIED, REPLACED, KEPT = "copied", "replaced", "kept"


@dataclass
class CopyReport:
    copied: int = 0  # cells the target lacked
    replaced: int = 0  # failed or running there, complete here
    kept: int = 0  # the target's own row stays
    leases: int = 0  # lease history rows added
    live: int = 0  # live leases left out

    def line(self, source: str, target: str) -> str:
        """The one line `ocl-bench results --export` prints."""
        text = (
            f"{source} -> {target}: {self.copied} cells copied, {self.replaced} replaced"
            f" (complete here, failed or running there), {self.kept} already there;"
            f" {self.leases} leases added"
        )
        if self.live:
            text += f"; {self.live} live leases not copied (cells still running at the source)"
        return text


def same_store(a: str | Path, b: str | Path) -> bool:
    if is_url(a) or is_url(b):
        return str(a) == str(b)
    return Path(a).resolve() == Path(b).resolve()


def copy_store(source: ResultStore, target: ResultStore) -> CopyReport:
    """Merge `source` into `target` (see the module's docstring); what was done."""
    if same_store(source.target, target.target):
        raise UserError(f"--export names the store it reads ({source.where}); name another")
    report = CopyReport()
    for cell in source.cells():
        full = source.get(cell.config_hash, per_image=True)
        if full is None:  # deleted meanwhile (a rerun replacing its row): not there to copy
            continue
        done = _merge_cell(target, full)
        setattr(report, done, getattr(report, done) + 1)
    history = source.leases()
    report.live = sum(lease.released is None for lease in history)
    report.leases = _add_leases(target, [lease for lease in history if lease.released is not None])
    return report


def _records(cell: Cell) -> list[dict[str, Any]]:
    """The cell's metrics as the records ResultStore.complete takes, per-image values too."""
    out = []
    for m in cell.metrics:
        values = cell.per_image.get((m["task"], m["metric"], m["masks"]))
        out.append({**m, "per_image": None if values is None else values.tolist()})
    return out


def _merge_cell(target: ResultStore, cell: Cell) -> str:
    with target.session("write", cell.config_hash) as db:
        row = db.one("SELECT id, status FROM cells WHERE config_hash = ?", (cell.config_hash,))
        if row is not None and (row["status"] == "complete" or cell.status != "complete"):
            return KEPT
        if row is not None:  # its metrics and per-image values go with it (ON DELETE CASCADE)
            db.run("DELETE FROM cells WHERE id = ?", (row["id"],))
        cell_id = insert_cell(db, cell)
        insert_metrics(db, cell_id, _records(cell))
    return COPIED if row is None else REPLACED


# The lease columns copied (all but the id, which the target assigns).
LEASE_COLUMNS = [f.name for f in fields(Lease) if f.name != "id"]


def _add_leases(target: ResultStore, leases: list[Lease]) -> int:
    """Add the released `leases` the target does not have; how many."""
    with target.session("write") as db:  # two exports at once add each lease once
        rows = db.rows("SELECT config_hash, host, pid, started FROM leases")
        have = {(r["config_hash"], r["host"], r["pid"], r["started"]) for r in rows}
        new = [x for x in leases if (x.config_hash, x.host, x.pid, x.started) not in have]
        db.many(
            f"INSERT INTO leases ({', '.join(LEASE_COLUMNS)})"
            f" VALUES ({', '.join('?' * len(LEASE_COLUMNS))})",
            [[getattr(x, c) for c in LEASE_COLUMNS] for x in new],
        )
    return len(new)
