"""pytest hooks of the performance gates: parametrization, order, engine release, summary.

Registered by llm_parity.pytest_plugin once the session's settings exist. The benchmarks run
grouped by engine (eager, compiled, then the Transformers baseline), each engine released
before the next is built, and every gate item runs after all of them.
"""

from __future__ import annotations

import pytest

from llm_parity.compare.performance import REFERENCE, evaluate_gate, reference_cases
from llm_parity.errors import MissingBenchmark
from llm_parity.pytest_plugin.state import PERF_KEY, SESSION_KEY, under_args
from llm_parity.runner.performance import PerformanceRun

_CASE = pytest.StashKey[str]()  # item -> the case key it measures
_ENGINE = pytest.StashKey[str]()  # item -> the engine it needs (a mode, or REFERENCE)
_ENGINE_ORDER = ("eager", "compiled", REFERENCE)
_BENCHMARKS = ("test_benchmark", "test_reference_benchmark")
_GATE = "test_performance_gate"
_PRECISION = ("test_prompt", "test_sequence", "test_decode", "test_gate")
_ONLY_SKIP = "--benchmark-only"


def pytest_configure(config: pytest.Config) -> None:
    session = config.stash[SESSION_KEY]
    run = config.stash[PERF_KEY] = PerformanceRun(session.settings)
    run.adopt, run.discard = session.take_spare, session.close_spare
    # --benchmark-only asks for the suite as -m performance does.
    path = session.settings.thresholds_path
    if config.getoption("benchmark_only", False) and not under_args(path, config):
        config.args.append(str(path))


def perf_run_of(config: pytest.Config) -> PerformanceRun:
    return config.stash[PERF_KEY]


def _in_suite(node) -> bool:
    from llm_parity.pytest_plugin.collector import ParitySuite

    return isinstance(getattr(node, "parent", None), ParitySuite)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not _in_suite(metafunc.definition):
        return
    settings = perf_run_of(metafunc.config).settings
    names = metafunc.fixturenames
    if "perf_case" in names or "perf_reference_case" in names:
        grid = settings.thresholds_file.grid_union(settings.model)
        if "perf_case" in names:
            metafunc.parametrize("perf_case", grid, ids=[c.id for c in grid])
        if "perf_reference_case" in names:
            cases = reference_cases(grid)
            metafunc.parametrize("perf_reference_case", cases,
                                 ids=[f"in{c.input_len}-out{c.output_len}" for c in cases])
    if "perf_gate" in names:
        metafunc.parametrize("perf_gate", settings.thresholds_file.performance_gate_names(settings.model))


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object):
    # A thresholds file without a performance grid (or gates) has no such tests at all.
    if name not in (*_BENCHMARKS, _GATE) or not _in_suite_module(collector):
        return None
    settings = perf_run_of(collector.config).settings
    if name == _GATE:
        empty = not settings.thresholds_file.performance_gate_names(settings.model)
    else:
        empty = not settings.thresholds_file.grid_union(settings.model)
    return [] if empty else None


def _in_suite_module(collector: pytest.Collector) -> bool:
    from llm_parity.pytest_plugin.collector import ParitySuite

    return isinstance(collector, ParitySuite)


def _case_of(item: pytest.Item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("perf_case") or params.get("perf_reference_case")


@pytest.hookimpl(hookwrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
    yield  # after every other plugin: -k/-m deselection, pytest-benchmark's skip marks
    run = perf_run_of(config)
    benchmarks, gates, first = [], [], None
    for index, item in enumerate(items):
        name = getattr(item, "originalname", "")
        if not _in_suite(item) or name not in (*_BENCHMARKS, _GATE):
            continue
        first = index if first is None else first
        if name == _GATE:
            gates.append(item)
            continue
        case = _case_of(item)
        item.stash[_CASE] = case.id
        item.stash[_ENGINE] = case.mode
        benchmarks.append(item)
    if first is None:
        return
    # Precision tests in the same session: their last engine may serve the first benchmark.
    config.stash[SESSION_KEY].hand_over = bool(benchmarks) and any(
        _in_suite(item) and getattr(item, "originalname", "") in _PRECISION for item in items)
    # One engine at a time: group the benchmarks by engine, then the gates after them all.
    benchmarks.sort(key=lambda item: _ENGINE_ORDER.index(item.stash[_ENGINE]))
    chosen = set(benchmarks) | set(gates)
    rest = [item for item in items if item not in chosen]
    # After the precision tests of the same suite, which release their engines as they end.
    after = max((i + 1 for i, item in enumerate(rest) if _in_suite(item)), default=first)
    items[:] = rest[:after] + benchmarks + gates + rest[after:]
    for item in gates:
        _unskip_under_benchmark_only(item)
        if getattr(getattr(config, "_benchmarksession", None), "skip", False):
            item.add_marker(pytest.mark.skip(reason="the benchmarks are skipped "
                                             "(--benchmark-skip), so the gates have no input"))
    run.collected = {item.stash[_CASE]: item.name for item in benchmarks}


def _unskip_under_benchmark_only(item: pytest.Item) -> None:
    # A gate takes no benchmark fixture, yet belongs to the benchmark run it judges.
    item.own_markers[:] = [
        m for m in item.own_markers
        if not (m.name == "skip" and _ONLY_SKIP in str(m.kwargs.get("reason", "")))
    ]


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        if getattr(item, "originalname", "") in _BENCHMARKS and _in_suite(item):
            perf_run_of(item.config).not_measured[_case_of(item).id] = "was deselected"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    key = item.stash.get(_CASE, None)
    if key is None or report.passed:
        return
    # A benchmark that did not measure: remember why, for the gates that read it.
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else "skipped"
        why = f"was skipped ({reason.removeprefix('Skipped: ')})"
    else:
        lines = report.longreprtext.strip().splitlines()
        why = ("failed" if report.when == "call" else "errored") + (
            f" ({lines[-1].strip()})" if lines else "")
    perf_run_of(item.config).not_measured.setdefault(key, why)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    # Release the engine as soon as no following test needs it.
    key = item.stash.get(_ENGINE, None)
    if key is None:
        return
    following = nextitem.stash.get(_ENGINE, None) if nextitem is not None else None
    if following != key:
        perf_run_of(item.config).release()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _ENGINE in item.stash and not hasattr(item.config, "_benchmarksession"):
        pytest.fail("llm-parity: the performance benchmarks need pytest-benchmark "
                    "(pip install pytest-benchmark), which is not installed or is disabled",
                    pytrace=False)


@pytest.fixture(scope="session")
def perf_run(request: pytest.FixtureRequest) -> PerformanceRun:
    """The session's performance benchmarks: the engine in use, and what was measured."""
    return perf_run_of(request.config)


@pytest.fixture
def perf_gate_outcome(perf_gate: str, perf_run: PerformanceRun):
    """A performance gate evaluated on the measured cases; an error when one is missing."""
    from llm_parity.errors import RUN_ERRORS

    problem = None
    try:
        thresholds = perf_run.thresholds()
        gate = next((g for g in thresholds.performance_gates if g.name == perf_gate), None)
        if gate is not None:
            outcome = evaluate_gate(
                gate, thresholds.grid, perf_run.results, thresholds.max_cv,
                why_missing=lambda case: perf_run.not_measured.get(case.id, "did not run"),
            )
    except (*RUN_ERRORS, MissingBenchmark) as exc:
        problem = f"llm-parity: {exc}"
    if problem:  # failed here, at setup, so the gate is reported as an error
        pytest.fail(problem, pytrace=False)
    if gate is None:
        pytest.skip(f"gate {perf_gate} does not apply to platform {perf_run.platform()}")
    perf_run.gate_outcomes[gate.name] = outcome
    return outcome


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    run = session.config.stash.get(PERF_KEY, None)
    if run is None:
        return
    try:
        run.release()  # a backstop: interrupted runs (-x, Ctrl-C) end with an engine alive
    except Exception as exc:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"llm-parity: releasing the last engine failed: {exc}", red=True)
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
