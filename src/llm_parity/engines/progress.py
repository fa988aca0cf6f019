"""What the engines are doing: each engine step (starting, scoring, decoding) is said once
on the `llm_parity` logger at INFO (`pytest --log-cli-level=INFO` shows it live, a CI log
shows where a slow run spends its time), and kept until the engine closes, so an
interrupted run's verdict can say what the signal interrupted.

A step may have a size (`total` prompts or tokens) that the engine advances as it works;
listeners (the pytest plugin's live line, pytest_plugin/live.py) hear each change.

Steps are kept per thread (a lane): while the candidate's engine starts in the main
thread, the reference may compute in another (runner/beside.py), and both are under way.
A thread may also be given a check (`checked`) that each of its steps' changes calls: the
work beside an engine's start is cancelled, or given its cores back, through it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger("llm_parity")


@dataclass(eq=False)
class Step:
    what: str  # "candidate (vllm): decoding 25 prompts"
    total: int | None = None  # how many `unit` the step has, when it is known
    unit: str = "prompts"
    done: int = 0
    started: float = field(default_factory=time.monotonic)


_steps: dict[int, Step] = {}  # thread -> the step under way there
_phases: dict[int, Step] = {}  # thread -> a step made of many engine calls, counted by its caller
_checks: dict[int, Callable[[], None]] = {}  # thread -> called at each change of its steps
_listeners: list[Callable[[Step | None], None]] = []
_lock = threading.Lock()


def announce(step: str, total: int | None = None, unit: str = "prompts") -> None:
    """An engine begins `step` ("candidate (vllm): decoding 25 prompts"), of `total` units
    when it can count them."""
    lane = _check()
    log.info(step)
    if lane in _phases:
        return  # one call of a phase: the phase is what is shown
    with _lock:
        _steps[lane] = now = Step(step, total, unit)
    _tell(now)


def advance(count: int = 1) -> None:
    """`count` more units of the step under way are done (an engine's own count)."""
    lane = _check()
    under_way = _steps.get(lane)
    if under_way is not None and lane not in _phases:
        under_way.done += count
        _tell(under_way)


@contextlib.contextmanager
def phase(what: str, total: int, unit: str = "prompts") -> Iterator[Callable[[int], None]]:
    """A step its caller counts over many engine calls (the noise floor asks batch by
    batch): yields the function that advances it."""
    lane = _check()
    counted = Step(what, total, unit)

    def done(count: int) -> None:
        _check()
        if _phases.get(lane) is counted:
            counted.done += count
            _tell(counted)

    with _lock:
        _phases[lane] = _steps[lane] = counted
    log.info(what)
    _tell(counted)
    try:
        yield done
    finally:
        with _lock:
            _phases.pop(lane, None)


def settle() -> None:
    """An engine closed (or is idle): no step is under way in this thread."""
    with _lock:
        _steps.pop(threading.get_ident(), None)
    _tell(None)


@contextlib.contextmanager
def checked(check: Callable[[], None]) -> Iterator[None]:
    """In this thread, `check` is called at each change of a step (it may raise, to stop
    the work); this thread's steps end with the block."""
    lane = threading.get_ident()
    _checks[lane] = check
    try:
        yield
    finally:
        _checks.pop(lane, None)
        with _lock:
            _steps.pop(lane, None)
            _phases.pop(lane, None)
        _tell(None)


def current() -> str | None:
    """What is under way, every lane's step ("; " between them), the main thread's first."""
    found = steps()
    return "; ".join(s.what for s in found) if found else None


def steps() -> tuple[Step, ...]:
    """The steps under way, the main thread's first."""
    main = threading.main_thread().ident
    with _lock:
        lanes = sorted(_steps.items(), key=lambda item: item[0] != main)
    return tuple(s for _, s in lanes)


def step() -> Step | None:
    found = steps()
    return found[0] if found else None


def listen(listener: Callable[[Step | None], None]) -> None:
    _listeners.append(listener)


def unlisten(listener: Callable[[Step | None], None]) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def _check() -> int:
    lane = threading.get_ident()
    check = _checks.get(lane)
    if check is not None:
        check()
    return lane


def _tell(changed: Step | None) -> None:
    for listener in list(_listeners):
        listener(changed)
