"""The precision comparison: reference and candidate answers in, per-prompt results and
gate outcomes out. Plain data only; nothing here knows which engine produced the arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_parity.engines.base import Decoded, NextToken
from llm_parity.metrics import PositionComparison, compare_position
from llm_parity.prompts import Prompt
from llm_parity.thresholds import Gate, GateResult, Thresholds

# Metrics summarised in the verdict's "aggregate" block, as <metric>_mean.
HEADLINE_METRICS = ("cosine", "kl", "js", "spearman", "mae")
# What a gate can be over: the founding protocol's first generated token, every position
# of a teacher-forced continuation (prefill path), or free-running greedy decoding.
VIEWS = ("first_token", "sequence", "decode")


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
class Divergence:
    """Where free-running decoding first chose another token than the reference."""

    step: int
    reference_token: str
    candidate_token: str
    reference_margin: float
    near_tie: bool
    context: str  # the text just before the divergent token


@dataclass
class PromptResult:
    prompt: Prompt
    token_count: int
    positions: list[PositionResult]
    gate_results: list[GateResult] = field(default_factory=list)
    view: str = "first_token"
    steps: int = 0  # decode: steps generated; the positions compared stop at the divergence
    divergence: Divergence | None = None

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
    sequences: list[PromptResult] = field(default_factory=list)
    decodes: list[PromptResult] = field(default_factory=list)
    noise_floor: Any = None  # llm_parity.noise_floor.NoiseFloor, when it was measured

    def view(self, name: str) -> list[PromptResult]:
        return {"first_token": self.prompts, "sequence": self.sequences,
                "decode": self.decodes}[name]

    @property
    def all_prompt_results(self) -> list[PromptResult]:
        return [*self.prompts, *self.sequences, *self.decodes]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.gate_results) and all(
            p.passed for p in self.all_prompt_results
        )

    def values(self, metric: str, view: str = "first_token") -> list[Any]:
        return [v for p in self.view(view) for v in p.values(metric)]

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
    """First-token comparison of every prompt (the founding protocol)."""
    results = []
    for prompt, ids, ref, cand in zip(prompts, token_ids, reference, candidate, strict=True):
        position = compare_view(len(ids) - 1, ref, cand, thresholds.near_tie_margin, k, decode)
        results.append(PromptResult(prompt, len(ids), [position]))
    return evaluate_gates(PrecisionResult(results, [], thresholds.near_tie_margin, k), thresholds)


def compare_view(
    position: int,
    reference: NextToken,
    candidate: NextToken,
    near_tie_margin: float,
    k: int,
    decode: Callable[[int], str],
) -> PositionResult:
    assert reference.full_logprobs is not None, "the reference must expose the full vocabulary"
    comparison = compare_position(
        reference.full_logprobs, candidate.token_ids[:k], candidate.logprobs[:k],
        candidate.full_logprobs,
    )
    return PositionResult(
        position=position,
        comparison=comparison,
        near_tie=(not comparison.top1_match) and comparison.top1_margin < near_tie_margin,
        reference_top1_text=decode(comparison.reference_top1),
        candidate_top1_text=decode(comparison.candidate_top1),
    )


def compare_sequences(
    prompts: Sequence[Prompt],
    token_ids: Sequence[Sequence[int]],
    reference: Sequence[Decoded],
    candidate: Sequence[Sequence[NextToken]],
    *,
    near_tie_margin: float,
    k: int,
    decode: Callable[[int], str] = str,
) -> list[PromptResult]:
    """Teacher-forced: the candidate scored prompt + the reference's continuation; every
    position of the continuation is compared with the reference's view there."""
    results = []
    for prompt, ids, ref, cand in zip(prompts, token_ids, reference, candidate, strict=True):
        positions = [
            compare_view(len(ids) - 1 + j, r, c, near_tie_margin, k, decode)
            for j, (r, c) in enumerate(zip(ref.steps, cand, strict=True))
        ]
        results.append(PromptResult(prompt, len(ids), positions, view="sequence",
                                    steps=len(positions)))
    return results


def compare_decodes(
    prompts: Sequence[Prompt],
    token_ids: Sequence[Sequence[int]],
    reference: Sequence[Decoded],
    candidate: Sequence[Decoded],
    *,
    near_tie_margin: float,
    k: int,
    decode: Callable[[int], str] = str,
    text: Callable[[Sequence[int]], str] = str,
) -> list[PromptResult]:
    """Free-running: compare each step while the candidate's tokens equal the reference's;
    the first divergent step is still compared (same prefix) and then reported."""
    results = []
    for prompt, ids, ref, cand in zip(prompts, token_ids, reference, candidate, strict=True):
        positions = []
        divergence = None
        for j, (r, c) in enumerate(zip(ref.steps, cand.steps)):
            position = compare_view(len(ids) - 1 + j, r, c, near_tie_margin, k, decode)
            positions.append(position)
            if cand.token_ids[j] != ref.token_ids[j]:
                divergence = Divergence(
                    step=j,
                    reference_token=decode(ref.token_ids[j]),
                    candidate_token=decode(cand.token_ids[j]),
                    reference_margin=position.comparison.top1_margin,
                    near_tie=position.comparison.top1_margin < near_tie_margin,
                    context=text(list(ids[-12:]) + list(ref.token_ids[:j])),
                )
                break
        results.append(PromptResult(prompt, len(ids), positions, view="decode",
                                    steps=len(cand.token_ids), divergence=divergence))
    return results


def evaluate_gates(precision: PrecisionResult, thresholds: Thresholds) -> PrecisionResult:
    """Every per-prompt gate on each prompt of its view, every run gate across its view.

    A gate relative to the noise floor is judged only when the floor was measured; without
    it, it is left out of the results (its test says why).
    """
    floor = precision.noise_floor
    for view in VIEWS:
        for prompt in precision.view(view):
            results = []
            for gate in thresholds.prompt_gates:
                if gate.over != view or (gate.relative_to and floor is None):
                    continue
                result = _evaluate(gate, prompt.values(gate.metric))
                if gate.relative_to:
                    result = _relative(result, floor.prompt_values(gate.metric, view,
                                                                   prompt.prompt.id))
                results.append(result)
            prompt.gate_results = results
    precision.gate_results = []
    for gate in thresholds.gates:
        if gate.over != "first_token" and not precision.view(gate.over):
            continue
        if gate.relative_to and floor is None:
            continue
        groups = [p.values(gate.metric) for p in precision.view(gate.over)]
        result = _evaluate_groups(gate, groups)
        if gate.relative_to:
            result = _relative(result, floor.values(gate.metric, gate.over))
        precision.gate_results.append(result)
    return precision


def _evaluate(gate: Gate, values: list[Any]) -> GateResult:
    if not values or any(v is None for v in values):
        # A full-vocabulary metric on a top-k-only candidate: the gate cannot be judged.
        return GateResult(gate, float("nan"), False)
    return gate.evaluate(values)


def _evaluate_groups(gate: Gate, groups: list[list[Any]]) -> GateResult:
    """A run gate over prompts: the pooled aggregate, its bootstrap interval over prompts,
    and, for a conservative gate, the unsafe end of that interval as the value judged."""
    from llm_parity.stats import bootstrap_ci, conservative

    values = [v for group in groups for v in group]
    result = _evaluate(gate, values)
    usable = [g for g in groups if g]
    if math.isnan(result.value) or len(usable) < 2:
        return result
    point, low, high = bootstrap_ci(usable, gate.aggregate)
    value = conservative(point, low, high, gate.bound) if gate.conservative else point
    return GateResult(gate, value, gate.check(value), point=point, interval=(low, high))


def _relative(result: GateResult, floor_values: list[float]) -> GateResult:
    """Turn a gate's candidate value into a multiple of the noise floor's same aggregate."""
    from llm_parity.metrics import aggregate
    from llm_parity.noise_floor import ratio

    gate = result.gate
    if not floor_values or math.isnan(result.value):
        return GateResult(gate, float("nan"), False, candidate_value=result.value)
    floor_value = aggregate(floor_values, gate.aggregate)
    value = ratio(result.value, floor_value)
    interval = None
    if result.interval is not None:
        interval = (ratio(result.interval[0], floor_value), ratio(result.interval[1], floor_value))
    return GateResult(gate, value, gate.check(value),
                      point=None if result.point is None else ratio(result.point, floor_value),
                      interval=interval, candidate_value=result.value, floor_value=floor_value)
