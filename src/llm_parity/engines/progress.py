"""What the engines are doing: each engine step (starting, scoring, decoding) is said once
on the `llm_parity` logger at INFO (`pytest --log-cli-level=INFO` shows it live, a CI log
shows where a slow run spends its time), and kept until the engine closes, so an
interrupted run's verdict can say what the signal interrupted.
"""

from __future__ import annotations

import logging

log = logging.getLogger("llm_parity")

_current: str | None = None  # the step under way; None when no engine is busy


def announce(step: str) -> None:
    """An engine begins `step` ("candidate (vllm): decoding 25 prompts")."""
    global _current
    _current = step
    log.info(step)


def settle() -> None:
    """An engine closed: no step is under way."""
    global _current
    _current = None


def current() -> str | None:
    return _current
