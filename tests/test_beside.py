"""Work beside an engine's start (runner/beside.py) and the progress lanes it is shown in
(engines/progress.py): each thread's step is its own, the main thread's first; the worker
leaves the engine a core while it starts and takes it back after; a cancel or an error
reaches the work at its next step and the caller, and nothing is left running."""

from __future__ import annotations

import threading

import pytest

from llm_parity.engines import progress
from llm_parity.errors import WorkCancelled
from llm_parity.runner.beside import Beside, threads_beside


def test_each_thread_has_its_own_step_and_the_main_threads_comes_first():
    progress.announce("candidate (vllm): starting")
    entered, leave = threading.Event(), threading.Event()

    def worker():
        progress.announce("reference (hf): decoding 4 prompts", 8, "tokens")
        progress.advance(3)
        entered.set()
        leave.wait(10)
        progress.settle()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert entered.wait(10)
        steps = progress.steps()
        assert [s.what for s in steps] == ["candidate (vllm): starting",
                                           "reference (hf): decoding 4 prompts"]
        assert steps[1].done == 3 and steps[0].done == 0  # advanced in its own lane only
        assert progress.current() == ("candidate (vllm): starting; "
                                      "reference (hf): decoding 4 prompts")
    finally:
        leave.set()
        thread.join()
    assert progress.current() == "candidate (vllm): starting"
    progress.settle()
    assert progress.steps() == ()


def test_the_worker_leaves_a_core_while_the_engine_starts_and_takes_it_back():
    import torch

    seen: list[int] = []
    went_on = threading.Event()

    def work():
        progress.announce("reference (hf): scoring 1 prompts", 1)
        seen.append(torch.get_num_threads())
        went_on.wait(10)
        progress.advance(1)  # the next step: the engine has started meanwhile
        seen.append(torch.get_num_threads())
        return "answers"

    main_threads = torch.get_num_threads()
    with Beside(work, threads=2, while_starting=1) as beside:
        beside.started()
        went_on.set()
        assert beside.result() == "answers"
    assert seen == [1, 2]
    assert torch.get_num_threads() == main_threads  # the main thread's own setting is its own
    assert threads_beside(1) == 1 and threads_beside(2) == 1 and threads_beside(16) == 15


def test_an_error_in_the_main_thread_cancels_the_work_at_its_next_step():
    steps = []

    def work():
        while True:  # ends only by being cancelled
            progress.announce(f"reference (hf): step {len(steps)}")
            steps.append(1)

    with pytest.raises(KeyboardInterrupt):
        with Beside(work, threads=1, while_starting=1) as beside:
            while not steps:
                pass
            raise KeyboardInterrupt  # a signal while the engine starts
    assert not beside.thread.is_alive()
    assert isinstance(beside.error, WorkCancelled)
    assert progress.steps() == ()  # the worker's lane ended with it


def test_the_works_own_error_is_raised_where_its_result_is_asked():
    def work():
        progress.announce("reference (hf): starting")
        raise ValueError("the reference could not load")

    with Beside(work, threads=1, while_starting=1) as beside:
        with pytest.raises(ValueError, match="could not load"):
            beside.result()
    assert not beside.thread.is_alive() and progress.steps() == ()
