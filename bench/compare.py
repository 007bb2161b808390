"""Paired comparison of two stored rows: is one really better, or is it seed luck?

A row is every complete cell of one config, seeds apart (a grid run with `--seeds N`
stores one cell per seed). Two rows are paired on what they share:

- the seeds both rows have, and within each seed the evaluated images (the same split and
  images in the same order), when per-image values are stored: pairs are (seed, image);
- else the seeds alone: pairs are the per-seed metric values.

The difference, its bootstrap interval and the sign-flip p-value come from bench.stats.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ocl_bench.errors import UserError
from ocl_bench.stats import Comparison, paired_difference
from ocl_bench.store import Cell, ResultStore


@dataclass(frozen=True)
class RowComparison:
    label_a: str
    label_b: str
    metric: str  # "task.metric", with the masks in brackets when set
    unit: str  # "seed x image" or "seed": what one pair is
    seeds: list[int]
    pairs: int
    mean_a: float
    mean_b: float
    result: Comparison

    @property
    def resolved(self) -> bool:
        """The interval of the difference leaves out 0 and the test agrees (p < 0.05).

        Both, because a bootstrap interval over a handful of pairs is too narrow (one pair
        has a zero-width interval), while the exact sign-flip test over n pairs cannot go
        below 2 / 2**n: three seeds alone never resolve a difference, which is honest."""
        r = self.result
        return not (r.ci_low <= 0.0 <= r.ci_high) and r.p_value < 0.05

    def text(self) -> str:
        r = self.result
        if self.resolved:
            verdict = f"{'A' if r.difference > 0 else 'B'} is higher (interval leaves out 0)"
        elif r.ci_low <= 0.0 <= r.ci_high:
            verdict = "not resolved: the interval includes 0"
        else:
            verdict = f"not resolved: p = {r.p_value:.3g} with {self.pairs} pairs"
        return "\n".join(
            [
                f"metric     {self.metric}",
                f"A          {self.label_a}: mean {self.mean_a:.4f}",
                f"B          {self.label_b}: mean {self.mean_b:.4f}",
                f"pairs      {self.pairs} ({self.unit}; seeds {', '.join(map(str, self.seeds))})",
                f"A - B      {r.difference:+.4f}, 95% CI [{r.ci_low:+.4f}, {r.ci_high:+.4f}]",
                f"p-value    {r.p_value:.4g} (paired sign-flip permutation test, two-sided)",
                f"verdict    {verdict}",
            ]
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "resolved": self.resolved}


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


def compare_rows(
    store: ResultStore,
    key_a: str,
    key_b: str,
    task: str = "object_discovery",
    metric: str = "fg_ari",
    masks: str | None = None,
    resamples: int = 10_000,
) -> RowComparison:
    """Row A minus row B on one metric, paired over shared seeds (and images)."""
    cells = store.cells(per_image=True)
    row_a, row_b = find_row(cells, key_a), find_row(cells, key_b)
    by_seed_b = {c.seed: c for c in row_b}
    shared = [c for c in row_a if c.seed in by_seed_b]
    if not shared:
        raise UserError(
            f"rows '{key_a}' (seeds {[c.seed for c in row_a]}) and '{key_b}' (seeds "
            f"{[c.seed for c in row_b]}) share no seed to pair on"
        )
    name = f"{task}.{metric}" + (f" [{masks}]" if masks else "")
    per_image_a = [c.image_values(task, metric, masks) for c in shared]
    per_image_b = [by_seed_b[c.seed].image_values(task, metric, masks) for c in shared]
    if all(
        a is not None and b is not None and len(a) == len(b)
        for a, b in zip(per_image_a, per_image_b)
    ):
        a = np.concatenate(per_image_a)
        b = np.concatenate(per_image_b)
        unit = "seed x image"
    else:
        a = np.array([_value(c, task, metric, masks, key_a) for c in shared])
        b = np.array([_value(by_seed_b[c.seed], task, metric, masks, key_b) for c in shared])
        unit = "seed"
    both = ~(np.isnan(a) | np.isnan(b))
    result = paired_difference(a, b, resamples=resamples)
    return RowComparison(
        label_a=_strip_seed(shared[0].label or shared[0].config_hash),
        label_b=_strip_seed(by_seed_b[shared[0].seed].label or key_b),
        metric=name,
        unit=unit,
        seeds=[c.seed for c in shared],
        pairs=int(both.sum()),
        mean_a=float(a[both].mean()) if both.any() else float("nan"),
        mean_b=float(b[both].mean()) if both.any() else float("nan"),
        result=result,
    )


def _value(cell: Cell, task: str, metric: str, masks: str | None, key: str) -> float:
    value = cell.value(task, metric, masks)
    if value is None:
        raise UserError(f"row '{key}' (seed {cell.seed}) has no stored {task}.{metric}")
    return float(value)
