"""Performance gates: the statistics and gate logic on plain numbers, measuring with a paced
stand-in engine, and the suite end to end with pytester (the paced engine for the gate
logic in seconds; one run with real vLLM engines on the toy model).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import junit_cases, needs_vllm

from llm_parity.compare.gates import Gate, GridCase
from llm_parity.compare.performance import (
    ENGINE_TIMESTAMPS,
    TWO_LENGTHS,
    CaseResult,
    Spread,
    evaluate_gate,
    figures_from_timings,
    gate_cases,
    reference_cases,
    speedup_pairs,
)
from llm_parity.config.prompts import load_prompts
from llm_parity.config.thresholds import (
    load_thresholds,
    packaged_thresholds_path,
    resolve_thresholds,
)
from llm_parity.engines.base import Timing, register
from llm_parity.errors import EngineError, MissingBenchmark, PerformanceError, ThresholdsError
from llm_parity.runner.performance import PerformanceRun, exact_length_prompt, measure

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from paced_engine import TOKEN_S, PacedEngine  # noqa: E402

register("paced", "paced_engine:PacedEngine")

FOUNDING = load_thresholds(packaged_thresholds_path()).grid


def spread(*values):
    return Spread(tuple(float(v) for v in values))


def result(case, tpot=(10.0, 10.0, 10.0), ttft=(5.0, 5.0, 5.0)):
    figures = {"tpot_ms": spread(*tpot), "ttft_ms": spread(*ttft),
               "latency_ms": spread(*(t * case.output_len for t in tpot)),
               "throughput_tok_s": spread(*(1e3 / t for t in tpot))}
    return CaseResult(case.id, case.mode, case.input_len, case.output_len, figures,
                      ENGINE_TIMESTAMPS)


def gate(metric, bound, threshold, aggregate="max", mode=None, name="g"):
    return Gate(name, metric, aggregate, bound, threshold, scope="performance", mode=mode)


# ---------------------------------------------------------------- statistics


def test_spread_matches_numpy():
    values = (12.0, 10.0, 11.0, 15.0)
    s = spread(*values)
    assert (s.min, s.max, s.median) == (10.0, 15.0, 11.5)
    assert s.cv == pytest.approx(np.std(values, ddof=1) / np.mean(values))
    assert not s.too_wide(0.2) and s.too_wide(0.1)


def test_one_round_has_no_spread_and_is_too_wide_to_trust():
    s = spread(3.0)
    assert math.isnan(s.cv) and s.too_wide(10.0)
    assert "cv n/a" in s.describe()


def test_figures_from_the_engines_timestamps():
    timing = Timing(prompt_tokens=16, output_tokens=8, latency_s=0.1, ttft_s=0.02,
                    decode_s=0.07)
    figures, method = figures_from_timings([timing, timing])
    assert method == ENGINE_TIMESTAMPS
    assert figures["tpot_ms"] == pytest.approx([10.0, 10.0])  # 70 ms over 7 tokens
    assert figures["ttft_ms"] == pytest.approx([20.0, 20.0])
    assert figures["latency_ms"] == pytest.approx([100.0, 100.0])
    assert figures["throughput_tok_s"] == pytest.approx([80.0, 80.0])


def test_figures_from_a_two_length_difference():
    long = [Timing(16, 8, 0.100), Timing(16, 8, 0.110)]
    short = [Timing(16, 1, 0.030), Timing(16, 1, 0.040)]
    figures, method = figures_from_timings(long, short)
    assert method == TWO_LENGTHS
    assert figures["tpot_ms"] == pytest.approx([10.0, 10.0])
    assert figures["ttft_ms"] == pytest.approx([30.0, 40.0])
    with pytest.raises(PerformanceError, match="no token timestamps"):
        figures_from_timings(long)


def test_one_output_token_has_no_tpot():
    figures, _ = figures_from_timings([Timing(16, 1, 0.01, 0.01, 0.0)])
    assert "tpot_ms" not in figures and figures["ttft_ms"] == [10.0]


# ---------------------------------------------------------------- which cases a gate reads


def test_speedup_pairs_on_the_founding_grid():
    pairs = [(e.id, c.id) for e, c in speedup_pairs(FOUNDING)]
    assert pairs == [
        ("eager-in16-out100", "compiled-in16-out50"),
        ("eager-in32-out100", "compiled-in32-out50"),
        ("eager-in64-out100", "compiled-in64-out100"),
    ]
    read = {c.id for c in gate_cases(gate("speedup", "min", 1.5, "min"), FOUNDING)}
    assert "eager-in128-out100" not in read and len(read) == 6


def test_speedup_prefers_the_same_output_length():
    grid = [GridCase("eager", 16, 50), GridCase("eager", 16, 100), GridCase("compiled", 16, 100)]
    assert [(e.id, c.id) for e, c in speedup_pairs(grid)] == [
        ("eager-in16-out100", "compiled-in16-out100")]


def test_gate_cases_by_mode_and_impossible_selections():
    compiled = gate_cases(gate("tpot_ms", "max", 20, mode="compiled"), FOUNDING)
    assert {c.mode for c in compiled} == {"compiled"} and len(compiled) == 3
    assert len(gate_cases(gate("ttft_ms", "max", 20), FOUNDING)) == 7
    eager_only = [c for c in FOUNDING if c.mode == "eager"]
    with pytest.raises(MissingBenchmark, match="no eager and compiled cases share"):
        gate_cases(gate("speedup", "min", 1.5, "min"), eager_only)
    with pytest.raises(MissingBenchmark, match="no compiled case"):
        gate_cases(gate("tpot_ms", "max", 20, mode="compiled"), eager_only)


def test_reference_cases_are_the_distinct_lengths():
    assert [c.id for c in reference_cases(FOUNDING)] == [
        "reference-in16-out100", "reference-in32-out100", "reference-in64-out100",
        "reference-in128-out100", "reference-in16-out50", "reference-in32-out50"]


# ---------------------------------------------------------------- gate verdicts


def founding_results(eager_tpot=26.0, compiled_tpot=14.0):
    return {c.id: result(c, tpot=(t * 0.99, t, t * 1.01))
            for c in FOUNDING
            for t in [eager_tpot if c.mode == "eager" else compiled_tpot]}


def test_the_founding_speedup_gate():
    g = gate("speedup", "min", 1.5, "min", name="compiled_speedup")
    outcome = evaluate_gate(g, FOUNDING, founding_results(26.0, 14.0), max_cv=0.1)
    assert outcome.passed and outcome.value == pytest.approx(26 / 14)
    assert outcome.low == pytest.approx(26 * 0.99 / (14 * 1.01))
    assert set(outcome.per_case) == {"compiled-in16-out50/eager-in16-out100",
                                     "compiled-in32-out50/eager-in32-out100",
                                     "compiled-in64-out100/eager-in64-out100"}
    assert not outcome.warnings
    slow = evaluate_gate(g, FOUNDING, founding_results(26.0, 20.0), max_cv=0.1)
    assert not slow.passed and slow.value == pytest.approx(1.3)
    assert "must be >= 1.5" in slow.message()


def test_ceilings_and_floors_read_the_median_of_each_case():
    results = founding_results()
    results["compiled-in64-out100"] = result(GridCase("compiled", 64, 100), tpot=(14, 18, 30))
    ceiling = evaluate_gate(gate("tpot_ms", "max", 17.0, mode="compiled"), FOUNDING, results,
                            max_cv=1.0)
    assert not ceiling.passed and ceiling.value == 18.0
    assert (ceiling.low, ceiling.high) == (14.0, 30.0)  # the max of the minima, of the maxima
    # The threshold sits inside what the rounds spanned: the verdict rests on noise.
    assert any("rests on noise" in w for w in ceiling.warnings)
    floor = evaluate_gate(gate("throughput_tok_s", "min", 30.0, "min", mode="eager"), FOUNDING,
                          results, max_cv=1.0)
    assert floor.passed and floor.value == pytest.approx(1e3 / 26)


def test_a_wide_spread_is_warned_about():
    results = founding_results()
    results["eager-in16-out100"] = result(GridCase("eager", 16, 100), tpot=(20, 26, 40))
    outcome = evaluate_gate(gate("tpot_ms", "max", 100.0, mode="eager"), FOUNDING, results,
                            max_cv=0.1)
    assert outcome.passed
    assert any(w.startswith("eager-in16-out100 tpot_ms: coefficient of variation")
               for w in outcome.warnings)


def test_a_gate_with_an_unmeasured_input_names_the_benchmark():
    results = founding_results()
    del results["compiled-in32-out50"]
    with pytest.raises(MissingBenchmark) as info:
        evaluate_gate(gate("speedup", "min", 1.5, "min", name="compiled_speedup"), FOUNDING,
                      results, max_cv=0.1, why_missing=lambda case: "was deselected")
    assert str(info.value) == ("gate compiled_speedup reads benchmarks that were not measured: "
                               "test_benchmark[compiled-in32-out50] was deselected")
    # A gate that does not read that case is unaffected.
    assert evaluate_gate(gate("tpot_ms", "max", 30, mode="eager"), FOUNDING, results, 0.1).passed


def test_only_the_figures_a_gate_reads_are_warned_about():
    from llm_parity.compare.performance import gated_figures

    t = resolve_thresholds({"performance": {
        "grid": [{"mode": m, "input_len": n, "output_len": 8}
                 for m, n in (("eager", 16), ("eager", 128), ("compiled", 16))],
        "gates": {"s": {"metric": "speedup", "min": 1.0},
                  "t": {"metric": "ttft_ms", "mode": "compiled", "max": 50.0}}}})
    assert gated_figures(t, GridCase("eager", 16, 8)) == {"tpot_ms"}
    assert gated_figures(t, GridCase("compiled", 16, 8)) == {"tpot_ms", "ttft_ms"}
    assert gated_figures(t, GridCase("eager", 128, 8)) == set()  # no compiled partner


# ---------------------------------------------------------------- the thresholds schema


def test_a_gate_can_select_one_mode():
    t = resolve_thresholds({"performance": {"gates": {"c": {
        "metric": "tpot_ms", "mode": "compiled", "max": 16.0}}}})
    assert t.performance_gates[0].mode == "compiled"
    assert t.performance_gates[0].aggregate == "mean"


@pytest.mark.parametrize("table, message", [
    ({"performance": {"gates": {"c": {"metric": "tpot_ms", "mode": "graph", "max": 1.0}}}},
     "mode must be one of eager, compiled, got 'graph'"),
    ({"performance": {"gates": {"s": {"metric": "speedup", "mode": "eager", "min": 1.0}}}},
     "a speedup gate compares both modes; it takes no mode"),
    ({"precision": {"gates": {"k": {"metric": "kl", "mode": "eager", "max": 1.0}}}},
     "mode applies to performance gates only"),
])
def test_bad_gate_modes_are_refused(table, message):
    with pytest.raises(ThresholdsError, match=message):
        resolve_thresholds(table)


# ---------------------------------------------------------------- measuring


def paced(mode="eager", **options):
    from llm_parity.engines.base import EngineSpec

    return PacedEngine(EngineSpec(model="unused", options={**PacedEngine.benchmark_options(mode),
                                                           **options}))


def test_measure_times_exactly_the_asked_rounds():
    engine = paced()
    calls = []

    def repeat(target, rounds):
        calls.append(rounds)
        for _ in range(rounds):
            target()

    try:
        figures, method = measure(engine, list(range(16)), 5, rounds=3, warmup_rounds=2,
                                  repeat=repeat)
    finally:
        engine.close()
    assert calls == [3] and method == ENGINE_TIMESTAMPS
    assert len(figures["tpot_ms"].values) == 3  # the warm-up rounds are not kept
    assert TOKEN_S["eager"] * 1e3 <= figures["tpot_ms"].median < 3 * TOKEN_S["eager"] * 1e3


def test_measure_without_timestamps_uses_two_lengths():
    engine = paced(stamps=False)
    try:
        figures, method = measure(engine, list(range(16)), 6, rounds=2, warmup_rounds=0)
    finally:
        engine.close()
    assert method == TWO_LENGTHS
    assert TOKEN_S["eager"] * 1e3 * 0.8 <= figures["tpot_ms"].median < 3 * TOKEN_S["eager"] * 1e3


def test_a_generation_short_of_the_asked_length_is_refused():
    engine = paced(short_by=1)
    try:
        with pytest.raises(PerformanceError, match="produced 4"):
            measure(engine, list(range(16)), 5, rounds=1, warmup_rounds=0)
    finally:
        engine.close()


def test_exact_length_prompts_from_the_toy_tokenizer():
    from llm_parity.runner.tokenization import load_tokenizer
    from llm_parity.runner.toymodel import toy_model_dir

    tokenizer = load_tokenizer(toy_model_dir())
    text = load_prompts().prompts[0].text
    for length in (1, 16, 128, 5000):
        ids = exact_length_prompt(tokenizer, text, length)
        assert len(ids) == length and ids[0] == tokenizer.bos_token_id


def test_one_engine_at_a_time_and_a_failed_build_is_not_retried(tmp_path):
    settings = SimpleNamespace(
        candidate="paced", candidate_model=None, candidate_options={}, candidate_dtype="bfloat16",
        candidate_device="cpu", trust_remote_code=False, tensor_parallel_size=1, model=None,
        thresholds_path=packaged_thresholds_path(), prompts=load_prompts(),
    )
    run = PerformanceRun(settings)
    eager, built = run.engine("eager")
    assert built is not None and run.engine("eager") == (eager, None)
    compiled, _ = run.engine("compiled")
    assert eager.closed and not compiled.closed and PacedEngine.alive == 1
    run.release()
    assert compiled.closed and PacedEngine.alive == 0
    assert run.events == [("build", "eager"), ("release", "eager"),
                          ("build", "compiled"), ("release", "compiled")]
    assert run.platform() == "cpu"

    broken = PerformanceRun(SimpleNamespace(**{**vars(settings),
                                               "candidate_options": {"fail_build": True}}))
    builds = PacedEngine.builds
    for _ in range(2):
        with pytest.raises(EngineError, match="asked not to start"):
            broken.engine("eager")
    assert PacedEngine.builds == builds + 1 and broken.events == [] and PacedEngine.alive == 0


# ---------------------------------------------------------------- end to end (pytester)

GRID = """
[performance]
warmup_rounds = 1
rounds = 3
max_cv = {max_cv}
grid = [
  {{ mode = "eager", input_len = 16, output_len = 4 }},
  {{ mode = "eager", input_len = 32, output_len = 4 }},
  {{ mode = "compiled", input_len = 16, output_len = 4 }},
  {{ mode = "compiled", input_len = 32, output_len = 4 }},
]

[performance.gates.compiled_speedup]
metric = "speedup"
aggregate = "min"
min = 1.5

[performance.gates.tpot_ceiling]
metric = "tpot_ms"
aggregate = "max"
max = 1000.0

[performance.gates.compiled_tpot]
metric = "tpot_ms"
mode = "compiled"
aggregate = "max"
max = 0.001

[performance.gates.throughput_floor]
metric = "throughput_tok_s"
aggregate = "min"
min = 1e9

[platforms.npu.performance.gates.npu_ttft]
metric = "ttft_ms"
max = 1.0
"""


@pytest.fixture
def paced_project(pytester):
    pytester.makeconftest(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
        "from llm_parity.engines.base import register\n"
        "register('paced', 'paced_engine:PacedEngine')\n"
    )
    pytester.makefile(".toml", thresholds=GRID.format(max_cv=0.5))
    return pytester


def run_paced(pytester, *args):
    # -k "not reference": the Transformers baseline is left to the real-engine test.
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--candidate", "paced", "-k", "not reference",
        "--junitxml", "junit.xml", "--benchmark-json", "bench.json", *args)


def junit_messages(path):
    """{test name: message of its failure or error}."""
    root = ET.parse(path).getroot()
    out = {}
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                out[case.get("name")] = (tag, node.get("message", ""))
    return out


def benchmarks(path):
    return {b["name"]: b for b in json.loads(Path(path).read_text())["benchmarks"]}


def test_gates_pass_and_fail_as_the_thresholds_say(paced_project):
    paced_project.makefile(".toml", thresholds=GRID.format(max_cv=0.0001))
    result = run_paced(paced_project, "--benchmark-only")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] == 4 + 2 and outcomes["failed"] == 2 and "errors" not in outcomes
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*llm-parity performance*",
        "case*rounds*TTFT ms*TPOT ms*latency ms*output tok/s*TPOT from",
        "eager-in16-out4 * 3 *engine timestamps",
        "compiled speedup (eager TPOT / compiled TPOT): in16 *x, in32 *x",
        "PASS gate compiled_speedup: min speedup*must be >= 1.5*",
        "FAIL gate compiled_tpot: max tpot_ms in compiled mode = *, must be <= 0.001*",
    ])
    assert "SpreadWarning" in out and "spread too widely" in out  # max_cv is tiny here

    cases = junit_cases(paced_project.path / "junit.xml")
    assert cases["test_performance_gate[compiled_speedup]"][0] == "passed"
    assert cases["test_performance_gate[tpot_ceiling]"][0] == "passed"
    assert cases["test_performance_gate[npu_ttft]"][0] == "skipped"
    outcome, props = cases["test_performance_gate[compiled_tpot]"]
    assert outcome == "failure"
    assert props["metric"] == "tpot_ms" and props["mode"] == "compiled"
    assert float(props["threshold"]) == 0.001 and props["passed"] == "False"
    assert props["cases"] == "compiled-in16-out4,compiled-in32-out4"
    assert float(props["value"]) >= TOKEN_S["compiled"] * 1e3
    _, speedup = cases["test_performance_gate[compiled_speedup]"]
    assert float(speedup["value"]) >= 1.5 and float(speedup["range_low"]) > 0
    assert speedup["spread_warning"]
    _, bench = cases["test_benchmark[eager-in16-out4]"]
    for key in ("ttft_ms", "tpot_ms", "latency_ms", "throughput_tok_s", "tpot_ms_min",
                "tpot_ms_max", "tpot_ms_cv", "tpot_method", "rounds", "backend"):
        assert key in bench, key
    assert bench["tpot_method"] == "engine timestamps" and bench["rounds"] == "3"
    messages = junit_messages(paced_project.path / "junit.xml")
    assert messages["test_performance_gate[throughput_floor]"][0] == "failure"
    assert "must be >= 1e+09" in messages["test_performance_gate[throughput_floor]"][1]

    data = benchmarks(paced_project.path / "bench.json")
    info = data["test_benchmark[compiled-in32-out4]"]["extra_info"]
    assert info["mode"] == "compiled" and info["input_len"] == 32 and info["output_len"] == 4
    assert len(info["tpot_ms_values"]) == 3
    assert info["tpot_ms_min"] <= info["tpot_ms"] <= info["tpot_ms_max"]
    assert data["test_benchmark[compiled-in32-out4]"]["stats"]["rounds"] == 3
    assert data["test_benchmark[compiled-in32-out4]"]["group"] == "in32-out4"


def test_a_gate_whose_benchmark_was_deselected_is_an_error(paced_project):
    result = run_paced(paced_project, "--benchmark-only", "-k", "not eager-in32")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    messages = junit_messages(paced_project.path / "junit.xml")
    tag, text = messages["test_performance_gate[compiled_speedup]"]
    assert tag == "error"
    assert "test_benchmark[eager-in32-out4] was deselected" in text
    assert messages["test_performance_gate[tpot_ceiling]"][0] == "error"
    # The compiled-only gate reads no eager case: it is judged, and fails on its own terms.
    assert messages["test_performance_gate[compiled_tpot]"][0] == "failure"
    result.stdout.fnmatch_lines(["ERROR*test_performance_gate[[]compiled_speedup[]]*"])


def test_a_gate_that_errors_fails_the_json_verdict_too(paced_project, read_json):
    # The gate that errors never reaches the performance block's gates; the verdict still
    # says fail, as the exit status and the JUnit XML do, and says why.
    paced_project.makefile(".toml", thresholds=GRID.format(max_cv=0.5).replace(
        "min = 1e9", "min = 0.0").replace("max = 0.001", "max = 1e9"))
    result = run_paced(paced_project, "--benchmark-only", "-k", "not eager-in32",
                       "--parity-json=verdict.json")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    verdict = read_json(paced_project.path / "verdict.json")
    messages = junit_messages(paced_project.path / "junit.xml")
    assert {tag for tag, _ in messages.values()} == {"error"}
    assert all(g["passed"] for g in verdict["performance"]["gates"])  # those judged passed
    assert verdict["verdict"] == "fail"
    assert verdict["session"]["tests"]["error"] == len(messages)
    assert verdict["session"]["exit_status"] == 1
    assert any("errored" in reason for reason in verdict["verdict_reasons"])
    assert "eager-in32-out4" in verdict["performance"]["not_measured"]


def test_a_benchmark_that_fails_makes_its_gates_errors(paced_project):
    result = run_paced(paced_project, "-m", "performance", "--candidate-option", "short_by=1")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    messages = junit_messages(paced_project.path / "junit.xml")
    assert "produced 3" in messages["test_benchmark[eager-in16-out4]"][1]
    tag, text = messages["test_performance_gate[compiled_speedup]"]
    assert tag == "error" and "test_benchmark[eager-in16-out4] failed" in text


def test_engines_are_built_once_per_mode_whatever_the_order(paced_project):
    ids = ["thresholds.toml::test_performance_gate[compiled_speedup]",
           "thresholds.toml::test_benchmark[compiled-in16-out4]",
           "thresholds.toml::test_benchmark[eager-in16-out4]",
           "thresholds.toml::test_benchmark[compiled-in32-out4]",
           "thresholds.toml::test_benchmark[eager-in32-out4]"]
    result = run_paced(paced_project, *ids, "--candidate-option", "stamps=false")
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["engines, in order: build eager, release eager, "
                                 "build compiled, release compiled"])
    order = [c.get("name") for c in
             ET.parse(paced_project.path / "junit.xml").getroot().iter("testcase")]
    assert order[-1] == "test_performance_gate[compiled_speedup]"
    data = benchmarks(paced_project.path / "bench.json")
    built = sorted(name for name, b in data.items() if "engine_build_s" in b["extra_info"])
    assert built == ["test_benchmark[compiled-in16-out4]", "test_benchmark[eager-in16-out4]"]
    # No timestamps from this engine: TPOT comes from the two-length difference.
    assert {b["extra_info"]["tpot_method"] for b in data.values()} == {"two-length difference"}


def test_markers_choose_between_precision_and_performance(paced_project):
    def collected(*args):
        result = paced_project.runpytest_subprocess("--collect-only", "-q", *args)
        return result.stdout.str()

    precision = collected("-m", "precision")
    assert "test_prompt[rag-01]" in precision and "test_benchmark" not in precision
    performance = collected("-m", "performance")
    assert "test_prompt" not in performance
    assert "thresholds.toml::test_benchmark[eager-in16-out4]" in performance
    assert "thresholds.toml::test_reference_benchmark[in16-out4]" in performance
    assert "thresholds.toml::test_performance_gate[compiled_speedup]" in performance
    everything = collected()
    assert "test_prompt[rag-01]" in everything and "test_benchmark[eager-in16-out4]" in everything


def test_benchmark_only_asks_for_the_packaged_suite(pytester):
    result = pytester.runpytest_subprocess("--collect-only", "-q", "--benchmark-only")
    out = result.stdout.str()
    assert "llm-parity::test_benchmark[eager-in16-out100]" in out
    assert "llm-parity::test_benchmark[compiled-in64-out100]" in out
    assert "llm-parity::test_performance_gate[compiled_speedup]" in out


def test_benchmark_compare_still_tracks_regressions(paced_project):
    first = run_paced(paced_project, "--benchmark-only", "-k", "eager-in16",
                      "--benchmark-autosave", "--benchmark-storage", "file://./saved")
    assert first.ret == 0, first.stdout.str()
    slower = run_paced(paced_project, "--benchmark-only", "-k", "eager-in16",
                       "--benchmark-storage", "file://./saved", "--benchmark-compare",
                       "--benchmark-compare-fail=median:50%", "--candidate-option", "slowdown=3")
    assert slower.ret != 0
    assert "Performance has regressed" in slower.stdout.str() + slower.stderr.str()
    assert "test_benchmark[eager-in16-out4] (0001_unversi)" in slower.stdout.str()


@needs_vllm
@pytest.mark.engine
def test_real_vllm_engines_eager_then_compiled(pytester):
    """The one run with real engines: vLLM eager, vLLM compiled, the Transformers baseline,
    in one session with the precision suite (eager): the precision run's engine is the
    first benchmark's, adopted rather than built again."""
    (pytester.path / "three.txt").write_text(
        "What is retrieval-augmented generation?\nName two uses of a vector index.\n"
        "Why does a model quote its sources?\n")
    pytester.makefile(".toml", thresholds="""
[precision.gates.kl_mean]
metric = "kl"
aggregate = "mean"
max = 0.01

[configurations.eager]
default = true
args = { enforce_eager = true, enable_prefix_caching = false }

[performance]
warmup_rounds = 1
rounds = 2
max_cv = 0.5
grid = [
  { mode = "eager", input_len = 16, output_len = 8 },
  { mode = "compiled", input_len = 16, output_len = 8 },
]

[performance.gates.compiled_not_slower_than_half]
metric = "speedup"
aggregate = "min"
min = 0.5

[performance.gates.tpot_under_a_microsecond]
metric = "tpot_ms"
aggregate = "max"
max = 0.001
""")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "precision or performance", "--candidate", "vllm",
        "--prompts=three.txt", "--continuation", "0", "--noise-floor", "off",
        "--junitxml", "junit.xml", "--benchmark-json", "bench.json", "--parity-json=v.json")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    outcomes = result.parseoutcomes()
    # precision: 3 prompts and 1 gate; performance: 3 cases, 1 gate
    assert outcomes["passed"] == 3 + 1 + 3 + 1 and outcomes["failed"] == 1, outcomes
    verdict = json.loads((pytester.path / "v.json").read_text())
    assert [c["verdict"] for c in verdict["configurations"]["entries"]] == ["pass"]
    result.stdout.fnmatch_lines([
        "candidate: vllm on cpu in bfloat16, vllm *",
        "engines, in order: adopt eager (the precision run's eager engine), release eager, "
        "build compiled, release compiled, build reference, release reference",
        "PASS gate compiled_not_slower_than_half*",
        "FAIL gate tpot_under_a_microsecond*",
    ])
    data = benchmarks(pytester.path / "bench.json")
    for mode, eager in (("eager", True), ("compiled", False)):
        info = data[f"test_benchmark[{mode}-in16-out8]"]["extra_info"]
        assert info["backend"] == "vllm" and info["tpot_method"] == "engine timestamps"
        assert info["engine_args"]["enforce_eager"] is eager
        assert info["engine_args"]["enable_prefix_caching"] is False
        assert 0 < info["ttft_ms"] < info["latency_ms"]
        # TTFT plus seven decode steps make up (most of) the end-to-end latency.
        assert info["ttft_ms"] + 7 * info["tpot_ms"] == pytest.approx(info["latency_ms"],
                                                                      rel=0.5)
    reference = data["test_reference_benchmark[in16-out8]"]["extra_info"]
    assert reference["backend"] == "hf" and reference["dtype"] == "bfloat16"
    assert statistics.fmean(reference["tpot_ms_values"]) > 0
