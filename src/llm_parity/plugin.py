"""pytest entry point: options, markers, collection of the suite, fixtures, end of run.

The suite's test items come from the active thresholds file: pytest collects
`thresholds.toml` as a module whose tests are those of `llm_parity.suite`. A project
without one runs the suite only when asked (an llm-parity option, or `-m precision`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from llm_parity.config import OPTIONS, SettingsError, build_settings

if TYPE_CHECKING:
    from llm_parity.session import ParitySession

SESSION_KEY = pytest.StashKey["ParitySession"]()
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
    if config.getoption("help", False) or config.getoption("version", False):
        return
    from llm_parity.session import ParitySession

    raw, explicit = _raw_options(config)
    try:
        settings = build_settings(raw, Path(config.rootpath))
    except SettingsError as exc:
        raise pytest.UsageError(f"llm-parity: {exc}") from None
    session = ParitySession(settings)
    config.stash[SESSION_KEY] = session
    markexpr = config.getoption("markexpr", "") or ""
    asked = explicit or any(m in markexpr for m in MARKERS)
    if asked and not _under_args(settings.thresholds_path, config):
        # Packaged or outside the tree: collect it explicitly so the suite still runs.
        config.args.append(str(settings.thresholds_path))
    from llm_parity import performance_plugin

    config.pluginmanager.register(performance_plugin, "llm-parity-performance")


def _under_args(path: Path, config: pytest.Config) -> bool:
    for arg in config.args:
        base = Path(arg.split("::")[0])
        if not base.is_absolute():
            base = Path(config.invocation_params.dir) / base
        base = base.resolve()
        if path == base or base in path.parents:
            return True
    return False


def parity_session(config: pytest.Config) -> ParitySession:
    return config.stash[SESSION_KEY]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    session = parent.config.stash.get(SESSION_KEY, None)
    if session is None or file_path.resolve() != session.settings.thresholds_path:
        return None
    from llm_parity.suite_collector import ParitySuite

    rootdir = Path(parent.config.rootpath).resolve()
    if rootdir in file_path.resolve().parents:
        return ParitySuite.from_parent(parent, path=file_path)
    # The packaged (or an outside) thresholds file: give the suite a stable name of its own.
    return ParitySuite.from_parent(parent, path=file_path, nodeid="llm-parity")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is None or session.settings.continuation:
        return
    # --continuation 0: the depth tests have nothing to compare; leave them out, counted.
    depth = [i for i in items if getattr(i, "originalname", "") in ("test_sequence", "test_decode")
             and isinstance(i.parent, _suite_class())]
    if depth:
        config.hook.pytest_deselected(items=depth)
        items[:] = [i for i in items if i not in depth]


def _suite_class():
    from llm_parity.suite_collector import ParitySuite

    return ParitySuite


@pytest.fixture(scope="session")
def parity(request: pytest.FixtureRequest) -> ParitySession:
    """The session's llm-parity state: settings, and the precision run on demand."""
    return parity_session(request.config)


@pytest.fixture(scope="session")
def parity_run(parity, record_testsuite_property):
    """The precision comparison, computed once; a failed run fails every test that needs it."""
    from llm_parity.session import RUN_ERRORS

    try:
        run = parity.precision()
    except RUN_ERRORS as exc:
        pytest.fail(f"llm-parity: {exc}", pytrace=False)
    for key, value in parity.environment.items():
        if value is not None:
            record_testsuite_property(key, value)
    return run


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is None or session.run is None:
        return
    from llm_parity.report import summary_lines

    terminalreporter.section("llm-parity")
    for line in summary_lines(session):
        terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(SESSION_KEY, None)
    if state is None:
        return
    from llm_parity.performance_plugin import PERF_KEY

    perf_run = session.config.stash.get(PERF_KEY, None)
    measured = perf_run is not None and (perf_run.results or perf_run.gate_outcomes)
    if not (state._attempted or measured):
        return  # nothing ran (e.g. --collect-only): write nothing rather than an empty verdict
    from llm_parity.report import write_outputs

    write_outputs(state, perf_run)
