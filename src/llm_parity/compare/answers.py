"""What an engine answers, as plain arrays, and the checks every answer passes before any
metric reads it. Engines build these; the comparison reads them; neither knows the other.

A full-vocabulary answer keeps one row per position: the engine's float32 logits, with the
two constants that normalise them. Its float64 log-probs are computed again, bit for bit,
each time a metric reads them, one row at a time, and dropped after. At a vocabulary of
262,144 (Gemma 3) that is 1 MiB a position where the logits plus a float64 log-prob row
were 3, and a run holds thousands of positions (the reference's, a full-vocabulary
candidate's). Rounding the log-probs themselves to float32 would have cost the same memory
but moved KL by up to 5e-4 relative (it is a sum of small differences of log-probs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_parity.errors import AnswerError, EngineError

# Log-probs are normalised over the whole vocabulary: none is above 0 and the top-k hold at
# most all the mass. Engines compute them in float32; this leaves room for its rounding.
NORMALISATION_TOLERANCE = 1e-3


class NextToken:
    """An engine's view of the next token at one position.

    `token_ids` and `logprobs` are its top-k, ordered by rank; `full_logprobs` is the whole
    vocabulary in float64 when the engine exposes it (the reference always does). Given
    `logits` (a float32 row, memory-mapped from a golden store or not), it is not kept but
    computed from them on each read: `(logits - shift) - norm` in float64, the very numbers
    `next_token_from_logits` ranked. A row given as `full_logprobs` is kept as it is.
    """

    __slots__ = ("token_ids", "logprobs", "logits", "shift", "norm", "_full")

    def __init__(self, token_ids: np.ndarray, logprobs: np.ndarray,
                 full_logprobs: np.ndarray | None = None, *, logits: np.ndarray | None = None,
                 shift: float = 0.0, norm: float = 0.0) -> None:
        self.token_ids, self.logprobs, self._full = token_ids, logprobs, full_logprobs
        self.logits, self.shift, self.norm = logits, shift, norm

    @property
    def full_logprobs(self) -> np.ndarray | None:
        if self.logits is None:
            return self._full
        row = self.logits.astype(np.float64)  # one new array, worked on in place
        row -= self.shift
        row -= self.norm
        return row

    def __getstate__(self) -> tuple:  # pickled between pytest-xdist workers (exchange.py)
        return self.token_ids, self.logprobs, self.logits, self.shift, self.norm, self._full

    def __setstate__(self, state: tuple) -> None:
        (self.token_ids, self.logprobs, self.logits, self.shift, self.norm,
         self._full) = state

    def __repr__(self) -> str:
        full = "logits" if self.logits is not None else (
            "full" if self._full is not None else "top-k")
        return f"NextToken(top {list(self.token_ids[:3])}..., {full})"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Full-vocabulary log-probs in float64 from one row of logits (any float dtype)."""
    row = np.asarray(logits, dtype=np.float64)
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())


def next_token_from_logits(logits: np.ndarray, k: int) -> NextToken:
    """The view of a full-vocabulary engine: float64 log-probs (as `log_softmax`), top-k by
    rank (stable), the float32 row kept as it is (a memory-mapped row stays mapped)."""
    logits = np.asarray(logits, dtype=np.float32)
    row = logits.astype(np.float64)
    shift = row.max()
    row -= shift
    norm = np.log(np.exp(row).sum())
    row -= norm  # the float64 row lives only until the top-k are taken
    top = top_k(row, k)
    return NextToken(top, row[top], logits=logits, shift=shift, norm=norm)


def top_k(row: np.ndarray, k: int) -> np.ndarray:
    """Indexes of the k largest values, largest first, equal values in index order: what
    `np.argsort(-row, kind="stable")[:k]` gives, without sorting the whole vocabulary."""
    k = min(k, row.size)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k == row.size or np.isnan(row).any():  # NaN: the sort's order; the check names it
        return np.argsort(-row, kind="stable")[:k]
    bound = np.partition(row, row.size - k)[row.size - k]  # the k-th largest
    above = np.flatnonzero(row > bound)
    tied = np.flatnonzero(row == bound)[: k - above.size]
    chosen = np.concatenate([above, tied])
    return chosen[np.lexsort((chosen, -row[chosen]))]


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
    full = result.full_logprobs  # computed once here: a float64 row at a time
    for name, values in (("top-k log-probs", result.logprobs), ("logits", full)):
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
    _check_normalised(result, full, where)


def _check_normalised(result: NextToken, full: np.ndarray | None, where: str) -> None:
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
    if full is not None:
        full = np.asarray(full, dtype=np.float64)
        peak = full.max()
        total = peak + np.log(np.exp(full - peak).sum())
        if abs(total) > NORMALISATION_TOLERANCE:
            raise AnswerError(
                f"{where}: the full-vocabulary log-probs sum to a probability mass of "
                f"{np.exp(total):.6g}, not 1; {cause}")


def check_depth_lengths(role: str, depth, answers: dict[str, Any],
                         sequences: list[list[int]] | None, continuation: int) -> None:
    """Every prompt answered, and at every step asked: a short answer would be judged on
    fewer positions without a word."""
    prompts, prompt_ids = depth
    for kind in ("decoded", "decode", "sequence"):
        if kind not in answers:
            continue
        if len(answers[kind]) != len(prompts):
            raise EngineError(f"{role}: {kind} answered {len(answers[kind])} prompts of "
                              f"{len(prompts)}")
        for i, (prompt, answer) in enumerate(zip(prompts, answers[kind])):
            if kind == "sequence":
                asked = len(sequences[i]) - len(prompt_ids[i]) if sequences else 0
                got = len(answer)
            else:
                asked, got = continuation, len(answer.steps)
                if len(answer.token_ids) != got:
                    raise EngineError(f"{role}, prompt {prompt.id}: decoding returned "
                                      f"{len(answer.token_ids)} tokens for {got} steps")
            if got != asked:
                what = "scored" if kind == "sequence" else "decoded"
                raise EngineError(f"{role}, prompt {prompt.id}: {what} {got} positions of the "
                                  f"{asked} asked (--continuation {continuation})")
