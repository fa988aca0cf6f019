"""Where the session's state hangs on the pytest config, shared by the plugin's modules."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from llm_parity.runner.session import ParitySession

SESSION_KEY = pytest.StashKey["ParitySession"]()
PERF_KEY = pytest.StashKey["PerformanceRun"]()


def parity_session(config: pytest.Config) -> ParitySession:
    return config.stash[SESSION_KEY]


def under_args(path: Path, config: pytest.Config) -> bool:
    """Whether pytest would collect `path` from the arguments it was given."""
    for arg in config.args:
        base = Path(arg.split("::")[0])
        if not base.is_absolute():
            base = Path(config.invocation_params.dir) / base
        base = base.resolve()
        if path == base or base in path.parents:
            return True
    return False


class SuiteOutcomes:
    """What pytest decided for each test of the suite: the verdict folds these in, so the
    JSON verdict, the JUnit XML and the exit status cannot disagree."""

    def __init__(self) -> None:
        self.selected: set[str] = set()
        self.outcome: dict[str, str] = {}  # nodeid -> passed, failed, error, skipped
        # The pytest-xdist controller collects nothing itself: it takes the suite's tests
        # by their node id prefix from the workers' reports.
        self.prefix: str | None = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.prefix is not None and report.nodeid.startswith(self.prefix):
            self.selected.add(report.nodeid)
        if report.nodeid not in self.selected:
            return
        if report.failed:
            self.outcome[report.nodeid] = "failed" if report.when == "call" else "error"
        elif report.skipped and self.outcome.get(report.nodeid) not in ("failed", "error"):
            self.outcome[report.nodeid] = "skipped"
        elif report.when == "call" and report.passed:
            self.outcome.setdefault(report.nodeid, "passed")

    def as_dict(self, exit_status: int) -> dict:
        counts = {k: 0 for k in ("passed", "failed", "error", "skipped")}
        for outcome in self.outcome.values():
            counts[outcome] += 1
        counts["not_run"] = len(self.selected) - len(self.outcome)
        return {"tests": counts, "exit_status": int(exit_status)}


OUTCOMES_KEY = pytest.StashKey[SuiteOutcomes]()
