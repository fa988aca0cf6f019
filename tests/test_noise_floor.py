"""The bf16 noise floor and the gates read relative to it; conservative gates; the
thresholds keys that declare them. No engine: made-up runs through the real comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest
from synthetic import make_session

from llm_parity.metrics import aggregate
from llm_parity.noise_floor import NoiseFloor, ratio
from llm_parity.precision import evaluate_gates
from llm_parity.report import full_verdict, summary_lines
from llm_parity.stats import bootstrap_ci
from llm_parity.thresholds import ThresholdsError, resolve_thresholds

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
    floor = NoiseFloor.from_precision(floor_run.run.precision, dtype="bfloat16", device="cpu")
    precision = candidate.run.precision
    precision.noise_floor = floor
    evaluate_gates(precision, candidate.run.thresholds)
    return candidate, floor


def gate(precision, name):
    return next(r for r in precision.gate_results if r.gate.name == name)


def test_relative_gate_is_candidate_over_floor_of_the_same_aggregate(tmp_path):
    session, floor = sessions(tmp_path, candidate_noise=0.05)
    precision = session.run.precision
    result = gate(precision, "sequence_kl_vs_floor")
    candidate_mean = float(np.mean([float(v) for v in precision.values("kl", "sequence")]))
    floor_mean = float(np.mean(floor.values("kl", "sequence")))
    assert result.candidate_value == pytest.approx(candidate_mean)
    assert result.floor_value == pytest.approx(floor_mean)
    assert result.value == pytest.approx(candidate_mean / floor_mean)
    # Same noise, same draws: the candidate is exactly its own floor.
    assert result.value == pytest.approx(1.0) and result.passed


def test_a_candidate_far_above_the_floor_fails_and_says_how_far(tmp_path):
    session, _ = sessions(tmp_path, candidate_noise=0.5)
    precision = session.run.precision
    result = gate(precision, "kl_vs_floor")
    assert result.value > 3.0 and not result.passed
    per_prompt = [g for p in precision.sequences for g in p.gate_results
                  if g.gate.name == "sequence_kl_vs_floor"]
    assert len(per_prompt) == len(precision.sequences)
    assert all(g.value > 10 for g in per_prompt)
    from llm_parity.report import gate_failure_message

    message = gate_failure_message(result, precision)
    assert "x the bf16 noise floor" in message and "must be <= 3x" in message


def test_without_a_floor_relative_gates_are_left_out_not_passed(tmp_path):
    session, _ = sessions(tmp_path, candidate_noise=0.5)
    precision = session.run.precision
    precision.noise_floor = None
    evaluate_gates(precision, session.run.thresholds)
    names = {r.gate.name for r in precision.gate_results}
    assert "kl_vs_floor" not in names and "sequence_kl_vs_floor" not in names
    assert all(g.gate.relative_to is None for p in precision.sequences for g in p.gate_results)


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

    from llm_parity.thresholds import Thresholds

    if high > point:
        middle = (point + high) / 2
        gates = tuple(replace(g, threshold=middle) if g.name == "kl_p95_safe" else g
                      for g in session.run.thresholds.gates)
        strict: Thresholds = replace(session.run.thresholds, gates=gates)
        evaluate_gates(precision, strict)
        assert not gate(precision, "kl_p95_safe").passed
        loose = tuple(replace(g, conservative=False) for g in gates)
        evaluate_gates(precision, replace(strict, gates=loose))
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
    assert sequence["kl_ratio"] == pytest.approx(sequence["candidate_kl_mean"] / sequence["kl_mean"])
    relative = next(g for g in verdict["gates"] if g["name"] == "kl_vs_floor")
    assert relative["relative_to"] == "noise_floor" and relative["floor_value"] > 0
    path = tmp_path / "v.json"
    from llm_parity.report import write_outputs

    session.settings = session.settings.__class__(**{**session.settings.__dict__,
                                                     "parity_json": path})
    write_outputs(session)
    read_json(path)  # validates against the shipped schema
    text = "\n".join(summary_lines(session))
    assert "noise floor (hf bfloat16 on cpu" in text
    assert "kl/floor" in text


def test_floor_round_trips_through_json():
    session = make_session(noise=0.1, steps=4)
    floor = NoiseFloor.from_precision(session.run.precision, dtype="bfloat16", device="cpu")
    again = NoiseFloor.from_json(floor.to_json())
    assert again.views == floor.views and again.flip_margins == floor.flip_margins
    assert again.values("kl", "decode") == floor.values("kl", "decode")


def test_ratio_edges():
    assert ratio(2.0, 1.0) == 2.0
    assert ratio(0.0, 0.0) == 0.0
    assert ratio(1e-6, 0.0) > 1e5  # a floor of zero makes any deviation enormous
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
