"""The statistics behind "mean ± ci" and paired comparisons (bench/report/stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ocl_bench.report.stats import (
    SeedTest,
    Summary,
    _percentile_interval,
    bootstrap_means,
    hierarchical_interval,
    paired_difference,
    seed_difference,
    seeds_needed,
    separated,
    summarize,
)

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def test_bootstrap_interval_matches_the_normal_closed_form() -> None:
    sigma, n = 2.0, 10_000
    values = np.random.default_rng(1).normal(5.0, sigma, size=n)
    s = summarize(values)
    half = Z95 * sigma / math.sqrt(n)
    assert s.method == "bootstrap" and s.n == n
    assert s.mean == pytest.approx(values.mean())
    assert s.std == pytest.approx(values.std(ddof=1))
    assert s.ci_low == pytest.approx(s.mean - half, abs=0.05 * half)
    assert s.ci_high == pytest.approx(s.mean + half, abs=0.05 * half)


def test_interval_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(2)
    draws = 300
    covered = 0
    for i in range(draws):
        s = summarize(rng.normal(0.0, 1.0, size=60), resamples=1000, seed=i)
        covered += s.ci_low <= 0.0 <= s.ci_high
    # Percentile bootstrap undercovers slightly at n=60; 300 draws give a ~1.3% std error.
    assert 0.90 <= covered / draws <= 0.98


def test_a_wider_confidence_gives_a_wider_interval() -> None:
    values = np.random.default_rng(3).normal(size=200)
    narrow, wide = summarize(values, confidence=0.8), summarize(values, confidence=0.99)
    assert wide.ci_low < narrow.ci_low < narrow.mean < narrow.ci_high < wide.ci_high


def test_deterministic_for_a_seed_and_varies_across_seeds() -> None:
    values = np.random.default_rng(4).normal(size=30)
    assert summarize(values, seed=7) == summarize(values, seed=7)
    assert summarize(values, seed=7).ci_low != summarize(values, seed=8).ci_low


def test_nans_are_dropped_before_anything_else() -> None:
    s = summarize([1.0, float("nan"), 3.0, float("nan"), 2.0])
    assert s.n == 3 and s.mean == 2.0 and s.std == 1.0
    # Student's t with 2 degrees of freedom: t = 4.3027, half-width t * 1 / sqrt(3).
    assert s.method == "student t"
    assert s.ci_low == pytest.approx(2.0 - 4.302653 / math.sqrt(3), abs=1e-5)
    assert s.ci_high == pytest.approx(2.0 + 4.302653 / math.sqrt(3), abs=1e-5)


def test_a_few_seeds_get_an_interval_that_covers_95_percent_of_the_time() -> None:
    # Three seeds: the percentile bootstrap of 3 values covers the true mean ~3 times in 4,
    # which would mark differences as resolved that are not; Student's t covers ~95%.
    rng = np.random.default_rng(5)
    draws = 2000
    samples = rng.normal(0.0, 1.0, size=(draws, 3))
    covered = sum(s.ci_low <= 0.0 <= s.ci_high for s in map(summarize, samples))
    assert 0.93 <= covered / draws <= 0.97
    boot = [_percentile_interval(bootstrap_means(x, 500, rng), 0.95) for x in samples[:400]]
    assert sum(lo <= 0.0 <= hi for lo, hi in boot) / 400 < 0.85


def test_one_value_has_a_point_interval() -> None:
    s = summarize([0.42, float("nan")])
    assert s == Summary(0.42, 0.0, 1, 0.42, 0.42, "single")
    assert s.contains(0.42) and not s.contains(0.43)


def test_no_values_give_an_empty_summary() -> None:
    s = summarize([float("nan")])
    assert s.n == 0 and s.method == "empty" and math.isnan(s.mean)
    assert not s.contains(0.0)


def test_constant_values_have_no_spread() -> None:
    s = summarize([0.7] * 5)
    assert (s.std, s.ci_low, s.ci_high) == (0.0, 0.7, 0.7)


def test_confidence_outside_0_1_is_refused() -> None:
    with pytest.raises(ValueError, match="confidence"):
        summarize([1.0, 2.0], confidence=95)


@pytest.mark.parametrize("n", [1, 5, 40, 3000])
def test_identical_rows_never_differ(n: int) -> None:
    a = np.random.default_rng(n).uniform(size=n)
    c = paired_difference(a, a.copy())
    assert (c.difference, c.ci_low, c.ci_high, c.p_value, c.n) == (0.0, 0.0, 0.0, 1.0, n)


def test_a_clearly_shifted_pair_differs() -> None:
    rng = np.random.default_rng(5)
    b = rng.uniform(0.3, 0.7, size=200)
    a = b + 0.05 + rng.normal(0.0, 0.05, size=200)
    c = paired_difference(a, b)
    assert c.method == "monte carlo" and c.n == 200
    assert c.difference == pytest.approx(float(np.mean(a - b)))
    assert 0.0 < c.ci_low < c.difference < c.ci_high
    assert c.p_value < 0.01
    flipped = paired_difference(b, a)  # the same comparison seen from the other row
    assert flipped.difference == pytest.approx(-c.difference)
    assert flipped.p_value < 0.01 and flipped.ci_high < 0.0


def test_false_positive_rate_under_no_difference_is_about_5_percent() -> None:
    rng = np.random.default_rng(6)
    draws = 200
    significant = covered = 0
    for i in range(draws):
        b = rng.uniform(size=40)
        c = paired_difference(b + rng.normal(0.0, 0.1, size=40), b, resamples=2000, seed=i)
        significant += c.p_value < 0.05
        covered += c.ci_low <= 0.0 <= c.ci_high
    # 200 draws: ~1.5% std error around 5% and 95%.
    assert significant / draws <= 0.10
    assert 0.88 <= covered / draws <= 0.99


def test_exact_sign_flip_p_value_for_three_seeds() -> None:
    # Three positive differences: of the 8 sign patterns, only all-plus and all-minus are as
    # extreme, so p = 2/8 (three seeds can never reach p < 0.05).
    c = paired_difference([0.61, 0.65, 0.70], [0.50, 0.52, 0.55])
    assert c.method == "exact" and c.p_value == pytest.approx(0.25)


def test_pairs_with_a_nan_are_dropped_together() -> None:
    nan = float("nan")
    c = paired_difference([1.0, nan, 2.0, 3.0], [0.5, 0.0, nan, 2.5])
    assert c.n == 2 and c.difference == pytest.approx(0.5)


def test_unpaired_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="same count"):
        paired_difference([1.0, 2.0], [1.0])


def _summary(mean: float, low: float, high: float, n: int = 3) -> Summary:
    return Summary(mean, 0.1, n, low, high, "student t")


def test_separated_needs_each_mean_outside_the_others_interval() -> None:
    runner_up = _summary(0.50, 0.45, 0.55)
    assert separated(_summary(0.60, 0.58, 0.62), runner_up)
    assert not separated(_summary(0.54, 0.50, 0.58), runner_up)
    assert not separated(_summary(0.55, 0.50, 0.60), runner_up)  # on the edge: not outside
    # the lead's mean is outside the runner-up's narrow interval, but the lead's own wide
    # interval holds the runner-up's mean: the seeds do not separate them
    assert not separated(_summary(0.60, 0.40, 0.80), runner_up)
    assert separated(_summary(30.0, 27.0, 33.0), _summary(25.0, 24.0, 26.0))  # either order


def test_one_seed_is_never_separated() -> None:
    one = _summary(0.9, 0.9, 0.9, n=1)
    assert not separated(one, _summary(0.5, 0.45, 0.55))
    assert not separated(_summary(0.9, 0.85, 0.95), one)


def test_nan_is_never_separated() -> None:
    assert not separated(summarize([]), _summary(0.5, 0.4, 0.6))
    assert not separated(_summary(0.9, 0.8, 1.0), summarize([]))


def test_seed_difference_is_scipys_paired_t() -> None:
    from scipy.stats import ttest_rel

    rng = np.random.default_rng(11)
    a, b = rng.normal(0.6, 0.1, size=5), rng.normal(0.5, 0.1, size=5)
    found = seed_difference(a, b)
    reference = ttest_rel(a, b)
    low, high = reference.confidence_interval(0.95)
    assert found.n == 5 and found.difference == pytest.approx(float(np.mean(a - b)))
    assert found.p_value == pytest.approx(reference.pvalue, rel=1e-10)
    assert (found.ci_low, found.ci_high) == pytest.approx((low, high), rel=1e-10)
    assert found.sd == pytest.approx(float(np.std(a - b, ddof=1)))


def test_the_verdict_needs_three_seeds_whatever_two_say() -> None:
    # Two seeds that agree closely: the paired t with one degree of freedom gives p < 0.05,
    # but one degree of freedom is no basis for a verdict.
    two = seed_difference([0.80, 0.90], [0.50, 0.601])
    assert two.p_value < 0.05 and two.ci_low > 0 and not two.resolved
    three = seed_difference([0.80, 0.90, 0.85], [0.50, 0.601, 0.55])
    assert three.resolved and three.p_value < 0.05
    one = seed_difference([0.9], [0.1])
    assert one.n == 1 and math.isnan(one.p_value) and math.isnan(one.sd) and not one.resolved


def test_sign_flip_over_seeds_is_exact() -> None:
    # Three positive differences: of the 8 sign patterns only all-plus and all-minus are as
    # extreme, so p = 2/8; with six, 2/64.
    assert seed_difference([0.61, 0.65, 0.70], [0.50, 0.52, 0.55]).sign_flip_p == 0.25
    six = seed_difference(np.arange(6) + 1.0, np.zeros(6))
    assert six.sign_flip_p == pytest.approx(2 / 64)


def test_constant_seed_differences_have_no_spread() -> None:
    found = seed_difference([0.7, 0.8, 0.9], [0.6, 0.7, 0.8])
    assert found.sd == pytest.approx(0.0, abs=1e-12) and found.resolved
    same = seed_difference([0.7, 0.8, 0.9], [0.7, 0.8, 0.9])
    assert same == SeedTest(0.0, 0.0, 0.0, 1.0, 1.0, 3, 0.0)
    assert not same.resolved


def test_seeds_needed_matches_the_textbook_paired_t_sample_sizes() -> None:
    # Two-sided paired t, alpha 0.05, 80% power (e.g. G*Power): effect size d/sd = 1 needs
    # 10 pairs, 0.5 needs 34; a bigger SD needs more seeds, a zero difference none.
    assert seeds_needed(1.0, 1.0) == 10
    assert seeds_needed(0.05, 0.1) == 34
    assert seeds_needed(3.0, 1.0) == 4
    assert seeds_needed(10.0, 1.0) == 3  # never fewer than the verdict's minimum
    assert seeds_needed(0.0, 1.0) is None and seeds_needed(1.0, math.nan) is None
    assert seeds_needed(1.0, 0.0) == 3


def test_hierarchical_interval_of_one_seed_is_the_image_bootstrap() -> None:
    values = np.random.default_rng(12).normal(0.1, 0.2, size=200)
    found = hierarchical_interval([values], resamples=4000)
    plain = summarize(values, resamples=4000)
    assert found.seeds == 1 and found.images == 200 and found.mean == pytest.approx(plain.mean)
    assert found.ci_high - found.ci_low == pytest.approx(plain.ci_high - plain.ci_low, rel=0.1)


def test_hierarchical_interval_widens_with_seed_to_seed_variation() -> None:
    # The same image noise; seeds that disagree (their means +-0.3) widen the interval
    # far past what the images alone give.
    rng = np.random.default_rng(13)
    noise = [rng.normal(0.0, 0.05, size=64) for _ in range(5)]
    agree = hierarchical_interval([0.1 + e for e in noise])
    shifts = [0.4, -0.2, 0.3, -0.3, 0.3]
    disagree = hierarchical_interval([s + e for s, e in zip(shifts, noise)])
    assert agree.ci_high - agree.ci_low < 0.03
    assert disagree.ci_high - disagree.ci_low > 0.3
    assert disagree.mean == pytest.approx(0.1, abs=0.02)


@pytest.mark.parametrize("position", [0, 1, 2])
def test_bootstrap_resamples_every_position_uniformly(position: int) -> None:
    # With one 1 among three values, each resample mean is (times the 1 was drawn) / 3:
    # over many resamples the average is 1/3 wherever the 1 sits (first and last included).
    values = np.zeros(3)
    values[position] = 1.0
    means = bootstrap_means(values, 30_000, np.random.default_rng(position))
    assert set(np.round(means * 3).astype(int)) == {0, 1, 2, 3}
    assert means.mean() == pytest.approx(1 / 3, abs=0.006)
