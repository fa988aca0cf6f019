"""Every engine answer is checked before any metric reads it: unnormalised log-probs
(raw logits, a top-k holding more than all the mass) are refused, naming where."""

from __future__ import annotations

import numpy as np
import pytest

from llm_parity.compare.answers import (
    NextToken,
    check_next_token,
    log_softmax,
    next_token_from_logits,
    top_k,
)
from llm_parity.errors import AnswerError, EngineError


def answer(logprobs, full=None):
    return NextToken(np.arange(len(logprobs)), np.asarray(logprobs, dtype=np.float64),
                     None if full is None else np.asarray(full, dtype=np.float64))


def test_real_log_probs_pass():
    view = next_token_from_logits(np.random.default_rng(0).normal(size=50), 5)
    check_next_token(view, k=5, vocab_size=50, where="p")


def test_raw_logits_are_refused_naming_the_largest_and_the_cause():
    with pytest.raises(AnswerError, match=r"prompt rag-01, position 3: top-k log-prob 15\.2 "
                                          r"\(rank 1, token 0\) is above 0.*raw_logits"):
        check_next_token(answer([15.2, 11.0, 9.0]), k=3, vocab_size=10,
                         where="candidate, prompt rag-01, position 3")


def test_a_top_k_holding_more_than_all_the_mass_is_refused():
    logprobs = np.log([0.6, 0.5, 0.1])  # each below 0, together 1.2
    with pytest.raises(AnswerError, match=r"hold a probability mass of 1\.2, more than 1"):
        check_next_token(answer(logprobs), k=3, vocab_size=10, where="p")


def test_full_vocabulary_rows_must_sum_to_one():
    full = np.log(np.full(8, 0.25))  # mass 2
    top = np.sort(full)[::-1][:3]
    with pytest.raises(AnswerError, match="full-vocabulary log-probs sum to a probability "
                                          "mass of 2"):
        check_next_token(answer(top, full), k=3, vocab_size=8, where="p")


def test_rounding_inside_the_tolerance_passes():
    check_next_token(answer([2e-4, -12.0]), k=2, vocab_size=10, where="p")


def test_an_answer_error_is_an_engine_error():
    assert issubclass(AnswerError, EngineError)  # a run stops on it like any engine failure


def test_a_full_vocabulary_answer_keeps_one_float32_row():
    import pickle

    logits = np.random.default_rng(1).normal(0, 4, 1000).astype(np.float32)
    view = next_token_from_logits(logits, 20)
    # One float32 row, the engine's own, and no float64 copy of it kept.
    assert view.logits.dtype == np.float32 and np.shares_memory(view.logits, logits)
    held = [getattr(view, name) for name in NextToken.__slots__]
    assert sum(a.nbytes for a in held if isinstance(a, np.ndarray)) <= 1000 * 4 + 20 * 16
    # The float64 log-probs, computed on each read, are log_softmax's to the last bit.
    assert view.full_logprobs.dtype == np.float64
    assert np.array_equal(view.full_logprobs, log_softmax(logits))
    assert list(view.token_ids) == list(np.argsort(-log_softmax(logits), kind="stable")[:20])
    assert np.array_equal(view.logprobs, log_softmax(logits)[view.token_ids])
    again = pickle.loads(pickle.dumps(view))  # as pytest-xdist workers exchange answers
    assert np.array_equal(again.full_logprobs, view.full_logprobs)


def test_top_k_is_the_stable_sort_of_the_whole_row():
    rng = np.random.default_rng(2)
    for _ in range(200):
        row = rng.integers(-6, 0, size=int(rng.integers(1, 60))).astype(np.float32)
        row[rng.random(row.size) < 0.1] = -np.inf
        for k in (1, 3, 20, 100):
            assert list(top_k(row, k)) == list(np.argsort(-row, kind="stable")[:k])
    row = np.array([-1.0, np.nan, -2.0, -0.5], dtype=np.float32)
    assert list(top_k(row, 2)) == list(np.argsort(-row, kind="stable")[:2])
