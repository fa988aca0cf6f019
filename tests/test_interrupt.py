"""Interrupted sessions without an engine: the verdict "interrupted" and every output made
from it, the plugin's SIGTERM handling in a real pytest run, and the signal guards and the
process stop the vLLM engine uses (tests/test_interrupt_e2e.py runs them on vLLM itself)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from conftest import junit_cases
from synthetic import failed_session, make_session

from llm_parity.engines import processes, progress
from llm_parity.errors import EngineStartInterrupted
from llm_parity.pytest_plugin.interrupt import Interruption
from llm_parity.report.compare import compare_verdicts
from llm_parity.report.document import render_verdict
from llm_parity.report.schema import validate_verdict
from llm_parity.report.summary import precision_summary
from llm_parity.report.verdict import full_verdict

DURING = "candidate (vllm, configuration eager): decoding 25 prompts"
SESSION = {"tests": {"passed": 0, "failed": 0, "error": 1, "skipped": 0, "not_run": 40},
           "exit_status": 143}


def interrupted(session, signame="SIGTERM", during=DURING):
    session.interrupted = {"signal": signame, "during": during}
    return full_verdict(session, None, SESSION)


def cut_short():
    """A session whose precision run the signal stopped before anything was compared."""
    session = failed_session()
    session.error = KeyboardInterrupt()
    return session


def test_a_run_cut_short_before_it_compared_is_interrupted_not_error():
    data = interrupted(cut_short())
    validate_verdict(data)
    reason = f"interrupted by SIGTERM while {DURING}"
    assert data["verdict"] == "interrupted" and data["error"] == reason
    assert data["interrupted"] == {"signal": "SIGTERM", "during": DURING}
    assert data["verdict_reasons"][0] == reason and data["session"]["exit_status"] == 143
    assert precision_summary(data) == [f"verdict: INTERRUPTED   {reason}"]
    for suffix in (".md", ".html"):
        text = render_verdict(data, suffix, generated="2026-01-01 00:00 UTC")
        assert "INTERRUPTED: the precision run did not finish" in text and reason in text


def test_what_was_judged_before_the_signal_stays_but_does_not_pass():
    data = interrupted(make_session(), "SIGINT", during=None)  # every gate passed
    validate_verdict(data)
    assert data["verdict"] == "interrupted" and data["gates"] and "error" not in data
    assert data["verdict_reasons"][0] == "interrupted by SIGINT"
    assert "verdict: INTERRUPTED" in precision_summary(data)[0]
    assert "INTERRUPTED: the candidate" in render_verdict(data, ".md")
    assert 'class="banner interrupted"' in render_verdict(data, ".html")


def test_an_error_of_the_run_itself_is_kept_when_a_signal_comes_after():
    data = interrupted(failed_session("the candidate engine died"))
    assert data["verdict"] == "interrupted" and data["error"] == "the candidate engine died"


def test_an_interrupted_new_run_is_a_regression_in_compare():
    good = full_verdict(make_session())
    out = compare_verdicts(good, interrupted(cut_short()))
    assert "the new run did not finish" in out.regressions
    assert f"interrupted by SIGTERM while {DURING}" in "\n".join(out.lines)


def test_the_schema_requires_what_interrupted_the_run():
    data = interrupted(cut_short())
    del data["interrupted"]
    with pytest.raises(Exception, match="interrupted"):
        validate_verdict(data)


# ---------------------------------------------------------------- the plugin, in a real run

CUT_SHORT = """
import os, signal, time

def test_first():
    pass

def test_cut_short():
    os.kill(os.getpid(), signal.{signame})
    time.sleep(30)

def test_never_runs():
    pass
"""


@pytest.mark.parametrize("signame, status", [("SIGTERM", 143), ("SIGINT", 2)])
def test_a_signal_ends_the_session_with_its_status_and_an_interrupted_verdict(
        pytester, read_json, signame, status):
    pytester.makepyfile(test_cut=CUT_SHORT.format(signame=signame))
    started = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--parity-json",
                                           "verdict.json", "--junitxml", "junit.xml")
    assert result.ret == status and time.monotonic() - started < 25
    verdict = read_json(pytester.path / "verdict.json")
    assert verdict["verdict"] == "interrupted"
    assert verdict["interrupted"] == {"signal": signame, "during": None}
    assert verdict["session"]["exit_status"] == status
    cases = junit_cases(pytester.path / "junit.xml")
    assert cases["test_first"][0] == "passed" and cases["test_cut_short"][0] == "failure"
    assert "test_never_runs" not in cases
    assert f"interrupted by {signame}" in (pytester.path / "junit.xml").read_text()


@pytest.fixture
def plain_signals():
    """Python's own SIGINT and SIGTERM handlers for one test: a signal it raises must not
    reach this very session's llm-parity handlers, which would take it as an interruption."""
    outer = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for signum, handler in outer.items():
        signal.signal(signum, handler)


def test_the_session_gives_back_the_signal_handlers_it_found(plain_signals):
    interruption = Interruption()
    interruption.take_signals()
    assert signal.getsignal(signal.SIGTERM) == interruption._on_signal
    assert signal.getsignal(signal.SIGINT) == interruption._on_signal
    interruption.stopping = True  # pytest is ending the session: a signal waits
    interruption._on_signal(signal.SIGTERM, None)
    interruption.give_back()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------- guards and the stop


class Recorded:
    def __init__(self):
        self.killed = 0

    def kill(self):
        self.killed += 1


def test_a_signal_while_an_engine_starts_kills_it_and_is_not_swallowed(plain_signals):
    before = signal.getsignal(signal.SIGINT)
    recorded = Recorded()
    with pytest.raises(EngineStartInterrupted) as caught:
        with processes.start_guard(recorded):
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:  # what vLLM's handshake does with a KeyboardInterrupt
                pytest.fail("the guard let a KeyboardInterrupt through")
    assert caught.value.signum == signal.SIGINT and recorded.killed == 1
    assert signal.getsignal(signal.SIGINT) == before
    with pytest.raises(KeyboardInterrupt):
        processes.redeliver(signal.SIGINT)


def test_signals_wait_while_processes_are_stopped_then_arrive(plain_signals):
    finished = False
    with pytest.raises(KeyboardInterrupt):
        with processes.signals_held():
            signal.raise_signal(signal.SIGINT)
            finished = True
    assert finished


def test_a_stop_ends_a_process_that_ignores_sigterm():
    psutil = pytest.importorskip("psutil")
    stubborn = subprocess.Popen([sys.executable, "-c",
                                 "import signal, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                 "print(flush=True)\ntime.sleep(60)"],
                                stdout=subprocess.PIPE)
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stubborn.stdout.readline()  # its handler is in place
        started = time.monotonic()
        left = processes.stop_processes([psutil.Process(stubborn.pid),
                                         psutil.Process(polite.pid)], grace=1.0)
        assert left == [] and time.monotonic() - started < 3
        assert polite.wait(5) == -signal.SIGTERM and stubborn.wait(5) == -signal.SIGKILL
    finally:
        for child in (stubborn, polite):
            child.kill()
            child.wait()


def test_the_step_under_way_is_said_and_kept_until_the_engine_closes(caplog):
    with caplog.at_level("INFO", logger="llm_parity"):
        progress.announce("reference (hf): decoding 4 prompts")
    assert progress.current() == "reference (hf): decoding 4 prompts"
    assert caplog.messages == ["reference (hf): decoding 4 prompts"]
    progress.settle()
    assert progress.current() is None
