"""What an engine answers, as plain arrays, and the checks every answer passes before any
metric reads it. Engines build these; the comparison reads them; neither knows the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_parity.errors import AnswerError

# Log-probs are normalised over the whole vocabulary: none is above 0 and the top-k hold at
# most all the mass. Engines compute them in float32; this leaves room for its rounding.
NORMALISATION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class NextToken:
    """An engine's view of the next token at one position.

    `token_ids` and `logprobs` are its top-k, ordered by rank; `full_logprobs` is the whole
    vocabulary when the engine exposes it (the reference always does).
    """

    token_ids: np.ndarray
    logprobs: np.ndarray
    full_logprobs: np.ndarray | None = None
    # The float32 logits `full_logprobs` was computed from, where the engine has them: a
    # golden reference store keeps these and rebuilds the row bit for bit.
    logits: np.ndarray | None = None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Full-vocabulary log-probs in float64 from one row of logits (any float dtype)."""
    row = np.asarray(logits, dtype=np.float64)
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())


def next_token_from_logits(logits: np.ndarray, k: int) -> NextToken:
    """The view of a full-vocabulary engine: float64 log-probs, top-k by rank (stable)."""
    logits = np.asarray(logits, dtype=np.float32)
    row = log_softmax(logits)
    top = np.argsort(-row, kind="stable")[:k]
    return NextToken(token_ids=top, logprobs=row[top], full_logprobs=row, logits=logits)


@dataclass(frozen=True)
class Decoded:
    """What greedy decoding produced: the tokens, and the view before each of them."""

    token_ids: list[int]
    steps: list[NextToken]


def check_next_token(result: NextToken, *, k: int, vocab_size: int, where: str) -> None:
    """Reject an answer the metrics cannot use, naming the prompt and what was wrong."""
    if len(result.token_ids) < min(k, vocab_size):
        raise AnswerError(
            f"{where}: returned {len(result.token_ids)} log-probs, asked for {k} "
            "(the engine may cap them: raise its max_logprobs, or lower --logprobs)"
        )
    for name, values in (("top-k log-probs", result.logprobs), ("logits", result.full_logprobs)):
        if values is None:
            continue
        bad = np.flatnonzero(np.isnan(values) | np.isposinf(values))
        if bad.size:
            raise AnswerError(
                f"{where}: {bad.size} NaN or infinite {name} (first at index {bad[0]}); "
                "the model produced non-finite numbers"
            )
    if np.isneginf(result.logprobs[0]):
        raise AnswerError(f"{where}: the rank-1 log-prob is -inf; the distribution is empty")
    _check_normalised(result, where)


def _check_normalised(result: NextToken, where: str) -> None:
    """Log-probs above 0, or a top-k that holds more than all the mass, are not log-probs
    (raw or processed logits, or a missing log-softmax): every metric on them is fiction."""
    logprobs = np.asarray(result.logprobs, dtype=np.float64)
    finite = logprobs[np.isfinite(logprobs)]
    cause = ("the engine returned scores that are not normalised log-probs; with vLLM, "
             "logprobs_mode must be raw_logprobs or processed_logprobs, not raw_logits or "
             "processed_logits")
    if finite.size and finite.max() > NORMALISATION_TOLERANCE:
        at = int(np.argmax(logprobs))
        raise AnswerError(
            f"{where}: top-k log-prob {finite.max():.6g} (rank {at + 1}, token "
            f"{int(result.token_ids[at])}) is above 0; {cause}")
    mass = float(np.exp(finite).sum()) if finite.size else 0.0
    if mass > 1.0 + NORMALISATION_TOLERANCE:
        raise AnswerError(
            f"{where}: the top-{len(logprobs)} log-probs hold a probability mass of "
            f"{mass:.6g}, more than 1; {cause}")
    if result.full_logprobs is not None:
        full = np.asarray(result.full_logprobs, dtype=np.float64)
        peak = full.max()
        total = peak + np.log(np.exp(full - peak).sum())
        if abs(total) > NORMALISATION_TOLERANCE:
            raise AnswerError(
                f"{where}: the full-vocabulary log-probs sum to a probability mass of "
                f"{np.exp(total):.6g}, not 1; {cause}")
