"""The precision comparison: reference and candidate answers in, per-prompt results and
gate outcomes out. Plain data only; nothing here knows which engine produced the arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_parity.engines.base import NextToken
from llm_parity.metrics import PositionComparison, compare_position
from llm_parity.prompts import Prompt
from llm_parity.thresholds import Gate, GateResult, Thresholds

# Metrics summarised in the verdict's "aggregate" block, as <metric>_mean.
HEADLINE_METRICS = ("cosine", "kl", "js", "spearman", "mae")


@dataclass
class PositionResult:
    """One compared position: the metrics plus what a reader needs to see the tokens."""

    position: int  # index in the scored sequence of the token whose successor is compared
    comparison: PositionComparison
    near_tie: bool  # a top-1 flip inside the near-tie margin (bf16 rounding can cause it)
    reference_top1_text: str = ""
    candidate_top1_text: str = ""

    @property
    def defect(self) -> bool:
        return not self.comparison.top1_match and not self.near_tie

    def value(self, metric: str) -> Any:
        if metric == "top1_defect":
            return self.defect
        return getattr(self.comparison, metric)


@dataclass
class PromptResult:
    prompt: Prompt
    token_count: int
    positions: list[PositionResult]
    gate_results: list[GateResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.gate_results)

    @property
    def first(self) -> PositionResult:
        return self.positions[0]

    def values(self, metric: str) -> list[Any]:
        return [p.value(metric) for p in self.positions]


@dataclass
class PrecisionResult:
    prompts: list[PromptResult]
    gate_results: list[GateResult]
    near_tie_margin: float
    k: int

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.gate_results) and all(p.passed for p in self.prompts)

    def values(self, metric: str) -> list[Any]:
        return [v for p in self.prompts for v in p.values(metric)]

    def has_metric(self, metric: str) -> bool:
        return all(v is not None for v in self.values(metric))

    def aggregate(self) -> dict[str, float]:
        from llm_parity.metrics import aggregate

        out = {"top1_match_rate": aggregate(self.values("top1_match"), "rate")}
        for metric in HEADLINE_METRICS:
            out[f"{metric}_mean"] = aggregate(self.values(metric), "mean")
        out["p_tail_max"] = aggregate(self.values("p_tail"), "max")
        return out

    @property
    def flips(self) -> list[tuple[PromptResult, PositionResult]]:
        return [(p, pos) for p in self.prompts for pos in p.positions
                if not pos.comparison.top1_match]


def compare_prompts(
    prompts: Sequence[Prompt],
    token_ids: Sequence[Sequence[int]],
    reference: Sequence[NextToken],
    candidate: Sequence[NextToken],
    thresholds: Thresholds,
    *,
    k: int,
    decode: Callable[[int], str] = str,
) -> PrecisionResult:
    """First-token comparison of every prompt, then every gate evaluated."""
    results = []
    for prompt, ids, ref, cand in zip(prompts, token_ids, reference, candidate, strict=True):
        assert ref.full_logprobs is not None, "the reference must expose the full vocabulary"
        comparison = compare_position(
            ref.full_logprobs, cand.token_ids[:k], cand.logprobs[:k], cand.full_logprobs
        )
        position = PositionResult(
            position=len(ids) - 1,
            comparison=comparison,
            near_tie=(not comparison.top1_match)
            and comparison.top1_margin < thresholds.near_tie_margin,
            reference_top1_text=decode(comparison.reference_top1),
            candidate_top1_text=decode(comparison.candidate_top1),
        )
        results.append(PromptResult(prompt, len(ids), [position]))
    return evaluate_gates(results, thresholds, k=k)


def evaluate_gates(
    results: list[PromptResult], thresholds: Thresholds, *, k: int
) -> PrecisionResult:
    for prompt in results:
        prompt.gate_results = [
            _evaluate(gate, prompt.values(gate.metric)) for gate in thresholds.prompt_gates
        ]
    precision = PrecisionResult(results, [], thresholds.near_tie_margin, k)
    precision.gate_results = [
        _evaluate(gate, precision.values(gate.metric)) for gate in thresholds.gates
    ]
    return precision


def _evaluate(gate: Gate, values: list[Any]) -> GateResult:
    if any(v is None for v in values):
        # A full-vocabulary metric on a top-k-only candidate: the gate cannot be judged.
        return GateResult(gate, float("nan"), False)
    return gate.evaluate(values)
