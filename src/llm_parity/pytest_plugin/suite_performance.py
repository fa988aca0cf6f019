"""The performance tests, collected under the active thresholds file with the precision ones.

One benchmark per grid case (execution mode x input length x output length) on the
candidate, one per distinct length pair on plain Transformers (the baseline), and one
test per performance gate, run after all benchmarks. Parametrization, order and engine
release live in llm_parity.pytest_plugin.performance.
"""

from __future__ import annotations

import json
import warnings

import pytest

from llm_parity.compare.performance import REFERENCE, CaseResult, gated_figures
from llm_parity.errors import ModeUnsupported, PerformanceError, SpreadWarning
from llm_parity.runner.performance import measure

__all__ = ["test_benchmark", "test_reference_benchmark", "test_performance_gate"]


@pytest.mark.performance
def test_benchmark(perf_case, perf_run, benchmark, request):
    """One grid case on the candidate engine, in the case's execution mode."""
    _benchmark(perf_run, perf_case, perf_case.mode, benchmark, request)


@pytest.mark.performance
def test_reference_benchmark(perf_reference_case, perf_run, benchmark, request):
    """The same lengths on plain Transformers, on the candidate's device and dtype."""
    _benchmark(perf_run, perf_reference_case, REFERENCE, benchmark, request)


@pytest.mark.performance
def test_performance_gate(perf_gate_outcome, request):
    """One performance gate over the benchmarks it reads."""
    outcome = perf_gate_outcome
    for name, value in outcome.properties():
        request.node.user_properties.append((name, value))
    for text in outcome.warnings:
        warnings.warn(SpreadWarning(f"gate {outcome.gate.name}: {text}"), stacklevel=1)
    if not outcome.passed:
        pytest.fail(outcome.message(), pytrace=False)


def _benchmark(run, case, key, benchmark, request) -> None:
    from llm_parity.errors import RUN_ERRORS, ThresholdsError

    lengths = (case.input_len, case.output_len)
    skip = problem = None
    try:
        thresholds = run.thresholds()
        if lengths not in {(c.input_len, c.output_len) for c in thresholds.grid} or (
                key != REFERENCE and case not in thresholds.grid):
            skip = f"{case.id} is not in the performance grid for platform {run.platform()}"
        else:
            prompt = run.prompt(case.input_len)
            run.check_fits(*lengths)
            engine, built_s = run.engine(key)
    except ModeUnsupported as exc:
        skip = str(exc)
    except (*RUN_ERRORS, PerformanceError, ThresholdsError) as exc:
        problem = f"llm-parity: {exc}"
    if skip:
        pytest.skip(skip)
    if problem:
        pytest.fail(problem, pytrace=False)
    run.max_cv = thresholds.max_cv
    benchmark.group = f"in{case.input_len}-out{case.output_len}"
    try:
        figures, method = measure(
            engine, prompt, case.output_len,
            rounds=thresholds.rounds, warmup_rounds=thresholds.warmup_rounds,
            repeat=lambda target, rounds: benchmark.pedantic(target, rounds=rounds,
                                                             iterations=1),
        )
    except (*RUN_ERRORS, PerformanceError) as exc:
        problem = f"llm-parity: {case.id}: {exc}"
    if problem:
        pytest.fail(problem, pytrace=False)
    info = dict(engine.describe())
    if key == REFERENCE:
        import torch

        info["threads"] = torch.get_num_threads()
    result = CaseResult(
        key=case.id, mode=key, input_len=case.input_len, output_len=case.output_len,
        figures=figures, tpot_method=method, engine=info,
        warmup_rounds=thresholds.warmup_rounds, built_engine_s=built_s,
    )
    run.results[result.key] = result
    flat = result.flat()
    benchmark.extra_info.update(flat)
    for name, value in flat.items():
        if not name.endswith("_values"):
            request.node.user_properties.append(
                (name, json.dumps(value) if isinstance(value, dict) else value))
    # Warn about the figures a gate reads here; the printed table marks every wide spread.
    read = gated_figures(thresholds, case)
    wide = [name for name in result.wide(thresholds.max_cv) if name in read]
    if wide:
        warnings.warn(SpreadWarning(
            f"{case.id}: the rounds spread too widely to support a gate: "
            + ", ".join(f"{name} {result.figures[name].describe()}" for name in wide)
            + f" (max_cv {thresholds.max_cv:.0%}; more rounds, or a quieter machine)"
        ), stacklevel=1)
