"""What a failing test says, and the JUnit properties each test records, built from the
comparison's results while the tests run."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from llm_parity.compare.gates import GateResult, higher_is_better
from llm_parity.report.text import fmt

if TYPE_CHECKING:
    from llm_parity.compare.precision import PrecisionResult, PromptResult

# Per-position metrics recorded for each prompt, where measured.
POSITION_METRICS = ("cosine", "kl", "js", "mae", "spearman", "rel_error", "top1_margin",
                    "choice_gap", "p_tail", "q_tail", "cosine_full", "kl_full", "js_full", "mae_full")


def _gate_line(result: GateResult) -> str:
    gate = result.gate
    if gate.relative_to:
        return (f"{gate.aggregate} {gate.metric} = {fmt(result.value)}x the bf16 noise floor "
                f"(candidate {fmt(result.candidate_value)}, floor {fmt(result.floor_value)}), "
                f"must be {gate.symbol} {fmt(gate.threshold)}x")
    line = (f"{gate.aggregate} {gate.metric} = {fmt(result.value)}, must be {gate.symbol} "
            f"{fmt(gate.threshold)}")
    if gate.conservative and result.interval is not None:
        line += (f" (conservative end of the 95% interval [{fmt(result.interval[0])}, "
                 f"{fmt(result.interval[1])}] over prompts; pooled {fmt(result.point)})")
    return line


def gate_metric_label(gate) -> str:
    """The metric column of a gate table: a relative gate reads metric/floor."""
    return f"{gate.metric}/floor" if gate.relative_to else gate.metric


def prompt_properties(result: PromptResult) -> list[tuple[str, Any]]:
    first = result.first
    comparison = first.comparison
    props: list[tuple[str, Any]] = [
        ("prompt_id", result.prompt.id),
        ("prompt", result.prompt.text),
        ("token_count", result.token_count),
        ("reference_top1", first.reference_top1_text),
        ("candidate_top1", first.candidate_top1_text),
        ("top1_match", comparison.top1_match),
        ("near_tie", first.near_tie),
    ]
    if len(result.positions) == 1:
        for metric in POSITION_METRICS:
            value = getattr(comparison, metric)
            if value is not None:
                props.append((metric, value))
    else:
        props.append(("positions", len(result.positions)))
        for metric in ("kl", "js", "cosine", "spearman", "mae", "p_tail"):
            values = [float(v) for v in result.values(metric)]
            props += [(f"{metric}_mean", sum(values) / len(values)),
                      (f"{metric}_{'min' if higher_is_better(metric) else 'max'}",
                       min(values) if higher_is_better(metric) else max(values))]
        flips = [p for p in result.positions if not p.comparison.top1_match]
        props += [("top1_flips", len(flips)), ("near_ties", sum(p.near_tie for p in flips))]
    if result.view == "decode":
        props.append(("steps_generated", result.steps))
        d = result.divergence
        props.append(("agreed_steps", d.step if d else len(result.positions)))
        if d:
            props += [("divergence_step", d.step), ("divergence_reference", d.reference_token),
                      ("divergence_candidate", d.candidate_token),
                      ("divergence_near_tie", d.near_tie)]
    for gate_result in result.gate_results:
        name = f"gate.{gate_result.gate.name}"
        props += [(f"{name}.{gate_result.gate.bound}", gate_result.gate.threshold),
                  (f"{name}.value", gate_result.value), (f"{name}.passed", gate_result.passed)]
    return props


def _flip_line(position, margin_floor: float) -> str:
    c = position.comparison
    kind = ("a near-tie (bf16 rounding can cause it)" if position.near_tie
            else f"above the near-tie margin {fmt(margin_floor)}: a defect")
    return (f"position {position.position}: reference top-1 {position.reference_top1_text} "
            f"(log-prob {fmt(c.reference_top1_logprob)}), candidate top-1 "
            f"{position.candidate_top1_text} (log-prob {fmt(c.candidate_top1_logprob)}); "
            f"{fmt(c.choice_gap)} below the reference's top-1 in its own log-probs "
            f"(reference rank-1/rank-2 margin {fmt(c.top1_margin)}), {kind}")


def prompt_failure_message(result: PromptResult, precision: PrecisionResult) -> str:
    lines = [f"prompt {result.prompt.id} ({result.token_count} tokens): "
             f"{result.prompt.text[:80]!r}"]
    lines += [f"  {_gate_line(r)}" for r in result.gate_results if not r.passed]
    flips = [p for p in result.positions if not p.comparison.top1_match]
    for position in flips[:5]:
        lines.append("  " + _flip_line(position, precision.near_tie_margin))
    if len(flips) > 5:
        lines.append(f"  ... and {len(flips) - 5} more top-1 flips")
    worst = max(result.positions, key=lambda p: p.comparison.kl)
    c = worst.comparison
    where = "" if len(result.positions) == 1 else (
        f" (worst of {len(result.positions)} positions, at position {worst.position})")
    lines.append(f"  cosine {fmt(c.cosine)}, kl {fmt(c.kl)}, js {fmt(c.js)}, spearman "
                 f"{fmt(c.spearman)}, reference tail {fmt(c.p_tail)}, candidate tail "
                 f"{fmt(c.q_tail)}{where}")
    if result.divergence:
        d = result.divergence
        kind = "a near-tie" if d.near_tie else "a defect"
        lines.append(f"  free-running decoding diverged at step {d.step}: reference "
                     f"{d.reference_token}, candidate {d.candidate_token} ({fmt(d.choice_gap)} below "
                     f"it in the reference; reference margin {fmt(d.reference_margin)}) "
                     f"({kind}); text before it: {d.context[-80:]!r}")
    return "\n".join(lines)


def worst_prompts(precision: PrecisionResult, metric: str, n: int = 3, view: str = "first_token"):
    """The prompts that pull a metric the wrong way, worst first."""
    scored = []
    for prompt in precision.view(view):
        values = [v for v in prompt.values(metric) if v is not None]
        if not values:
            continue
        if higher_is_better(metric):
            scored.append((min(float(v) for v in values), prompt))
        else:
            scored.append((max(float(v) for v in values), prompt))
    scored.sort(key=lambda item: item[0], reverse=not higher_is_better(metric))
    return scored[:n]


def gate_failure_message(result: GateResult, precision: PrecisionResult) -> str:
    gate = result.gate
    if math.isnan(result.value):
        return (f"gate {gate.name}: {gate.metric} could not be measured (a full-vocabulary "
                "metric needs a candidate that exposes the full vocabulary, e.g. hf)")
    lines = [f"gate {gate.name}: {_gate_line(result)}"
             + ("" if gate.over == "first_token" else f", over {gate.over} positions")]
    if gate.metric in ("top1_match", "top1_defect"):
        flips = [(p, pos) for p in precision.view(gate.over) for pos in p.positions
                 if not pos.comparison.top1_match]
        for prompt, position in flips[:10]:
            lines.append(f"  {prompt.prompt.id}: " + _flip_line(position, precision.near_tie_margin))
    else:
        worst = ", ".join(f"{p.prompt.id} {fmt(v)}"
                          for v, p in worst_prompts(precision, gate.metric, view=gate.over))
        lines.append(f"  worst prompts: {worst}")
    return "\n".join(lines)


def ratio(value: float) -> str:
    """A multiple of the floor, to two figures: 0.95x, 1.4x, 46x, 380x."""
    return f"{value:.2g}x" if value < 100 else f"{value:.0f}x"


def localization_lines(loc: Mapping[str, Any]) -> list[str]:
    """The verdict's `localization` block in words: where the candidate first diverges, the
    layers shown to be within their floors before it, each layer's ratio to its floor."""
    if loc.get("skipped"):
        return [f"where it diverges: not localized: {loc['skipped']}"]
    if loc.get("error"):
        return [f"where it diverges: localization could not finish: {loc['error']}"]
    head = next((r for r in loc["results"] if r["where"] == loc["where"]),
                loc["results"][0] if loc["results"] else None)
    if head is None:
        return []
    count = len(head["positions"])
    lines = [f"where it diverges (configuration {loc['configuration']}, prompt "
             f"{head['prompt_id']}, {head['view'].replace('_', '-')} view, "
             f"{count} position{'s' if count != 1 else ''}):"]
    named = next((p for p in head["points"] if p["layer"] == head["layer"]
                  and p["module"] == head["module"]), None)
    before = [p["ratio"] for p in head["points"]
              if p["module"] in ("embed", "output") and head["layer"] is not None
              and (p["layer"] is None or p["layer"] < head["layer"])]
    if not loc["diverged"]:
        lines.append(f"  nothing diverges: every captured point within {ratio(head['limit'])} "
                     "its bf16 floor")
        if loc.get("unseen"):
            lines.append(f"  the failure is on a path the capture did not take: {loc['unseen']}")
    else:
        text = f"  {loc['where']}"
        if named is not None:
            text += f": {ratio(named['ratio'])} its bf16 floor (limit {ratio(head['limit'])})"
        if before:
            text += (f"; the {len(before) - 1} layers before it within {ratio(max(before))}"
                     " their floors" if len(before) > 1 else
                     f"; the embedding before it within {ratio(max(before))} its floor")
        lines.append(text)
    stream = [(p, "embed" if p["module"] == "embed" else "norm" if p["module"] == "final_norm"
               else str(p["layer"])) for p in head["points"]
              if p["module"] in ("embed", "output", "final_norm")]
    lines.append("  ratio to floor by layer: " + " ".join(
        f"{label}:{ratio(p['ratio'])}" for p, label in stream))
    for note in (head.get("note"), loc.get("note")):
        if note and note != "every captured point is within its floor":
            lines.append(f"  {note}")
    return lines


def localization_properties(loc: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """JUnit properties of test_localization."""
    props: list[tuple[str, Any]] = [("localize_mode", loc["mode"])]
    if loc.get("skipped"):
        return props + [("localized", False), ("reason", loc["skipped"])]
    if loc.get("error"):
        return props + [("localized", False), ("error", loc["error"])]
    props += [("localized", True), ("configuration", loc["configuration"]),
              ("diverged", loc["diverged"]), ("where", loc["where"]),
              ("layer", "" if loc["layer"] is None else loc["layer"]),
              ("module", loc["module"] or "")]
    if loc.get("unseen"):
        props.append(("unseen", loc["unseen"]))
    head = next((r for r in loc["results"] if r["where"] == loc["where"]), None)
    if head is not None:
        props += [("prompt_id", head["prompt_id"]), ("positions", len(head["positions"])),
                  ("limit", head["limit"])]
        props += [(f"ratio.{p['name']}", p["ratio"]) for p in head["points"]
                  if p["module"] in ("embed", "output", "final_norm")]
    return props
