"""Leaderboard and grid files: their types and how they are read.

Both the grid runner (grid.py) and the renderer (leaderboard.py) use this module and
neither imports the other: a grid file expands into cells here, a published board's rows
become run configs here; running them and measuring them happen elsewhere.

A config value "@PRESET" (e.g. `objectives.spot_self_training.teacher = "@spot-coco"`)
names a run the cell needs: the grid adds a cell for that preset on the same dataset,
with the same command-line overrides, runs it first, and hands its run directory to the
cell. The stored config (and so its hash) keeps "@PRESET", which is what a leaderboard
recomputes; the run directory's config.toml holds the resolved path.

A grid file may name its rows with a `[labels]` table, one sub-table per axis mapping
each value (as TOML writes it: `true`, `3`, or a string's text) to a name:

    [labels."decoder.attn_prior"]
    true = "attention prior"
    false = "MLP masks"

A row's label joins the names of its values ("attention prior, Gaussian slots"); a value
left unnamed shows as `key=value`, as every row does in a grid without `[labels]`. Labels
name rows (leaderboard, progress, `ocl-bench compare`) and are not part of any config, so
naming rows changes no config hash.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ocl_bench.api.errors import ConfigError, DataError, UnknownPluginError, UserError
from ocl_bench.api.tasking import Metric
from ocl_bench.run.config import (
    STAGES,
    RunConfig,
    apply_overrides,
    default_text,
    parse_override,
    read_toml,
    resolve,
    tomllib,
)
from ocl_bench.run.protocol import apply_protocol
from ocl_bench.run.registry import registry


def leaderboard_dir() -> Path:
    """The packaged tables: leaderboards/ of a checkout, ocl_bench/leaderboards in a wheel."""
    return Path(str(resources.files("ocl_bench.leaderboards"))).resolve()


def list_leaderboards(directory: Path | None = None) -> list[Path]:
    return sorted((directory or leaderboard_dir()).glob("*.toml"))


@dataclass
class Column:
    key: str
    metric: str
    task: str
    dataset: str | None
    label: str
    masks: str | None = None
    scale: float = 1.0
    # Which way is better decides the leaderboard's mark; only a few metrics (FID) fall.
    higher_is_better: bool = True


@dataclass
class Row:
    label: str
    overrides: dict[str, Any]
    published: dict[str, float]
    notes: str = ""
    measured: dict[str, float | None] = field(default_factory=dict)
    missing: str | None = None  # why the row cannot be built or measured
    config_hashes: dict[str, str] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    preset: str | None = None  # the run config the overrides apply to (default: default.toml)
    dataset_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # column key -> how its measured value was measured (MetricRecord.protocol), if stored
    protocols: dict[str, dict[str, Any]] = field(default_factory=dict)
    # column key -> the measured value over the row's seeds (`measured` holds its mean), a
    # ocl_bench.report.leaderboard.Spread: filled by the leaderboard, which reads the store
    spreads: dict[str, Any] = field(default_factory=dict)
    # column keys whose stored values are all NaN (measured but undefined, e.g. a probe's
    # accuracy with no matched slot): `measured` holds None for them, as for unmeasured
    undefined: set[str] = field(default_factory=set)
    # A board with `axes`: this row's axis values, and the label of the board row it expands
    # (what a figure draws one line per); without axes {} and the row's own label.
    axis: dict[str, Any] = field(default_factory=dict)
    system: str = ""
    # The evaluation protocol the row's published numbers follow (ocl_bench.run.protocol): the
    # row's `protocol`, else its preset's; '' when it names none.
    protocol: str = ""
    # column dataset -> (dataset evaluated, protocol applied) of the row's measured config;
    # its published number compares only where both are the column's (`comparable`).
    measured_with: dict[str, tuple[str, str]] = field(default_factory=dict)
    comparable: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.system = self.system or self.label

    @property
    def buildable(self) -> bool:
        return bool(self.preset or self.overrides)


def seed_list(seeds: Any, first: int, where: str) -> list[int]:
    """The seeds a `seeds` setting names: N means the N seeds from `first` on (so one
    seed is the run config's own, and the cells stored before seeds existed count), a
    list names them."""
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConfigError(f"{where}: seeds must be at least 1, got {seeds}")
        return [first + i for i in range(seeds)]
    if (
        isinstance(seeds, list)
        and seeds
        and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{where}: seeds {seeds} repeat a seed")
        return list(seeds)
    raise ConfigError(
        f"{where}: seeds is {seeds!r:.40}, expected a number of seeds or a non-empty list of"
        " integers"
    )


def _param_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls.Params)}


def applies(raw: dict[str, Any], text: str) -> bool:
    """Whether a command-line override applies to a row: one that sets a stage param its
    plugin lacks but another plugin of that kind has (`decoder.num_heads` on an `mlp`
    row) does not; any other (including a typo) does, so that mistakes still fail."""
    parts, _ = parse_override(text)
    if len(parts) != 2 or parts[0] not in STAGES or parts[1] == "name":
        return True
    reg = registry()
    try:
        cls = reg.get(parts[0], raw.get(parts[0], {}).get("name", ""))
    except UnknownPluginError:
        return True
    if parts[1] in _param_names(cls):
        return True
    others = (reg.get(parts[0], n) for n in reg.names(parts[0]))
    return not any(parts[1] in _param_names(c) for c in others)


def _wrapped(raw: dict[str, Any], text: str) -> str:
    """A `dataset.KEY=V` setting as the row's dataset takes it. A dataset plugin built from
    another one (`generated`) declares a classmethod `wrapped_setting(KEY)` naming where a
    setting of the dataset it wraps goes in its own params: `dataset.name=X` then keeps the
    row's dataset, built from X, and a param of X's kind it lacks reaches X. Its own params,
    and a key no dataset plugin has (a typo, which must still fail), are left as they are."""
    parts, value = parse_override(text)
    if len(parts) != 2 or parts[0] != "dataset":
        return text
    reg = registry()
    try:
        cls = reg.get("dataset", raw.get("dataset", {}).get("name", ""))
    except UnknownPluginError:
        return text
    route = cls.wrapped_setting
    key = parts[1]
    if route("name") is None or (key != "name" and key in _param_names(cls)):
        return text
    datasets = (reg.get("dataset", n) for n in reg.names("dataset"))
    if key != "name" and not any(key in _param_names(c) for c in datasets):
        return text
    return f"dataset.{route(key)}={_format(value)}"


def row_raw(
    row: Row,
    base: dict[str, Any],
    dataset: str | None,
    overrides: list[str] | None = None,
    not_applied: list[str] | None = None,
) -> dict[str, Any]:
    """A row's run config before validation: its preset (or the embedded default), switched
    to the column's dataset, then the board's `base`, the row's overrides, the row's
    overrides for that dataset, and last the command-line `overrides` that apply to it. A
    preset or row on a dataset built from another (`generated`) keeps it and gets the
    column's dataset as its source (see `_wrapped`), and the
    command-line dataset settings go where the row's dataset takes them."""
    raw = read_toml(row.preset) if row.preset else tomllib.loads(default_text())
    if row.protocol:
        raw["protocol"] = row.protocol
    if dataset and dataset != "mixed":
        # a preset on a dataset built from another (glass-coco: `generated` from COCO
        # prompts) keeps its dataset and takes the column's as the source
        raw = apply_overrides(raw, [_wrapped(raw, f"dataset.name={json.dumps(dataset)}")])
    extra = row.dataset_overrides.get(dataset or "", {})
    raw = apply_overrides(raw, [f"{k}={_format(v)}" for k, v in {**base, **row.overrides}.items()])
    if dataset and dataset != "mixed":
        # the column's dataset once more, as the row's dataset takes it: a no-op for a row
        # on it, the source of a row that switched to a dataset built from another
        raw = apply_overrides(raw, [_wrapped(raw, f"dataset.name={json.dumps(dataset)}")])
    raw = apply_overrides(raw, [f"{k}={_format(v)}" for k, v in extra.items()])
    for text in overrides or []:
        text = _wrapped(raw, text)
        if applies(raw, text):
            raw = apply_overrides(raw, [text])
        elif not_applied is not None:
            not_applied.append(text)
    return raw


def row_config(
    row: Row, base: dict[str, Any], dataset: str | None, overrides: list[str] | None = None
) -> RunConfig:
    return resolve(row_raw(row, base, dataset, overrides))


# The TOML type of each key a leaderboard or grid file may hold (keys are not limited here:
# load_grid refuses unknown grid keys itself).
_SPEC_TYPES: dict[str, Any] = {
    "name": str,
    "title": str,
    "source": dict,
    "dataset": str,
    "base": dict,
    "base_config": str,
    "columns": list,
    "rows": list,
    "axes": dict,
    "masks": str,
    "exclude": list,
    "seeds": (int, list),
    "labels": dict,
    "workers": int,
    "gpus": int,
    "nodes": int,
    "cpus_per_task": int,
    "figure": dict,
}
_ROW_TYPES: dict[str, Any] = {
    "label": str,
    "overrides": dict,
    "published": dict,
    "notes": str,
    "preset": str,
    "dataset_overrides": dict,
    "protocol": str,
}
_COLUMN_TYPES: dict[str, Any] = {
    "key": str,
    "task": str,
    "metric": str,
    "dataset": str,
    "label": str,
    "masks": str,
    "scale": (int, float),
}


def _type_words(kind: Any) -> str:
    names = {
        str: "a string",
        dict: "a table",
        list: "a list",
        (int, float): "a number",
        (int, list): "a number or a list",
    }
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def check_spec(spec: dict[str, Any], path: Path) -> dict[str, Any]:
    """`spec` when every value has the type the readers expect, else one ConfigError line
    naming the file and the entry (rather than a traceback while rendering)."""

    def check(table: Any, types: dict[str, Any], where: str, required: tuple[str, ...] = ()):
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {where} is {table!r:.40}, expected a table")
        for key in required:
            if key not in table:
                raise ConfigError(f"{path}: {where} has no '{key}'")
        for key, kind in types.items():
            value = table.get(key)
            if key in table and (not isinstance(value, kind) or isinstance(value, bool)):
                at = f"{where}.{key}" if where else key
                raise ConfigError(f"{path}: {at} is {value!r:.40}, expected {_type_words(kind)}")

    check(spec, _SPEC_TYPES, "")
    for key, values in spec.get("axes", {}).items():  # a grid file's, or a board's
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axis '{key}' must be a non-empty list")
    for i, row in enumerate(spec.get("rows", [])):
        check(row, _ROW_TYPES, f"rows[{i}]", ("label",))
        for key, value in row.get("published", {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(
                    f"{path}: rows[{i}] ('{row['label']}') published.{key} is {value!r:.40},"
                    " expected a number"
                )
        for ds, table in row.get("dataset_overrides", {}).items():
            check(table, {}, f"rows[{i}].dataset_overrides.{ds}")
    # A file with rows is a published board (which may carry axes too); else a grid file.
    grid_file = "rows" not in spec
    for i, column in enumerate(spec.get("columns", [])):
        if grid_file and not isinstance(column, str):
            raise ConfigError(f"{path}: columns[{i}] is {column!r:.40}, expected a metric name")
        if not grid_file:
            check(column, _COLUMN_TYPES, f"columns[{i}]", ("key", "task"))
    for i, rule in enumerate(spec.get("exclude", [])):
        check(rule, {}, f"exclude[{i}]")
    if "figure" in spec:
        check_figure(spec, path)
    return spec


# A board's `[figure]`: the keys each kind takes (every kind takes `kind` and `title`).
FIGURE_KEYS: dict[str, tuple[str, ...]] = {
    "bars": (),
    "scatter": ("x", "y", "markers", "threshold_curve"),
}


def check_figure(spec: dict[str, Any], path: Path) -> None:
    """A board's `[figure]` table, checked against FIGURE_KEYS and the board's columns:
    one ConfigError line naming the file and the entry."""
    figure = spec["figure"]
    kind = figure.get("kind")
    if kind not in FIGURE_KEYS:
        raise ConfigError(
            f"{path}: figure.kind is {kind!r:.40}, expected one of {', '.join(FIGURE_KEYS)}"
        )
    if "rows" not in spec:
        raise ConfigError(f"{path}: [figure] needs a board with [[rows]] and [[columns]]")
    allowed = ("kind", "title", *FIGURE_KEYS[kind])
    for key, value in figure.items():
        if key not in allowed:
            raise ConfigError(
                f"{path}: figure.{key} is no key of a '{kind}' figure;"
                f" allowed: {', '.join(allowed)}"
            )
        wanted = dict if key == "markers" else str
        if not isinstance(value, wanted):
            raise ConfigError(
                f"{path}: figure.{key} is {value!r:.40}, expected {_type_words(wanted)}"
            )
    columns = [c for c in spec.get("columns", []) if isinstance(c, dict)]
    metrics = {c.get("metric", c.get("key")) for c in columns}
    datasets = {c.get("dataset", spec.get("dataset")) for c in columns}
    if kind == "scatter":
        for key in ("x", "y"):
            if key not in figure:
                raise ConfigError(f"{path}: a 'scatter' figure needs figure.{key} (a metric)")
            if figure[key] not in metrics:
                raise ConfigError(
                    f"{path}: figure.{key} = '{figure[key]}' is no column's metric;"
                    f" metrics: {', '.join(sorted(map(str, metrics)))}"
                )
        for ds, marker in figure.get("markers", {}).items():
            if ds not in datasets or not isinstance(marker, str) or not marker:
                raise ConfigError(
                    f"{path}: figure.markers.{ds} = {marker!r:.20}: expected a marker string for"
                    f" a column dataset ({', '.join(sorted(map(str, datasets)))})"
                )
        curve = figure.get("threshold_curve")
        if curve is not None and not threshold_columns(columns, curve):
            raise ConfigError(
                f"{path}: figure.threshold_curve = '{curve}' names no '{curve}_iouNN' column"
            )
    if kind == "bars" and len(spec.get("axes", {})) > 1:
        raise ConfigError(
            f"{path}: a 'bars' figure draws lines over one axis; the board has"
            f" {len(spec['axes'])}: {', '.join(spec['axes'])}"
        )


def threshold_columns(columns: list[dict[str, Any]], metric: str) -> dict[str, float]:
    """Column metric -> IoU threshold for the columns of `<metric>_iouNN` (NN = 100 x the
    threshold, two digits: the property probe's names)."""
    found = {}
    for column in columns:
        name = str(column.get("metric", column.get("key")))
        suffix = name.removeprefix(f"{metric}_iou")
        if name != suffix and len(suffix) == 2 and suffix.isdigit():
            found[name] = int(suffix) / 100
    return found


def read_rows(spec: dict[str, Any]) -> list[Row]:
    """The rows of a parsed published leaderboard (nothing measured yet)."""
    return [
        Row(
            r["label"],
            dict(r.get("overrides", {})),
            dict(r.get("published", {})),
            r.get("notes", ""),
            preset=r.get("preset"),
            dataset_overrides=dict(r.get("dataset_overrides", {})),
            protocol=r.get("protocol", ""),
        )
        for r in spec.get("rows", [])
    ]


def board_path(name_or_path: str | Path) -> Path:
    """A leaderboard file from its name (leaderboards/NAME.toml) or its path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = leaderboard_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(p.stem for p in list_leaderboards())
        raise UserError(f"unknown leaderboard '{name_or_path}'; known: {known}")
    return path


def column_datasets(spec: dict[str, Any]) -> list[str]:
    """The datasets a published board's columns are measured on, in column order."""
    found = [c.get("dataset", spec.get("dataset")) or "" for c in spec.get("columns", [])]
    return list(dict.fromkeys(found))


def read_columns(spec: dict[str, Any]) -> list[Column]:
    """The columns of a parsed published leaderboard."""
    return [
        Column(
            key=c["key"],
            metric=c.get("metric", c["key"]),
            task=c["task"],
            dataset=c.get("dataset", spec.get("dataset")),
            label=c.get("label", c["key"]),
            masks=c.get("masks"),
            scale=float(c.get("scale", 1)),
            higher_is_better=declared_metric(c["task"], c.get("metric", c["key"])).higher_is_better,
        )
        for c in spec.get("columns", [])
    ]


def declared_metric(task: str, metric: str) -> Metric:
    """What task plugin `task` declares of its metric `metric` (direction, unit, scale)."""
    cls = registry().get("task", task)
    return cls.metric(metric)


def metric_owner(metric: str, tasks: list[str]) -> str:
    """The task a bare metric name belongs to: the first of `tasks` (the grid's own, in
    config order), else the one registered task, that declares it by exactly that name."""
    reg = registry()
    for pool in (tasks, reg.names("task")):
        owners = [t for t in pool if any(m.name == metric for m in reg.get("task", t).metrics)]
        if owners and (pool is tasks or len(owners) == 1):
            return owners[0]
        if owners:
            raise ConfigError(
                f"column '{metric}' is declared by several tasks ({', '.join(owners)});"
                f" write it as TASK.{metric}"
            )
    raise ConfigError(f"column '{metric}': no installed task declares a metric of that name")


def grid_columns(spec: dict[str, Any], tasks: list[str] | None = None) -> list[Column]:
    """A grid file's columns, each "TASK.METRIC" or a bare metric of one of `tasks` (the
    grid's tasks, in config order; "fg_ari" is object discovery's), shown at the scale the
    task declares (fractions in percent). Without `columns`, the headline metrics of `tasks`.
    A column of a task whose records name their masks reads the grid's `masks`."""
    tasks = list(tasks or [])
    reg = registry()
    metrics = spec.get("columns") or [
        f"{t}.{m.name}" for t in tasks for m in reg.get("task", t).headline_metrics()
    ]
    masks = spec.get("masks", "decoder")
    columns = []
    for m in metrics:
        task, _, metric = m.rpartition(".")
        task = task or metric_owner(metric, tasks)
        cls = reg.get("task", task)
        declared = cls.metric(metric)
        columns.append(
            Column(
                m,
                metric,
                task,
                None,
                metric,
                masks if cls.scores_masks else None,
                declared.scale,
                declared.higher_is_better,
            )
        )
    return columns


GRID_KEYS = (
    "name",
    "title",
    "base",
    "base_config",
    "axes",
    "exclude",
    "columns",
    "masks",
    "seeds",
    "labels",
    "workers",
    "gpus",
    "nodes",
    "cpus_per_task",
)


@dataclass
class GridCell:
    """One combination: its overrides of the base, and the resolved config."""

    label: str
    overrides: list[str]
    config: RunConfig
    needs: dict[str, GridCell] = field(default_factory=dict)  # dotted key -> producing cell
    row: str = ""  # the label without the seed: cells that differ only by seed share it

    def __post_init__(self) -> None:
        self.row = self.row or self.label


@dataclass
class Grid:
    name: str
    cells: list[GridCell]
    # Local processes the file suggests (`workers = N`); --workers replaces it.
    workers: int = 1
    # Each cell's submitit job (`gpus = G`, `nodes = N`): N x G processes in one process
    # group (--gpus and --nodes replace them; the local executor runs a cell in one process).
    gpus: int = 0
    nodes: int = 1
    # CPUs each of those processes books (`cpus_per_task = C`; --cpus-per-task replaces
    # it): 0 leaves it to the cluster's default, often 1, too few for DataLoader workers.
    cpus_per_task: int = 0


def _format(value: Any) -> str:
    """A value as the TOML text an override parses back to it (dicts as inline tables:
    JSON's `{"a": 1}` is no TOML, so a table value would come back as a string)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_format(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    return repr(value)


def demo_grid_path() -> Path:
    """The packaged demo grid (leaderboards/shapes-demo.toml)."""
    path = leaderboard_dir() / "shapes-demo.toml"
    if not path.is_file():
        raise DataError(f"the demo grid {path} is missing from this installation; pass a grid file")
    return path


def load_grid(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    seeds: int | list[int] | None = None,
) -> Grid:
    """Read a grid file and expand its cross product (minus `exclude` rules), each
    combination once per seed: `seeds` (as `--seeds`) replaces the file's `seeds`."""
    path = Path(path) if path is not None else demo_grid_path()
    if not path.suffix and not path.exists():  # a leaderboard by name
        path = board_path(path)
    spec = check_spec(read_toml(path), path)
    if seeds is not None:
        spec["seeds"] = seeds
    if "rows" in spec:
        return _board_grid(path, spec, list(overrides or []))
    unknown = [k for k in spec if k not in GRID_KEYS]
    if unknown:
        raise ConfigError(
            f"{path}: unknown grid key '{unknown[0]}'; allowed: {', '.join(GRID_KEYS)}"
        )
    if "base_config" in spec:
        start = read_toml(path.parent / spec["base_config"])
    else:
        start = tomllib.loads(default_text())
    base = _merge(start, spec.get("base", {}))
    base = apply_overrides(base, list(overrides or []))
    axes: dict[str, list[Any]] = dict(spec.get("axes", {}))
    if "seed" in axes:  # a seed axis is the seeds setting by another name
        if "seeds" in spec:
            raise ConfigError(f"{path}: give the seeds once, as `seeds` or as the axis 'seed'")
        spec["seeds"] = axes.pop("seed")
    cells = _axis_cells(path, spec, base, axes, overrides)
    least = {"workers": 1, "gpus": 0, "nodes": 1, "cpus_per_task": 0}
    for key, low in least.items():
        if spec.get(key, low) < low:
            raise ConfigError(f"{path}: {key} must be a number >= {low}, got {spec[key]!r}")
    counts = {key: spec.get(key, low) for key, low in least.items()}
    return Grid(spec.get("name", path.stem), _with_needs(cells), **counts)


def _axis_cells(
    path: Path,
    spec: dict[str, Any],
    base: dict[str, Any],
    axes: dict[str, list[Any]],
    overrides: list[str] | None,
) -> list[GridCell]:
    """One cell per combination of `axes` values and seed, in that order, minus the
    combinations an `exclude` rule matches."""
    first = base.get("seed", 0)  # checked when the cells resolve
    first = first if isinstance(first, int) and not isinstance(first, bool) else 0
    seeds = seed_list(spec.get("seeds", 1), first, str(path))
    excludes = spec.get("exclude", [])
    names = _axis_value_names(spec.get("labels", {}), axes, path)
    combos_by_row: dict[str, dict[str, Any]] = {}
    keys = list(axes)
    cells = []
    for combo in itertools.product(*(axes[k] for k in keys)):
        chosen = dict(zip(keys, combo))
        row = _row_label(chosen, names)
        for seed in seeds:
            if any(
                all({**chosen, "seed": seed}.get(k) == v for k, v in rule.items())
                for rule in excludes
            ):
                continue
            if combos_by_row.setdefault(row, chosen) != chosen:
                raise ConfigError(
                    f"{path}: [labels] give two rows the same label '{row}'"
                    f" ({_row_label(combos_by_row[row], {})} and {_row_label(chosen, {})})"
                )
            cell_overrides = [f"{k}={_format(v)}" for k, v in chosen.items()]
            if len(seeds) > 1 or seed != first:
                cell_overrides.append(f"seed={seed}")
            raw = apply_overrides(base, cell_overrides)
            label = _seed_label(row, seed, seeds, keys)
            needs = _needs(raw, overrides, seed if len(seeds) > 1 else None)
            cells.append(GridCell(label, cell_overrides, resolve(raw), needs, row))
    return cells


def _value_key(value: Any) -> str:
    """An axis value as a `[labels]` key: a string's own text, else its TOML form."""
    return value if isinstance(value, str) else _format(value)


def _axis_value_names(
    labels: dict[str, Any], axes: dict[str, list[Any]], path: Path
) -> dict[str, dict[str, str]]:
    """A grid file's `[labels]`, checked: every axis and value it names exists (a typo
    would otherwise leave a row silently unnamed) and every name is a non-empty string."""
    for key, table in labels.items():
        if key not in axes:
            raise ConfigError(
                f'{path}: labels."{key}" names no axis; axes: {", ".join(axes) or "none"}'
            )
        if not isinstance(table, dict):
            raise ConfigError(
                f'{path}: labels."{key}" is {table!r:.40}, expected a table of value = name'
            )
        known = [_value_key(v) for v in axes[key]]
        for value, name in table.items():
            if value not in known:
                raise ConfigError(
                    f"{path}: labels.\"{key}\" names value '{value}', not on the axis;"
                    f" values: {', '.join(known)}"
                )
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(
                    f'{path}: labels."{key}".{value} is {name!r:.40}, expected a name'
                )
    return labels


def _row_label(chosen: dict[str, Any], names: dict[str, dict[str, str]]) -> str:
    """A combination's row label: each value's name from `[labels]`, else `key=value`."""
    parts = [names.get(k, {}).get(_value_key(v), f"{k}={v}") for k, v in chosen.items()]
    return ", ".join(parts) or "base"


def _seed_label(row: str, seed: int, seeds: list[int], axes: list[str]) -> str:
    """A cell's label: its row's, naming the seed only when the grid has several."""
    if len(seeds) == 1:
        return row
    return f"{row}, seed={seed}" if axes else f"seed={seed}"


def board_rows(spec: dict[str, Any], path: Path) -> list[Row]:
    """A published board's rows; with `axes`, each buildable row once per combination of
    axis values, labelled '<row>, <values>' (named by `[labels]` as in a grid file). The
    axis values are applied after the row's own overrides for each column dataset (so an
    axis beats a row's `dataset_overrides`), before the command line's. Expanded rows
    compare with no published number: the paper printed its row at one setting."""
    rows = read_rows(spec)
    axes: dict[str, list[Any]] = spec.get("axes", {})
    if not axes:
        return rows
    names = _axis_value_names(spec.get("labels", {}), axes, path)
    datasets = column_datasets(spec)
    expanded = []
    for row in rows:
        if not row.buildable:
            expanded.append(row)
            continue
        for combo in itertools.product(*axes.values()):
            chosen = dict(zip(axes, combo))
            per_dataset = {ds: {**row.dataset_overrides.get(ds, {}), **chosen} for ds in datasets}
            expanded.append(
                Row(
                    f"{row.label}, {_row_label(chosen, names)}",
                    dict(row.overrides),
                    {},
                    row.notes,
                    preset=row.preset,
                    dataset_overrides=per_dataset,
                    axis=chosen,
                    system=row.label,
                    protocol=row.protocol,
                )
            )
    return expanded


def _board_grid(path: Path, spec: dict[str, Any], overrides: list[str]) -> Grid:
    """A published leaderboard's buildable rows (each once per combination of its `axes`),
    one cell per row and column dataset."""
    base = dict(spec.get("base", {}))
    cells: list[GridCell] = []
    skipped = []
    for row in board_rows(spec, path):
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
            label = f"{row.label} [{where}]"
            seeds = seed_list(spec.get("seeds", 1), cfg.seed, str(path))
            for seed in seeds:
                seeded = raw if seed == cfg.seed else apply_overrides(raw, [f"seed={seed}"])
                many = len(seeds) > 1
                cells.append(
                    GridCell(
                        f"{label} seed={seed}" if many else label,
                        [],
                        cfg if seeded is raw else resolve(seeded),
                        _needs(seeded, overrides, seed if many else None),
                        label,
                    )
                )
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


def _needs(
    raw: dict[str, Any], overrides: list[str] | None, seed: int | None = None
) -> dict[str, GridCell]:
    """The cells a config's "@PRESET" values name: each preset on the config's dataset;
    with `seed` (a grid of several seeds), the needed run takes the cell's seed too, so
    that the spread over seeds includes the spread of what the cell builds on."""
    needs = {}
    # the needed run reads the data as the cell does, its protocol's settings included
    dataset = apply_protocol(raw, registry())[0]["dataset"]
    for key, preset in _references(raw).items():
        dep = read_toml(preset)
        dep["dataset"] = dict(dataset)
        # As for rows: a stage param the needed run's plugin lacks (but a sibling has) is
        # not applied, so one set of tiny overrides serves a row and the run it needs.
        dep_raw = apply_overrides(dep, [o for o in overrides or [] if applies(dep, o)])
        row = f"@{preset} [{raw['dataset'].get('name', '')}]"
        label = row
        if seed is not None:
            dep_raw = apply_overrides(dep_raw, [f"seed={seed}"])
            label = f"{row} seed={seed}"
        needs[key] = GridCell(label, [], resolve(dep_raw), _needs(dep_raw, overrides, seed), row)
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
