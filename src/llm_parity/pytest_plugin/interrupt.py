"""An interrupted session (Ctrl-C, or the SIGTERM of a cancelled CI job) ends within
seconds, with its engines closed, their processes gone, and a verdict "interrupted".

SIGINT raises KeyboardInterrupt already; SIGTERM is made to raise Terminated, a
KeyboardInterrupt, in the main thread, so pytest takes the same path for both: the test's
engines are closed as the exception leaves them, fixtures are torn down,
pytest_sessionfinish writes the outputs, and the process exits 2 (SIGINT) or 143 (what a
shell reports for a process ended by SIGTERM). The test the signal cut short is reported as
an error, so the JUnit XML does not look like a run that passed. Once pytest is on that
path, further signals are held until the session has ended: a second Ctrl-C, or the SIGTERM
CI sends after its SIGINT, must not cut the cleanup short and orphan an engine process.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import pytest

from llm_parity.engines.progress import current
from llm_parity.errors import Terminated

PLUGIN = "llm-parity-interrupt"
TERMINATED_STATUS = 128 + signal.SIGTERM  # 143


class Interruption:
    """Which signal cut the session short, what the engines were doing, and the test that
    was running."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.during: str | None = None
        self.stopping = False  # pytest is ending the session: hold further signals
        self.previous: dict[int, Any] = {}
        self.item: pytest.Item | None = None
        self.reported: set[str] = set()

    def take_signals(self) -> None:
        """Handle SIGINT and SIGTERM where nobody else does (Python's own KeyboardInterrupt,
        the default SIGTERM), in the main thread only."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, default in ((signal.SIGINT, signal.default_int_handler),
                                (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(signum) is default:
                self.previous[signum] = default
                signal.signal(signum, self._on_signal)

    def give_back(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        __tracebackhide__ = True  # pytest shows where the run was, not this handler
        if self.stopping:
            sys.stderr.write(f"\nllm-parity: {signal.Signals(signum).name} held: the session "
                             "is ending, once its engines are closed\n")
            return
        if self.signum is None:
            self.signum, self.during = signum, current()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated

    def info(self) -> dict[str, Any]:
        """What interrupted the session, for the verdict."""
        return {"signal": signal.Signals(self.signum).name if self.signum else None,
                "during": self.during}

    # ------------------------------------------------------------ hooks

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None):
        self.item, self.reported = item, set()
        result = yield
        self.item = None  # left set when an interruption leaves through here
        return result

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.item is not None and report.nodeid == self.item.nodeid:
            self.reported.add(report.when)

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo) -> None:
        self.stopping = True
        if self.signum is None and self.during is None:
            self.during = current()  # pytest.exit(), or a KeyboardInterrupt raised by code
        item, self.item = self.item, None
        when = next((w for w in ("setup", "call", "teardown") if w not in self.reported), None)
        if item is None or when is None:
            return
        from llm_parity.report.verdict import interruption_text

        # The test the signal cut short has no report of its own: give it one that says so.
        keywords = {name: 1 for name in item.keywords}
        item.ihook.pytest_runtest_logreport(report=pytest.TestReport(
            item.nodeid, item.location, keywords, "failed", interruption_text(self.info()),
            when, user_properties=item.user_properties))
        if when != "teardown":
            item.ihook.pytest_runtest_logreport(report=pytest.TestReport(
                item.nodeid, item.location, keywords, "passed", None, "teardown"))


def install(config: pytest.Config) -> None:
    if config.pluginmanager.get_plugin(PLUGIN) is not None:
        return  # once per session
    interruption = Interruption()
    config.pluginmanager.register(interruption, PLUGIN)
    interruption.take_signals()


def finish(session: pytest.Session) -> dict[str, Any] | None:
    """At the end of the session: hold further signals, give a SIGTERM its exit status, and
    return what interrupted the session (None if nothing did)."""
    interruption = session.config.pluginmanager.get_plugin(PLUGIN)
    if interruption is None:
        return None
    interruption.stopping = True
    if interruption.signum is None and session.exitstatus != pytest.ExitCode.INTERRUPTED:
        return None
    if interruption.signum == signal.SIGTERM:
        session.exitstatus = TERMINATED_STATUS
    return interruption.info()


def uninstall(config: pytest.Config) -> None:
    interruption = config.pluginmanager.get_plugin(PLUGIN)
    if interruption is not None:
        interruption.give_back()
