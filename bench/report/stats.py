"""Mean, spread and confidence intervals of repeated measurements, and paired comparisons.

The statistical model (docs/leaderboards.md, "Seeds, intervals and comparisons"): the unit
of replication is the training seed. The images of one seed are all scored by the same
trained model, so they measure the test set's noise around that one model, not how the
recipe varies when it is trained again; a verdict on two recipes therefore rests on their
per-seed means.

Conventions (what a leaderboard cell's "mean ± ci" means):

- Values are per seed (a cell's value is already its mean over images), or per image for
  the within-seed view of one seed. NaN marks a value that was not measured (an image
  skipped by the IoU family) and is dropped before anything else.
- `std` is the sample standard deviation (ddof=1), 0 for a single value.
- From 20 values on the interval is the bootstrap percentile interval of the mean:
  `resamples` resamples of the values with replacement, the (1-c)/2 and (1+c)/2 quantiles
  of their means (what SciPy's `bootstrap(method="percentile")` gives).
- Below 20 values (a handful of seeds) the percentile bootstrap is far too narrow: with 3
  values its 95% interval covers the true mean about 3 times in 4 (measured in
  tests/test_stats.py). There the interval is Student's t, mean ± t(n-1) · std / √n,
  which is exact for normal values and honest about how little 2 or 3 seeds say
  (method "student t"). One value has no spread: its interval is (mean, mean), "single".
- Verdicts (`seed_difference`): row A minus row B over their shared seeds, the paired
  Student's t over per-seed means (df = seeds - 1) for the interval and p-value, and the
  exact sign-flip p over seeds beside it as a distribution-free check. Resolved only with
  at least `MIN_SEEDS` seeds, p < 1 - confidence and an interval that leaves out 0.
- `hierarchical_interval` (resample seeds, then images within each) is a descriptive,
  within-seed view of the same difference; it never decides a verdict.
- `seeds_needed`: the smallest seed count at which the two-sided paired t reaches 80%
  power for a given difference and seed-level SD (noncentral t).
- `paired_difference` (bootstrap interval, sign-flip p over any pairs) is the generic
  paired tool; verdicts do not use it over images.
- Everything is deterministic for a given `seed` (numpy's PCG64 generator).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import product

import numpy as np

# Index matrices are built this many elements at a time: 1 MiB of int32 indices and 2 MiB
# of gathered float64 values stay in cache (measured ~1.8x faster than 32 MiB chunks for
# 10k resamples of 10k values), and no 800 MB array is ever made.
_CHUNK_ELEMENTS = 1 << 18
# Up to 2**this pairs the sign-flip test enumerates every sign pattern (an exact p-value).
_EXACT_MAX_PAIRS = 13
# Below this many values `summarize` uses Student's t instead of the percentile bootstrap.
SMALL_SAMPLE = 20
# A seed-level verdict needs this many shared seeds. One seed has no seed-to-seed variance
# to test against; two give it one degree of freedom, an estimate so unstable (its 95%
# interval spans a factor of ~70 in SD) that no verdict should rest on it.
MIN_SEEDS = 3
# The power `seeds_needed` asks for, the usual planning target.
POWER = 0.8
# `seeds_needed` reports "more than this" rather than searching further.
MAX_SEEDS_NEEDED = 100_000


@dataclass(frozen=True)
class Summary:
    """The mean of some values with its spread and confidence interval."""

    mean: float
    std: float
    n: int
    ci_low: float
    ci_high: float
    method: str  # "bootstrap", "student t", "single" (one value) or "empty" (none: all NaN)
    confidence: float = 0.95

    def contains(self, value: float) -> bool:
        """Whether `value` (a published number, say) lies inside the interval, ends included."""
        return bool(self.ci_low <= value <= self.ci_high)


@dataclass(frozen=True)
class Comparison:
    """Row A minus row B over paired values."""

    difference: float  # mean of a - b
    ci_low: float
    ci_high: float
    p_value: float  # two-sided, sign-flip permutation test; 1.0 when nothing differs
    n: int  # pairs compared (pairs with a NaN on either side are dropped)
    method: str  # "exact" (every sign pattern) or "monte carlo" (`resamples` patterns)
    confidence: float = 0.95


def _finite(values: Iterable[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[~np.isnan(array)]


def bootstrap_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The means of `resamples` resamples (with replacement) of `values`, chunked so the
    index matrix stays small.

    Indices are uniform doubles scaled to [0, n) and truncated, ~1.6x faster than
    `Generator.integers` (measured, 10k x 10k); the non-uniformity this leaves is below
    n / 2**53, far under the bootstrap's own Monte Carlo error."""
    n = values.size
    means = np.empty(resamples, dtype=np.float64)
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        scaled = rng.random((stop - start, n))
        scaled *= n
        picks = scaled.astype(np.intp)
        np.minimum(picks, n - 1, out=picks)  # a draw just under 1 may round up to n
        means[start:stop] = np.take(values, picks).mean(axis=1)
    return means


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return float(low), float(high)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def summarize(
    values: Iterable[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> Summary:
    """Mean, sample std (ddof=1) and confidence interval of the mean of `values` (NaNs
    dropped): Student's t below `SMALL_SAMPLE` values, else the bootstrap percentile
    interval. See the module docstring for the conventions."""
    _check_confidence(confidence)
    data = _finite(values)
    n = int(data.size)
    if n == 0:
        nan = float("nan")
        return Summary(nan, nan, 0, nan, nan, "empty", confidence)
    mean = float(data.mean())
    if n == 1:
        return Summary(mean, 0.0, 1, mean, mean, "single", confidence)
    std = float(data.std(ddof=1))
    method = "student t" if n < SMALL_SAMPLE else "bootstrap"
    if std == 0.0:  # every resample has the same mean; skip the work and rounding noise
        return Summary(mean, 0.0, n, mean, mean, method, confidence)
    if method == "student t":
        from scipy.stats import t as student_t

        half = float(student_t.ppf(0.5 + confidence / 2.0, df=n - 1)) * std / math.sqrt(n)
        return Summary(mean, std, n, mean - half, mean + half, method, confidence)
    means = bootstrap_means(data, resamples, np.random.default_rng(seed))
    low, high = _percentile_interval(means, confidence)
    return Summary(mean, std, n, low, high, "bootstrap", confidence)


def _sign_flip_means(
    differences: np.ndarray, resamples: int, rng: np.random.Generator
) -> tuple[np.ndarray, str]:
    """The mean difference under sign patterns: all 2**n of them when n is small (exact),
    else `resamples` random ones. A pattern's mean is (2 * bits @ d - sum d) / n, so each
    chunk is one matrix-vector product over random bits."""
    n = differences.size
    total = differences.sum()
    if n <= _EXACT_MAX_PAIRS:
        bits = np.array(list(product((0.0, 1.0), repeat=n)))
        return (2.0 * (bits @ differences) - total) / n, "exact"
    means = np.empty(resamples, dtype=np.float64)
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        packed = rng.integers(0, 256, size=(stop - start, (n + 7) // 8), dtype=np.uint8)
        bits = np.unpackbits(packed, axis=1, count=n).astype(np.float64)
        means[start:stop] = (2.0 * (bits @ differences) - total) / n
    return means, "monte carlo"


def paired_differences(
    a: Iterable[float] | np.ndarray, b: Iterable[float] | np.ndarray
) -> np.ndarray:
    """a[i] - b[i] over the pairs with no NaN on either side; unequal counts are an error."""
    left = np.asarray(a, dtype=np.float64).ravel()
    right = np.asarray(b, dtype=np.float64).ravel()
    if left.shape != right.shape:
        raise ValueError(
            f"paired values need the same count on both sides, got {left.size} and {right.size}"
        )
    keep = ~(np.isnan(left) | np.isnan(right))
    return left[keep] - right[keep]


def paired_difference(
    a: Iterable[float] | np.ndarray,
    b: Iterable[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> Comparison:
    """Mean of a - b over pairs (a[i], b[i]) — the same image or seed in both rows — with
    the bootstrap percentile interval of that mean and a two-sided p-value.

    The p-value comes from a sign-flip permutation test (SciPy's
    `permutation_test(..., permutation_type="samples")` on paired data tests the same
    hypothesis, but calls the statistic per batch of Python-built permutations; this one is
    a matrix product over random bits). It is exact up to 2**13 sign patterns, else
    estimated from `resamples` random patterns as (1 + hits) / (1 + resamples), so it is
    never 0. Pairs with a NaN on either side are dropped."""
    _check_confidence(confidence)
    differences = paired_differences(a, b)
    n = int(differences.size)
    if n == 0:
        nan = float("nan")
        return Comparison(nan, nan, nan, nan, 0, "exact", confidence)
    observed = float(differences.mean())
    if not differences.any():  # identical rows: no resampling can make them differ
        return Comparison(0.0, 0.0, 0.0, 1.0, n, "exact", confidence)
    rng = np.random.default_rng(seed)
    if n == 1:
        low = high = observed
    else:
        low, high = _percentile_interval(bootstrap_means(differences, resamples, rng), confidence)
    p_value, method = sign_flip_p(differences, resamples, rng)
    return Comparison(observed, low, high, p_value, n, method, confidence)


def sign_flip_p(
    differences: np.ndarray, resamples: int = 10_000, rng: np.random.Generator | None = None
) -> tuple[float, str]:
    """Two-sided sign-flip permutation p-value of the mean of `differences` (no NaN), and
    "exact" or "monte carlo". Exact up to 2**13 sign patterns; else estimated from
    `resamples` random patterns as (1 + hits) / (1 + resamples), so never 0. Exact over n
    pairs it cannot go below 2 / 2**n (0.25 with 3 seeds, 0.0625 with 5)."""
    differences = np.asarray(differences, dtype=np.float64).ravel()
    if differences.size == 0:
        return float("nan"), "exact"
    if not differences.any():
        return 1.0, "exact"
    observed = float(differences.mean())
    flipped, method = _sign_flip_means(differences, resamples, rng or np.random.default_rng(0))
    # The observed pattern must count as at least as extreme despite float rounding.
    tolerance = 1e-12 * max(1.0, float(np.abs(differences).max()))
    hits = int(np.count_nonzero(np.abs(flipped) >= abs(observed) - tolerance))
    if method == "exact":
        return min(1.0, hits / flipped.size), method
    return min(1.0, (1 + hits) / (1 + flipped.size)), method


def separated(lead: Summary, runner_up: Summary) -> bool:
    """Whether two rows' seed intervals keep each other's means out: the lead's mean lies
    outside the runner-up's interval and the runner-up's outside the lead's, both over 2
    or more seeds. A one-sided test (only the lead's mean outside) would mark a lead whose
    own wide interval still holds the runner-up. NaN is never separated."""
    if lead.n < 2 or runner_up.n < 2:
        return False
    numbers = (lead.mean, lead.ci_low, lead.ci_high, runner_up.mean)
    numbers += (runner_up.ci_low, runner_up.ci_high)
    if any(math.isnan(x) for x in numbers):
        return False
    return not runner_up.contains(lead.mean) and not lead.contains(runner_up.mean)


@dataclass(frozen=True)
class SeedTest:
    """Row A minus row B over their shared training seeds: the paired Student's t over the
    per-seed means (df = n - 1), with the exact sign-flip p over seeds beside it."""

    difference: float  # mean over seeds of a_seed - b_seed
    ci_low: float  # Student's t interval; NaN with one seed
    ci_high: float
    p_value: float  # two-sided paired t; NaN with one seed (no variance to test against)
    sign_flip_p: float  # two-sided, exact over the 2**n sign patterns (distribution-free)
    n: int  # seeds compared (a seed with NaN on either side is dropped)
    sd: float  # sample SD (ddof=1) of the per-seed differences; NaN with one seed
    confidence: float = 0.95

    @property
    def resolved(self) -> bool:
        """At least `MIN_SEEDS` seeds, p < 1 - confidence, and the interval leaves out 0."""
        if self.n < MIN_SEEDS or math.isnan(self.p_value):
            return False
        outside = self.ci_low > 0.0 or self.ci_high < 0.0
        return outside and self.p_value < 1.0 - self.confidence


def paired_t(differences: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, ...]:
    """(mean, sd, half-width, two-sided p) of the paired Student's t over the last axis of
    `differences` (no NaN, 2 or more values), vectorised over the leading axes. An SD of 0
    gives a zero half-width and p = 0 for a nonzero mean (t is infinite), 1 for zero."""
    from scipy.stats import t as student_t

    d = np.asarray(differences, dtype=np.float64)
    n = d.shape[-1]
    mean = d.mean(axis=-1)
    sd = d.std(axis=-1, ddof=1)
    se = sd / math.sqrt(n)
    half = float(student_t.ppf(0.5 + confidence / 2.0, df=n - 1)) * se
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, np.abs(mean) / np.where(se > 0, se, 1.0), np.inf)
    t = np.where((se == 0) & (mean == 0), 0.0, t)
    p = 2.0 * student_t.sf(t, df=n - 1)
    return mean, sd, half, p


def seed_difference(
    a: Iterable[float] | np.ndarray, b: Iterable[float] | np.ndarray, *, confidence: float = 0.95
) -> SeedTest:
    """Row A minus row B over per-seed values a[i], b[i] (the same training seed): the
    paired Student's t interval and p-value, and the exact sign-flip p. Seeds with a NaN on
    either side are dropped."""
    _check_confidence(confidence)
    d = paired_differences(a, b)
    n = int(d.size)
    nan = float("nan")
    if n == 0:
        return SeedTest(nan, nan, nan, nan, nan, 0, nan, confidence)
    flip, _ = sign_flip_p(d)
    mean = float(d.mean())
    if n == 1:  # no seed-to-seed spread: no interval, no test
        return SeedTest(mean, nan, nan, nan, flip, 1, nan, confidence)
    _, sd, half, p = paired_t(d, confidence)
    half = float(half)
    return SeedTest(mean, mean - half, mean + half, float(p), flip, n, float(sd), confidence)


@dataclass(frozen=True)
class WithinSeed:
    """A descriptive interval of a paired difference that keeps the images of each seed:
    resample seeds, then images within each resampled seed. It shows how much of the
    difference's uncertainty the test images add; it is not the verdict."""

    mean: float  # mean over seeds of each seed's mean image difference
    ci_low: float
    ci_high: float
    seeds: int
    images: int  # image pairs over all seeds
    confidence: float = 0.95
    method: str = "hierarchical bootstrap (seeds, then images within each)"


def hierarchical_interval(
    per_seed: list[np.ndarray],
    *,
    confidence: float = 0.95,
    resamples: int = 4000,
    seed: int = 0,
) -> WithinSeed:
    """The percentile interval of the mean difference under a two-stage bootstrap: each
    resample draws len(per_seed) seeds with replacement, and for every draw resamples that
    seed's image differences (NaN dropped) with replacement; its statistic is the mean of
    the drawn seeds' means. With one seed this is the image bootstrap of that seed."""
    _check_confidence(confidence)
    seeds = [_finite(d) for d in per_seed]
    seeds = [d for d in seeds if d.size]
    nan = float("nan")
    if not seeds:
        return WithinSeed(nan, nan, nan, 0, 0, confidence)
    n = len(seeds)
    images = sum(d.size for d in seeds)
    centre = float(np.mean([d.mean() for d in seeds]))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))
    drawn = np.empty((resamples, n), dtype=np.float64)
    for s, d in enumerate(seeds):  # every draw of seed s gets its own image resample
        where = picks == s
        drawn[where] = bootstrap_means(d, int(where.sum()), rng) if where.any() else 0.0
    low, high = _percentile_interval(drawn.mean(axis=1), confidence)
    return WithinSeed(centre, low, high, n, images, confidence)


def seeds_needed(
    difference: float, sd: float, *, power: float = POWER, confidence: float = 0.95
) -> int | None:
    """About how many seeds the two-sided paired t (alpha = 1 - confidence) needs to
    resolve a true difference `difference` with `power`, if the per-seed differences
    scatter with SD `sd`: the smallest n >= MIN_SEEDS whose noncentral-t power,
    P(|T| > t_crit) with T ~ nct(n - 1, |difference| / sd * sqrt(n)), reaches `power`.

    None when the difference is 0 or NaN, or the SD is NaN (one seed): nothing to plan
    from. An SD of 0 (every seed differs by the same amount) gives MIN_SEEDS. Capped at
    MAX_SEEDS_NEEDED + 1 ("more than" that). The observed SD of a few seeds is itself
    uncertain, so this is a rough planning figure, not a promise."""
    from scipy.stats import nct, norm
    from scipy.stats import t as student_t

    if math.isnan(difference) or math.isnan(sd) or difference == 0.0:
        return None
    if sd == 0.0:
        return MIN_SEEDS
    effect = abs(difference) / sd
    alpha = 1.0 - confidence
    # The normal approximation is a lower bound for the t test: search upward from it.
    guess = ((norm.ppf(1 - alpha / 2) + norm.ppf(power)) / effect) ** 2
    if guess > MAX_SEEDS_NEEDED:
        return MAX_SEEDS_NEEDED + 1
    start = max(MIN_SEEDS, int(guess))
    for low in range(start, MAX_SEEDS_NEEDED + 1, 64):
        n = np.arange(low, min(low + 64, MAX_SEEDS_NEEDED + 1))
        crit = student_t.ppf(1 - alpha / 2, df=n - 1)
        nc = effect * np.sqrt(n)
        reached = nct.sf(crit, n - 1, nc) + nct.cdf(-crit, n - 1, nc) >= power
        if reached.any():
            return int(n[np.argmax(reached)])
    return MAX_SEEDS_NEEDED + 1
