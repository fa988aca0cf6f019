"""A run's comparison with the reference: one engine's answers set against the
reference's in every view (first token, teacher-forced, free decode), the gates judged once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llm_parity.compare.precision import (
    PrecisionResult,
    PromptResult,
    compare_decodes,
    compare_prompts,
    compare_sequences,
    judge,
)
from llm_parity.runner.floor import floor_skip_reason


class Comparison:
    """Compare one engine's answers with the reference in every view; judge the gates once."""

    def __init__(self, settings, tokenizer, token_ids, depth, reference, thresholds, k):
        from llm_parity.runner.tokenization import token_text

        self.settings, self.tokenizer, self.token_ids = settings, tokenizer, token_ids
        self.depth, self.reference, self.thresholds, self.k = depth, reference, thresholds, k
        self.decode = lambda token: token_text(tokenizer, token)

    def views(self, answers: dict[str, Any], first: Sequence[int] | None = None,
              depth: Sequence[int] | None = None) -> dict[str, list[PromptResult]]:
        """Every view compared. `first` and `depth` are the indexes of the first-token and
        depth prompts `answers` holds, all of them by default: the noise floor is compared
        one batch at a time, as its engine answers."""
        margin, k, decode = self.thresholds.near_tie_margin, self.k, self.decode
        first = range(len(self.token_ids)) if first is None else first
        views = {"first_token": compare_prompts(
            [self.settings.prompts.prompts[i] for i in first],
            [self.token_ids[i] for i in first], [self.reference["first"][i] for i in first],
            answers["first"], near_tie_margin=margin, k=k, decode=decode)}
        if self.depth:
            rows = range(len(self.depth[1])) if depth is None else depth
            prompts, ids, decoded = ([values[i] for i in rows] for values in (
                *self.depth, self.reference["decoded"]))
            views["sequence"] = compare_sequences(
                prompts, ids, decoded, answers.get("sequence", []), near_tie_margin=margin,
                k=k, decode=decode)
            views["decode"] = compare_decodes(
                prompts, ids, decoded, answers.get("decode", []), near_tie_margin=margin, k=k,
                decode=decode,
                text=lambda tokens: self.tokenizer.decode(list(tokens), skip_special_tokens=False))
        return views

    def judge(self, answers: dict[str, Any], noise_floor: Any = None) -> PrecisionResult:
        return judge(
            self.views(answers), self.thresholds, k=self.k, noise_floor=noise_floor,
            floor_missing=floor_skip_reason(self.settings) or "it was not measured",
            depth_missing=None if self.depth else (
                "the depth views did not run (--continuation 0)"),
            strict=self.settings.strict_gates,
        )
