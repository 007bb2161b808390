"""What a grid's leaderboard concludes: which of its differences the stored data resolves.

The rows of one column are ranked by their mean, and each row is compared with the next
one down by `ocl-bench compare`'s paired test (bench.compare.compare_rows: the paired
difference over shared seeds and images, its 95% bootstrap interval and the sign-flip
p-value). Neighbours in the ranking are enough to state the order the data supports;
every sentence is built from the stored numbers, so the conclusion changes with them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ocl_bench.boards import Column
from ocl_bench.compare import RowComparison, compare_rows
from ocl_bench.errors import UserError
from ocl_bench.store import ResultStore

__all__ = ["RankedRow", "conclude", "conclusion_lines"]


@dataclass(frozen=True)
class RankedRow:
    label: str
    config_hash: str  # any one seed's cell: compare_rows finds the row's other seeds
    mean: float  # the column's value (scaled), as the leaderboard shows it


def conclude(
    store: ResultStore, rows: list[RankedRow], column: Column, resamples: int = 10_000
) -> list[tuple[RankedRow, RankedRow, RowComparison]]:
    """(higher row, lower row, their paired comparison) for each pair of neighbours in
    the column's ranking (best first; FID-like columns rank lowest first)."""
    ranked = sorted(rows, key=lambda r: -r.mean if column.higher_is_better else r.mean)
    pairs = []
    for better, worse in zip(ranked, ranked[1:]):
        try:
            result = compare_rows(
                store,
                better.config_hash,
                worse.config_hash,
                column.task,
                column.metric,
                column.masks,
                resamples,
            )
        except UserError:  # no shared seed or value: this pair says nothing
            continue
        pairs.append((better, worse, result))
    return pairs


def conclusion_lines(
    pairs: list[tuple[RankedRow, RankedRow, RowComparison]], column: Column
) -> list[str]:
    """One sentence per compared pair, then the order the resolved pairs support."""
    if not pairs:
        return []
    lines = []
    for better, worse, comparison in pairs:
        r = comparison.result
        seeds = len(comparison.seeds)
        verdict = "resolved" if comparison.resolved else "not resolved"
        lines.append(
            f"{better.label} vs {worse.label}: {column.label} difference "
            f"{r.difference * column.scale:+.2f}, 95% CI [{r.ci_low * column.scale:+.2f}, "
            f"{r.ci_high * column.scale:+.2f}], p = {r.p_value:.2g} over {comparison.pairs} "
            f"pairs ({comparison.unit}, {seeds} seed{'s' if seeds != 1 else ''}): {verdict}"
        )
    chain = [pairs[0][0].label]
    for better, worse, comparison in pairs:
        if chain[-1] != better.label:  # a pair between them could not be compared
            chain += ["|", better.label]
        chain += [_relation(comparison, column), worse.label]
    lines.append(
        f"Order on {column.label} the data supports ('>' resolved, '~' not resolved): "
        + " ".join(chain)
    )
    if any(len(comparison.seeds) == 1 for _, _, comparison in pairs):
        lines.append(
            "One seed: these intervals cover the evaluated images, not training with another "
            "seed; `ocl-bench grid --seeds N` adds seeds and the comparisons pair over them."
        )
    return lines


def _relation(comparison: RowComparison, column: Column) -> str:
    """'>' when the better-ranked row is resolved better, '~' when not resolved, '<' when
    the paired data resolves the opposite of the ranking by means (seeds not shared)."""
    if not comparison.resolved:
        return "~"
    higher = comparison.result.difference > 0
    return ">" if higher == column.higher_is_better else "<"
