"""What people and dashboards read: test messages, JUnit properties, the end-of-run
summary, the JSON verdict and the Markdown report.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_parity.thresholds import GateResult

if TYPE_CHECKING:
    from llm_parity.precision import PrecisionResult, PromptResult
    from llm_parity.session import ParitySession

SCHEMA_VERSION = 1
# Above this much reference mass outside the candidate's top-k, the bin KL is a loose bound.
TAIL_WARNING = 0.05
_METRICS = ("cosine", "kl", "js", "mae", "spearman", "rel_error", "top1_margin", "p_tail",
            "q_tail", "cosine_full", "kl_full", "js_full", "mae_full")
_HIGHER_IS_BETTER = {"cosine", "cosine_full", "spearman", "top1_match"}


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


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


# ---------------------------------------------------------------- per test


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
        for metric in _METRICS:
            value = getattr(comparison, metric)
            if value is not None:
                props.append((metric, value))
    else:
        props.append(("positions", len(result.positions)))
        for metric in ("kl", "js", "cosine", "spearman", "mae", "p_tail"):
            values = [float(v) for v in result.values(metric)]
            props += [(f"{metric}_mean", sum(values) / len(values)),
                      (f"{metric}_{'min' if metric in _HIGHER_IS_BETTER else 'max'}",
                       min(values) if metric in _HIGHER_IS_BETTER else max(values))]
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
            f"reference margin {fmt(c.top1_margin)}, {kind}")


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
                     f"{d.reference_token}, candidate {d.candidate_token}, reference margin "
                     f"{fmt(d.reference_margin)} ({kind}); text before it: {d.context[-80:]!r}")
    return "\n".join(lines)


def worst_prompts(precision: PrecisionResult, metric: str, n: int = 3, view: str = "first_token"):
    """The prompts that pull a metric the wrong way, worst first."""
    scored = []
    for prompt in precision.view(view):
        values = [v for v in prompt.values(metric) if v is not None]
        if not values:
            continue
        if metric in _HIGHER_IS_BETTER:
            scored.append((min(float(v) for v in values), prompt))
        else:
            scored.append((max(float(v) for v in values), prompt))
    scored.sort(key=lambda item: item[0], reverse=metric not in _HIGHER_IS_BETTER)
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


# ---------------------------------------------------------------- end of run


def summary_lines(session: ParitySession) -> list[str]:
    run = session.run
    assert run is not None
    precision = run.precision
    verdict = "PASS" if precision.passed else "FAIL"
    candidate = run.candidate
    lines = [
        f"verdict: {verdict}   model: {run.reference_model.name}   candidate: "
        f"{candidate['backend']} on {candidate['device']} in {candidate['dtype']}   "
        f"reference: hf on {run.reference['device']} in {run.reference['dtype']}",
        f"{len(precision.prompts)} prompts ({session.settings.prompts.name}), first generated "
        f"token, top-{precision.k} log-probs; gates from {run.thresholds.source}",
        "",
        f"{'gate':<28}{'over':<13}{'metric':<13}{'aggregate':<10}{'bound':>9}{'value':>11}"
        f"  {'result':<8}95% interval over prompts",
    ]
    for r in precision.gate_results:
        interval = "" if r.interval is None else (
            f"[{fmt(r.interval[0])}, {fmt(r.interval[1])}]"
            + (" (judged at the unsafe end)" if r.gate.conservative else ""))
        lines.append(f"{r.gate.name:<28}{r.gate.over:<13}{gate_metric_label(r.gate):<13}"
                     f"{r.gate.aggregate:<10}{r.gate.symbol + ' ' + fmt(r.gate.threshold):>9}"
                     f"{fmt(r.value):>11}  {'pass' if r.passed else 'FAIL':<8}{interval}".rstrip())
    counts = []
    for view in ("first_token", "sequence", "decode"):
        results = precision.view(view)
        if results:
            failed = [p.prompt.id for p in results if not p.passed]
            counts.append(f"{view.replace('_', ' ')} {len(results) - len(failed)}/{len(results)}"
                          + (f" (failing: {', '.join(failed)})" if failed else ""))
    lines.append("prompts passing their per-prompt gates: " + "; ".join(counts))
    flips = precision.flips
    near = sum(1 for _, pos in flips if pos.near_tie)
    lines.append(f"top-1 flips: {len(flips)} ({near} near-ties, {len(flips) - near} defects)")
    worst = ", ".join(f"{p.prompt.id} {fmt(v)}" for v, p in worst_prompts(precision, "kl"))
    lines.append(f"worst KL: {worst}")
    lines += depth_summary_lines(precision)
    lines += noise_floor_lines(precision)
    tail = max(precision.values("p_tail"))
    if tail > TAIL_WARNING:
        lines.append(f"warning: up to {fmt(tail)} of the reference mass lies outside the "
                     f"candidate's top-{precision.k}; the KL shown is a loose lower bound "
                     "(raise --logprobs)")
    t = run.timings
    lines.append("time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in t.items()))
    return lines


def depth_summary_lines(precision: PrecisionResult) -> list[str]:
    if not precision.sequences:
        return []
    from llm_parity.metrics import aggregate

    kl = [float(v) for v in precision.values("kl", "sequence")]
    lines = [f"teacher-forced: {len(kl)} positions over {len(precision.sequences)} prompts, "
             f"KL mean {fmt(aggregate(kl, 'mean'))}, p95 {fmt(aggregate(kl, 'p95'))}, "
             f"max {fmt(aggregate(kl, 'max'))}"]
    by_position = kl_by_position(precision.sequences)
    lines.append("  KL mean by continuation step: " + ", ".join(
        f"{start}-{end}: {fmt(value)}" for start, end, value in by_position))
    diverged = [p for p in precision.decodes if p.divergence]
    defects = [p for p in diverged if not p.divergence.near_tie]
    agreed = sum(p.divergence.step if p.divergence else len(p.positions) for p in precision.decodes)
    total = sum(p.steps for p in precision.decodes)
    lines.append(f"free-running: {agreed}/{total} steps agreed before divergence; "
                 f"{len(diverged)} of {len(precision.decodes)} prompts diverged "
                 f"({len(diverged) - len(defects)} at near-ties, {len(defects)} at defects)")
    return lines


def noise_floor_summary(precision: PrecisionResult) -> dict[str, Any] | None:
    """The floor's means per view and the candidate's as a multiple of them."""
    floor = precision.noise_floor
    if floor is None:
        return None
    from llm_parity.metrics import aggregate
    from llm_parity.noise_floor import ratio

    out = floor.summary()
    for view, entry in out["views"].items():
        for metric in ("kl", "js", "mae"):
            if f"{metric}_mean" in entry and precision.view(view):
                candidate = aggregate([float(v) for v in precision.values(metric, view)], "mean")
                entry[f"candidate_{metric}_mean"] = candidate
                entry[f"{metric}_ratio"] = ratio(candidate, entry[f"{metric}_mean"])
    return out


def noise_floor_lines(precision: PrecisionResult) -> list[str]:
    summary = noise_floor_summary(precision)
    if summary is None:
        return []
    parts = [f"{view.replace('_', ' ')} {fmt(entry['kl_mean'])} (candidate "
             f"{fmt(entry.get('kl_ratio', math.nan))}x)"
             for view, entry in summary["views"].items()]
    flips = sum(entry["flips"] for entry in summary["views"].values())
    return [f"noise floor (hf {summary['dtype']} on {summary['device']} against the reference): "
            f"KL mean {'; '.join(parts)}",
            f"  rounding alone flipped {flips} top-1 tokens, largest reference margin "
            f"{fmt(summary['max_flip_margin'])}"] + (
        [f"warning: rounding alone flipped a token whose reference margin "
         f"({fmt(summary['max_flip_margin'])}) is above near_tie_margin "
         f"({fmt(precision.near_tie_margin)}): such flips count as defects; raise "
         "near_tie_margin in thresholds.toml"]
        if summary["max_flip_margin"] > precision.near_tie_margin else [])


def kl_by_position(results: list[PromptResult], buckets: int = 4) -> list[tuple[int, int, float]]:
    """Mean KL over continuation steps in a few equal buckets: a bug that grows shows here."""
    steps = max(len(r.positions) for r in results)
    size = max(1, -(-steps // buckets))
    out = []
    for start in range(0, steps, size):
        values = [float(r.positions[j].comparison.kl) for r in results
                  for j in range(start, min(start + size, len(r.positions)))]
        if values:
            out.append((start, min(start + size, steps) - 1, sum(values) / len(values)))
    return out


def gate_dict(result: GateResult) -> dict[str, Any]:
    """A gate outcome for the verdict; "over" names the positions it reads."""
    return {**result.as_dict(), "over": result.gate.over}


def _depth_entry(result: PromptResult) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": result.prompt.id,
        "token_count": result.token_count,
        "positions": len(result.positions),
        "passed": result.passed,
        "gates": [gate_dict(r) for r in result.gate_results],
        "kl": [float(p.comparison.kl) for p in result.positions],
        "cosine": [float(p.comparison.cosine) for p in result.positions],
        "top1_match": [bool(p.comparison.top1_match) for p in result.positions],
        "near_tie": [bool(p.near_tie) for p in result.positions],
    }
    if result.view == "decode":
        entry["steps_generated"] = result.steps
        d = result.divergence
        entry["divergence"] = None if d is None else {
            "step": d.step, "reference_token": d.reference_token,
            "candidate_token": d.candidate_token, "reference_margin": d.reference_margin,
            "near_tie": d.near_tie, "context": d.context}
    return entry


def verdict_dict(session: ParitySession) -> dict[str, Any]:
    settings = session.settings
    run = session.run
    if run is None:
        return {
            "schema_version": SCHEMA_VERSION,
            "verdict": "error",
            "error": str(session.error) if session.error else "the precision run did not finish",
            "model": settings.model or "llm-parity/toy",
            "candidate": {"backend": settings.candidate, "device": settings.candidate_device,
                          "dtype": settings.candidate_dtype},
            "aggregate": {}, "gates": [], "prompts": [],
            "environment": session.environment,
        }
    precision = run.precision
    prompts = []
    for result in precision.prompts:
        first = result.first
        c = first.comparison
        entry: dict[str, Any] = {
            "id": result.prompt.id,
            "prompt": result.prompt.text,
            "token_count": result.token_count,
            "reference_top1": first.reference_top1_text,
            "candidate_top1": first.candidate_top1_text,
            "top1_match": c.top1_match,
            "near_tie": first.near_tie,
            "passed": result.passed,
        }
        entry.update({m: getattr(c, m) for m in _METRICS if getattr(c, m) is not None})
        entry["gates"] = [gate_dict(r) for r in result.gate_results]
        prompts.append(entry)
    return {
        "schema_version": SCHEMA_VERSION,
        "verdict": "pass" if precision.passed else "fail",
        "model": run.reference_model.name,
        "candidate_model": run.candidate_model.name,
        "candidate": run.candidate,
        "reference": run.reference,
        "protocol": {"prompts": settings.prompts.name, "prompt_count": len(prompts),
                     "positions": "first generated token", "logprobs": precision.k,
                     "continuation": session.settings.continuation,
                     "long_prompts": (session.settings.long_prompts.name
                                      if session.settings.long_prompts else None),
                     "near_tie_margin": precision.near_tie_margin,
                     "thresholds": run.thresholds.source},
        "aggregate": precision.aggregate(),
        "gates": [gate_dict(r) for r in precision.gate_results],
        "prompts": prompts,
        "sequences": [_depth_entry(r) for r in precision.sequences],
        "noise_floor": noise_floor_summary(precision),
        "decodes": [_depth_entry(r) for r in precision.decodes],
        "model_card": run.card,
        "timings": run.timings,
        "environment": session.environment,
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN: unmeasurable values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _clean(value.item())
    return value


def write_atomic(path: Path, text: str) -> None:
    """Write next to the target and rename, so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a report is for readers
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def performance_dict(perf_run: Any) -> dict[str, Any] | None:
    """The performance block of the verdict: every measured case and every judged gate."""
    if perf_run is None or not (perf_run.results or perf_run.gate_outcomes):
        return None
    cases = [{"key": key, **result.flat()} for key, result in perf_run.results.items()]
    gates = []
    for outcome in perf_run.gate_outcomes.values():
        gate = outcome.gate
        entry = {"name": gate.name, "metric": gate.metric, "aggregate": gate.aggregate,
                 "bound": gate.bound, "threshold": gate.threshold, "value": outcome.value,
                 "passed": outcome.passed, "scope": "performance"}
        if getattr(gate, "mode", None):
            entry["mode"] = gate.mode
        gates.append(entry)
    return {"cases": cases, "gates": gates, "not_measured": dict(perf_run.not_measured)}


def full_verdict(session: ParitySession, perf_run: Any = None) -> dict[str, Any]:
    """The verdict with the performance block when benchmarks ran; JSON-ready."""
    data = verdict_dict(session)
    performance = performance_dict(perf_run)
    if performance is not None:
        data["performance"] = performance
        perf_passed = all(g["passed"] for g in performance["gates"])
        if not session._attempted:
            # A performance-only run: its verdict is the performance gates'.
            data["verdict"] = "pass" if perf_passed else "fail"
            data.pop("error", None)
        elif not perf_passed and data["verdict"] == "pass":
            data["verdict"] = "fail"
    return _clean(data)


def write_outputs(session: ParitySession, perf_run: Any = None) -> None:
    settings = session.settings
    if not (settings.parity_json or settings.parity_reports):
        return
    from datetime import datetime, timezone

    from llm_parity.report_document import render_verdict

    data = full_verdict(session, perf_run)
    if settings.parity_json:
        write_atomic(settings.parity_json, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    for path in settings.parity_reports:
        write_atomic(path, render_verdict(data, path.suffix, generated=generated))


def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    """A Markdown table."""
    header = list(header)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        out.append("| " + " | ".join(fmt(v).replace("|", "\\|") for v in row) + " |")
    return out
