"""Running grids: every cell not yet stored is trained, evaluated and stored once.

What a grid is (a base run config plus axes, or a published leaderboard's buildable rows)
and how its cells are expanded lives in boards.py.
"""

from __future__ import annotations

import json
import subprocess
import traceback
from pathlib import Path
from typing import Any

from ocl_bench.boards import Grid, GridCell, demo_grid_path, load_grid
from ocl_bench.config import RunConfig, apply_overrides, resolve
from ocl_bench.errors import ConfigError, UserError
from ocl_bench.store import Cell, ResultStore

__all__ = ["Grid", "GridCell", "demo_grid_path", "load_grid", "run_cell", "run_grid"]


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
    from ocl_bench.registry import registry

    reg = registry()
    out = {}
    choices = [cfg.dataset, cfg.encoder, cfg.grouping, cfg.decoder, *cfg.objectives, *cfg.tasks]
    for c in choices:
        info = reg.info(c.kind, c.name)
        out[f"{c.kind}.{c.name}"] = f"{info.distribution} {info.version}"
    return out


def run_cell(cell: GridCell, grid_name: str, runs_dir: Path, db_path: Path, progress: bool) -> str:
    """Train and evaluate one cell into the store; returns its final status."""
    from ocl_bench.evaluate import evaluate, load_run
    from ocl_bench.train import train

    store = ResultStore(db_path)
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
    try:
        cfg = _resolve_needs(cell, store, runs_dir)
        train(cfg, run_dir, progress=progress)
        cfg2, model, step = load_run(run_dir)
        metrics = evaluate(cfg2, model, run_dir, step, progress=progress)
    except Exception as err:  # a failing cell is recorded and the grid goes on
        detail = str(err) if isinstance(err, UserError) else traceback.format_exc(limit=3)
        store.fail(digest, f"{type(err).__name__}: {detail}")
        return "failed"
    store.complete(digest, metrics["records"])
    return "complete"


def _resolve_needs(cell: GridCell, store: ResultStore, runs_dir: Path) -> RunConfig:
    """The cell's config with each "@PRESET" replaced by that (complete) run's directory."""
    if not cell.needs:
        return cell.config
    paths = []
    for key, dep in cell.needs.items():
        stored = store.get(dep.config.digest())
        if stored is None or stored.status != "complete":
            state = "failed" if stored is not None else "not run"
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
) -> dict[str, str]:
    """Run every cell not yet complete in the store; label -> status."""
    if executor not in ("local", "submitit"):
        raise ConfigError(f"unknown executor '{executor}'; use 'local' or 'submitit'")
    store = ResultStore(db_path)
    todo: list[GridCell] = []
    statuses: dict[str, str] = {}
    for cell in grid.cells:
        if store.status(cell.config.digest()) == "complete":
            statuses[cell.label] = "complete (stored)"
        else:
            todo.append(cell)
    for wave in _waves(todo):  # a cell's teacher runs (and is stored) before the cell
        if executor == "submitit":
            statuses.update(_run_submitit(grid.name, wave, db_path, runs_dir, slurm or {}))
        elif workers <= 1:
            for cell in wave:
                statuses[cell.label] = run_cell(cell, grid.name, runs_dir, db_path, progress)
        else:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                futures = {
                    cell.label: pool.submit(run_cell, cell, grid.name, runs_dir, db_path, False)
                    for cell in wave
                }
                for label, fut in futures.items():
                    statuses[label] = fut.result()
    return statuses


def _run_submitit(
    name: str, cells: list[GridCell], db_path: Path, runs_dir: Path, slurm: dict[str, Any]
) -> dict[str, str]:
    """One Slurm job per cell ('local' cluster runs them as local processes, for tests)."""
    try:
        import submitit
    except ImportError:
        raise UserError(
            "--executor submitit needs the 'submitit' package: pip install submitit"
        ) from None
    folder = runs_dir / "submitit"
    executor = submitit.AutoExecutor(folder=folder, cluster=slurm.get("cluster"))
    params: dict[str, Any] = {"timeout_min": slurm.get("time", 60)}
    if slurm.get("partition"):
        params["slurm_partition"] = slurm["partition"]
    if slurm.get("gpus"):
        params["gpus_per_node"] = slurm["gpus"]
    executor.update_parameters(**params)
    jobs = [
        (cell.label, executor.submit(run_cell, cell, name, runs_dir, db_path, False))
        for cell in cells
    ]
    return {label: job.result() for label, job in jobs}
