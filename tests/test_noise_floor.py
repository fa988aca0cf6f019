"""The bf16 noise floor and the gates read relative to it; conservative gates; the
thresholds keys that declare them. No engine: made-up runs through the real comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest
from synthetic import floor_of, make_session, rejudge, write_session_outputs

from llm_parity.compare.metrics import aggregate
from llm_parity.compare.noise_floor import NoiseFloor, ratio
from llm_parity.compare.stats import bootstrap_ci
from llm_parity.config.thresholds import resolve_thresholds
from llm_parity.errors import ThresholdsError
from llm_parity.report.summary import precision_summary
from llm_parity.report.verdict import full_verdict

RELATIVE = """
[precision.gates.kl_vs_floor]
metric = "kl"
aggregate = "mean"
relative_to = "noise_floor"
max = 3.0

[precision.gates.sequence_kl_vs_floor]
over = "sequence"
metric = "kl"
aggregate = "mean"
relative_to = "noise_floor"
max = 3.0

[precision.prompt_gates.sequence_kl_vs_floor]
over = "sequence"
metric = "kl"
aggregate = "mean"
relative_to = "noise_floor"
max = 10.0

[precision.gates.kl_p95_safe]
over = "sequence"
metric = "kl"
aggregate = "p95"
conservative = true
max = 1.0
"""


def sessions(tmp_path, candidate_noise, floor_noise=0.05, seed=0):
    path = tmp_path / "thresholds.toml"
    path.write_text(RELATIVE)
    candidate = make_session(noise=candidate_noise, steps=6, thresholds=path, seed=seed)
    floor_run = make_session(noise=floor_noise, steps=6, thresholds=path, seed=seed)
    floor = floor_of(floor_run)
    rejudge(candidate, noise_floor=floor)
    return candidate, floor


def gate(precision, name):
    return next(r for r in precision.gate_results if r.gate.name == name)


def test_relative_gate_is_candidate_over_floor_of_the_same_aggregate(tmp_path):
    # The floor comes from other draws (another seed): its value differs from the candidate's.
    path = tmp_path / "thresholds.toml"
    path.write_text(RELATIVE)
    session = make_session(noise=0.05, steps=6, thresholds=path, seed=0)
    floor = floor_of(make_session(noise=0.08, steps=6, thresholds=path, seed=1))
    precision = rejudge(session, noise_floor=floor)
    result = gate(precision, "sequence_kl_vs_floor")
    candidate_mean = float(np.mean([float(v) for v in precision.values("kl", "sequence")]))
    floor_mean = float(np.mean(floor.values("kl", "sequence")))
    assert result.candidate_value == pytest.approx(candidate_mean)
    assert result.floor_value == pytest.approx(floor_mean)
    assert result.value == pytest.approx(ratio(candidate_mean, floor_mean))
    assert 0.1 < result.value < 0.9 and result.passed  # less noise than the floor's


def test_the_ratio_interval_resamples_the_floor_too(tmp_path):
    # A paired bootstrap over prompts: the floor's own spread widens the interval, which a
    # floor taken as a constant (candidate interval / floor mean) would hide.
    path = tmp_path / "thresholds.toml"
    path.write_text(RELATIVE)
    session = make_session(noise=0.05, steps=6, thresholds=path, seed=0)
    floor = floor_of(make_session(noise=0.08, steps=6, thresholds=path, seed=1))
    result = gate(rejudge(session, noise_floor=floor), "sequence_kl_vs_floor")
    groups = [[float(v) for v in p.values("kl")] for p in session.run.precision.sequences]
    _, low, high = bootstrap_ci(groups, "mean")
    constant = (low / result.floor_value, high / result.floor_value)
    assert result.interval[0] <= result.value <= result.interval[1]
    assert result.interval != pytest.approx(constant, rel=1e-3)
    # A floor that moves with the candidate prompt by prompt (here: the same draws) leaves
    # the ratio at 1 in every resample; a constant floor would report the candidate's spread.
    same = gate(rejudge(session, noise_floor=floor_of(session)), "sequence_kl_vs_floor")
    assert same.interval == pytest.approx((1.0, 1.0))
    assert constant[1] - constant[0] > 0.1


def test_decode_ratio_reads_only_the_positions_both_sides_saw(tmp_path):
    path = tmp_path / "thresholds.toml"
    path.write_text(RELATIVE.replace('over = "sequence"', 'over = "decode"'))
    # The candidate diverges early on two prompts; the floor decodes every step.
    session = make_session(noise=0.05, steps=6, thresholds=path, seed=0, diverge={0: 1, 3: 2})
    floor = floor_of(make_session(noise=0.08, steps=6, thresholds=path, seed=1))
    precision = rejudge(session, noise_floor=floor)
    result = gate(precision, "sequence_kl_vs_floor")
    cand, flo = [], []
    for prompt in precision.decodes:
        values = [float(v) for v in prompt.values("kl")]
        floor_values = floor.prompt_values("kl", "decode", prompt.prompt.id)
        n = min(len(values), len(floor_values))
        cand += values[:n]
        flo += floor_values[:n]
    assert len(flo) < len(floor.values("kl", "decode"))  # the floor's extra steps are out
    assert result.floor_value == pytest.approx(float(np.mean(flo)))
    assert result.candidate_value == pytest.approx(float(np.mean(cand)))


def test_a_candidate_far_above_the_floor_fails_and_says_how_far(tmp_path):
    session, _ = sessions(tmp_path, candidate_noise=0.5)
    precision = session.run.precision
    result = gate(precision, "kl_vs_floor")
    assert result.value > 3.0 and not result.passed
    per_prompt = [g for p in precision.sequences for g in p.gate_results
                  if g.gate.name == "sequence_kl_vs_floor"]
    assert len(per_prompt) == len(precision.sequences)
    assert all(g.value > 10 for g in per_prompt)
    from llm_parity.report.messages import gate_failure_message

    message = gate_failure_message(result, precision)
    assert "x the bf16 noise floor" in message and "must be <= 3x" in message


def test_without_a_floor_relative_gates_are_listed_as_not_judged(tmp_path):
    session, _ = sessions(tmp_path, candidate_noise=0.5)
    precision = rejudge(session, noise_floor=None)
    names = {r.gate.name for r in precision.gate_results}
    assert "kl_vs_floor" not in names and "sequence_kl_vs_floor" not in names
    assert all(g.gate.relative_to is None for p in precision.sequences for g in p.gate_results)
    not_judged = {(n.gate.name, n.gate.scope): n for n in precision.not_judged}
    assert set(not_judged) == {("kl_vs_floor", "run"), ("sequence_kl_vs_floor", "run"),
                               ("sequence_kl_vs_floor", "prompt")}
    assert all("noise floor" in n.reason for n in not_judged.values())
    verdict = full_verdict(session)
    assert {g["name"] for g in verdict["not_judged"]} == {"kl_vs_floor", "sequence_kl_vs_floor"}
    assert "NOT JUDGED kl_vs_floor" in "\n".join(precision_summary(verdict))


def test_conservative_gate_reads_the_unsafe_end_of_the_interval_over_prompts(tmp_path):
    session, _ = sessions(tmp_path, candidate_noise=0.2)
    precision = session.run.precision
    result = gate(precision, "kl_p95_safe")
    groups = [[float(v) for v in p.values("kl")] for p in precision.sequences]
    point, low, high = bootstrap_ci(groups, "p95")
    assert result.point == pytest.approx(point)
    assert result.interval == pytest.approx((low, high))
    assert result.value == pytest.approx(high) and high >= point
    # A threshold between the point and the interval's top: pooled passes, conservative fails.
    from dataclasses import replace

    from llm_parity.compare.gates import Thresholds

    assert high > point  # 6 prompts of unequal noise: the interval has room above
    middle = (point + high) / 2
    gates = tuple(replace(g, threshold=middle) if g.name == "kl_p95_safe" else g
                  for g in session.run.thresholds.gates)
    strict: Thresholds = replace(session.run.thresholds, gates=gates)
    precision = rejudge(session, strict)
    assert not gate(precision, "kl_p95_safe").passed
    loose = tuple(replace(g, conservative=False) for g in gates)
    precision = rejudge(session, replace(strict, gates=loose))
    assert gate(precision, "kl_p95_safe").passed


def test_every_run_gate_over_several_prompts_reports_an_interval(tmp_path):
    session, _ = sessions(tmp_path, candidate_noise=0.05)
    for result in session.run.precision.gate_results:
        assert result.interval is not None, result.gate.name
        low, high = result.interval
        assert low <= (result.point if result.point is not None else result.value) <= high


def test_floor_summary_reaches_the_verdict_and_the_summary(tmp_path, read_json):
    session, floor = sessions(tmp_path, candidate_noise=0.1)
    verdict = full_verdict(session)
    block = verdict["noise_floor"]
    assert block["dtype"] == "bfloat16" and block["k"] == 8
    sequence = block["views"]["sequence"]
    assert sequence["kl_mean"] == pytest.approx(aggregate(floor.values("kl", "sequence"), "mean"))
    assert sequence["kl_ratio"] == pytest.approx(ratio(sequence["candidate_kl_mean"], sequence["kl_mean"]))
    relative = next(g for g in verdict["gates"] if g["name"] == "kl_vs_floor")
    assert relative["relative_to"] == "noise_floor" and relative["floor_value"] > 0
    path = tmp_path / "v.json"
    session.settings = session.settings.__class__(**{**session.settings.__dict__,
                                                     "parity_json": path})
    write_session_outputs(session)
    read_json(path)  # validates against the shipped schema
    text = "\n".join(precision_summary(verdict))
    assert "noise floor (hf bfloat16 on cpu" in text
    assert "kl/floor" in text


def test_floor_round_trips_through_a_dict():
    session = make_session(noise=0.1, steps=4)
    floor = floor_of(session)
    again = NoiseFloor.from_dict(floor.to_dict())
    assert again.views == floor.views and again.flip_margins == floor.flip_margins
    assert again.values("kl", "decode") == floor.values("kl", "decode")


def test_ratio_edges():
    assert ratio(2.0, 1.0) == pytest.approx(2.0, rel=1e-5)
    assert ratio(0.0, 0.0) == 1.0  # a candidate as exact as a floor of ~0 is 1x it
    assert ratio(1e-9, 0.0) == pytest.approx(1.001)  # not 1e3x: both are rounding noise
    assert ratio(1e-3, 0.0) > 100  # a real deviation over an exact floor is still huge
    assert math.isnan(ratio(float("nan"), 1.0))


@pytest.mark.parametrize("table, message", [
    ('metric = "kl"\nrelative_to = "bf16"\nmax = 3.0',
     "relative_to must be 'noise_floor', got 'bf16'"),
    ('metric = "cosine"\nrelative_to = "noise_floor"\nmax = 3.0',
     "metric 'cosine' cannot be read relative to the noise floor"),
    ('metric = "kl"\nrelative_to = "noise_floor"\nmin = 0.5', "give max, not min"),
    ('metric = "kl"\nconservative = "yes"\nmax = 0.1', "conservative must be true or false"),
])
def test_bad_relative_or_conservative_keys_are_named(tmp_path, table, message):
    import tomllib

    data = tomllib.loads(f"[precision.gates.g]\n{table}\n")
    with pytest.raises(ThresholdsError, match=r"\[precision\.gates\.g\]") as info:
        resolve_thresholds(data, source="t.toml")
    assert message in str(info.value)


def test_conservative_is_refused_on_a_per_prompt_gate():
    data = {"precision": {"prompt_gates": {"g": {"metric": "kl", "conservative": True,
                                                 "max": 0.1}}}}
    with pytest.raises(ThresholdsError, match="conservative applies to precision gates across"):
        resolve_thresholds(data, source="t.toml")
