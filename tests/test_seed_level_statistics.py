"""Planted effects under a two-level model: each (row, training seed) has its own effect and
each image its own noise. The verdict (ocl_bench.report.stats.seed_difference, via compare and the
leaderboard) must find a real seed-level difference with enough seeds, must not find one
that lives only inside seeds, must hold its 5% false-positive rate when seeds vary, and the
best mark must follow the same evidence."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm
from scipy.stats import t as student_t

from ocl_bench.report.compare import compare_rows
from ocl_bench.report.leaderboard import (
    Leaderboard,
    Spread,
    best_rows,
    load_leaderboard,
    seed_interval,
)
from ocl_bench.report.stats import paired_difference, seed_difference, seeds_needed, separated
from ocl_bench.run.boards import Column, Row
from ocl_bench.run.grid import load_grid
from ocl_bench.run.store import Cell, ResultStore

IMAGES = 64


def _two_level(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    difference: float | np.ndarray,
    seed_sd: float,
    image_sd: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image scores of rows A and B, shape (*shape, seeds, IMAGES): an image's
    difficulty shared by both rows (as they are scored on the same images), plus a
    (row, seed) effect with SD `seed_sd`, plus per-row image noise. A's mean is B's +
    `difference` (a scalar, or one value per seed broadcast over the images)."""
    images = (*shape, IMAGES)
    seeds = (*shape, 1)
    difficulty = rng.uniform(0.3, 0.7, size=images)
    b = difficulty + rng.normal(0.0, seed_sd, size=seeds) + rng.normal(0.0, image_sd, images)
    a = difficulty + rng.normal(0.0, seed_sd, size=seeds) + rng.normal(0.0, image_sd, images)
    return a + np.asarray(difference)[..., None], b


def _store_rows(db: Path, a: np.ndarray, b: np.ndarray) -> ResultStore:
    """Rows "a" and "b" of per-image values (seeds, images) as one cell per seed."""
    store = ResultStore(db)
    for name, values in (("a", a), ("b", b)):
        for seed, per_image in enumerate(values):
            digest = f"{name}{seed:04d}hash"
            label = f"row={name}, seed={seed}"
            config = {"seed": seed, "row": name}
            store.start(Cell(digest, config, {}, "shapes", "val", seed, "running", "g", label))
            record = {"task": "object_discovery", "metric": "fg_ari", "masks": "decoder"}
            record.update(value=float(per_image.mean()), per_image=per_image.tolist())
            store.complete(digest, [record])
    return store


def test_a_real_seed_level_difference_is_resolved_with_8_seeds_not_with_2(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(1)
    a, b = _two_level(rng, (8,), difference=0.05, seed_sd=0.02)
    eight = compare_rows(_store_rows(tmp_path / "8.sqlite", a, b), "row=a", "row=b")
    assert eight.result.n == 8 and eight.resolved and eight.result.difference > 0
    two = compare_rows(_store_rows(tmp_path / "2.sqlite", a[:2], b[:2]), "row=a", "row=b")
    assert two.result.n == 2 and not two.resolved
    assert "at least 3 seeds" in two.text() and "seeds would resolve" in two.text()
    # the 128 (seed, image) pairs of the same two seeds, pooled, look decisive
    pooled = paired_difference(a[:2].ravel(), b[:2].ravel(), resamples=2000)
    assert pooled.ci_low > 0 and pooled.p_value < 0.05


def test_a_difference_that_lives_only_within_seeds_is_not_resolved(tmp_path: Path) -> None:
    # Every seed moves all 64 of A's images by a large amount, but that shift is seed luck:
    # drawn with mean 0 and SD ~0.13 over seeds (these 5 draws happen to average +0.03).
    shifts = np.array([0.18, -0.10, 0.15, -0.12, 0.04])
    rng = np.random.default_rng(2)
    a, b = _two_level(rng, (5,), difference=shifts, seed_sd=0.0, image_sd=0.01)
    found = compare_rows(_store_rows(tmp_path / "r.sqlite", a, b), "row=a", "row=b")
    assert not found.resolved and found.result.ci_low < 0 < found.result.ci_high
    assert found.result.p_value > 0.5
    # Pooling the 320 (seed, image) pairs, the pre-seed-level verdict, calls it resolved:
    # the images of one seed share its trained models and are no replications of training.
    pooled = paired_difference(a.ravel(), b.ravel(), resamples=2000)
    assert pooled.ci_low > 0 and pooled.p_value < 0.001
    # the descriptive hierarchical bootstrap resamples seeds too, so it is wide here
    assert found.within is not None and found.within.ci_low < 0 < found.within.ci_high


def test_false_positive_rate_over_planted_nulls_where_seeds_vary() -> None:
    # 2000 nulls, 5 seeds each: no difference between the rows, a seed effect (SD 0.05)
    # larger than what 64 images of noise (SD 0.1) leave in a seed's mean (0.0125).
    rng = np.random.default_rng(3)
    sims, seeds = 2000, 5
    a, b = _two_level(rng, (sims, seeds), difference=0.0, seed_sd=0.05)
    seed_a, seed_b = a.mean(axis=-1), b.mean(axis=-1)  # each cell's value, as stored
    verdicts = [seed_difference(x, y).resolved for x, y in zip(seed_a, seed_b)]
    rate = float(np.mean(verdicts))
    assert 0.03 <= rate <= 0.07, rate
    # The pooled (seed x image) paired test on the same data, as a normal-theory z over
    # its 320 pairs, calls most of these nulls different.
    d = (a - b).reshape(sims, -1)
    z = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(d.shape[1]))
    assert float(np.mean(2 * norm.sf(np.abs(z)) < 0.05)) > 0.5


def test_seeds_needed_agrees_with_a_simulated_power_curve() -> None:
    difference, sd = 0.03, 0.04  # per-seed differences: mean 0.03, SD 0.04
    planned = seeds_needed(difference, sd)
    assert planned is not None
    rng = np.random.default_rng(4)
    simulated = None
    for n in range(3, 60):  # the paired t, written out here: |t| > t_crit(n - 1)
        d = rng.normal(difference, sd, size=(2000, n))
        t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
        if np.mean(np.abs(t) > student_t.ppf(0.975, n - 1)) >= 0.8:
            simulated = n
            break
    assert simulated is not None
    assert 1 / 1.5 <= planned / simulated <= 1.5, (planned, simulated)


def _column() -> Column:
    return Column("fg_ari", "fg_ari", "object_discovery", None, "FG-ARI", "decoder", 100.0)


def _spread(values: list[float]) -> Spread:
    from ocl_bench.report.leaderboard import spread_of

    return spread_of(list(enumerate(values)))


def test_no_best_mark_where_the_runner_up_lies_inside_the_leaders_interval() -> None:
    lead = _spread([60.0, 64.0, 62.0])  # mean 62, 95% interval [57.0, 67.0] over 3 seeds
    runner_up = _spread([57.9, 58.0, 58.1])  # mean 58, a narrow one
    assert not runner_up.contains(lead.mean) and lead.contains(runner_up.mean)
    rows = [Row(n, {}, {}, spreads={"fg_ari": s}) for n, s in (("a", lead), ("b", runner_up))]
    assert best_rows(Leaderboard("b", "", {}, [_column()], rows)) == {}
    # the same rows apart: marked
    rows[1].spreads["fg_ari"] = _spread([47.9, 48.0, 48.1])
    assert best_rows(Leaderboard("b", "", {}, [_column()], rows)) == {"fg_ari": 0}


GRID = """
name = "paired-mark"
columns = ["fg_ari"]
masks = "decoder"
seeds = 4
[axes]
"decoder.hidden" = [8, 16]
"""


def test_a_resolved_seed_level_comparison_marks_the_best(tmp_path: Path) -> None:
    # Some seeds train well for both rows, some badly (a shared seed effect, SD 0.1), and
    # the wider decoder is 3 points better under every seed: the rows' intervals overlap,
    # their paired comparison over the 4 seeds resolves.
    path = tmp_path / "g.toml"
    path.write_text(GRID)
    db = tmp_path / "r.sqlite"
    store = ResultStore(db)
    rng = np.random.default_rng(5)
    shared = rng.normal(0.0, 0.1, size=4)
    for cell in load_grid(path).cells:
        cfg = cell.config
        lead = 0.03 if cfg.decoder.params.hidden == 16 else 0.0
        values = 0.5 + shared[cfg.seed] + lead + rng.normal(0.0, 0.005) + rng.normal(0, 0.05, 64)
        digest = cfg.digest()
        store.start(
            Cell(digest, cfg.to_dict(), {}, "shapes", "val", cfg.seed, "running", "g", cell.label)
        )
        record = {"task": "object_discovery", "metric": "fg_ari", "masks": "decoder"}
        record.update(value=float(values.mean()), per_image=values.tolist())
        store.complete(digest, [record])
    board = load_leaderboard(path, db)
    wide, narrow = (seed_interval(r.spreads["fg_ari"]) for r in board.rows[::-1])
    assert wide is not None and narrow is not None and not separated(wide, narrow)
    assert board.conclusion[0].endswith(": resolved")
    assert best_rows(board) == {"fg_ari": 1}
    board.store, board.seed_verdicts = None, {}  # without the database: intervals only
    assert best_rows(board) == {}


@pytest.mark.parametrize("seeds", [1, 2])
def test_one_or_two_seeds_resolve_nothing_however_clear(seeds: int) -> None:
    rng = np.random.default_rng(6)
    a, b = _two_level(rng, (seeds,), difference=0.3, seed_sd=0.001, image_sd=0.01)
    found = seed_difference(a.mean(axis=-1), b.mean(axis=-1))
    assert found.n == seeds and not found.resolved
