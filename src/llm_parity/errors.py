"""Every error and warning type of llm-parity. A leaf: it imports nothing of the package.

Each message is meant to be read on its own: it names the file, option, prompt or engine
concerned and what was expected.
"""

from __future__ import annotations

import signal


class ParityError(Exception):
    """Base of the errors a run reports as a plain message, without a traceback."""


# ---------------------------------------------------------------- input, before any model


class SettingsError(ParityError, ValueError):
    """An option that cannot be used, with the option named."""


class ThresholdsError(ParityError, ValueError):
    """A thresholds file that does not match the schema."""


class PromptsError(ParityError, ValueError):
    """A prompt file that cannot be used."""


class ModelError(ParityError, ValueError):
    """A model that cannot be found or is not a usable checkpoint."""


class StoreError(ParityError, ValueError):
    """A reference store that cannot be used: stale, unreadable or malformed."""


class ParityInputError(ParityError, ValueError):
    """Inputs that cannot be compared (e.g. tokenizers that disagree)."""


# ---------------------------------------------------------------- engines and answers


class EngineError(ParityError, RuntimeError):
    """An engine that could not be built, died, or answered something unusable."""


class AnswerError(EngineError):
    """An engine's answer that no comparison may read: NaN, +inf, or log-probs that are not
    normalised (a positive log-prob, a top-k holding more than all the mass)."""


# ---------------------------------------------------------------- interruptions


class Terminated(KeyboardInterrupt):
    """SIGTERM (what CI sends to a cancelled job), raised in the main thread: a
    KeyboardInterrupt, so pytest ends the session as on Ctrl-C (the engines closed, the
    verdict written) and no `except Exception` on the way stops it."""

    signum = signal.SIGTERM

    def __init__(self) -> None:
        super().__init__("SIGTERM")


class EngineStartInterrupted(BaseException):
    """A signal while an engine's processes start. Not a KeyboardInterrupt: vLLM's engine
    handshake swallows those (vllm.utils.network_utils.zmq_socket_ctx) and then waits
    VLLM_ENGINE_READY_TIMEOUT_S (600 s) for an engine that is gone. The engine turns it back
    into the signal's own exception once its processes are stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# ---------------------------------------------------------------- performance


class PerformanceError(ParityError, RuntimeError):
    """A benchmark that could not measure what it was asked to."""


class ModeUnsupported(PerformanceError):
    """The candidate backend has no such execution mode."""


class MissingBenchmark(ParityError, LookupError):
    """A gate whose inputs were not measured."""


class SpreadWarning(UserWarning):
    """Rounds that disagree too much for a figure, or a gate, to rest on them."""


# ---------------------------------------------------------------- verdict files


class VerdictFileError(ParityError, ValueError):
    """A file that is not a verdict this version can compare."""


class VerdictSchemaError(ParityError, ValueError):
    """A verdict that does not match the schema; the message lists every violation."""


# What a failed precision run raises to the tests: each message is enough on its own.
RUN_ERRORS = (EngineError, ModelError, ParityInputError, StoreError)


class WorkCancelled(BaseException):
    """Raised inside work running beside an engine's start (runner/beside.py) when the run
    stops it: the engine failed to start, or a signal ended the run. Not an Exception, so no
    `except Exception` on the way keeps the work going."""
