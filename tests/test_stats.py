"""Statistics over prompts x positions, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import bootstrap

from llm_parity.compare import stats
from llm_parity.compare.metrics import aggregate
from llm_parity.compare.stats import bootstrap_ci, conservative

NUMERIC = ("mean", "median", "min", "max", "p95", "p99")


def naive_bootstrap(groups, how, *, confidence=0.95, resamples=2000, seed=0):
    """One pool per resample, built and reduced the obvious way, with the same draws."""
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(groups), size=(resamples, len(groups)))
    estimates = [aggregate(np.concatenate([groups[i] for i in row]), how) for row in drawn]
    tail = (1 - confidence) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail])
    point = aggregate(np.concatenate(groups), how)
    return point, min(low, point), max(high, point)


def exponential_groups(seed, n_groups, lengths):
    rng = np.random.default_rng(seed)
    sizes = (
        rng.integers(*lengths, size=n_groups)
        if isinstance(lengths, tuple)
        else [lengths] * n_groups
    )
    # Rounded so that ties, which the rank bookkeeping must get right, are common.
    return [np.round(rng.exponential(size=int(n)), 1) for n in sizes]


# Three inputs, each taking one of the quantile routes: few uneven groups (bisection),
# many groups of one length (gathered pools), many uneven groups (running counts).
SHAPES = {
    "few-uneven": (25, (1, 80)),
    "many-even": (400, 1),
    "many-uneven": (400, (1, 4)),
}


# ------------------------------------------------------------------ bootstrap_ci


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("how", NUMERIC)
def test_bootstrap_matches_pooling_every_resample_by_hand(shape, how):
    groups = exponential_groups(7, *SHAPES[shape])
    got = bootstrap_ci(groups, how, resamples=300, seed=11)
    expected = naive_bootstrap(groups, how, resamples=300, seed=11)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(
    ("shape", "route"),
    [
        ("few-uneven", "_bisection_finder"),
        ("many-even", "_quantiles_of_gathered"),
        ("many-uneven", "_running_count_finder"),
    ],
)
def test_each_shape_takes_the_route_it_is_meant_to_cover(monkeypatch, shape, route):
    taken = []
    original = getattr(stats, route)
    monkeypatch.setattr(stats, route, lambda *a: taken.append(route) or original(*a))
    bootstrap_ci(exponential_groups(7, *SHAPES[shape]), "p95", resamples=20)
    assert taken == [route]


@pytest.mark.parametrize("shape", SHAPES)
def test_bootstrap_in_small_memory_blocks_gives_the_same_interval(monkeypatch, shape):
    groups = exponential_groups(3, *SHAPES[shape])
    whole = bootstrap_ci(groups, "median", resamples=300, seed=5)
    # Tiny caps force one resample per block and no bisection table.
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(stats, "_TABLE_ELEMENTS", 1)
    assert bootstrap_ci(groups, "median", resamples=300, seed=5) == whole


def test_bootstrap_rate_matches_pooling_by_hand():
    rng = np.random.default_rng(3)
    groups = [rng.random(int(n)) < 0.9 for n in rng.integers(1, 64, size=25)]
    got = bootstrap_ci(groups, "rate", resamples=500, seed=2)
    assert got == pytest.approx(naive_bootstrap(groups, "rate", resamples=500, seed=2))
    assert 0.0 <= got[1] <= got[0] <= got[2] <= 1.0


def test_bootstrap_point_is_the_gate_value_of_all_positions_pooled():
    groups = exponential_groups(1, 10, (5, 40))
    for how in NUMERIC:
        assert bootstrap_ci(groups, how, resamples=50)[0] == aggregate(np.concatenate(groups), how)


def test_bootstrap_width_agrees_with_scipy_on_one_value_per_group():
    # With one value per prompt, resampling prompts is the ordinary bootstrap scipy does.
    data = np.random.default_rng(5).normal(loc=2.0, scale=1.0, size=60)
    groups = [[v] for v in data]
    point, low, high = bootstrap_ci(groups, "mean", resamples=4000, seed=1)
    reference = bootstrap(
        (data,), np.mean, method="percentile", n_resamples=4000, random_state=1
    ).confidence_interval
    assert point == pytest.approx(data.mean())
    assert high - low == pytest.approx(reference.high - reference.low, rel=0.1)
    assert low == pytest.approx(reference.low, abs=0.05)
    assert high == pytest.approx(reference.high, abs=0.05)


def test_bootstrap_interval_of_the_mean_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(2024)
    covered = 0
    repetitions = 200
    for seed in range(repetitions):
        groups = [rng.normal(size=5) for _ in range(30)]
        _, low, high = bootstrap_ci(groups, "mean", resamples=400, seed=seed)
        covered += low <= 0.0 <= high
    # The percentile bootstrap runs a little under nominal with 30 groups.
    assert 0.86 <= covered / repetitions <= 0.99


def test_groups_are_resampled_whole_so_correlated_positions_widen_the_interval():
    # Each prompt is offset as a whole: positions of a prompt are not independent draws.
    rng = np.random.default_rng(8)
    correlated = [rng.normal() + 0.1 * rng.normal(size=64) for _ in range(20)]
    independent = [np.concatenate(correlated)[i::20] for i in range(20)]
    _, low_c, high_c = bootstrap_ci(correlated, "mean")
    _, low_i, high_i = bootstrap_ci(independent, "mean")
    assert high_c - low_c > 3 * (high_i - low_i)


def test_bootstrap_is_deterministic_for_a_seed_and_moves_with_it():
    groups = exponential_groups(4, 25, (10, 64))
    for how in ("mean", "p95"):
        assert bootstrap_ci(groups, how, seed=3) == bootstrap_ci(groups, how, seed=3)
        assert bootstrap_ci(groups, how, seed=3) != bootstrap_ci(groups, how, seed=4)


def test_higher_confidence_gives_a_wider_interval():
    groups = exponential_groups(6, 25, (10, 64))
    _, low_80, high_80 = bootstrap_ci(groups, "mean", confidence=0.8)
    _, low_99, high_99 = bootstrap_ci(groups, "mean", confidence=0.99)
    assert low_99 < low_80 < high_80 < high_99


@pytest.mark.parametrize("how", NUMERIC)
def test_single_group_gives_a_zero_width_interval(how):
    values = [0.3, 0.1, 0.7, 0.2]
    v = aggregate(values, how)
    assert bootstrap_ci([values], how) == (v, v, v)


def test_single_group_of_booleans():
    assert bootstrap_ci([[True, False, True, True]], "rate") == (0.75, 0.75, 0.75)


@pytest.mark.parametrize("how", NUMERIC)
def test_constant_values_give_a_zero_width_interval(how):
    groups = [[0.25] * n for n in (3, 7, 1, 4)]
    assert bootstrap_ci(groups, how) == (0.25, 0.25, 0.25)


@pytest.mark.parametrize("how", NUMERIC)
def test_interval_always_holds_the_point(how):
    groups = exponential_groups(9, 12, (1, 30))
    point, low, high = bootstrap_ci(groups, how, resamples=200)
    assert low <= point <= high


def test_max_interval_reaches_down_only_and_min_interval_up_only():
    # A resample cannot exceed the sample's extremes: the point is the interval's edge.
    groups = exponential_groups(10, 20, (5, 30))
    point, low, high = bootstrap_ci(groups, "max")
    assert high == point and low < point
    point, low, high = bootstrap_ci(groups, "min")
    assert low == point


@pytest.mark.parametrize(
    ("groups", "kwargs", "error", "words"),
    [
        ([], {}, ValueError, "values_per_group is empty"),
        ([[1.0], []], {}, ValueError, "group 1 is empty"),
        ([[1.0], [[1.0, 2.0]]], {}, ValueError, "group 1 must be a flat"),
        ([[1.0], ["a"]], {}, TypeError, "group 1 holds"),
        ([[1.0, float("nan")], [2.0]], {}, ValueError, "NaN"),
        ([[1.0], [2.0]], {"how": "average"}, ValueError, "unknown aggregate 'average'"),
        ([[1.0], [2.0]], {"confidence": 1.0}, ValueError, "confidence"),
        ([[1.0], [2.0]], {"confidence": 0}, ValueError, "confidence"),
        ([[1.0], [2.0]], {"resamples": 0}, ValueError, "resamples"),
        ([[1.0], [2.0]], {"resamples": 10.0}, ValueError, "resamples"),
        ([[0.5], [1.0]], {"how": "rate"}, TypeError, "booleans"),
        ("abc", {}, TypeError, "string"),
    ],
)
def test_bootstrap_rejects_bad_input_saying_what(groups, kwargs, error, words):
    kwargs = {"how": "mean", **kwargs}
    with pytest.raises(error, match=words):
        bootstrap_ci(groups, **kwargs)


# ------------------------------------------------------------------ conservative


def test_conservative_reads_the_end_that_is_worse_for_the_gate():
    assert conservative(0.995, 0.98, 1.0, "min") == 0.98
    assert conservative(0.004, 0.002, 0.009, "max") == 0.009
    # A zero-width interval leaves the point itself.
    assert conservative(0.5, 0.5, 0.5, "min") == conservative(0.5, 0.5, 0.5, "max") == 0.5


def test_conservative_of_a_bootstrap_is_never_kinder_than_the_point():
    groups = exponential_groups(12, 20, (5, 30))
    for how in NUMERIC:
        point, low, high = bootstrap_ci(groups, how, resamples=300)
        assert conservative(point, low, high, "max") >= point
        assert conservative(point, low, high, "min") <= point


@pytest.mark.parametrize(
    ("args", "words"),
    [((0.5, 0.4, 0.6, "lower"), "bound"), ((0.7, 0.4, 0.6, "max"), "does not contain")],
)
def test_conservative_rejects_bad_input(args, words):
    with pytest.raises(ValueError, match=words):
        conservative(*args)
