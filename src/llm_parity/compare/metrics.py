"""Next-token distribution metrics at one position, and their aggregation over positions.

Pure numpy on plain arrays (SPEC section 4): the engines hand over log-probs, this module
never knows which engine produced them.

Comparison partition: every token of the candidate's top-k set ``C`` is its own bin and all
other tokens share one tail bin (absent when ``C`` covers the whole vocabulary). Reference
mass per bin is exact, the tail taken as a logsumexp over the complement; candidate mass is
``q_i = exp(c_i)`` with ``q_tail = max(0, 1 - sum q_i)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "AGGREGATES",
    "TAIL_EPS",
    "PositionComparison",
    "aggregate",
    "compare_position",
]

TAIL_EPS = 1e-10
"""Floor for candidate mass in KL and for the reference mass dividing the relative error."""

_LOG_TAIL_EPS = math.log(TAIL_EPS)

AGGREGATES = ("mean", "median", "min", "max", "p95", "p99", "rate")


@dataclass(frozen=True)
class PositionComparison:
    """Reference versus candidate at one position; see :func:`compare_position`."""

    reference_top1: int
    candidate_top1: int
    top1_match: bool
    top1_margin: float
    # The reference's log-prob gap from its top-1 to the token the candidate ranked first
    # (0 on a match): how far below the reference's choice the candidate's choice sits.
    choice_gap: float
    reference_top1_logprob: float
    candidate_top1_logprob: float
    cosine: float
    kl: float
    js: float
    mae: float
    spearman: float
    rel_error: float
    p_tail: float
    q_tail: float
    k: int
    cosine_full: float | None = None
    kl_full: float | None = None
    js_full: float | None = None
    mae_full: float | None = None

    def as_dict(self) -> dict:
        """Plain dict of Python scalars for JSON.

        Only three fields can be non-finite: ``top1_margin`` (``inf`` when the reference's
        rank 2 has zero mass), ``choice_gap`` (``inf`` when the candidate's rank 1 has zero
        reference mass) and ``candidate_top1_logprob`` (``-inf`` if the candidate gave every
        top-k token zero mass).
        """
        return dataclasses.asdict(self)


def compare_position(
    reference_logprobs: ArrayLike,
    candidate_ids: ArrayLike,
    candidate_logprobs: ArrayLike,
    candidate_full_logprobs: ArrayLike | None = None,
) -> PositionComparison:
    """Compare the reference's full-vocabulary log-probs with the candidate's top-k.

    Decisions where the definitions leave room:

    - top-1: first index on ties on both sides; the candidate's rank 1 is its largest
      log-prob, so unsorted top-k lists are handled.
    - ``top1_margin`` is 0.0 for a one-token vocabulary and ``inf`` when the reference puts
      zero mass on every token but its rank 1.
    - ``choice_gap`` is ``inf`` when the candidate's rank 1 has zero reference mass.
    - KL floors the candidate's bin mass at ``TAIL_EPS``. With that floor, the bin KL is a
      lower bound on ``kl_full`` only while no candidate probability falls below ``TAIL_EPS``;
      and it can dip a hair below 0 when the candidate's top-k masses sum above 1.
    - Spearman uses average ranks for ties. ``k == 1``: 1.0; both sides constant over ``C``:
      1.0; exactly one side constant: 0.0.
    - ``rel_error`` floors the reference mass in the denominator at ``TAIL_EPS``, so a token
      the reference gives zero mass counts as ``q_i / TAIL_EPS`` rather than infinity.
    - ``cosine`` is 0.0 if a side has no mass at all, and is clipped to [0, 1].
    - When ``C`` is the whole vocabulary there is no tail bin, both tails are 0, and the bin
      metrics equal the full-vocabulary ones (MAE then averages over k bins, not k + 1).

    Raises ValueError on malformed input: NaN or +inf log-probs (-inf is a legal zero
    probability), ids outside the vocabulary, duplicate ids, mismatched lengths.
    """
    reference = _logprob_vector(reference_logprobs, "reference log-probs")
    if not np.isfinite(reference).any():
        raise ValueError("reference log-probs: no finite value, the reference has no mass")
    vocab_size = reference.size
    ids = _candidate_ids(candidate_ids, vocab_size)
    candidate = _logprob_vector(candidate_logprobs, "candidate log-probs")
    if candidate.size != ids.size:
        raise ValueError(
            f"candidate log-probs: {candidate.size} values for {ids.size} candidate ids"
        )
    k = ids.size

    reference_top1 = int(np.argmax(reference))
    candidate_rank1 = int(np.argmax(candidate))

    in_candidate = np.zeros(vocab_size, dtype=bool)
    in_candidate[ids] = True
    has_tail = k < vocab_size
    reference_in_c = reference[ids]
    p_in_c = np.exp(reference_in_c)
    q_in_c = np.exp(candidate)
    if has_tail:
        log_p_tail = _logsumexp(reference[~in_candidate])
        q_tail = max(0.0, 1.0 - float(q_in_c.sum()))
        log_q_tail = math.log(q_tail) if q_tail > 0.0 else -math.inf
        log_p_bins = np.append(reference_in_c, log_p_tail)
        log_q_bins = np.append(candidate, log_q_tail)
        p_tail = math.exp(log_p_tail)
    else:
        log_p_bins, log_q_bins = reference_in_c, candidate
        p_tail = q_tail = 0.0
    cosine, kl, js, mae = _divergences(log_p_bins, log_q_bins)

    full: dict[str, float] = {}
    if candidate_full_logprobs is not None:
        candidate_full = _logprob_vector(candidate_full_logprobs, "candidate full log-probs")
        if candidate_full.size != vocab_size:
            raise ValueError(
                f"candidate full log-probs: {candidate_full.size} values for a vocabulary "
                f"of {vocab_size}"
            )
        values = _divergences(reference, candidate_full)
        full = dict(zip(("cosine_full", "kl_full", "js_full", "mae_full"), values))

    return PositionComparison(
        reference_top1=reference_top1,
        candidate_top1=int(ids[candidate_rank1]),
        top1_match=reference_top1 == int(ids[candidate_rank1]),
        top1_margin=_top1_margin(reference),
        choice_gap=float(reference[reference_top1] - reference[int(ids[candidate_rank1])]),
        reference_top1_logprob=float(reference[reference_top1]),
        candidate_top1_logprob=float(candidate[candidate_rank1]),
        cosine=cosine,
        kl=kl,
        js=js,
        mae=mae,
        spearman=_spearman(reference_in_c, candidate),
        rel_error=float(np.mean(np.abs(p_in_c - q_in_c) / np.maximum(p_in_c, TAIL_EPS))),
        p_tail=p_tail,
        q_tail=q_tail,
        k=k,
        **full,
    )


def aggregate(values: Sequence[float] | Sequence[bool] | ArrayLike, how: str) -> float:
    """Reduce per-position values to one number, as a gate reads it.

    ``rate`` is the fraction of True and takes booleans only (TypeError otherwise);
    ``p95``/``p99`` use numpy's linear-interpolation percentile. Empty input or a NaN
    raises ValueError.
    """
    if how not in AGGREGATES:
        raise ValueError(f"unknown aggregate {how!r}; expected one of {', '.join(AGGREGATES)}")
    array = np.asarray(values)
    if how == "rate":
        _check_values(array, how)
        if array.dtype != np.bool_:
            raise TypeError(f"aggregate 'rate' takes booleans, got dtype {array.dtype}")
        return float(np.mean(array))
    array = _numeric_values(array, how)
    if how == "mean":
        return float(np.mean(array))
    if how == "median":
        return float(np.median(array))
    if how == "min":
        return float(np.min(array))
    if how == "max":
        return float(np.max(array))
    return float(np.percentile(array, 95 if how == "p95" else 99))


def _logprob_vector(values: ArrayLike, side: str) -> NDArray[np.float64]:
    """1-D float64 log-probs; -inf allowed, NaN and +inf rejected with their index."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{side}: expected a non-empty 1-D array, got shape {array.shape}")
    bad = np.flatnonzero(np.isnan(array) | (array == np.inf))
    if bad.size:
        index = int(bad[0])
        raise ValueError(
            f"{side}: {array[index]} at index {index} ({bad.size} such values); "
            "NaN and +inf are not log-probabilities"
        )
    return array


def _candidate_ids(values: ArrayLike, vocab_size: int) -> NDArray[np.int64]:
    array = np.asarray(values)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"candidate ids: expected a non-empty 1-D array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"candidate ids: expected integers, got dtype {array.dtype}")
    outside = np.flatnonzero((array < 0) | (array >= vocab_size))
    if outside.size:
        index = int(outside[0])
        raise ValueError(
            f"candidate ids: id {array[index]} at index {index} is outside the vocabulary "
            f"[0, {vocab_size})"
        )
    order = np.argsort(array, kind="stable")
    repeated = np.flatnonzero(array[order][1:] == array[order][:-1])
    if repeated.size:
        first, second = sorted((int(order[repeated[0]]), int(order[repeated[0] + 1])))
        raise ValueError(
            f"candidate ids: id {array[first]} appears at index {first} and again at {second}"
        )
    return array.astype(np.int64)


def _logsumexp(log_values: NDArray[np.float64]) -> float:
    if log_values.size == 0:
        return -math.inf
    peak = float(np.max(log_values))
    if peak == -math.inf:
        return -math.inf
    return peak + math.log(float(np.sum(np.exp(log_values - peak))))


def _divergences(
    log_p: NDArray[np.float64], log_q: NDArray[np.float64]
) -> tuple[float, float, float, float]:
    """cosine, KL(p||q) with q floored at TAIL_EPS, JS (natural log), MAE, from log masses."""
    p = np.exp(log_p)
    q = np.exp(log_q)
    norms = math.sqrt(float(np.sum(p * p)) * float(np.sum(q * q)))
    cosine = min(1.0, max(0.0, float(np.sum(p * q)) / norms)) if norms > 0.0 else 0.0
    # Log space keeps r_i - c_i exact, so identical inputs give exactly 0.
    mass = p > 0.0
    kl = float(np.sum(p[mass] * (log_p[mass] - np.maximum(log_q[mass], _LOG_TAIL_EPS))))
    m = 0.5 * (p + q)
    js = 0.5 * _relative_entropy_sum(p, m) + 0.5 * _relative_entropy_sum(q, m)
    # Each JS term is >= 0 (log-sum inequality); only rounding can push the sum below.
    js = min(math.log(2.0), max(0.0, js))
    mae = float(np.mean(np.abs(p - q)))
    return cosine, kl, js, mae


def _relative_entropy_sum(a: NDArray[np.float64], m: NDArray[np.float64]) -> float:
    """sum a log(a/m), zero-mass terms contributing 0 (m > 0 wherever a > 0)."""
    mass = a > 0.0
    return float(np.sum(a[mass] * np.log(a[mass] / m[mass])))


def _top1_margin(reference: NDArray[np.float64]) -> float:
    if reference.size < 2:
        return 0.0
    # A -inf rank 2 gives inf: the reference has no competitor at all.
    second, first = np.partition(reference, reference.size - 2)[-2:]
    return float(first - second)


def _average_ranks(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_group = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    group = np.cumsum(starts_group) - 1
    boundaries = np.flatnonzero(np.concatenate((starts_group, [True])))
    # A group spanning sorted slots [lo, hi) has 1-based ranks lo+1..hi, mean (lo + 1 + hi) / 2.
    mean_rank = 0.5 * (boundaries[:-1] + 1 + boundaries[1:])
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def _spearman(x: NDArray[np.float64], y: NDArray[np.float64]) -> float:
    if x.size == 1:
        return 1.0
    x_constant = bool(np.all(x == x[0]))
    y_constant = bool(np.all(y == y[0]))
    if x_constant or y_constant:
        return 1.0 if x_constant and y_constant else 0.0
    rx = _average_ranks(x)
    ry = _average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    rho = float(np.dot(rx, ry)) / math.sqrt(float(np.dot(rx, rx)) * float(np.dot(ry, ry)))
    return min(1.0, max(-1.0, rho))


def _numeric_values(array: NDArray, what: str) -> NDArray[np.float64]:
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    _check_values(array, what)
    if array.dtype != np.bool_ and not numeric:
        raise TypeError(f"{what}: expected numbers, got dtype {array.dtype}")
    return array.astype(np.float64)


def _check_values(array: NDArray, what: str) -> None:
    label = f"aggregate {what!r}" if what in AGGREGATES else what
    if array.ndim != 1:
        raise ValueError(f"{label}: expected a flat sequence of values, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{label}: no values")
    if np.issubdtype(array.dtype, np.floating):
        nan = np.flatnonzero(np.isnan(array))
        if nan.size:
            raise ValueError(f"{label}: NaN at index {int(nan[0])}")
