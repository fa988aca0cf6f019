"""The public fixtures: checks of your own, in your conftest.py or test files, on the
engines the suite already loaded (nothing is loaded twice).

- `parity`: the session state (settings, and the precision run on demand).
- `parity_run`: the precision run: `.precision` (every view's per-position results and
  the gates judged), `.candidate`, `.reference`, `.thresholds`, `.timings`.
- `parity_reference`, `parity_candidate`: the loaded engines (`next_token`, `score`,
  `greedy` on token ids; plain numpy arrays back).
- `parity_compare(text, prompt_id="extra", continuation=0)`: one more prompt compared;
  returns {"first_token": PromptResult, "sequence": PromptResult (with continuation)}, each
  with `.positions[i].comparison` (kl, cosine, js, top1_match, ...).

Asking for the engines keeps them open until the session ends; runs that do not ask
release each engine as soon as its answers are in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from llm_parity.errors import RUN_ERRORS
from llm_parity.pytest_plugin.state import parity_session

ENGINE_FIXTURES = frozenset({"parity_reference", "parity_candidate", "parity_compare"})


@pytest.fixture(scope="session")
def parity(request: pytest.FixtureRequest):
    """The session's llm-parity state: settings, and the precision run on demand."""
    return parity_session(request.config)


@pytest.fixture(scope="session")
def parity_run(parity, record_testsuite_property):
    """The precision comparison, computed once; a failed run fails every test that needs it."""
    try:
        run = parity.precision()
    except RUN_ERRORS as exc:
        pytest.fail(f"llm-parity: {exc}", pytrace=False)
    for key, value in parity.environment.items():
        if value is not None:
            record_testsuite_property(key, value)
    return run


@pytest.fixture(scope="session")
def parity_reference(parity, parity_run) -> Any:
    """The float32 reference engine, as loaded by the run."""
    from llm_parity.runner.extra import reference_engine

    return reference_engine(parity)


@pytest.fixture(scope="session")
def parity_candidate(parity, parity_run) -> Any:
    """The candidate engine under test, as loaded by the run."""
    from llm_parity.runner.extra import candidate_engine

    return candidate_engine(parity)


@pytest.fixture(scope="session")
def parity_compare(parity, parity_run) -> Callable[..., dict]:
    """compare(text, prompt_id="extra", continuation=0) -> per-view PromptResult."""
    from llm_parity.runner.extra import compare_prompt

    def compare(text: str, prompt_id: str = "extra", continuation: int = 0) -> dict:
        try:
            return compare_prompt(parity, text, prompt_id=prompt_id, continuation=continuation)
        except RUN_ERRORS as exc:
            pytest.fail(f"llm-parity: {exc}", pytrace=False)

    return compare
