"""The statistics behind every interval and correlation steerloop reports.

One module so that the runner's aggregates, the regression gate and the study report use
the same resampling: percentile bootstrap intervals, seeded (the same inputs give the same
interval), 2000 resamples and 95% by default. Correlations over policies: Pearson r,
Spearman rho (Pearson on average ranks) and Kendall tau-b, each with a bootstrap interval
that resamples policies, and the number of pairwise ranking inversions between two orders.
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_RESAMPLES = 2000  # resamples of every bootstrap interval
BOOTSTRAP_SEED = 0  # every bootstrap is seeded: the same inputs give the same interval
CONFIDENCE = 0.95  # two-sided level of every interval


def bootstrap_ci(values, *, statistic=np.mean, resamples: int = BOOTSTRAP_RESAMPLES, level: float = CONFIDENCE,
                 seed: int = BOOTSTRAP_SEED):
    """(point, lo, hi): ``statistic`` of the finite ``values`` with a percentile bootstrap
    interval (None three times for no values; the point three times for one)."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if len(values) == 0:
        return None, None, None
    point = float(statistic(values))
    if len(values) == 1:
        return point, point, point
    rng = np.random.default_rng(seed)
    samples = values[rng.integers(0, len(values), (resamples, len(values)))]
    stats = np.apply_along_axis(statistic, 1, samples)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return point, float(lo), float(hi)


def ranks(x) -> np.ndarray:
    """Ranks 0..n-1, ties given their average rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    out = np.empty(len(x), dtype=np.float64)
    out[order] = np.arange(len(x))
    for value in np.unique(x):
        tied = x == value
        out[tied] = out[tied].mean()
    return out


def pearson(x, y) -> float:
    """Pearson correlation; nan when either variable is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum()))


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson on average ranks); nan when either is constant."""
    return pearson(ranks(x), ranks(y))


def _pair_signs(x, y) -> tuple[np.ndarray, np.ndarray]:
    """sign(x_i - x_j), sign(y_i - y_j) over the pairs i < j."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    i, j = np.triu_indices(len(x), k=1)
    return np.sign(x[i] - x[j]), np.sign(y[i] - y[j])


def kendall(x, y) -> float:
    """Kendall's tau-b (ties in either variable handled); nan when either is constant."""
    sx, sy = _pair_signs(x, y)
    denominator = math.sqrt(float(np.sum(sx != 0)) * float(np.sum(sy != 0)))
    return math.nan if denominator == 0 else float(np.sum(sx * sy) / denominator)


def ranking_inversions(x, y, *, x_higher_is_better: bool = False, y_higher_is_better: bool = True) -> int:
    """Pairs of items that the two measurements order the opposite way, once both are turned
    into "better" orders (e.g. lower offline error vs higher closed-loop success); pairs tied
    in either measurement are not counted."""
    sx, sy = _pair_signs(x, y)
    sx = sx if x_higher_is_better else -sx
    sy = sy if y_higher_is_better else -sy
    return int(np.sum(sx * sy < 0))


# ----------------------------------------------------------------------------- over many resamples at once
def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """:func:`pearson` of every row pair of (B, n) arrays (nan where a row is constant)."""
    x, y = x - x.mean(axis=1, keepdims=True), y - y.mean(axis=1, keepdims=True)
    denominator = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    constant = (np.ptp(x, axis=1) == 0) | (np.ptp(y, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(constant, np.nan, (x * y).sum(axis=1) / np.where(constant, 1.0, denominator))


def _ranks_rows(x: np.ndarray) -> np.ndarray:
    """:func:`ranks` of every row of a (B, n) array: average 0-based ranks."""
    less = (x[:, None, :] < x[:, :, None]).sum(axis=2)
    at_most = (x[:, None, :] <= x[:, :, None]).sum(axis=2)
    return (less + at_most - 1) / 2.0


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _pearson_rows(_ranks_rows(x), _ranks_rows(y))


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    i, j = np.triu_indices(x.shape[1], k=1)
    sx, sy = np.sign(x[:, i] - x[:, j]), np.sign(y[:, i] - y[:, j])
    denominator = np.sqrt((sx != 0).sum(axis=1) * (sy != 0).sum(axis=1).astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator == 0, np.nan, (sx * sy).sum(axis=1) / np.where(denominator == 0, 1.0, denominator))


_BATCHED = {pearson: _pearson_rows, spearman: _spearman_rows, kendall: _kendall_rows}


def correlation_ci(x, y, fn, samples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                   level: float = CONFIDENCE):
    """(point, lo, hi): ``fn`` over the paired values with a percentile bootstrap interval
    (pairs resampled with replacement; resamples with a constant variable are dropped, and
    fewer than a tenth of them left gives no interval). Pearson, Spearman and Kendall are
    computed over all resamples at once."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    point = fn(x, y)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(x), size=(samples, len(x)))
    if fn in _BATCHED:
        values = _BATCHED[fn](x[index], y[index])
    else:
        values = np.asarray([fn(x[i], y[i]) for i in index], np.float64)
    values = values[~np.isnan(values)]
    if math.isnan(point) or len(values) < samples // 10:
        return point, math.nan, math.nan
    tail = (1 - level) / 2 * 100
    return point, float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))
