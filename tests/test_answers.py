"""Every engine answer is checked before any metric reads it: unnormalised log-probs
(raw logits, a top-k holding more than all the mass) are refused, naming where."""

from __future__ import annotations

import numpy as np
import pytest

from llm_parity.compare.answers import NextToken, check_next_token, next_token_from_logits
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
