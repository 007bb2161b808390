"""Ablation grids: a base run config plus axes, expanded into cells, run, stored.

A published leaderboard (leaderboards/*.toml with `rows`) is a grid too: each buildable
row on each dataset of its columns is a cell.

A config value "@PRESET" (e.g. `objectives.spot_self_training.teacher = "@spot-coco"`)
names a run the cell needs: the grid adds a cell for that preset on the same dataset,
with the same command-line overrides, runs it first, and hands its run directory to the
cell. The stored config (and so its hash) keeps "@PRESET", which is what a leaderboard
recomputes; the run directory's config.toml holds the resolved path.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ocl_bench.config import STAGES, RunConfig, apply_overrides, read_toml, resolve, tomllib
from ocl_bench.errors import ConfigError, DataError, UnknownPluginError, UserError
from ocl_bench.store import Cell, ResultStore

GRID_KEYS = ("name", "title", "base", "base_config", "axes", "exclude", "columns", "masks")


@dataclass
class GridCell:
    """One combination: its overrides of the base, and the resolved config."""

    label: str
    overrides: list[str]
    config: RunConfig
    needs: dict[str, GridCell] = field(default_factory=dict)  # dotted key -> producing cell


@dataclass
class Grid:
    name: str
    cells: list[GridCell]


def _format(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return repr(value)


def demo_grid_path() -> Path:
    """The packaged demo grid (leaderboards/shapes-demo.toml)."""
    from ocl_bench.leaderboard import leaderboard_dir

    path = leaderboard_dir() / "shapes-demo.toml"
    if not path.is_file():
        raise DataError(f"the demo grid {path} is missing from this installation; pass a grid file")
    return path


def load_grid(path: str | Path | None = None, overrides: list[str] | None = None) -> Grid:
    """Read a grid file and expand its cross product (minus `exclude` rules)."""
    path = Path(path) if path is not None else demo_grid_path()
    if not path.suffix and not path.exists():  # a leaderboard by name
        from ocl_bench.leaderboard import board_path

        path = board_path(path)
    spec = read_toml(path)
    if "rows" in spec and "axes" not in spec:
        return _board_grid(path, spec, list(overrides or []))
    unknown = [k for k in spec if k not in GRID_KEYS]
    if unknown:
        raise ConfigError(
            f"{path}: unknown grid key '{unknown[0]}'; allowed: {', '.join(GRID_KEYS)}"
        )
    if "base_config" in spec:
        start = read_toml(path.parent / spec["base_config"])
    else:
        from ocl_bench.config import default_text

        start = tomllib.loads(default_text())
    base = _merge(start, spec.get("base", {}))
    base = apply_overrides(base, list(overrides or []))
    axes: dict[str, list[Any]] = spec.get("axes", {})
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axis '{key}' must be a non-empty list")
    excludes = spec.get("exclude", [])
    keys = list(axes)
    cells = []
    for combo in itertools.product(*(axes[k] for k in keys)):
        chosen = dict(zip(keys, combo))
        if any(all(chosen.get(k) == v for k, v in rule.items()) for rule in excludes):
            continue
        cell_overrides = [f"{k}={_format(v)}" for k, v in chosen.items()]
        label = ", ".join(f"{k}={v}" for k, v in chosen.items()) or "base"
        raw = apply_overrides(base, cell_overrides)
        cells.append(GridCell(label, cell_overrides, resolve(raw), _needs(raw, overrides)))
    return Grid(spec.get("name", path.stem), _with_needs(cells))


def _board_grid(path: Path, spec: dict[str, Any], overrides: list[str]) -> Grid:
    """A published leaderboard's buildable rows, one cell per row and column dataset."""
    from ocl_bench.leaderboard import column_datasets, read_rows, row_raw

    base = dict(spec.get("base", {}))
    cells: list[GridCell] = []
    skipped = []
    for row in read_rows(spec):
        if not row.buildable:
            continue
        not_applied: list[str] = []
        for ds in column_datasets(spec):
            try:
                raw = row_raw(row, base, ds or None, overrides, not_applied)
                cfg = resolve(raw)
            except UnknownPluginError as err:
                skipped.append(f"{row.label}: {str(err).split(';')[0]}")
                break
            except ConfigError as err:
                raise ConfigError(f"{path.stem} row '{row.label}' [{ds}]: {err}") from None
            where = ds if cfg.dataset.name == ds else f"{ds} as {cfg.dataset.name}"
            cells.append(GridCell(f"{row.label} [{where}]", [], cfg, _needs(raw, overrides)))
        if not_applied:
            unique = " ".join(dict.fromkeys(not_applied))
            print(f"{row.label}: its plugins have no {unique}; not applied", file=sys.stderr)
    for reason in skipped:
        print(f"skipping {reason}", file=sys.stderr)
    return Grid(spec.get("name", path.stem), _with_needs(cells))


def _references(raw: Any, prefix: str = "") -> dict[str, str]:
    """Dotted key -> preset name for every "@PRESET" string value in a raw config."""
    found: dict[str, str] = {}
    if isinstance(raw, dict):
        for k, v in raw.items():
            found.update(_references(v, f"{prefix}{k}."))
    elif isinstance(raw, str) and raw.startswith("@") and len(raw) > 1:
        found[prefix[:-1]] = raw[1:]
    return found


def _needs(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, GridCell]:
    """The cells a config's "@PRESET" values name: each preset on the config's dataset."""
    needs = {}
    for key, preset in _references(raw).items():
        dep = read_toml(preset)
        dep["dataset"] = dict(raw["dataset"])
        dep_raw = apply_overrides(dep, list(overrides or []))
        label = f"@{preset} [{raw['dataset'].get('name', '')}]"
        needs[key] = GridCell(label, [], resolve(dep_raw), _needs(dep_raw, overrides))
    return needs


def _with_needs(cells: list[GridCell]) -> list[GridCell]:
    """Cells with the cells they need placed before them, each config once."""
    ordered: dict[str, GridCell] = {}

    def add(cell: GridCell) -> None:
        for dep in cell.needs.values():
            add(dep)
        ordered.setdefault(cell.config.digest(), cell)

    for cell in cells:
        add(cell)
    return list(ordered.values())


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


def _merge(a: dict[str, Any], b: dict[str, Any], top: bool = True) -> dict[str, Any]:
    """Deep-merge `b` over `a`."""
    out = dict(a)
    for k, v in b.items():
        # A grid's objectives and tasks replace the base's; so does a stage table that
        # names another plugin (the old plugin's params would not apply).
        switched = isinstance(v, dict) and isinstance(out.get(k), dict) and "name" in v
        switched = switched and k in STAGES and v["name"] != out[k].get("name")
        replace = top and (k in ("objectives", "tasks") or switched)
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not replace:
            out[k] = _merge(out[k], v, top=False)
        else:
            out[k] = v
    return out


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
