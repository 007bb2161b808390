"""Benchmarks: the bootstrap behind "mean ± ci", and a leaderboard's aggregation of stored
per-image values.

Targets (issue 13): 10k resamples of 10k values, and 10k per-image values read back from a
results store into summaries, each in well under a second on 2 CPU cores. Measure with

    python -m pytest tests/benchmarks/test_bench_stats.py --benchmark-enable

Under plain pytest (`--benchmark-disable`) each body runs once and only its checks apply.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ocl_bench.report.stats import paired_difference, summarize
from ocl_bench.run.store import Cell, ResultStore

VALUES, RESAMPLES = 10_000, 10_000
CELLS = 4  # the stored values are split over this many cells (VALUES // CELLS images each)


def test_bench_summarize_10k_values(benchmark) -> None:
    values = np.random.default_rng(0).normal(0.6, 0.2, size=VALUES)
    s = benchmark(lambda: summarize(values, resamples=RESAMPLES))
    half = 1.96 * 0.2 / math.sqrt(VALUES)
    assert s.n == VALUES and abs((s.ci_high - s.ci_low) / 2 - half) < 0.05 * half
    benchmark.extra_info.update(values=VALUES, resamples=RESAMPLES)


def test_bench_paired_difference_10k_pairs(benchmark) -> None:
    rng = np.random.default_rng(1)
    b = rng.uniform(size=VALUES)
    a = b + 0.01 + rng.normal(0.0, 0.1, size=VALUES)
    c = benchmark(lambda: paired_difference(a, b, resamples=RESAMPLES))
    assert c.ci_low > 0.0 and c.p_value < 0.01 and c.method == "monte carlo"
    benchmark.extra_info.update(pairs=VALUES, resamples=RESAMPLES)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ResultStore:
    path: Path = tmp_path_factory.mktemp("stats") / "r.sqlite"
    store = ResultStore(path)
    rng = np.random.default_rng(2)
    images = VALUES // CELLS
    for i in range(CELLS):
        digest = f"cell{i}"
        store.start(Cell(digest, {}, {}, "shapes", "val", i, "running", grid="bench"))
        values = rng.uniform(0.3 + 0.1 * i, 0.5 + 0.1 * i, size=images)
        values[::50] = np.nan  # images without objects, skipped by the IoU family
        record = {"task": "object_discovery", "metric": "miou", "masks": "decoder"}
        record.update(value=float(np.nanmean(values)), per_image=values.tolist())
        store.complete(digest, [record])
    return store


def test_bench_aggregate_stored_per_image_values(benchmark, store: ResultStore) -> None:
    def aggregate() -> dict[str, object]:
        return {
            cell.config_hash: summarize(cell.image_values("object_discovery", "miou"))
            for cell in store.cells("bench", per_image=True)
        }

    summaries = benchmark(aggregate)
    assert len(summaries) == CELLS
    assert sum(s.n for s in summaries.values()) == VALUES - VALUES // 50
    means = [s.mean for s in summaries.values()]
    assert means == sorted(means)  # cell i was drawn around 0.4 + 0.1 i
    assert all(s.ci_low < s.mean < s.ci_high for s in summaries.values())
    benchmark.extra_info.update(values=VALUES, cells=CELLS, resamples=10_000)
