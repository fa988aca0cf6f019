"""pytest entry point: options, markers, collection of the suite, fixtures, end of run.

The suite's test items come from the active thresholds file: pytest collects
`thresholds.toml` as a module whose tests are those of `llm_parity.pytest_plugin.suite`. A project
without one runs the suite only when asked (an llm-parity option, or `-m precision`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llm_parity.config.options import OPTIONS, build_settings
from llm_parity.errors import ModelError, SettingsError
from llm_parity.pytest_plugin.state import (
    OUTCOMES_KEY,
    PERF_KEY,
    SESSION_KEY,
    SuiteOutcomes,
    under_args,
)

MARKERS = {
    "precision": "next-token parity of the candidate against the float32 reference",
    "performance": "speed gates of the candidate engine (latency, throughput, TPOT)",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    # Help-text rules: each option says what it takes and its default; ini keys mirror
    # the long options with dashes turned to underscores, and the command line wins.
    group = parser.getgroup("llm-parity", "language-model port acceptance (llm-parity)")
    for option in OPTIONS:
        kwargs: dict[str, Any] = {"dest": option.dest, "help": option.help}
        if option.kind == "bool":
            kwargs["action"] = "store_true"
            kwargs["default"] = None
        elif option.kind == "list":
            kwargs["action"] = "append"
        group.addoption(option.flag, **kwargs)
        parser.addini(
            option.ini,
            option.help,
            type="bool" if option.kind == "bool" else ("args" if option.kind == "list" else None),
            default=option.default if option.kind != "list" else [],
        )


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, args: list[str]) -> None:
    # The first moment the rootdir pytest chose can be checked against our options.
    from llm_parity.pytest_plugin.paths import check_setup

    check_setup(early_config, args)


def _raw_options(config: pytest.Config) -> tuple[dict[str, Any], bool]:
    raw: dict[str, Any] = {}
    explicit = False
    for option in OPTIONS:
        value = config.getoption(option.dest)
        if value is not None:
            explicit = True
        else:
            value = config.getini(option.ini)
            if value in ("", None, []):
                value = option.default
            elif value != option.default:
                explicit = True
        raw[option.flag.lstrip("-")] = value
    return raw, explicit


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    # torch's own deprecation, raised whenever vLLM imports it: noise in every user's run.
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
    if config.getoption("help", False) or config.getoption("version", False):
        return
    from llm_parity.runner.session import ParitySession

    raw, explicit = _raw_options(config)
    try:
        settings = build_settings(raw, Path(config.rootpath))
    except SettingsError as exc:
        raise pytest.UsageError(f"llm-parity: {exc}") from None
    session = ParitySession(settings)
    try:  # a quantized candidate whose scheme cannot be read stops here, before any model
        session.quantization_gate_names()
    except ModelError as exc:
        raise pytest.UsageError(f"llm-parity: {exc}") from None
    config.stash[SESSION_KEY] = session
    outcomes = config.stash[OUTCOMES_KEY] = SuiteOutcomes()
    config.pluginmanager.register(outcomes, "llm-parity-outcomes")
    from llm_parity.pytest_plugin.paths import drop_inactive_thresholds

    drop_inactive_thresholds(config, settings.thresholds_path)
    markexpr = config.getoption("markexpr", "") or ""
    asked = explicit or any(m in markexpr for m in MARKERS)
    if asked and not under_args(settings.thresholds_path, config):
        # Packaged or outside the tree: collect it explicitly so the suite still runs.
        config.args.append(str(settings.thresholds_path))
    if asked:
        from llm_parity.pytest_plugin import distributed, interrupt

        # Where the suite runs, SIGTERM ends the session as Ctrl-C does: engines closed, a
        # verdict written; a project that never asks for the suite keeps pytest's own.
        interrupt.install(config)
        session.live = True  # the live line, once the terminal reporter exists (below)

        if distributed.EXCHANGE in getattr(config, "workerinput", {}):
            distributed.setup_worker(config)
        elif distributed.is_controller(config):
            distributed.setup_controller(config)
    from llm_parity.pytest_plugin import fixtures, performance

    config.pluginmanager.register(fixtures, "llm-parity-fixtures")
    config.pluginmanager.register(performance, "llm-parity-performance")


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    state = session.config.stash.get(SESSION_KEY, None)
    if state is not None and getattr(state, "live", False):
        from llm_parity.pytest_plugin import live

        live.setup(session.config, state.settings.progress_interval)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    session = parent.config.stash.get(SESSION_KEY, None)
    if session is None or file_path.resolve() != session.settings.thresholds_path:
        return None
    from llm_parity.pytest_plugin.collector import ParitySuite

    rootdir = Path(parent.config.rootpath).resolve()
    if rootdir in file_path.resolve().parents:
        return ParitySuite.from_parent(parent, path=file_path)
    # The packaged (or an outside) thresholds file: give the suite a stable name of its own.
    return ParitySuite.from_parent(parent, path=file_path, nodeid="llm-parity")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is None:
        return
    from llm_parity.pytest_plugin.fixtures import ENGINE_FIXTURES

    if any(isinstance(i.parent, _suite_class()) for i in items):
        from llm_parity.pytest_plugin import interrupt

        interrupt.install(config)  # the suite runs (collected without being asked, too)
    # A test of the user's asks for the loaded engines: the run keeps them open for it.
    session.keep_engines = any(ENGINE_FIXTURES & set(getattr(i, "fixturenames", ()))
                               for i in items)
    # A depth test judges its view's per-prompt gates: with --continuation 0 it has nothing
    # to compare, and with no per-prompt gate over its view it could never fail; leave such
    # tests out, counted as deselected (the run gates over that view still judge it).
    views = (session.settings.thresholds_file.prompt_gate_views(session.settings.model)
             if session.settings.continuation else set())
    tests = {"test_sequence": "sequence", "test_decode": "decode"}
    depth = [i for i in items if tests.get(getattr(i, "originalname", "")) not in (None, *views)
             and isinstance(i.parent, _suite_class())]
    if depth:
        config.hook.pytest_deselected(items=depth)
        items[:] = [i for i in items if i not in depth]


def _suite_class():
    from llm_parity.pytest_plugin.collector import ParitySuite

    return ParitySuite


def pytest_itemcollected(item: pytest.Item) -> None:
    outcomes = item.config.stash.get(OUTCOMES_KEY, None)
    if outcomes is not None and isinstance(item.parent, _suite_class()):
        outcomes.selected.add(item.nodeid)


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        outcomes = item.config.stash.get(OUTCOMES_KEY, None)
        if outcomes is not None:
            outcomes.selected.discard(item.nodeid)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Build the verdict once, with the suite's outcomes folded in; a verdict that fails
    makes the exit status 1, as a failed test does. Then write the outputs."""
    config = session.config
    state = config.stash.get(SESSION_KEY, None)
    if state is None:
        return
    from llm_parity.pytest_plugin import interrupt

    state.interrupted = interrupt.finish(session)  # first: it may set the exit status
    if hasattr(config, "workerinput") and state.exchange is not None:
        state.close_engines()  # a pytest-xdist worker: the controller writes the verdict
        return
    controller = config.pluginmanager.get_plugin("llm-parity-xdist-controller")
    if controller is not None:
        controller.finish()
    perf_run = config.stash.get(PERF_KEY, None)
    measured = perf_run is not None and (perf_run.results or perf_run.gate_outcomes
                                         or perf_run.not_measured)
    if not (state.attempted or measured or state.interrupted):
        return  # nothing ran (e.g. --collect-only): write nothing rather than an empty verdict
    from llm_parity.report.outputs import write_outputs
    from llm_parity.report.verdict import full_verdict

    outcomes = config.stash[OUTCOMES_KEY].as_dict(int(session.exitstatus))
    data = full_verdict(state, perf_run if measured else None, outcomes)
    if data["verdict"] != "pass" and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        data["session"]["exit_status"] = int(session.exitstatus)
    state.verdict = data
    try:
        write_outputs(data, state.settings.parity_json, state.settings.parity_reports)
    finally:
        state.close_engines()
    if session.exitstatus == pytest.ExitCode.INTERNAL_ERROR:
        # pytest prints no terminal summary after an internal error (pytest-xdist raises one
        # when a worker dies while tests are being sent to it): the verdict is still shown.
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            _summary(reporter, config)


def pytest_unconfigure(config: pytest.Config) -> None:
    from llm_parity.pytest_plugin import interrupt

    interrupt.uninstall(config)  # the signal handlers the session found


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    _summary(terminalreporter, config)


def _summary(terminalreporter, config: pytest.Config) -> None:
    state = config.stash.get(SESSION_KEY, None)
    data = getattr(state, "verdict", None)
    if data is None:
        return
    from llm_parity.report.summary import performance_summary, precision_summary

    if state.attempted:
        terminalreporter.section("llm-parity")
        for line in precision_summary(data):
            terminalreporter.write_line(line)
    if (data.get("performance") or {}).get("cases"):
        terminalreporter.section("llm-parity performance")
        for line in performance_summary(data):
            terminalreporter.write_line(line)
