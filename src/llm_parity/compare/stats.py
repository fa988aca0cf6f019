"""Statistics over per-position values grouped by prompt: bootstrap intervals, the
conservative end, and the paired interval of a ratio to the noise floor.

Positions of one prompt are not independent draws (they share a context, and a defect in
a prompt shows at many of its positions), so every interval here resamples whole prompts,
never single positions. Pure numpy, like :mod:`llm_parity.compare.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from llm_parity.compare.metrics import AGGREGATES, aggregate

__all__ = ["BOUNDS", "bootstrap_ci", "conservative", "paired_ratio_ci"]

BOUNDS = ("min", "max")

# Caps, in int32 elements, on the quantile paths' working arrays: 64 MB and 16 MB.
_TABLE_ELEMENTS = 1 << 24
_CHUNK_ELEMENTS = 1 << 22

_QUANTILE_OF = {"median": 0.5, "p95": 0.95, "p99": 0.99}


def bootstrap_ci(
    values_per_group: Sequence[Sequence[float]] | Sequence[Sequence[bool]],
    how: str,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(point, low, high): the aggregate ``how`` of the pooled values and a bootstrap interval.

    Groups are prompts, each holding its per-position values (booleans for ``rate``). Each
    resample draws as many groups as there are, with replacement, pools their values and
    applies :func:`llm_parity.compare.metrics.aggregate`; the interval is the percentile interval
    of those ``resamples`` values, the same for the same ``seed``.

    - The point is the aggregate of all values as given, exactly what a gate reads.
    - The interval is widened to contain the point if it does not. That matters for
      ``min`` and ``max``: a resample can never go beyond the sample's own extremes, so the
      interval is one-sided there and says only how much the extreme rests on few prompts.
    - One group: (v, v, v). Resampling one prompt only ever redraws that prompt, so there
      is no spread across prompts to measure; the interval is empty, not a certainty.

    Raises ValueError for no groups, an empty group, NaN, an unknown ``how``, a
    ``confidence`` outside (0, 1) or fewer than one resample; TypeError for non-boolean
    values under ``rate``.
    """
    if how not in AGGREGATES:
        raise ValueError(f"unknown aggregate {how!r}; expected one of {', '.join(AGGREGATES)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples: expected a positive integer, got {resamples!r}")
    groups = _groups(values_per_group, "bootstrap_ci")
    pooled = np.concatenate(groups)
    # aggregate() checks NaN and that 'rate' gets booleans, and gives the gate's own number.
    point = aggregate(pooled, how)
    if len(groups) == 1:
        return point, point, point

    rng = np.random.default_rng(seed)
    n_groups = len(groups)
    # drawn[r]: the groups resample r is made of.
    drawn = rng.integers(0, n_groups, size=(resamples, n_groups))

    if how in ("mean", "rate"):
        # The pooled mean is the drawn groups' total over their count of values.
        sums = np.array([g.sum(dtype=np.float64) for g in groups])
        counts = np.array([g.size for g in groups], dtype=np.float64)
        estimates = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    elif how in ("min", "max"):
        extreme = np.array([g.min() if how == "min" else g.max() for g in groups], dtype=float)
        estimates = extreme[drawn].min(axis=1) if how == "min" else extreme[drawn].max(axis=1)
    else:
        estimates = _pooled_quantiles(groups, drawn, _QUANTILE_OF[how])

    tail = (1.0 - confidence) / 2.0
    low, high = (float(v) for v in np.quantile(estimates, [tail, 1.0 - tail]))
    return point, min(low, point), max(high, point)


def conservative(point: float, low: float, high: float, bound: str) -> float:
    """The end of the interval a gate should read to be safe: ``low`` for a ``min`` bound
    (the value must stay above it), ``high`` for a ``max`` bound.

    ValueError for another bound, or an interval that does not hold ``point``.
    """
    if bound not in BOUNDS:
        raise ValueError(f"bound: expected 'min' or 'max', got {bound!r}")
    if not low <= point <= high:
        raise ValueError(f"interval [{low}, {high}] does not contain the point {point}")
    return low if bound == "min" else high


def paired_ratio_ci(
    candidate_groups: Sequence[Sequence[float]],
    floor_groups: Sequence[Sequence[float]],
    how: str,
    ratio,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(point, low, high) of ratio(aggregate(candidate), aggregate(floor)) with a paired
    bootstrap over prompts: each resample draws the same prompts for both sides, so the
    floor's own spread is part of the interval rather than treated as a constant.

    Group i of both sides is the same prompt (and the same positions within it).
    """
    if len(candidate_groups) != len(floor_groups):
        raise ValueError("paired_ratio_ci: the two sides hold different numbers of prompts")
    cand = _groups(candidate_groups, "paired_ratio_ci")
    floor = _groups(floor_groups, "paired_ratio_ci")
    point = ratio(aggregate(np.concatenate(cand), how), aggregate(np.concatenate(floor), how))
    if len(cand) == 1:
        return point, point, point
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(cand), size=(resamples, len(cand)))
    if how == "mean":
        counts = np.array([g.size for g in cand], dtype=np.float64)
        c_sums = np.array([g.sum(dtype=np.float64) for g in cand])
        f_sums = np.array([g.sum(dtype=np.float64) for g in floor])
        n = counts[drawn].sum(axis=1)
        c_est, f_est = c_sums[drawn].sum(axis=1) / n, f_sums[drawn].sum(axis=1) / n
        estimates = np.array([ratio(c, f) for c, f in zip(c_est, f_est)])
    else:
        estimates = np.array([
            ratio(aggregate(np.concatenate([cand[i] for i in row]), how),
                  aggregate(np.concatenate([floor[i] for i in row]), how))
            for row in drawn])
    tail = (1.0 - confidence) / 2.0
    low, high = (float(v) for v in np.quantile(estimates, [tail, 1.0 - tail]))
    return point, min(low, point), max(high, point)


def _groups(values_per_group, what: str) -> list[NDArray]:
    """Each group as a 1-D array; no groups, an empty group or a nested one is an error."""
    if isinstance(values_per_group, (str, bytes)):
        raise TypeError(f"{what}: expected a sequence of groups of values, got a string")
    groups = [np.asarray(g) for g in values_per_group]
    if not groups:
        raise ValueError(f"{what}: values_per_group is empty, there are no groups")
    for index, group in enumerate(groups):
        if group.ndim != 1:
            raise ValueError(
                f"{what}: group {index} must be a flat sequence of values, got shape {group.shape}"
            )
        if group.size == 0:
            raise ValueError(f"{what}: group {index} is empty, every group needs a value")
        if group.dtype != np.bool_ and not np.issubdtype(group.dtype, np.number):
            raise TypeError(f"{what}: group {index} holds {group.dtype}, expected numbers")
    return groups


def _reject_nan(values: NDArray[np.float64], what: str) -> None:
    nan = np.flatnonzero(np.isnan(values))
    if nan.size:
        raise ValueError(f"{what}: NaN among the values ({nan.size} of them)")


def _pooled_quantiles(
    groups: list[NDArray], drawn: NDArray[np.int64], q: float
) -> NDArray[np.float64]:
    """np.percentile(pooled resample, 100 q) for every resample, by the cheapest exact route.

    Groups of one length: the pools are the rows of one gathered matrix. Otherwise a pool
    is every value repeated as often as its group was drawn, and over the values sorted
    once the value at a rank is the first column where the drawn groups' weighted counts
    exceed it: found by bisection when groups are few, else by counting along every column.
    """
    n_groups = len(groups)
    columns = sum(g.size for g in groups)
    # Bisection costs about groups x log2(values) per resample, the other routes 3 x values.
    if n_groups * (math.log2(columns) + 1) <= 3 * columns and n_groups * columns <= _TABLE_ELEMENTS:
        return _quantiles_by_rank(groups, drawn, q, _bisection_finder)
    if len({g.size for g in groups}) == 1:
        return _quantiles_of_gathered(np.stack(groups).astype(np.float64), drawn, q)
    return _quantiles_by_rank(groups, drawn, q, _running_count_finder)


def _quantiles_of_gathered(
    table: NDArray[np.float64], drawn: NDArray[np.int64], q: float
) -> NDArray[np.float64]:
    resamples = drawn.shape[0]
    step = max(1, _CHUNK_ELEMENTS // table.size)
    estimates = np.empty(resamples)
    for first in range(0, resamples, step):
        chunk = drawn[first : first + step]
        pools = table[chunk].reshape(chunk.shape[0], -1)
        estimates[first : first + step] = np.quantile(pools, q, axis=1)
    return estimates


def _quantiles_by_rank(groups, drawn, q: float, finder) -> NDArray[np.float64]:
    resamples, n_groups = drawn.shape
    # multiplicity[r, g]: how many times resample r drew group g.
    offsets = (np.arange(resamples) * n_groups)[:, None]
    multiplicity = np.bincount((drawn + offsets).ravel(), minlength=resamples * n_groups)
    multiplicity = multiplicity.reshape(resamples, n_groups)
    values = np.concatenate(groups).astype(np.float64)
    group_of = np.concatenate([np.full(g.size, i) for i, g in enumerate(groups)])
    order = np.argsort(values, kind="stable")
    values, group_of = values[order], group_of[order]
    size = multiplicity @ np.array([g.size for g in groups])
    # numpy's linear method: rank h = (n - 1) q, between ranks floor(h) and floor(h) + 1.
    h = (size - 1) * q
    lower = np.floor(h).astype(np.int64)
    upper = np.minimum(lower + 1, size - 1)
    find = finder(group_of, len(groups), multiplicity.astype(np.int32))
    below = values[find(lower)]
    above = values[find(upper)]
    return below + (h - lower) * (above - below)


def _bisection_finder(group_of, n_groups: int, weights):
    """Bisect over the sorted columns; holds each group's count up to every column."""
    columns = group_of.size
    up_to = np.zeros((n_groups, columns), dtype=np.int32)
    up_to[group_of, np.arange(columns)] = 1
    np.cumsum(up_to, axis=1, out=up_to)
    steps = math.ceil(math.log2(columns)) + 1

    def find(rank: NDArray[np.int64]) -> NDArray[np.int64]:
        lo = np.zeros(rank.size, dtype=np.int64)
        hi = np.full(rank.size, columns - 1, dtype=np.int64)
        for _ in range(steps):
            mid = (lo + hi) // 2
            count = np.einsum("rg,gr->r", weights, up_to[:, mid])
            above = count > rank
            hi = np.where(above, mid, hi)
            lo = np.where(above, lo, mid + 1)
        return lo

    return find


def _running_count_finder(group_of, n_groups: int, weights):
    """Running weighted counts along every column, a bounded block of resamples at a time."""
    resamples = weights.shape[0]
    step = max(1, _CHUNK_ELEMENTS // group_of.size)

    def find(rank: NDArray[np.int64]) -> NDArray[np.int64]:
        found = np.empty(resamples, dtype=np.int64)
        for first in range(0, resamples, step):
            block = weights[first : first + step][:, group_of]
            running = np.cumsum(block, axis=1, dtype=np.int32)
            found[first : first + step] = _first_exceeding(running, rank[first : first + step])
        return found

    return find


def _first_exceeding(running: NDArray[np.int32], rank: NDArray[np.int64]) -> NDArray[np.int64]:
    """Per row, the first column whose running count exceeds ``rank`` (0-based)."""
    rows, columns = running.shape
    # Shifting each row past the previous one's largest count lets one searchsorted do all.
    shift = np.arange(rows, dtype=np.int64) * (int(running[:, -1].max()) + 1)
    flat = (running + shift[:, None]).ravel()
    found = np.searchsorted(flat, rank + shift, side="right")
    return found - np.arange(rows) * columns
