"""Paired comparison of two stored rows: is one really better, or is it seed luck?

A row is every complete cell of one config, seeds apart (a grid run with `--seeds N`
stores one cell per seed). The training seed is the unit of replication: two rows are
paired over the seeds they share, each seed's value being the cell's metric (its mean over
the evaluated images), and the verdict is the paired Student's t over those per-seed
values (ocl_bench.report.stats.seed_difference), resolved only with at least 3 shared seeds.

When both rows store per-image values for every shared seed, a hierarchical bootstrap of
the image differences (seeds, then images within each) is reported beside the verdict as a
descriptive, within-seed view: the images of one seed are scored by the same two trained
models, so they say how the test set varies, not how training does.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ocl_bench.api.errors import UserError
from ocl_bench.report.stats import (
    MAX_SEEDS_NEEDED,
    MIN_SEEDS,
    POWER,
    SeedTest,
    WithinSeed,
    hierarchical_interval,
    seed_difference,
    seeds_needed,
)
from ocl_bench.run.boards import metric_owner
from ocl_bench.run.registry import registry
from ocl_bench.run.store import Cell, ResultStore


@dataclass(frozen=True)
class RowComparison:
    label_a: str
    label_b: str
    metric: str  # "task.metric", with the masks in brackets when set
    seeds: list[int]  # the shared seeds, in order
    values_a: list[float]  # per shared seed: row A's metric value (its mean over images)
    values_b: list[float]
    mean_a: float  # mean over the seeds compared (both values defined)
    mean_b: float
    result: SeedTest  # the verdict's test: paired t over per-seed values
    seeds_needed: int | None  # seeds the observed difference needs (80% power), see stats
    within: WithinSeed | None  # descriptive within-seed view; None without per-image values

    @property
    def resolved(self) -> bool:
        """The seed-level paired t resolves it: >= 3 seeds, p < 0.05, interval leaves out 0."""
        return self.result.resolved

    def reason(self) -> str:
        """Why the comparison is not resolved ('' when it is)."""
        r = self.result
        if self.resolved:
            return ""
        if r.n == 0:
            return "no shared seed has a value on both rows"
        if r.n == 1:
            return (
                "1 shared seed gives no seed-to-seed variance to test against; a verdict "
                f"needs at least {MIN_SEEDS} seeds"
            )
        if r.n < MIN_SEEDS:
            return (
                f"{r.n} shared seeds give the seed-to-seed variance one degree of freedom, "
                f"too little to rest a verdict on; it needs at least {MIN_SEEDS} seeds"
            )
        return "the seed-level interval includes 0"

    def needed_text(self, scale: float = 1.0, digits: int = 4) -> str:
        """About how many seeds would resolve a difference of the observed size."""
        r = self.result
        size = f"{r.difference * scale:+.{digits}f}"
        if r.n < 2 or math.isnan(r.sd):
            return "one seed gives no seed-level SD to estimate how many seeds would resolve it"
        if r.difference == 0.0:
            return "the difference is 0: no number of seeds resolves it"
        if r.sd == 0.0:
            return (
                f"every seed differs by the same amount (SD 0): {MIN_SEEDS} seeds would "
                f"resolve {size} if that holds"
            )
        if self.seeds_needed is None:
            return ""
        if self.seeds_needed > MAX_SEEDS_NEEDED:
            return f"more than {MAX_SEEDS_NEEDED} seeds would be needed to resolve {size}"
        return f"about {self.seeds_needed} seeds would resolve {size}"

    def text(self) -> str:
        r = self.result
        if self.resolved:
            verdict = f"{'A' if r.difference > 0 else 'B'} is higher (resolved over seeds)"
        else:
            verdict = f"not resolved: {self.reason()}"
        seeds = ", ".join(map(str, self.seeds))
        p_value = "n/a (one seed)" if math.isnan(r.p_value) else f"{r.p_value:.4g}"
        lines = [
            f"metric     {self.metric}",
            f"A          {self.label_a}: mean {self.mean_a:.4f} ({_listed(self.values_a)})",
            f"B          {self.label_b}: mean {self.mean_b:.4f} ({_listed(self.values_b)})",
            f"seeds      {r.n} compared (shared: {seeds}); the training seed is the unit",
            f"A - B      {r.difference:+.4f}, {_interval(r)}",
            f"p-value    {p_value} (paired t, two-sided); exact sign-flip over seeds "
            f"{r.sign_flip_p:.3g}",
            f"verdict    {verdict}",
        ]
        if not self.resolved:
            sd = "" if math.isnan(r.sd) else f", from the seed-level SD {r.sd:.4f}"
            planning = f"{int(POWER * 100)}% power of the paired t at alpha 0.05{sd}"
            lines.append(f"needed     {self.needed_text()} ({planning})")
        if self.within is not None:
            w = self.within
            lines.append(
                f"within     {w.mean:+.4f}, 95% [{w.ci_low:+.4f}, {w.ci_high:+.4f}] over "
                f"{w.images} image pairs: {w.method}; descriptive, within-seed, not the verdict"
            )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "resolved": self.resolved,
            "reason": self.reason(),
            "seeds_needed_text": self.needed_text(),
        }


def _interval(r: SeedTest) -> str:
    if r.n < 2:
        return "no interval: one seed has no seed-to-seed spread"
    return (
        f"95% CI [{r.ci_low:+.4f}, {r.ci_high:+.4f}] (paired Student's t over per-seed "
        f"means, df {r.n - 1})"
    )


def _listed(values: list[float]) -> str:
    shown = ", ".join(f"{v:.4f}" for v in values)
    return f"per seed {shown}"


def _without_seed(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True)


def find_row(cells: list[Cell], key: str) -> list[Cell]:
    """The complete cells of the row named by `key`: a config-hash prefix or a cell label
    (with or without its ", seed=N" suffix), all seeds of that config."""
    complete = [c for c in cells if c.status == "complete"]
    chosen = [c for c in complete if c.config_hash.startswith(key)] if len(key) >= 4 else []
    if not chosen:
        chosen = [c for c in complete if c.label and _strip_seed(c.label) == _strip_seed(key)]
    if not chosen:
        known = sorted({_strip_seed(c.label or c.config_hash) for c in complete})
        raise UserError(
            f"no complete row '{key}' in the database; rows: {'; '.join(known[:12]) or 'none'}"
        )
    configs = {_without_seed(c.config) for c in chosen}
    if len(configs) > 1:
        raise UserError(f"'{key}' names {len(configs)} different configs; give a config hash")
    config = configs.pop()
    row = [c for c in complete if _without_seed(c.config) == config]
    return sorted(row, key=lambda c: c.seed)


def _strip_seed(label: str) -> str:
    for sep in (", seed=", " seed="):
        if sep in label:
            return label.split(sep)[0]
    return label


def headline_of(cell: Cell) -> tuple[str, str] | None:
    """(task, metric): the first headline metric a cell stores, its tasks in stored order."""
    reg = registry()
    for task in dict.fromkeys(m["task"] for m in cell.metrics):
        if task not in reg.names("task"):
            continue
        for declared in reg.get("task", task).headline_metrics():
            if cell.value(task, declared.name) is not None:
                return task, declared.name
    return None


def compare_rows(
    store: ResultStore,
    key_a: str,
    key_b: str,
    task: str | None = None,
    metric: str | None = None,
    masks: str | None = None,
    resamples: int = 4000,
    within: bool = True,
) -> RowComparison:
    """Row A minus row B on one metric, paired over their shared seeds; with `within`,
    also the hierarchical bootstrap over the stored per-image values (`resamples`)."""
    cells = store.cells()
    row_a, row_b = find_row(cells, key_a), find_row(cells, key_b)
    if metric is None:
        found = next(filter(None, map(headline_of, row_a)), None)
        if found is None:
            raise UserError(f"row '{key_a}' stores no headline metric; give --metric TASK.METRIC")
        task, metric = found
    elif task is None:
        task = metric_owner(metric, list(dict.fromkeys(m["task"] for m in row_a[0].metrics)))
    by_seed_b = {c.seed: c for c in row_b}
    shared = [c for c in row_a if c.seed in by_seed_b]
    if not shared:
        raise UserError(
            f"rows '{key_a}' (seeds {[c.seed for c in row_a]}) and '{key_b}' (seeds "
            f"{[c.seed for c in row_b]}) share no seed to pair on"
        )
    name = f"{task}.{metric}" + (f" [{masks}]" if masks else "")
    a = np.array([_value(c, task, metric, masks, key_a) for c in shared])
    b = np.array([_value(by_seed_b[c.seed], task, metric, masks, key_b) for c in shared])
    both = ~(np.isnan(a) | np.isnan(b))
    result = seed_difference(a, b)
    return RowComparison(
        label_a=_strip_seed(shared[0].label or shared[0].config_hash),
        label_b=_strip_seed(by_seed_b[shared[0].seed].label or key_b),
        metric=name,
        seeds=[c.seed for c in shared],
        values_a=a.tolist(),
        values_b=b.tolist(),
        mean_a=float(a[both].mean()) if both.any() else float("nan"),
        mean_b=float(b[both].mean()) if both.any() else float("nan"),
        result=result,
        seeds_needed=seeds_needed(result.difference, result.sd),
        within=(
            _within(store, shared, by_seed_b, (task, metric, masks), resamples) if within else None
        ),
    )


def _within(
    store: ResultStore,
    shared: list[Cell],
    by_seed_b: dict[int, Cell],
    what: tuple[str, str, str | None],
    resamples: int,
) -> WithinSeed | None:
    """The hierarchical bootstrap of the per-image differences, when both rows stored the
    same number of per-image values for every shared seed (read only for these cells)."""
    per_seed = []
    for cell in shared:
        full_a = store.get(cell.config_hash, per_image=True)
        full_b = store.get(by_seed_b[cell.seed].config_hash, per_image=True)
        va = None if full_a is None else full_a.image_values(*what)
        vb = None if full_b is None else full_b.image_values(*what)
        if va is None or vb is None or len(va) != len(vb):
            return None
        per_seed.append(np.asarray(va, dtype=np.float64) - np.asarray(vb, dtype=np.float64))
    found = hierarchical_interval(per_seed, resamples=resamples)
    return found if found.seeds else None


def _value(cell: Cell, task: str, metric: str, masks: str | None, key: str) -> float:
    value = cell.value(task, metric, masks)
    if value is None:
        raise UserError(f"row '{key}' (seed {cell.seed}) has no stored {task}.{metric}")
    return float(value)
