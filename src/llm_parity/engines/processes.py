"""The processes an engine starts (vLLM's EngineCore, its workers and their compilers), and
how they are stopped for sure, so that none outlives the run; and the guard that keeps a
signal during an engine's start from being swallowed.

Processes are found by what appeared under this one while the engine was built (psutil,
which vLLM depends on), not by vLLM's own handles: those do not exist yet when the start
itself is interrupted, and the workers are the EngineCore's children, which vLLM's shutdown
can orphan when it has to kill the EngineCore.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from llm_parity.errors import EngineStartInterrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 3.0  # between SIGTERM and SIGKILL, and after SIGKILL
# The same on the way out of an interrupted run, which must end in seconds: a busy vLLM
# worker takes 2-3 s over a graceful exit that nobody will wait for.
HURRIED_GRACE_S = 1.0


def _resource_tracker_pid() -> int | None:
    # multiprocessing's resource tracker starts with the first spawned process and serves
    # every later one: not the engine's, and it exits with this process.
    from multiprocessing import resource_tracker

    return getattr(getattr(resource_tracker, "_resource_tracker", None), "_pid", None)


def _alive(process: Any) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_processes(processes: list[Any], grace: float = GRACE_S,
                   steps: tuple[str, ...] = ("terminate", "kill")) -> list[Any]:
    """Each of `steps` in turn (SIGTERM, then SIGKILL), waiting up to `grace` seconds after
    each for the processes to go; returns any still alive. Zombies count as gone (their
    parent reaps them), and nothing is reaped here, so multiprocessing still sees its own
    children's exit codes."""
    import psutil

    for signal_them in steps:
        alive = [p for p in processes if _alive(p)]
        for process in alive:
            with contextlib.suppress(psutil.Error):
                getattr(process, signal_them)()
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p for p in alive if _alive(p)]
        if not alive:
            return []
    return alive


class EngineProcesses:
    """The processes one engine started: the children that appeared under this process
    while it was built (the resource tracker aside) and everything under them, kept by
    psutil handle (pid and start time, so a reused pid is never signalled)."""

    def __init__(self) -> None:
        import psutil

        self._me = psutil.Process()
        self._before = {p.pid for p in self._me.children()}
        self._roots: list[Any] | None = None  # set once the engine is up
        self.found: dict[int, Any] = {}

    def started(self) -> None:
        """The engine is up: its children are the ones there now. A later engine's are
        not this one's to stop."""
        self._roots = self._new_children()
        self.collect()

    def _new_children(self) -> list[Any]:
        tracker = _resource_tracker_pid()
        return [c for c in self._me.children()
                if c.pid not in self._before and c.pid != tracker]

    def collect(self) -> None:
        """Add what is under the engine's children now (workers, compile helpers); call
        it before a shutdown can orphan them."""
        import psutil

        roots = self._new_children() if self._roots is None else self._roots
        for child in roots:
            self.found.setdefault(child.pid, child)
            with contextlib.suppress(psutil.Error):
                for below in child.children(recursive=True):
                    self.found.setdefault(below.pid, below)

    def stop(self, grace: float = GRACE_S) -> list[Any]:
        """Stop every process found (signals held meanwhile); returns any that survived."""
        with signals_held():
            self.collect()
            return stop_processes(list(self.found.values()), grace)

    def kill(self) -> None:
        """SIGKILL at once: for an engine whose start was interrupted. vLLM's EngineCore
        defers a SIGTERM until it has finished starting, so a graceful stop would only wait
        out vLLM's 5 s before it kills them itself."""
        self.collect()
        stop_processes(list(self.found.values()), steps=("kill",))


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _take(handler: Any) -> dict[int, Any]:
    """Install `handler` for SIGINT and SIGTERM where Python handles them (not ignored, not
    set from C); returns the handlers it replaced."""
    previous: dict[int, Any] = {}
    if not _main_thread():
        return previous
    for signum in STOP_SIGNALS:
        old = signal.getsignal(signum)
        if old in (signal.SIG_IGN, None):
            continue
        previous[signum] = old
        signal.signal(signum, handler)
    return previous


def _give_back(previous: dict[int, Any]) -> None:
    for signum, old in previous.items():
        signal.signal(signum, old)


@contextlib.contextmanager
def start_guard(processes: EngineProcesses) -> Iterator[None]:
    """While an engine starts, SIGINT and SIGTERM kill its processes and raise
    EngineStartInterrupted (which no `except KeyboardInterrupt` or `except Exception` in the
    engine's code catches); the caller then `redeliver`s the signal to the handler it had."""

    fired: list[int] = []

    def interrupted(signum: int, frame: Any) -> None:
        __tracebackhide__ = True  # pytest shows where the engine was, not this handler
        if fired:
            return  # a second signal: the first is stopping the engine already
        fired.append(signum)
        processes.kill()
        raise EngineStartInterrupted(signum)

    previous = _take(interrupted)
    try:
        yield
    finally:
        _give_back(previous)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait while processes are being stopped (a second Ctrl-C, or the
    SIGTERM CI sends after its SIGINT, must not cut the stop short and orphan a worker),
    then each goes to its own handler."""
    pending: list[int] = []
    previous = _take(lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        _give_back(previous)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


def redeliver(signum: int) -> None:
    """Send `signum` to this process again, now that its own handler is back: it raises
    KeyboardInterrupt (or Terminated under the pytest plugin), or ends the process if the
    handler is the default."""
    __tracebackhide__ = True
    signal.raise_signal(signum)
