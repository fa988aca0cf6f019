"""What the engines are doing: each engine step (starting, scoring, decoding) is said once
on the `llm_parity` logger at INFO (`pytest --log-cli-level=INFO` shows it live, a CI log
shows where a slow run spends its time), and kept until the engine closes, so an
interrupted run's verdict can say what the signal interrupted.

A step may have a size (`total` prompts or tokens) that the engine advances as it works;
listeners (the pytest plugin's live line, pytest_plugin/live.py) hear each change.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger("llm_parity")


@dataclass
class Step:
    what: str  # "candidate (vllm): decoding 25 prompts"
    total: int | None = None  # how many `unit` the step has, when it is known
    unit: str = "prompts"
    done: int = 0
    started: float = field(default_factory=time.monotonic)


_current: Step | None = None  # the step under way; None when no engine is busy
_phase: Step | None = None  # a step made of many engine calls, counted by its caller
_listeners: list[Callable[[Step | None], None]] = []


def announce(step: str, total: int | None = None, unit: str = "prompts") -> None:
    """An engine begins `step` ("candidate (vllm): decoding 25 prompts"), of `total` units
    when it can count them."""
    global _current
    log.info(step)
    if _phase is not None:
        return  # one call of a phase: the phase is what is shown
    _current = Step(step, total, unit)
    _tell()


def advance(count: int = 1) -> None:
    """`count` more units of the step under way are done (an engine's own count)."""
    if _current is not None and _phase is None:
        _current.done += count
        _tell()


@contextlib.contextmanager
def phase(what: str, total: int, unit: str = "prompts") -> Iterator[Callable[[int], None]]:
    """A step its caller counts over many engine calls (the noise floor asks batch by
    batch): yields the function that advances it."""
    global _current, _phase

    def done(count: int) -> None:
        if _phase is not None:
            _phase.done += count
            _tell()

    _phase = _current = Step(what, total, unit)
    log.info(what)
    _tell()
    try:
        yield done
    finally:
        _phase = None


def settle() -> None:
    """An engine closed: no step is under way."""
    global _current
    _current = None
    _tell()


def current() -> str | None:
    return _current.what if _current is not None else None


def step() -> Step | None:
    return _current


def listen(listener: Callable[[Step | None], None]) -> None:
    _listeners.append(listener)


def unlisten(listener: Callable[[Step | None], None]) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def _tell() -> None:
    for listener in list(_listeners):
        listener(_current)
