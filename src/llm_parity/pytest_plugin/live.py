"""The live line: what the suite is doing while it works (the phase, done/total, the rate
and an estimate of the time left), through pytest's terminal reporter.

On a terminal one line is redrawn in place, and wiped when pytest writes again; into a
file (a CI log) plain lines are written: one when a step begins, then one every
`--progress-interval` seconds while it lasts. Nothing under `-q`, `-p no:terminal` or on
a pytest-xdist worker (the controller speaks for the run); JUnit never sees it.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from llm_parity.engines import progress
from llm_parity.engines.progress import Step

REDRAW_S = 0.25  # a terminal's line is redrawn at most this often (and each second)
SEPARATOR = "  |  "  # between two lanes' steps on a terminal's one line


def text(step: Step, now: float, width: int | None = None) -> str:
    """`reference (hf): decoding 8 prompts · 96/256 tokens · 12.0 tokens/s · ETA 13 s · 8 s`,
    the step's name cut first when the line must fit `width`."""
    elapsed = now - step.started
    parts = []
    if step.total:
        parts.append(f"{step.done}/{step.total} {step.unit}")
        if step.done and elapsed > 0:
            rate = step.done / elapsed
            parts.append(f"{rate:.3g} {step.unit}/s")
            if step.done < step.total:
                parts.append(f"ETA {duration((step.total - step.done) / rate)}")
    parts.append(duration(elapsed))
    numbers = " · ".join(parts)
    what = step.what
    if width is not None and len(what) + 3 + len(numbers) > width:
        what = what[:max(10, width - 3 - len(numbers) - 1)] + "…"
    return f"{what} · {numbers}"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Live:
    def __init__(self, reporter, capture, interval: float) -> None:
        self.reporter = reporter
        self.capture = capture  # pytest's capture manager: the run works inside a test
        self.tty = bool(reporter.isatty)
        self.interval = interval
        self.lock = threading.Lock()
        self.steps: tuple[Step, ...] = ()  # the steps last shown (one per lane)
        self.hidden: tuple[Step, ...] | None = None  # wiped for pytest's results: redrawn on news only
        self.drawn = False  # a terminal line of ours is on screen
        self.moved = False  # we wrote since pytest last did: its file's name is not in view
        self.last = 0.0  # when a line was last drawn or written
        self.stopped = threading.Event()
        self.ticker = threading.Thread(target=self._tick, name="llm-parity-live", daemon=True)
        self.ticker.start()
        progress.listen(self.changed)

    def changed(self, step: Step | None) -> None:
        with self.lock, self._terminal():
            now = time.monotonic()
            steps = progress.steps()
            new = [s for s in steps if s not in self.steps]
            self.steps = steps
            self.hidden = None
            if not steps:
                self._wipe()
            elif self.tty and (new or now - self.last >= REDRAW_S
                               or (step is not None and step.done == step.total)):
                self._draw(steps, now)
            elif not self.tty and new:
                self._lines(new, now)
            elif not self.tty and now - self.last >= self.interval:
                self._lines(steps, now)

    def _tick(self) -> None:
        # Between updates (an engine starting, one long call) the clock still moves.
        while not self.stopped.wait(1.0):
            with self.lock:
                steps, now = self.steps, time.monotonic()
                if not steps or steps == self.hidden:
                    continue
                due = (now - self.last >= 1.0 if self.tty
                       else self.interval and now - self.last >= self.interval)
                if not due:
                    continue
            with self.lock, self._terminal():
                steps, now = self.steps, time.monotonic()
                if not steps or steps == self.hidden:
                    continue
                if self.tty and now - self.last >= 1.0:
                    self._draw(steps, now)
                elif not self.tty and self.interval and now - self.last >= self.interval:
                    self._lines(steps, now)

    def _terminal(self):
        """The terminal itself, past pytest's capture of the test that runs the suite."""
        if self.capture is None:
            return contextlib.nullcontext()
        return self.capture.global_and_fixture_disabled()

    def _draw(self, steps: tuple[Step, ...], now: float) -> None:
        writer = self.reporter._tw
        if not self.drawn:
            self.reporter.ensure_newline()
        width = max(40, writer.fullwidth - 1)
        # Two lanes (the reference beside an engine's start) share the line.
        share = (width - len("llm-parity: ")) // len(steps) - len(SEPARATOR)
        line = ("llm-parity: " + SEPARATOR.join(text(s, now, share) for s in steps))[:width]
        writer.write("\r" + line + "\x1b[K", flush=True)
        self.drawn = self.moved = True
        self.last = now
        # pytest writes the file's name again before its next result, on a line of its own.
        self.reporter.currentfspath = None

    def _wipe(self) -> None:
        if self.drawn:
            self.reporter._tw.write("\r\x1b[K", flush=True)
            self.drawn = False

    def _lines(self, steps, now: float) -> None:
        for step in steps:  # a line each: a log reads one step per line
            self.reporter.write_line("llm-parity: " + text(step, now))
        self.reporter.currentfspath = None
        self.moved = True
        self.last = now

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report) -> None:
        # pytest is about to write a result: our line goes first.
        with self.lock:
            self.hidden = self.steps
            if self.moved:
                self.moved = False
                with self._terminal():
                    self._wipe()
                    if self.reporter.verbosity <= 0:
                        # pytest writes this result's letter where it left its file's name:
                        # the name again first, on the line the live one held.
                        self.reporter.write_fspath_result(report.nodeid, "")

    def stop(self) -> None:
        progress.unlisten(self.changed)
        self.stopped.set()
        with self.lock, self._terminal():
            self._wipe()
            self.steps = ()


def setup(config: pytest.Config, interval: float) -> None:
    """The live line for this run, where a person or a log reads the terminal."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or config.get_verbosity() < 0 or hasattr(config, "workerinput"):
        return
    live = Live(reporter, config.pluginmanager.get_plugin("capturemanager"), interval)
    config.pluginmanager.register(live, "llm-parity-live")
    config.add_cleanup(live.stop)
