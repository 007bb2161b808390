"""What a grid's leaderboard concludes: which of its differences the stored data resolves.

The rows of one column are ranked by their mean, and each row is compared with the next
one down by `ocl-bench compare`'s seed-level test (ocl_bench.report.compare.compare_rows: the paired
Student's t over the per-seed values of their shared seeds, resolved only with at least 3
seeds; the exact sign-flip p over seeds and a within-seed hierarchical bootstrap are shown
beside it, never deciding). An unresolved step says about how many seeds a difference of
its size would need. Neighbours in the ranking are enough to state the order the data
supports; every sentence is built from the stored numbers, so it changes with them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ocl_bench.api.errors import UserError
from ocl_bench.report.compare import RowComparison, compare_rows
from ocl_bench.report.stats import MIN_SEEDS
from ocl_bench.run.boards import Column
from ocl_bench.run.store import ResultStore

__all__ = ["RankedRow", "conclude", "conclusion_lines"]


@dataclass(frozen=True)
class RankedRow:
    label: str
    config_hash: str  # any one seed's cell: compare_rows finds the row's other seeds
    mean: float  # the column's value (scaled), as the leaderboard shows it


def conclude(
    store: ResultStore, rows: list[RankedRow], column: Column, resamples: int = 4000
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
    lines = [_sentence(better, worse, comparison, column) for better, worse, comparison in pairs]
    chain = [pairs[0][0].label]
    for better, worse, comparison in pairs:
        if chain[-1] != better.label:  # a pair between them could not be compared
            chain += ["|", better.label]
        chain += [_relation(comparison, column), worse.label]
    lines.append(
        f"Order on {column.label} the data supports ('>' resolved over seeds, '~' not "
        "resolved): " + " ".join(chain)
    )
    if any(comparison.result.n < MIN_SEEDS for _, _, comparison in pairs):
        lines.append(
            f"Fewer than {MIN_SEEDS} shared seeds never resolve a difference: the training "
            "seed is the unit of replication, and the images of one seed are all scored by "
            "the same trained models, so they measure the test set, not training again; "
            f"`ocl-bench grid --seeds {MIN_SEEDS}` (or more) adds seeds."
        )
    return lines


def _sentence(
    better: RankedRow, worse: RankedRow, comparison: RowComparison, column: Column
) -> str:
    """One compared pair: the seed-level difference, interval and p-values, the
    within-seed view beside it, and the verdict (with why not, and the seeds it needs)."""
    r = comparison.result
    scale = column.scale
    seeds = f"{r.n} seed{'s' if r.n != 1 else ''}"
    if r.n < 2:
        test = "over 1 seed: no interval or test over seeds"
    else:
        test = (
            f"95% CI [{r.ci_low * scale:+.2f}, {r.ci_high * scale:+.2f}] (p = {r.p_value:.2g}, "
            f"paired t over {seeds}; sign-flip p = {r.sign_flip_p:.2g})"
        )
    text = (
        f"{better.label} vs {worse.label}: {column.label} difference "
        f"{r.difference * scale:+.2f}, {test}"
    )
    if comparison.within is not None:
        w = comparison.within
        text += (
            f"; within-seed view (descriptive) [{w.ci_low * scale:+.2f}, "
            f"{w.ci_high * scale:+.2f}] over {w.images} images"
        )
    if comparison.resolved:
        return text + ": resolved"
    why = comparison.reason()
    if r.n >= 2:  # one seed has no SD to plan from: the reason already says so
        why += f"; {comparison.needed_text(scale, digits=2)}"
    return f"{text}: not resolved ({why})"


def _relation(comparison: RowComparison, column: Column) -> str:
    """'>' when the better-ranked row is resolved better, '~' when not resolved, '<' when
    the paired data resolves the opposite of the ranking by means (seeds not shared)."""
    if not comparison.resolved:
        return "~"
    higher = comparison.result.difference > 0
    return ">" if higher == column.higher_is_better else "<"
