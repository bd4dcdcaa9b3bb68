"""Vectorised grouped statistics: medians per key and robust z-scores per group."""

from __future__ import annotations

import numpy as np

__all__ = ["MIN_GROUP_FOR_Z", "group_median", "robust_z"]

#: A robust z-score needs at least this many finite values in its group.
MIN_GROUP_FOR_Z = 5
#: MAD of a normal distribution in units of its sigma (Iglewicz & Hoaglin's 0.6745).
_MAD_PER_SIGMA = 0.6745
#: Mean absolute deviation of a normal distribution in units of its sigma is sqrt(2/pi); its
#: inverse scales the fallback used when more than half the values equal the median (MAD 0).
_SIGMA_PER_MEAN_AD = 1.2533141


def group_median(keys: np.ndarray, values: np.ndarray,
                 min_count: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median of ``values`` per distinct ``key``, without a Python loop over groups.

    Returns (sorted distinct keys, median per key, number of values per key), keeping only
    keys with at least ``min_count`` values.  NaN values must be removed by the caller.
    """
    keys = np.asarray(keys)
    values = np.asarray(values, dtype=np.float64)
    if len(keys) == 0:
        return keys[:0], np.zeros(0), np.zeros(0, dtype=np.int64)
    order = np.lexsort((values, keys))
    sorted_keys, sorted_values = keys[order], values[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    counts = np.diff(np.r_[starts, len(sorted_keys)])
    median = 0.5 * (sorted_values[starts + (counts - 1) // 2] + sorted_values[starts + counts // 2])
    keep = counts >= min_count
    return sorted_keys[starts][keep], median[keep], counts[keep]


def robust_z(values: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Robust z-score of each value within its group, and the group median of each value.

    ``z = 0.6745 (x - median) / MAD`` (Iglewicz & Hoaglin's modified z-score); where the MAD
    is 0 (more than half the group share one value) the mean absolute deviation scaled to a
    normal sigma is used instead.  NaN for non-finite values, for groups with fewer than
    :data:`MIN_GROUP_FOR_Z` finite values and for groups without any spread.
    """
    values = np.asarray(values, dtype=np.float64)
    groups = np.asarray(groups)
    z = np.full(len(values), np.nan)
    median_of = np.full(len(values), np.nan)
    finite = np.flatnonzero(np.isfinite(values))
    if len(finite) == 0:
        return z, median_of
    keys, median, counts = group_median(groups[finite], values[finite])
    slot = np.searchsorted(keys, groups[finite])
    deviation = np.abs(values[finite] - median[slot])
    _, mad, _ = group_median(groups[finite], deviation)
    mean_ad = np.bincount(slot, weights=deviation, minlength=len(keys)) / counts
    sigma = np.where(mad > 0, mad / _MAD_PER_SIGMA, mean_ad * _SIGMA_PER_MEAN_AD)
    usable = (counts >= MIN_GROUP_FOR_Z) & (sigma > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = (values[finite] - median[slot]) / sigma[slot]
    z[finite] = np.where(usable[slot], scores, np.nan)
    median_of[finite] = median[slot]
    return z, median_of
