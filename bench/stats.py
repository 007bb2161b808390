"""Mean, spread and confidence intervals of repeated measurements, and paired comparisons.

Conventions (what a leaderboard cell's "mean ± ci" means):

- Values are per seed, or per image when a cell has one seed. NaN marks a value that was
  not measured (an image skipped by the IoU family) and is dropped before anything else.
- `std` is the sample standard deviation (ddof=1), 0 for a single value.
- From 20 values on (per-image values, many seeds) the interval is the bootstrap
  percentile interval of the mean: `resamples` resamples of the values with replacement,
  the (1-c)/2 and (1+c)/2 quantiles of their means. It needs no normality assumption, and
  it is what SciPy's `bootstrap(method="percentile")` gives.
- Below 20 values (a handful of seeds) the percentile bootstrap is far too narrow: with 3
  values its 95% interval covers the true mean about 3 times in 4 (measured in
  tests/test_stats.py). There the interval is Student's t, mean ± t(n-1) · std / √n,
  which is exact for normal values and honest about how little 2 or 3 seeds say
  (method "student t").
  One value has no spread to resample: its interval is (mean, mean), method "single".
- Comparisons are paired (the same images, or the same seeds, in both rows): the interval
  is the bootstrap interval of the mean difference, the p-value that of a two-sided
  sign-flip permutation test of the mean difference (under the null hypothesis "no
  difference", each pair's difference is as likely to have either sign).
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
    left = np.asarray(a, dtype=np.float64).ravel()
    right = np.asarray(b, dtype=np.float64).ravel()
    if left.shape != right.shape:
        raise ValueError(
            f"paired values need the same count on both sides, got {left.size} and {right.size}"
        )
    keep = ~(np.isnan(left) | np.isnan(right))
    differences = left[keep] - right[keep]
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
    flipped, method = _sign_flip_means(differences, resamples, rng)
    # The observed pattern must count as at least as extreme despite float rounding.
    tolerance = 1e-12 * max(1.0, float(np.abs(differences).max()))
    hits = int(np.count_nonzero(np.abs(flipped) >= abs(observed) - tolerance))
    if method == "exact":
        p_value = hits / flipped.size
    else:
        p_value = (1 + hits) / (1 + flipped.size)
    return Comparison(observed, low, high, min(1.0, p_value), n, method, confidence)


def resolved(best: Summary, runner_up: Summary, *, higher_is_better: bool = True) -> bool:
    """Whether `best` leads `runner_up` by more than the runner-up's own uncertainty: its
    mean lies beyond the runner-up's interval, on the better side. NaN is never resolved."""
    if math.isnan(best.mean) or math.isnan(runner_up.ci_low) or math.isnan(runner_up.ci_high):
        return False
    if higher_is_better:
        return best.mean > runner_up.ci_high
    return best.mean < runner_up.ci_low
