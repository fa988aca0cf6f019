"""The precision comparison: reference and candidate answers in, per-prompt results and
gate outcomes out. Plain data only; nothing here knows which engine produced the arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_parity.compare.answers import Decoded, NextToken
from llm_parity.compare.gates import VIEWS, Gate, GateResult, Thresholds
from llm_parity.compare.metrics import PositionComparison, aggregate, compare_position

if TYPE_CHECKING:
    from llm_parity.config.prompts import Prompt

# Metrics summarised in the verdict's "aggregate" block, as <metric>_mean.
HEADLINE_METRICS = ("cosine", "kl", "js", "spearman", "mae")


@dataclass(frozen=True)
class PositionResult:
    """One compared position: the metrics plus what a reader needs to see the tokens."""

    position: int  # index in the scored sequence of the token whose successor is compared
    comparison: PositionComparison
    # A top-1 flip to a token the reference ranks within the near-tie margin of its own
    # top-1 (bf16 rounding can cause it); a token far below it is a defect, whatever the
    # reference's rank-1/rank-2 gap.
    near_tie: bool
    reference_top1_text: str = ""
    candidate_top1_text: str = ""

    @property
    def defect(self) -> bool:
        return not self.comparison.top1_match and not self.near_tie

    def value(self, metric: str) -> Any:
        if metric == "top1_defect":
            return self.defect
        return getattr(self.comparison, metric)


@dataclass(frozen=True)
class Divergence:
    """Where free-running decoding first chose another token than the reference."""

    step: int
    reference_token: str
    candidate_token: str
    reference_margin: float  # the reference's rank-1/rank-2 gap there
    choice_gap: float  # the reference's gap from its top-1 to the candidate's token
    near_tie: bool  # choice_gap under the near-tie margin
    context: str  # the text just before the divergent token


@dataclass(frozen=True)
class PromptResult:
    prompt: Prompt
    token_count: int
    positions: tuple[PositionResult, ...]
    view: str = "first_token"
    steps: int = 0  # decode: steps generated; the positions compared stop at the divergence
    divergence: Divergence | None = None
    gate_results: tuple[GateResult, ...] = ()  # its per-prompt gates, once judged

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.gate_results)

    @property
    def first(self) -> PositionResult:
        return self.positions[0]

    def values(self, metric: str) -> list[Any]:
        return [p.value(metric) for p in self.positions]

    def gate_values(self, gate: Gate) -> list[Any]:
        """What a gate reads here: the metric, with near-tie flips counted as matches when
        the gate excuses them."""
        if gate.excuse_near_ties:
            return [bool(p.comparison.top1_match) or p.near_tie for p in self.positions]
        return self.values(gate.metric)


@dataclass(frozen=True)
class NotJudged:
    """A gate this run could not judge, and the true reason why."""

    gate: Gate
    reason: str
    strict: bool = False  # under strict = true a gate not judged fails the run

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.gate.name, "metric": self.gate.metric,
                "aggregate": self.gate.aggregate, "bound": self.gate.bound,
                "threshold": self.gate.threshold, "over": self.gate.over,
                "scope": self.gate.scope, "reason": self.reason, "strict": self.strict}


@dataclass(frozen=True)
class PrecisionResult:
    """Every view compared and every gate judged once; built whole, never changed."""

    prompts: tuple[PromptResult, ...]
    near_tie_margin: float
    k: int
    sequences: tuple[PromptResult, ...] = ()
    decodes: tuple[PromptResult, ...] = ()
    gate_results: tuple[GateResult, ...] = ()
    not_judged: tuple[NotJudged, ...] = ()
    noise_floor: Any = None  # llm_parity.compare.noise_floor.NoiseFloor, when measured

    def view(self, name: str) -> tuple[PromptResult, ...]:
        return {"first_token": self.prompts, "sequence": self.sequences,
                "decode": self.decodes}[name]

    @property
    def all_prompt_results(self) -> list[PromptResult]:
        return [*self.prompts, *self.sequences, *self.decodes]

    @property
    def judged(self) -> int:
        """How many gate outcomes this run has: across prompts and per prompt."""
        return len(self.gate_results) + sum(len(p.gate_results)
                                            for p in self.all_prompt_results)

    @property
    def nothing_judged(self) -> str | None:
        """Why the run judged no gate at all, when it did not (else None)."""
        if self.judged:
            return None
        if not self.not_judged:
            return "no gate was judged: the thresholds file has no precision gate"
        return "no gate was judged: " + "; ".join(
            f"{n.gate.name} ({n.reason})" for n in self.not_judged)

    @property
    def passed(self) -> bool:
        # A run that judged no gate has shown nothing: it does not pass.
        return (self.judged > 0
                and all(r.passed for r in self.gate_results)
                and all(p.passed for p in self.all_prompt_results)
                and not any(n.strict for n in self.not_judged))

    def values(self, metric: str, view: str = "first_token") -> list[Any]:
        return [v for p in self.view(view) for v in p.values(metric)]

    def aggregate(self) -> dict[str, float]:
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
    *,
    near_tie_margin: float,
    k: int,
    decode: Callable[[int], str] = str,
) -> list[PromptResult]:
    """First-token comparison of every prompt (the founding protocol)."""
    return [
        PromptResult(prompt, len(ids),
                     (compare_view(len(ids) - 1, ref, cand, near_tie_margin, k, decode),))
        for prompt, ids, ref, cand in zip(prompts, token_ids, reference, candidate, strict=True)
    ]


def is_near_tie(comparison: PositionComparison, near_tie_margin: float) -> bool:
    """A flip is a near-tie when the token the candidate chose is within the margin of the
    reference's top-1 in the reference's own log-probs."""
    return (not comparison.top1_match) and comparison.choice_gap < near_tie_margin


def compare_view(
    position: int,
    reference: NextToken,
    candidate: NextToken,
    near_tie_margin: float,
    k: int,
    decode: Callable[[int], str],
) -> PositionResult:
    full = reference.full_logprobs  # computed on each read (compare/answers.py): once here
    assert full is not None, "the reference must expose the full vocabulary"
    comparison = compare_position(
        full, candidate.token_ids[:k], candidate.logprobs[:k], candidate.full_logprobs,
    )
    return PositionResult(
        position=position,
        comparison=comparison,
        near_tie=is_near_tie(comparison, near_tie_margin),
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
        results.append(PromptResult(prompt, len(ids), tuple(positions), view="sequence",
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
        for j, (r, c) in enumerate(zip(ref.steps, cand.steps, strict=True)):
            position = compare_view(len(ids) - 1 + j, r, c, near_tie_margin, k, decode)
            positions.append(position)
            if cand.token_ids[j] != ref.token_ids[j]:
                # The token the candidate decoded, as the reference ranks it: an engine's
                # sampler may break a bf16 tie otherwise than its own log-probs' order.
                row = r.full_logprobs  # computed on each read: once here
                assert row is not None, "the reference must expose the vocabulary"
                gap = float(np.max(row) - row[int(cand.token_ids[j])])
                divergence = Divergence(
                    step=j,
                    reference_token=decode(ref.token_ids[j]),
                    candidate_token=decode(cand.token_ids[j]),
                    reference_margin=position.comparison.top1_margin,
                    choice_gap=gap,
                    near_tie=gap < near_tie_margin,
                    context=text(list(ids[-12:]) + list(ref.token_ids[:j])),
                )
                break
        results.append(PromptResult(prompt, len(ids), tuple(positions), view="decode",
                                    steps=len(cand.token_ids), divergence=divergence))
    return results


def judge(
    views: Mapping[str, Sequence[PromptResult]],
    thresholds: Thresholds,
    *,
    k: int,
    noise_floor: Any = None,
    floor_missing: str | None = None,
    depth_missing: str | None = None,
    strict: bool = False,
) -> PrecisionResult:
    """Judge every gate once on the compared views and return the whole, frozen result.

    A gate that cannot be judged (no floor, no depth positions, a full-vocabulary metric on
    a top-k candidate) is listed in `not_judged` with its reason, never silently dropped.
    """
    strict = strict or thresholds.strict
    not_judged: list[NotJudged] = []

    def why_not(gate: Gate, values_known: bool) -> str | None:
        if gate.over != "first_token" and not views.get(gate.over):
            return depth_missing or f"no {gate.over} positions were compared"
        if gate.relative_to and noise_floor is None:
            return f"it reads the noise floor, which was not measured: {floor_missing}"
        if gate.relative_to and not noise_floor.has(gate.metric, gate.over):
            return (f"the noise floor holds no {gate.metric} values over {gate.over} (a "
                    "golden store written by an older version: rewrite it with "
                    "--reference-store-update)")
        if not values_known:
            return (f"metric {gate.metric} needs a candidate that exposes the full vocabulary "
                    "(e.g. --candidate hf)")
        return None

    judged_views: dict[str, tuple[PromptResult, ...]] = {}
    for view in VIEWS:
        results = []
        for prompt in views.get(view, ()):
            gate_results = []
            for gate in thresholds.prompt_gates:
                if gate.over != view:
                    continue
                values = prompt.gate_values(gate)
                if why_not(gate, all(v is not None for v in values)) is None:
                    result = _evaluate(gate, values)
                    if gate.relative_to:
                        result = _relative(result, [values], [noise_floor.prompt_values(
                            gate.metric, view, prompt.prompt.id)],
                            at_least=_pooled_floor(gate, views[view], noise_floor))
                    gate_results.append(result)
            results.append(replace(prompt, gate_results=tuple(gate_results)))
        judged_views[view] = tuple(results)
    for gate in thresholds.prompt_gates:
        sample = next(iter(views.get(gate.over) or ()), None)
        known = sample is None or all(v is not None for v in sample.values(gate.metric))
        reason = why_not(gate, known)
        if reason:
            not_judged.append(NotJudged(gate, reason, strict))

    gate_results = []
    for gate in thresholds.gates:
        groups = [p.gate_values(gate) for p in views.get(gate.over, ())]
        reason = why_not(gate, all(v is not None for g in groups for v in g))
        if reason:
            not_judged.append(NotJudged(gate, reason, strict))
            continue
        if gate.relative_to:
            floors = [noise_floor.prompt_values(gate.metric, gate.over, p.prompt.id)
                      for p in views[gate.over]]
            gate_results.append(_relative(_evaluate_groups(gate, groups), groups, floors))
        else:
            gate_results.append(_evaluate_groups(gate, groups))
    first = judged_views["first_token"]
    return PrecisionResult(
        prompts=first,
        near_tie_margin=thresholds.near_tie_margin,
        k=k,
        sequences=judged_views["sequence"],
        decodes=judged_views["decode"],
        gate_results=tuple(gate_results),
        not_judged=tuple(not_judged),
        noise_floor=noise_floor,
    )


def _evaluate(gate: Gate, values: list[Any]) -> GateResult:
    return gate.evaluate(values)


def _evaluate_groups(gate: Gate, groups: list[list[Any]]) -> GateResult:
    """A run gate over prompts: the pooled aggregate, its bootstrap interval over prompts,
    and, for a conservative gate, the unsafe end of that interval as the value judged."""
    from llm_parity.compare.stats import bootstrap_ci, conservative

    values = [v for group in groups for v in group]
    result = _evaluate(gate, values)
    usable = [g for g in groups if g]
    if math.isnan(result.value) or len(usable) < 2:
        return result
    point, low, high = bootstrap_ci(usable, gate.aggregate)
    value = conservative(point, low, high, gate.bound) if gate.conservative else point
    return GateResult(gate, value, gate.check(value), point=point, interval=(low, high),
                      count=len(values))


def _pooled_floor(gate: Gate, prompts: Sequence[Any], noise_floor: Any) -> float:
    """The floor's aggregate over every prompt of the view: the least a per-prompt gate
    divides by. One prompt's few positions measure rounding too coarsely to stand alone:
    rounding's rare large events (a Mixture-of-Experts router near a tie choosing another
    expert, measured on the Qwen3-MoE stand-in: one position of 32 at KL 0.045) land on
    one prompt in the candidate and on others in the floor, so a prompt where the floor
    had none would read 28x on a correct port."""
    values = [float(v) for p in prompts
              for v in noise_floor.prompt_values(gate.metric, gate.over, p.prompt.id)]
    return aggregate(values, gate.aggregate) if values else 0.0


def _relative(result: GateResult, candidate_groups: list[list[float]],
              floor_groups: list[list[float]], at_least: float = 0.0) -> GateResult:
    """A gate's value as a multiple of the noise floor's same aggregate, on the positions
    both saw (free-running decoding stops each side at its own divergence), with a paired
    bootstrap interval over prompts. `at_least` bounds the floor's aggregate from below
    (a per-prompt gate's pooled floor)."""
    from llm_parity.compare.noise_floor import ratio
    from llm_parity.compare.stats import conservative, paired_ratio_ci

    gate = result.gate
    pairs = [(c[:n], f[:n]) for c, f in zip(candidate_groups, floor_groups)
             if (n := min(len(c), len(f)))]
    if not pairs:
        return GateResult(gate, math.nan, False, candidate_value=result.value)
    cand = [float(v) for c, _ in pairs for v in c]
    floor = [float(v) for _, f in pairs for v in f]
    candidate_value = aggregate(cand, gate.aggregate)
    floor_value = max(aggregate(floor, gate.aggregate), at_least)
    value = ratio(candidate_value, floor_value)
    point = interval = None
    if len(pairs) >= 2:
        point, low, high = paired_ratio_ci([c for c, _ in pairs], [f for _, f in pairs],
                                           gate.aggregate, ratio)
        interval = (low, high)
        if gate.conservative:  # the unsafe end of the ratio's interval, as for other gates
            value = conservative(point, low, high, gate.bound)
    return GateResult(gate, value, gate.check(value), point=point, interval=interval,
                      candidate_value=candidate_value, floor_value=floor_value,
                      count=len(cand))
