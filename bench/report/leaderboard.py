"""Leaderboards: published numbers beside measured ones, from the results database."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ocl_bench.api.errors import ConfigError, UnknownPluginError, UserError
from ocl_bench.report.compare import compare_rows
from ocl_bench.report.conclusion import RankedRow, conclude, conclusion_lines
from ocl_bench.report.stats import MIN_SEEDS, Summary, separated, summarize
from ocl_bench.run.boards import (
    Column,
    Row,
    board_path,
    board_rows,
    check_spec,
    grid_columns,
    leaderboard_dir,
    list_leaderboards,
    load_grid,
    read_columns,
    row_config,
)
from ocl_bench.run.config import RunConfig, read_toml
from ocl_bench.run.protocol import evaluated_dataset, load_protocol
from ocl_bench.run.registry import registry
from ocl_bench.run.store import Cell, ResultStore, store_exists

FORMATS = ("md", "csv", "html", "json")
# Under a table whose rows have several seeds: what "±" and "n" mean.
SPREAD_NOTE = (
    "Measured: mean ± half-width of the 95% confidence interval of the mean over the row's"
    " n training seeds (Student's t below 20 seeds, else bootstrap); (in CI) / (outside CI):"
    " whether the published number lies inside it. A row with n = 1 shows its value alone:"
    " one seed has no seed interval."
)
# Where a one-seed row's interval over its images is drawn (the HTML chart; json
# `within_seed`): what that interval is and is not.
WITHIN_SEED_NOTE = (
    "A row with one seed is drawn with the 95% interval over its evaluated images: a"
    " within-seed interval. All its images are scored by the same trained model, so it says"
    " how the test images vary, not how training with another seed would; it is never a"
    " seed interval, and it never marks a row best."
)
# Under a table with a measured column: what a bold (marked) cell means, and when none is.
# A diff that would compare numbers measured on another dataset or under another protocol.
NOT_COMPARABLE = "not comparable"
COMPARABLE_NOTE = (
    "protocol: the evaluation protocol each row's measured cells were scored under (see"
    " Protocols); 'not comparable': the measured cell's dataset or protocol is not the one the"
    " published number was measured with, so no difference is computed."
)
MARK_NOTE = (
    "Bold (best in json/csv): the column's best row (lowest FID, else highest), marked only"
    " where the seeds support it: the best and the runner-up both have 2 or more seeds and"
    " neither mean lies inside the other's 95% seed interval, or their paired comparison"
    f" over at least {MIN_SEEDS} shared seeds is resolved (as in the Conclusion). A row with"
    " one seed is never marked. No mark: the lead is within the seeds' uncertainty."
)
__all__ = ["Leaderboard", "leaderboard_dir", "list_leaderboards", "load_leaderboard"]


@dataclass
class Leaderboard:
    name: str
    title: str
    source: dict[str, str]
    columns: list[Column]
    rows: list[Row]
    overrides: list[str] = field(default_factory=list)  # applied to every measured row
    # A grid's conclusion on its first column: which neighbours in the ranking the stored
    # data resolves (bench.conclusion), one sentence each, then the order it supports.
    conclusion: list[str] = field(default_factory=list)
    # The board's `[figure]` (ocl_bench.report.board_figures draws it) and `axes`, as written.
    figure: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    # The results database the rows were measured from: best_rows pairs the two leading
    # rows' seeds in it. None without one (then only their seed intervals can mark).
    store: ResultStore | None = field(default=None, repr=False, compare=False)
    # best_rows' seed-level comparisons, (column, row, row) -> resolved in the column's
    # direction: each is computed once however often the board is rendered.
    seed_verdicts: dict[tuple[str, int, int], bool] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def runnable(self) -> int:
        return sum(
            1 for r in self.rows if r.missing is None or r.missing.startswith("not measured")
        )


def load_leaderboard(
    name_or_path: str | Path,
    db: Path | str | None = None,
    dataset: str | None = None,
    overrides: list[str] | None = None,
) -> Leaderboard:
    """Read a leaderboard TOML and fill in what the database measured.

    `overrides` are the command-line overrides the board's cells were run with
    (`ocl-bench grid NAME overrides...`): a grid file's base takes them, and a published
    board's rows take them last, so the same overrides find the same stored cells.
    """
    path = board_path(name_or_path)
    spec = check_spec(read_toml(path), path)
    if "rows" not in spec:  # a grid file: its cells are the rows
        return _from_grid(path, db, overrides)
    columns = read_columns(spec)
    if dataset:
        columns = [c for c in columns if c.dataset in (dataset, None, "mixed")]
    rows = board_rows(spec, path)
    store = _Stored(ResultStore(db) if store_exists(db) else None)  # db: a path or a URL
    base = dict(spec.get("base", {}))
    for row in rows:
        _measure(row, columns, base, store, overrides)
    return Leaderboard(
        spec.get("name", path.stem),
        spec.get("title", ""),
        spec.get("source", {}),
        columns,
        rows,
        list(overrides or []),
        figure=dict(spec.get("figure", {})),
        axes=dict(spec.get("axes", {})),
        store=store.store,
    )


class _Stored:
    """The stored cells by config hash, and every seed a cell was run with: a row's seeds
    are its config with each of those seeds, so cells that differ only by seed are one row
    whichever grid (or `--seeds`) ran them."""

    def __init__(self, store: ResultStore | None) -> None:
        cells = store.cells() if store is not None else []
        self.store = store
        self.by_hash = {c.config_hash: c for c in cells}
        self.seeds = sorted({c.seed for c in cells})
        self._with_images: dict[str, Cell | None] = {}

    def image_values(self, cell: Cell, col: Column) -> np.ndarray | None:
        """A cell's stored per-image values of a column's metric (unscaled), read on first
        use: only single-seed rows need them, and a board of many cells need not load all."""
        if self.store is None:
            return None
        if cell.config_hash not in self._with_images:
            self._with_images[cell.config_hash] = self.store.get(cell.config_hash, per_image=True)
        full = self._with_images[cell.config_hash]
        return None if full is None else full.image_values(col.task, col.metric, col.masks)

    def seeded(self, cfg: RunConfig) -> list[tuple[int, Cell]]:
        """The stored cells of `cfg` under each seed, its own seed first."""
        found = []
        for seed in dict.fromkeys([cfg.seed, *self.seeds]):
            cell = self.by_hash.get(dataclasses.replace(cfg, seed=seed).digest())
            if cell is not None:
                found.append((seed, cell))
        return found


def _measure(
    row: Row,
    columns: list[Column],
    base: dict[str, Any],
    store: _Stored,
    overrides: list[str] | None = None,
) -> None:
    if not row.buildable:
        row.missing = "no ocl-bench recipe (published only)"
        return
    cells = {}
    failed = []  # what a row with nothing measured shows: why its grid could not run it
    for ds in sorted({c.dataset or "" for c in columns}):
        try:
            cfg = row_config(row, base, ds or None, overrides)
        except UnknownPluginError as err:
            row.missing = f"needs plugin: {str(err).split(';')[0].replace('unknown ', '')}"
            return
        except ConfigError as err:
            row.missing = f"needs: {err}"
            return
        row.config_hashes[ds] = cfg.digest()
        _note_protocol(row, ds, cfg, base, overrides)
        seeded = store.seeded(cfg)
        cells[ds] = [(s, c) for s, c in seeded if c.status == "complete"]
        failed += [c for _, c in seeded if c.status == "failed"]
    shown = None  # the figure comes from the last column's measured cell (its first seed)
    for col in columns:
        complete = cells.get(col.dataset or "", [])
        if not complete:
            row.measured[col.key] = None
            continue
        _take(row, col, complete, store)
        shown = complete[0][1]
    if shown is not None:
        row.figures = _latest_figure(shown)
    if all(v is None for v in row.measured.values()):
        if failed:
            row.missing = f"failed: {(failed[0].error_line or '')[:120]}"
        else:
            row.missing = "not measured yet (run its grid)"


def _note_protocol(
    row: Row, ds: str, cfg: RunConfig, base: dict[str, Any], overrides: list[str] | None
) -> None:
    """What the row's cells on column dataset `ds` are evaluated on and under which protocol,
    and whether that is what its published numbers were measured with: the column's dataset
    and the protocol the row (or its preset) names. The stored cell has the same settings
    (its hash is the config's), so a result stored before protocols existed is judged by what
    it was measured with, not by a name it did not record."""
    evaluated, _ = evaluated_dataset(cfg.raw, registry())
    row.measured_with[ds] = (evaluated, cfg.protocol)
    declared = cfg
    if overrides:
        try:
            declared = row_config(row, base, ds or None)
        except (ConfigError, UnknownPluginError):  # the overrides are what made it buildable
            declared = cfg
    row.protocol = row.protocol or declared.protocol
    same_dataset = ds in ("", "mixed") or evaluated == ds
    row.comparable[ds] = same_dataset and cfg.protocol == declared.protocol


def _take(
    row: Row, col: Column, cells: list[tuple[int, Cell]], stored: _Stored | None = None
) -> None:
    """A column's value (scaled) over a row's complete cells, one per seed, and how the
    first was measured; with one seed, also the interval over its stored per-image values."""
    values = []
    for seed, cell in cells:
        record = cell.record(col.task, col.metric, col.masks)
        value = None if record is None else record["value"]
        if value is not None and not math.isnan(value):
            values.append((seed, value * col.scale))
        if record is not None and record.get("protocol") and col.key not in row.protocols:
            row.protocols[col.key] = record["protocol"]
    if not values:
        row.measured[col.key] = None
        if any(c.record(col.task, col.metric, col.masks) is not None for _, c in cells):
            row.undefined.add(col.key)
        return
    spread = spread_of(values)
    if spread.n == 1 and stored is not None:
        per_image = stored.image_values(cells[0][1], col)
        if per_image is not None:
            spread.images = summarize(np.asarray(per_image, dtype=np.float64) * col.scale)
    row.spreads[col.key] = spread
    row.measured[col.key] = spread.mean


@dataclass
class Spread:
    """A column's value over a row's seeds: its mean, and with two seeds or more the
    standard deviation and 95% confidence interval (ocl_bench.report.stats.summarize)."""

    mean: float
    n: int
    seeds: list[int]
    std: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    method: str | None = None
    # With one seed: the interval over the cell's stored per-image values (scaled like the
    # column), what the leaderboard's best-row mark compares against; None when not stored.
    images: Summary | None = None

    @property
    def half_width(self) -> float | None:
        if self.ci_low is None or self.ci_high is None:
            return None
        return (self.ci_high - self.ci_low) / 2

    def contains(self, value: float | None) -> bool | None:
        """Whether a (published) value lies inside the interval; None with no interval."""
        if value is None or self.ci_low is None or self.ci_high is None:
            return None
        return self.ci_low <= value <= self.ci_high


def spread_of(values: list[tuple[int, float]]) -> Spread:
    """(seed, value) pairs summarised: one seed is its value as measured; more get their
    standard deviation and 95% interval (ocl_bench.report.stats.summarize)."""
    seeds = [seed for seed, _ in values]
    if len(values) == 1:
        return Spread(values[0][1], 1, seeds)

    summary = summarize([v for _, v in values], confidence=0.95)
    return Spread(
        summary.mean,
        summary.n,
        seeds,
        summary.std,
        summary.ci_low,
        summary.ci_high,
        summary.method,
    )


def _protocol_text(protocol: dict[str, Any]) -> str:
    def show(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v, separators=(", ", ": "))

    return ", ".join(f"{k}={show(v)}" for k, v in protocol.items())


def protocol_notes(board: Leaderboard) -> list[str]:
    """One line per column and distinct protocol, naming the rows when they differ: what
    a reader needs to compare a measured number with a published one (e.g. FID's
    reference set and extractor)."""
    notes = []
    for col in board.columns:
        rows_by_text: dict[str, list[str]] = {}
        for row in board.rows:
            if row.protocols.get(col.key):
                text = _protocol_text(row.protocols[col.key])
                rows_by_text.setdefault(text, []).append(row.label)
        name = f"{col.label} [{col.dataset}]" if col.dataset else col.label
        for text, labels in rows_by_text.items():
            which = f" ({', '.join(labels)})" if len(rows_by_text) > 1 else ""
            notes.append(f"{name}{which}: {text}")
    return _named_protocols(board) + notes


def _named_protocols(board: Leaderboard) -> list[str]:
    """One line per evaluation protocol a row is scored under: what it is and follows."""
    used: dict[str, set[str]] = {}
    for row in board.rows:
        for evaluated, protocol in row.measured_with.values():
            if protocol:
                used.setdefault(protocol, set()).add(evaluated)
    lines = []
    for name, datasets in sorted(used.items()):
        protocol = load_protocol(name)
        for ds in sorted(datasets):
            lines.append(f"protocol {protocol.describe(ds)}" + (f" [{ds}]" if ds else ""))
    return lines


def _latest_figure(cell: Any) -> list[str]:
    """The newest mask figure of a stored cell's run directory, then its generated images
    (none if absent)."""
    if not cell.run_dir:
        return []
    figures = Path(cell.run_dir) / "figures"
    masks = sorted(str(p) for p in figures.glob("step*.png"))[-1:]
    return masks + [str(p) for p in figures.glob("conditional_generation.png")]


def _from_grid(path: Path, db: Path | str | None, overrides: list[str] | None) -> Leaderboard:
    spec = read_toml(path)
    grid = load_grid(path, overrides)
    columns = grid_columns(spec, [t.name for t in grid.cells[0].config.tasks] if grid.cells else [])
    store = _Stored(ResultStore(db) if store_exists(db) else None)  # db: a path or a URL
    groups: dict[str, list[Any]] = {}  # a row per group of cells that differ only by seed
    for cell in grid.cells:
        groups.setdefault(cell.row, []).append(cell)
    rows = []
    for label, group in groups.items():
        row = Row(label, {}, {})
        row.config_hashes[""] = group[0].config.digest()
        seeded = store.seeded(group[0].config)
        complete = [(s, c) for s, c in seeded if c.status == "complete"]
        for col in columns:
            if complete:
                _take(row, col, complete, store)
            else:
                row.measured[col.key] = None
        failed = [c for _, c in seeded if c.status == "failed"]
        if complete:
            row.figures = _latest_figure(complete[0][1])
        elif failed:
            row.missing = f"failed: {(failed[0].error_line or '')[:120]}"
        else:
            row.missing = "not measured yet (run its grid)"
        rows.append(row)
    board = Leaderboard(
        grid.name, spec.get("title", grid.name), {"document": str(path.name)}, columns, rows
    )
    board.store = store.store
    if store.store is not None and columns:
        board.conclusion = _conclusion(store.store, rows, columns[0])
    return board


def _conclusion(store: ResultStore, rows: list[Row], column: Column) -> list[str]:

    ranked = [
        RankedRow(r.label, r.config_hashes[""], r.measured[column.key])
        for r in rows
        if r.measured.get(column.key) is not None and not math.isnan(r.measured[column.key])
    ]
    return conclusion_lines(conclude(store, ranked, column), column) if len(ranked) > 1 else []


def seed_interval(spread: Spread | None) -> Summary | None:
    """A row's column summarised over its seeds (2 or more), None with one seed: the
    interval a best mark may rest on."""
    if spread is None or spread.n < 2 or spread.ci_low is None or spread.ci_high is None:
        return None
    std = math.nan if spread.std is None else spread.std
    method = spread.method or "student t"
    return Summary(spread.mean, std, spread.n, spread.ci_low, spread.ci_high, method)


def judged(spread: Spread | None) -> Summary | None:
    """The interval a row's column is drawn with: over its seeds, or with one seed the
    within-seed interval over its stored per-image values (WITHIN_SEED_NOTE); None when it
    has neither. Only the seed interval counts towards a best mark (best_rows)."""
    seeds = seed_interval(spread)
    if seeds is not None:
        return seeds
    if spread is not None and spread.images is not None and spread.images.n > 1:
        return spread.images
    return None


def best_rows(board: Leaderboard) -> dict[str, int]:
    """Column key -> index of the row marked best: the best mean in the column's direction,
    marked only where the seeds support its lead over the runner-up (MARK_NOTE): both
    have 2 or more seeds and their seed intervals keep each other's means out
    (ocl_bench.report.stats.separated), or their seed-level paired comparison in the
    board's database resolves (ocl_bench.report.compare.compare_rows, 3 or more shared
    seeds). One-seed rows are never marked: an interval over one seed's images is
    within-seed."""
    marks = {}
    for col in board.columns:
        measured = [
            (i, row.spreads[col.key])
            for i, row in enumerate(board.rows)
            if col.key in row.spreads and not math.isnan(row.spreads[col.key].mean)
        ]
        if len(measured) < 2:
            continue
        sign = -1.0 if col.higher_is_better else 1.0
        ranked = sorted(measured, key=lambda item: sign * item[1].mean)
        (best, lead), (second, runner_up) = ranked[0], ranked[1]
        lead_seeds, runner_up_seeds = seed_interval(lead), seed_interval(runner_up)
        if lead_seeds is None or runner_up_seeds is None:
            continue  # a one-seed row on either side: nothing over seeds to judge by
        if separated(lead_seeds, runner_up_seeds) or _paired_resolved(board, col, best, second):
            marks[col.key] = best
    return marks


def _paired_resolved(board: Leaderboard, col: Column, best: int, second: int) -> bool:
    """Whether the seed-level paired comparison of the best and runner-up rows (their
    shared seeds in the board's database) resolves the best as better. False without a
    database, with fewer than MIN_SEEDS seeds on a side, or when the rows cannot be found
    by their own seed's cell (a row stored under other seeds only)."""
    rows = board.rows
    seeds = min(rows[best].spreads[col.key].n, rows[second].spreads[col.key].n)
    if board.store is None or seeds < MIN_SEEDS:
        return False
    key = (col.key, best, second)
    if key not in board.seed_verdicts:
        ds = col.dataset or ""
        hash_a, hash_b = rows[best].config_hashes.get(ds), rows[second].config_hashes.get(ds)
        verdict = False
        if hash_a and hash_b:
            try:
                found = compare_rows(
                    board.store, hash_a, hash_b, col.task, col.metric, col.masks, within=False
                )
            except UserError:
                found = None
            if found is not None and found.resolved:
                verdict = (found.result.difference > 0) == col.higher_is_better
        board.seed_verdicts[key] = verdict
    return board.seed_verdicts[key]


def marked_cells(board: Leaderboard) -> set[tuple[int, int]]:
    """(row, position in `table`'s line) of each marked measured cell."""
    published = any(r.published for r in board.rows)
    where = {c.key: 2 + (3 * i + 1 if published else i) for i, c in enumerate(board.columns)}
    return {(row, where[key]) for key, row in best_rows(board).items()}
