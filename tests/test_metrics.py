"""Metrics against independent computations: scipy, or direct full-vocabulary formulas."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cosine as cosine_distance
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from scipy.stats import entropy, spearmanr

from llm_parity.compare.metrics import (
    AGGREGATES,
    TAIL_EPS,
    PositionComparison,
    aggregate,
    compare_position,
)

LN2 = math.log(2.0)


def log_softmax(logits) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max()
    return shifted - np.log(np.sum(np.exp(shifted)))


def top_k(logprobs: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-logprobs, kind="stable")[:k]


def direct_bins(reference, ids, candidate):
    """Bin masses the plain way: a direct sum over the complement, no log-space tricks."""
    outside = np.ones(reference.size, dtype=bool)
    outside[ids] = False
    p = np.exp(reference[ids])
    q = np.exp(candidate)
    if outside.any():
        p = np.append(p, np.sum(np.exp(reference[outside])))
        q = np.append(q, max(0.0, 1.0 - q.sum()))
    return p, q


def scipy_kl(p, q) -> float:
    return float(np.sum(rel_entr(p, np.maximum(q, TAIL_EPS))))


def scipy_js(p, q) -> float:
    # scipy returns the JS distance (square root of the divergence), natural log by default.
    return float(jensenshannon(p, q)) ** 2


def perturbed_pair(seed: int, vocab_size: int, scale: float):
    """A reference and a nearby candidate, as a bf16 port would produce."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, vocab_size)
    reference = log_softmax(logits)
    candidate_full = log_softmax(logits + rng.normal(0.0, scale, vocab_size))
    return reference, candidate_full


# --- each metric against an independent computation -----------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 3, 20])
def test_bin_metrics_match_scipy(seed, k):
    reference, candidate_full = perturbed_pair(seed, vocab_size=200, scale=0.3)
    ids = top_k(candidate_full, k)
    candidate = candidate_full[ids]
    result = compare_position(reference, ids, candidate)
    p, q = direct_bins(reference, ids, candidate)

    assert result.k == k
    assert result.p_tail == pytest.approx(p[-1], rel=1e-12)
    assert result.q_tail == pytest.approx(q[-1], rel=1e-12, abs=1e-15)
    assert result.cosine == pytest.approx(1.0 - cosine_distance(p, q), abs=1e-12)
    assert result.kl == pytest.approx(scipy_kl(p, q), rel=1e-9, abs=1e-15)
    assert result.js == pytest.approx(scipy_js(p, q), rel=1e-6, abs=1e-15)
    assert result.mae == pytest.approx(np.mean(np.abs(p - q)), rel=1e-12, abs=1e-18)
    pk, qk = p[:k], q[:k]
    assert result.rel_error == pytest.approx(np.mean(np.abs(pk - qk) / pk), rel=1e-12)
    expected_rho = 1.0 if k == 1 else spearmanr(reference[ids], candidate).statistic
    assert result.spearman == pytest.approx(expected_rho, abs=1e-12)
    assert result.reference_top1 == int(np.argmax(reference))
    assert result.candidate_top1 == int(ids[0])
    assert result.top1_match == (int(np.argmax(reference)) == int(ids[0]))


@pytest.mark.parametrize("seed", range(4))
def test_full_variants_match_direct_formulas(seed):
    reference, candidate_full = perturbed_pair(seed, vocab_size=300, scale=0.5)
    ids = top_k(candidate_full, 20)
    result = compare_position(reference, ids, candidate_full[ids], candidate_full)
    p, q = np.exp(reference), np.exp(candidate_full)

    assert result.cosine_full == pytest.approx(1.0 - cosine_distance(p, q), abs=1e-12)
    # entropy() renormalises; both sides already sum to 1, so it is the plain KL.
    assert result.kl_full == pytest.approx(entropy(p, q), rel=1e-9)
    assert result.js_full == pytest.approx(scipy_js(p, q), rel=1e-6)
    assert result.mae_full == pytest.approx(np.abs(p - q).sum() / 300, rel=1e-12)
    # Data-processing inequality: coarsening into bins can only lose divergence.
    assert result.kl <= result.kl_full
    assert result.js <= result.js_full


def test_full_variants_absent_without_full_candidate():
    reference, candidate_full = perturbed_pair(0, vocab_size=50, scale=0.1)
    ids = top_k(candidate_full, 5)
    result = compare_position(reference, ids, candidate_full[ids])
    assert (result.cosine_full, result.kl_full, result.js_full, result.mae_full) == (None,) * 4


def test_kl_floors_candidate_mass_at_tail_eps():
    reference = np.log([0.5, 0.3, 0.2])
    # The candidate gives token 1 zero probability and keeps all mass in its top-2.
    result = compare_position(reference, [0, 1], [math.log(1.0), -math.inf])
    expected = (
        0.5 * math.log(0.5 / 1.0) + 0.3 * math.log(0.3 / TAIL_EPS) + 0.2 * math.log(0.2 / TAIL_EPS)
    )
    assert result.q_tail == 0.0
    assert result.kl == pytest.approx(expected, rel=1e-12)


def test_q_tail_clamped_when_candidate_mass_exceeds_one():
    reference = np.log([0.5, 0.3, 0.2])
    result = compare_position(reference, [0, 1], np.log([0.6, 0.5]))
    assert result.q_tail == 0.0
    assert result.p_tail == pytest.approx(0.2, rel=1e-12)


# --- degenerate cases from SPEC section 4 ---------------------------------------------------


def test_identical_distributions():
    reference, _ = perturbed_pair(7, vocab_size=100, scale=0.0)
    ids = top_k(reference, 20)
    result = compare_position(reference, ids, reference[ids], reference)

    # The full view is exactly 0; the bins carry the rounding of q_tail = 1 - sum q_i.
    assert result.kl_full == 0.0
    assert result.js_full == 0.0
    assert result.kl == pytest.approx(0.0, abs=1e-15)
    assert result.js == pytest.approx(0.0, abs=1e-15)
    assert result.cosine == pytest.approx(1.0, abs=1e-15)
    assert result.cosine_full == pytest.approx(1.0, abs=1e-15)
    assert result.mae == pytest.approx(0.0, abs=1e-16)
    assert result.mae_full == 0.0
    assert result.rel_error == 0.0
    assert result.spearman == 1.0
    assert result.top1_match
    assert result.p_tail == pytest.approx(result.q_tail, abs=1e-15)


def test_disjoint_top_k_sets():
    # The reference lives on tokens 0-4; the candidate's top-k is tokens 5-9, where the
    # reference has zero mass.
    reference = np.full(10, -np.inf)
    reference[:5] = np.log([0.4, 0.3, 0.15, 0.1, 0.05])
    ids = np.array([5, 6, 7, 8, 9])
    q_in_c = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    result = compare_position(reference, ids, np.log(q_in_c))
    p, q = direct_bins(reference, ids, np.log(q_in_c))

    assert not result.top1_match
    assert (result.reference_top1, result.candidate_top1) == (0, 5)
    assert result.p_tail == pytest.approx(1.0, rel=1e-15)
    assert result.q_tail == pytest.approx(0.0, abs=1e-15)
    assert result.cosine == pytest.approx(0.0, abs=1e-12)
    # All reference mass sits in the tail bin, where the candidate has (floored) zero.
    assert result.kl == pytest.approx(math.log(1.0 / TAIL_EPS), rel=1e-12)
    assert result.kl == pytest.approx(scipy_kl(p, q), rel=1e-12)
    assert result.js == pytest.approx(LN2, abs=1e-12)
    assert result.js == pytest.approx(scipy_js(p, q), rel=1e-9)
    assert result.mae == pytest.approx(2.0 / 6.0, rel=1e-12)
    # Zero reference mass is floored in the denominator: q_i / TAIL_EPS.
    assert result.rel_error == pytest.approx(np.mean(q_in_c) / TAIL_EPS, rel=1e-12)
    # The reference is constant (-inf) over C, the candidate is not.
    assert result.spearman == 0.0


def test_disjoint_top_k_with_tiny_reference_mass():
    rng = np.random.default_rng(3)
    logits = np.concatenate([rng.normal(5.0, 1.0, 8), np.full(8, -40.0)])
    reference = log_softmax(logits)
    ids = np.arange(8, 16)
    candidate = log_softmax(rng.normal(0.0, 1.0, 8))
    result = compare_position(reference, ids, candidate)
    p, q = direct_bins(reference, ids, candidate)

    assert result.p_tail == pytest.approx(1.0, abs=1e-15)
    assert result.kl == pytest.approx(scipy_kl(p, q), rel=1e-9)
    assert result.js == pytest.approx(scipy_js(p, q), rel=1e-9)
    assert result.js == pytest.approx(LN2, abs=1e-12)
    # Reference mass ~1e-21 per token: the denominator is floored at TAIL_EPS.
    pk = np.exp(reference[ids])
    assert pk.max() < TAIL_EPS
    assert result.rel_error == pytest.approx(np.mean(q[:8]) / TAIL_EPS, rel=1e-9)


def test_one_hot_reference():
    reference = np.full(6, -np.inf)
    reference[2] = 0.0
    ids = np.array([2, 4, 0])
    q_in_c = np.array([0.9, 0.06, 0.03])
    result = compare_position(reference, ids, np.log(q_in_c))
    p, q = direct_bins(reference, ids, np.log(q_in_c))

    assert result.top1_match
    assert result.reference_top1_logprob == 0.0
    assert result.top1_margin == math.inf
    assert result.p_tail == 0.0
    assert result.q_tail == pytest.approx(0.01, rel=1e-12)
    assert result.kl == pytest.approx(-math.log(0.9), rel=1e-12)
    assert result.kl == pytest.approx(scipy_kl(p, q), rel=1e-12)
    assert result.js == pytest.approx(scipy_js(p, q), rel=1e-9)
    assert result.cosine == pytest.approx(1.0 - cosine_distance(p, q), abs=1e-12)
    # Ties in the reference ranks (two -inf), resolved by average ranks as scipy does.
    assert result.spearman == pytest.approx(spearmanr(reference[ids], q_in_c).statistic)
    assert result.spearman == pytest.approx(math.sqrt(3.0) / 2.0)


@pytest.mark.parametrize(
    ("reference_in_c", "candidate"),
    [
        ([-1.0, -2.0, -2.0, -3.0], [-1.1, -1.9, -2.5, -3.0]),
        ([-1.0, -2.0, -2.0, -3.0], [-1.0, -2.0, -2.0, -2.0]),
        ([-2.0, -2.0, -2.0, -1.0], [-3.0, -1.0, -2.0, -2.0]),
        ([-1.0, -2.0, -3.0, -4.0, -5.0], [-5.0, -4.0, -3.0, -2.0, -1.0]),
    ],
)
def test_spearman_with_ties_matches_scipy(reference_in_c, candidate):
    k = len(candidate)
    ids = np.arange(k)
    reference = np.concatenate([reference_in_c, np.full(3, -10.0)])
    result = compare_position(reference, ids, candidate)
    assert result.spearman == pytest.approx(spearmanr(reference_in_c, candidate).statistic)


def test_spearman_degenerate_cases():
    reference = log_softmax([3.0, 2.0, 2.0, 1.0, 0.0])
    # k == 1: a single pair is trivially in order.
    assert compare_position(reference, [0], [-0.5]).spearman == 1.0
    # Both sides constant over C.
    assert compare_position(reference, [1, 2], [-1.0, -1.0]).spearman == 1.0
    # Exactly one side constant.
    assert compare_position(reference, [1, 2], [-1.0, -2.0]).spearman == 0.0
    assert compare_position(reference, [0, 3], [-1.0, -1.0]).spearman == 0.0
    # Fully reversed order.
    assert compare_position(reference, [0, 3, 4], [-3.0, -2.0, -1.0]).spearman == -1.0


@pytest.mark.parametrize("seed", range(3))
def test_k_covering_the_vocabulary_equals_full_metrics(seed):
    reference, candidate_full = perturbed_pair(seed, vocab_size=12, scale=0.4)
    ids = np.random.default_rng(seed).permutation(12)
    result = compare_position(reference, ids, candidate_full[ids], candidate_full)

    assert result.k == 12
    assert result.p_tail == 0.0
    assert result.q_tail == 0.0
    assert result.cosine == pytest.approx(result.cosine_full, abs=1e-15)
    assert result.kl == pytest.approx(result.kl_full, rel=1e-12)
    assert result.js == pytest.approx(result.js_full, rel=1e-12)
    assert result.mae == pytest.approx(result.mae_full, rel=1e-12)
    p, q = np.exp(reference), np.exp(candidate_full)
    assert result.kl == pytest.approx(entropy(p, q), rel=1e-9)


def test_p_tail_from_complement_keeps_a_tail_that_subtraction_loses():
    # Top-2 tokens hold all but 1e-12 of the mass, spread over three tail tokens.
    tail_mass = 1e-12
    head = np.array([0.7, 0.3]) * (1.0 - tail_mass)
    probs = np.concatenate([head, np.full(3, tail_mass / 3.0)])
    reference = np.log(probs)
    ids = np.array([0, 1])
    exact_tail = float(np.sum(probs[2:]))

    result = compare_position(reference, ids, reference[ids])
    by_subtraction = 1.0 - float(np.sum(np.exp(reference[ids])))

    assert result.p_tail == pytest.approx(exact_tail, rel=1e-12)
    assert abs(by_subtraction - exact_tail) / exact_tail > 1e-6
    # Identical inputs, yet the candidate's tail is only as good as 1 - sum q_i.
    assert result.q_tail == by_subtraction


def test_p_tail_below_double_resolution():
    probs = np.array([0.6, 0.4, 1e-20, 2e-20])
    result = compare_position(np.log(probs), [0, 1], np.log([0.6, 0.4]))
    assert result.p_tail == pytest.approx(3e-20, rel=1e-12)


def test_top1_margin_and_near_tie():
    reference = np.log([0.40, 0.39, 0.21])
    result = compare_position(reference, [1, 0], np.log([0.41, 0.38]))
    assert not result.top1_match
    assert result.top1_margin == pytest.approx(math.log(0.40 / 0.39), rel=1e-12)
    assert result.reference_top1_logprob == pytest.approx(math.log(0.40))
    assert result.candidate_top1_logprob == pytest.approx(math.log(0.41))


def test_top1_margin_single_token_vocabulary():
    result = compare_position([0.0], [0], [0.0])
    assert result.top1_margin == 0.0
    assert result.top1_match
    assert (result.p_tail, result.q_tail, result.kl, result.js) == (0.0, 0.0, 0.0, 0.0)


def test_top1_margin_ignores_order_of_vocabulary():
    reference = np.log([0.1, 0.2, 0.05, 0.5, 0.15])
    result = compare_position(reference, [3], [math.log(0.5)])
    assert result.top1_margin == pytest.approx(math.log(0.5 / 0.2), rel=1e-12)
    assert result.reference_top1 == 3


def test_candidate_rank1_is_its_largest_logprob_when_unsorted():
    reference = np.log([0.1, 0.2, 0.6, 0.1])
    result = compare_position(reference, [0, 2, 1], np.log([0.2, 0.5, 0.2]))
    assert result.candidate_top1 == 2
    assert result.top1_match
    assert result.candidate_top1_logprob == pytest.approx(math.log(0.5))
    # Ties go to the earlier rank.
    tied = compare_position(reference, [1, 2], np.log([0.4, 0.4]))
    assert tied.candidate_top1 == 1


def test_as_dict_is_plain_json():
    reference, candidate_full = perturbed_pair(1, vocab_size=40, scale=0.2)
    ids = top_k(candidate_full, 5)
    result = compare_position(reference, ids, candidate_full[ids], candidate_full)
    data = result.as_dict()
    assert set(data) == {f.name for f in PositionComparison.__dataclass_fields__.values()}
    assert all(type(v) in (int, float, bool) for v in data.values())
    assert json.loads(json.dumps(data, allow_nan=False)) == data


# --- validation ---------------------------------------------------------------------------


REFERENCE = np.log([0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize(
    ("reference", "ids", "candidate", "full", "message"),
    [
        ([0.0, np.nan, -1.0], [0], [-0.1], None, "reference log-probs: nan at index 1"),
        ([0.0, -1.0, np.inf], [0], [-0.1], None, "reference log-probs: inf at index 2"),
        ([-np.inf, -np.inf], [0], [-0.1], None, "reference log-probs: no finite value"),
        ([], [0], [-0.1], None, "reference log-probs: expected a non-empty 1-D"),
        (REFERENCE, [0, 1], [-0.1, np.nan], None, "candidate log-probs: nan at index 1"),
        (REFERENCE, [0, 1], [np.inf, -1.0], None, "candidate log-probs: inf at index 0"),
        (REFERENCE, [0, 4], [-0.1, -1.0], None, "id 4 at index 1 is outside the vocabulary"),
        (REFERENCE, [-1, 0], [-0.1, -1.0], None, "id -1 at index 0 is outside the vocabulary"),
        (REFERENCE, [2, 0, 2], [-1, -2, -3], None, "id 2 appears at index 0 and again at 2"),
        (REFERENCE, [0.0, 1.0], [-0.1, -1.0], None, "candidate ids: expected integers"),
        (REFERENCE, [], [], None, "candidate ids: expected a non-empty 1-D"),
        (REFERENCE, [0, 1], [-0.1], None, "candidate log-probs: 1 values for 2"),
        (REFERENCE, [0], [-0.9], REFERENCE[:3], "candidate full log-probs: 3 values"),
        (REFERENCE, [0], [-0.9], [0, np.nan, 0, 0], "candidate full log-probs: nan at index 1"),
    ],
)
def test_invalid_input_names_side_and_index(reference, ids, candidate, full, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        compare_position(reference, ids, candidate, full)


def test_negative_infinity_is_a_legal_candidate_logprob():
    result = compare_position(REFERENCE, [0, 1], [math.log(0.4), -math.inf])
    assert result.q_tail == pytest.approx(0.6)
    assert result.rel_error == pytest.approx(0.5)


# --- properties -------------------------------------------------------------------------------


@st.composite
def consistent_candidate(draw):
    """A reference and a full candidate, the candidate's top-k taken from its own full view."""
    vocab_size = draw(st.integers(2, 40))
    logit = st.floats(-8.0, 8.0, allow_nan=False)
    reference = log_softmax(draw(st.lists(logit, min_size=vocab_size, max_size=vocab_size)))
    candidate_full = log_softmax(draw(st.lists(logit, min_size=vocab_size, max_size=vocab_size)))
    k = draw(st.integers(1, vocab_size))
    return reference, candidate_full, top_k(candidate_full, k)


@settings(max_examples=300, deadline=None)
@given(consistent_candidate())
def test_divergences_bounded(case):
    reference, candidate_full, ids = case
    result = compare_position(reference, ids, candidate_full[ids], candidate_full)
    assert result.kl >= -1e-12
    assert result.kl_full >= -1e-12
    assert 0.0 <= result.js <= LN2
    assert 0.0 <= result.js_full <= LN2
    assert 0.0 <= result.cosine <= 1.0
    assert 0.0 <= result.cosine_full <= 1.0
    assert -1.0 <= result.spearman <= 1.0
    assert 0.0 <= result.p_tail <= 1.0
    assert 0.0 <= result.q_tail <= 1.0


@settings(max_examples=300, deadline=None)
@given(consistent_candidate())
def test_bin_divergence_is_lower_bound_of_full(case):
    # Logits in [-8, 8] over <= 40 tokens keep every probability far above TAIL_EPS,
    # where the data-processing inequality holds despite the floor.
    reference, candidate_full, ids = case
    result = compare_position(reference, ids, candidate_full[ids], candidate_full)
    # Slack for rounding only: q_tail = 1 - sum q_i carries ~k ulps of absolute error.
    slack = 1e-12 * (1.0 + result.kl_full)
    if result.q_tail > 0.0:
        slack += result.p_tail * len(ids) * 1e-15 / result.q_tail
    assert result.kl <= result.kl_full + slack
    assert result.js <= result.js_full + 1e-12


# --- aggregation ------------------------------------------------------------------------------

VALUES = [0.2, 0.9, 0.4, 0.1, 0.7, 0.5, 0.3, 0.8, 0.6, 1.0]


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("mean", 0.55),
        ("median", 0.55),
        ("min", 0.1),
        ("max", 1.0),
        # Linear interpolation: position 0.95 * 9 = 8.55, between 0.9 and 1.0.
        ("p95", 0.955),
        ("p99", 0.991),
    ],
)
def test_aggregate(how, expected):
    assert aggregate(VALUES, how) == pytest.approx(expected, rel=1e-12)
    assert aggregate(np.array(VALUES), how) == pytest.approx(expected, rel=1e-12)


def test_aggregate_rate_counts_true():
    assert aggregate([True, False, True, True], "rate") == 0.75
    assert aggregate(np.array([True] * 25), "rate") == 1.0
    assert aggregate([np.bool_(False), np.bool_(True)], "rate") == 0.5


@pytest.mark.parametrize("values", [[1.0, 0.0], [1, 0], [True, 1.0]])
def test_aggregate_rate_rejects_non_booleans(values):
    with pytest.raises(TypeError, match="rate"):
        aggregate(values, "rate")


@pytest.mark.parametrize("how", AGGREGATES)
def test_aggregate_rejects_empty(how):
    with pytest.raises(ValueError, match="no values"):
        aggregate([], how)


@pytest.mark.parametrize("how", [h for h in AGGREGATES if h != "rate"])
def test_aggregate_rejects_nan_naming_the_aggregate(how):
    with pytest.raises(ValueError, match=f"aggregate '{how}': NaN at index 2"):
        aggregate([0.1, 0.2, math.nan], how)


def test_aggregate_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown aggregate 'avg'"):
        aggregate([1.0], "avg")
