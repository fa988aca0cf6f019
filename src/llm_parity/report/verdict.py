"""The verdict: one JSON-ready dict of everything the run judged, from which the terminal
summary, the reports and `llm-parity compare` are all made. Written atomically.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_parity.compare.gates import GateResult
from llm_parity.report.messages import POSITION_METRICS
from llm_parity.report.schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from llm_parity.compare.precision import PrecisionResult, PromptResult
    from llm_parity.runner.session import ParitySession

# Above this much reference mass outside the candidate's top-k, the bin KL is a loose bound.
TAIL_WARNING = 0.05


def noise_floor_summary(precision: PrecisionResult) -> dict[str, Any] | None:
    """The floor's means per view and the candidate's as a multiple of them."""
    floor = precision.noise_floor
    if floor is None:
        return None
    from llm_parity.compare.metrics import aggregate
    from llm_parity.compare.noise_floor import ratio

    out = floor.summary()
    for view, entry in out["views"].items():
        for metric in ("kl", "js", "mae"):
            if f"{metric}_mean" in entry and precision.view(view):
                candidate = aggregate([float(v) for v in precision.values(metric, view)], "mean")
                entry[f"candidate_{metric}_mean"] = candidate
                entry[f"{metric}_ratio"] = ratio(candidate, entry[f"{metric}_mean"])
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
            "choice_gap": d.choice_gap, "near_tie": d.near_tie, "context": d.context}
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
        entry.update({m: getattr(c, m) for m in POSITION_METRICS if getattr(c, m) is not None})
        entry["gates"] = [gate_dict(r) for r in result.gate_results]
        prompts.append(entry)
    configurations = configurations_dict(run)
    layer_gates, layer_not_judged = layer_gate_entries(run)
    port_passed = precision.passed and all(c["verdict"] == "pass"
                                           for c in (configurations or {}).get("entries", [])) \
        and not layer_gate_failures(layer_gates, layer_not_judged)
    quant = run.quantization
    passed = port_passed and (quant is None or quant.passed)
    out = {
        "schema_version": SCHEMA_VERSION,
        "verdict": "pass" if passed else ("error" if precision.nothing_judged else "fail"),
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
                     "strict": run.thresholds.strict or settings.strict_gates,
                     "trust_remote_code": settings.trust_remote_code,
                     "tensor_parallel_size": settings.tensor_parallel_size,
                     "thresholds": run.thresholds.source},
        "aggregate": precision.aggregate(),
        "gates": [gate_dict(r) for r in precision.gate_results],
        "not_judged": [n.as_dict() for n in precision.not_judged] + layer_not_judged,
        "layer_gates": layer_gates,
        "prompts": prompts,
        "sequences": [_depth_entry(r) for r in precision.sequences],
        "noise_floor": noise_floor_summary(precision),
        "decodes": [_depth_entry(r) for r in precision.decodes],
        "model_card": run.card,
        "timings": run.timings,
        "environment": session.environment,
    }
    if precision.nothing_judged:
        out["error"] = precision.nothing_judged
    if configurations is not None:
        out["configurations"] = configurations
    if run.localization is not None:
        out["localization"] = run.localization.as_dict()
    if quant is not None:
        if quant.original is not None:
            out["model"] = quant.original.name  # the model asked for, not its quantized copy
        failed = [g["name"] for g in out["gates"] if not g["passed"]]
        out["quantization"] = {
            "scheme": quant.scheme.describe(),
            "port": {"verdict": "pass" if port_passed else "fail",
                     "reference": f"the float32 run of {quant.checkpoint}'s quantized weights "
                                  "(its floor: the same weights in bfloat16)",
                     "failed_gates": failed,
                     "left_out": list(quant.left_out),
                     "bounds": dict(quant.bounds)},
            "quantization": quant.as_dict(),
        }
    return out


def layer_gate_entries(run: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The layer gates judged on localization's capture, and those it could not judge."""
    loc = run.localization
    if loc is None:
        return [], []
    return ([r.as_dict() for r in getattr(loc, "layer_gates", ())],
            [n.as_dict() for n in getattr(loc, "layer_not_judged", ())])


def layer_gate_failures(judged: Sequence[Mapping[str, Any]],
                        not_judged: Sequence[Mapping[str, Any]]) -> list[str]:
    """The layer gates that fail the run: those above their bound, and under strict those
    not judged."""
    return [g["name"] for g in judged if not g["passed"]] + [
        f"{n['name']} (not judged, strict)" for n in not_judged
        if n.get("scope") == "layer" and n.get("strict")]


def configurations_dict(run: Any) -> dict[str, Any] | None:
    """Every candidate configuration judged: its arguments, its gates, how it differs from
    the base (the first), and whether its switch is what introduces an error. None when the
    backend declares no configurations."""
    entries = run.configurations
    if not entries or not entries[0].configuration.declared:
        return None
    from llm_parity.compare.configurations import compare_configurations

    base = next(c for c in entries if c.precision is not None)
    out = []
    for entry in entries:
        item: dict[str, Any] = {
            **entry.configuration.as_dict(),
            "engine_args": entry.candidate.get("engine_args", {}),
            "timings": entry.timings,
        }
        if entry is not base:
            item["switch"] = entry.configuration.switch(base.configuration)
        if entry.precision is None:
            item.update(verdict="error", error=entry.error, gates=[], failed_gates=[],
                        failed_prompts=[])
            out.append(item)
            continue
        precision = entry.precision
        failed_prompts = sorted({f"{r.view}:{r.prompt.id}" for r in
                                 precision.all_prompt_results if not r.passed})
        item.update(
            verdict="pass" if precision.passed else (
                "error" if precision.nothing_judged else "fail"),
            gates=[gate_dict(r) for r in precision.gate_results],
            failed_gates=[r.gate.name for r in precision.gate_results if not r.passed],
            failed_prompts=failed_prompts,
            not_judged=[n.gate.name for n in precision.not_judged],
            aggregate=precision.aggregate(),
        )
        if entry is not base:
            item["vs_base"] = compare_configurations(base.precision, precision)
        out.append(item)
    base_passed = base.precision.passed
    for item in out:
        # A configuration that fails where the base passes: its switch introduces the error.
        item["introduces_error"] = (item["name"] != base.name and base_passed
                                    and item["verdict"] == "fail")
    return {"base": base.name, "entries": out}


def clean(value: Any) -> Any:
    """JSON has no NaN: unmeasurable values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return clean(value.item())
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
    """The performance block of the verdict: every measured case, every judged gate, what
    was not measured and why, and the order engines were built and released in."""
    if perf_run is None or not (perf_run.results or perf_run.gate_outcomes
                                or perf_run.not_measured):
        return None
    return {
        "cases": [{"key": key, **result.flat()} for key, result in perf_run.results.items()],
        "gates": [outcome.as_dict() for outcome in perf_run.gate_outcomes.values()],
        "not_measured": dict(perf_run.not_measured),
        "engines": [f"{verb} {key}" for verb, key in perf_run.events],
        "max_cv": perf_run.max_cv,
    }


def full_verdict(session: ParitySession, perf_run: Any = None,
                 outcomes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The verdict, with the performance block when benchmarks ran, and the session's own
    outcome folded in: `outcomes` holds the suite's test counts and pytest's exit status, and
    the verdict passes only if they do, so JSON, JUnit and exit status always agree."""
    data = verdict_dict(session)
    performance = performance_dict(perf_run)
    reasons: list[str] = []
    if performance is not None:
        data["performance"] = performance
        failed = [g["name"] for g in performance["gates"] if not g["passed"]]
        if failed:
            reasons.append(f"performance gates failed: {', '.join(failed)}")
        if not session.attempted:
            # A performance-only run: its verdict is the performance side's.
            data["verdict"] = "pass"
            data.pop("error", None)
    if data["verdict"] == "fail":
        failing = [c for c in (data.get("configurations") or {}).get("entries", [])
                   if c["verdict"] != "pass"]
        layer = layer_gate_failures(data.get("layer_gates") or [], data.get("not_judged") or [])
        run = session.run
        quant = (data.get("quantization") or {})
        cost = quant.get("quantization") or {}
        port = quant.get("port")
        if port is not None:  # a quantized candidate: say which question failed
            if port["verdict"] != "pass":
                reasons.append("the port failed, judged against its own quantized weights")
            if cost.get("verdict") == "fail":
                reasons.append("the quantization failed its gates against the unquantized "
                               "original: " + ", ".join(cost["failed_gates"]))
        if port is not None and port["verdict"] == "pass":
            pass
        elif not failing and not (layer and run is not None and run.precision.passed):
            reasons.append("precision gates failed")
        if layer:
            reasons.append(f"layer gates failed: {', '.join(layer)}")
        for c in failing:
            what = (f"could not run ({c['error']})" if c["verdict"] == "error" else
                    "failed gates " + (", ".join(c["failed_gates"]) or "per prompt"))
            switch = (f"; {c['switch']} introduces the error" if c["introduces_error"]
                      else "")
            reasons.append(f"configuration {c['name']} {what}{switch}")
    if outcomes is not None:
        data["session"] = dict(outcomes)
        tests = outcomes.get("tests", {})
        bad = {k: tests.get(k, 0) for k in ("failed", "error")}
        if any(bad.values()):
            reasons.append(", ".join(f"{n} suite tests {'failed' if k == 'failed' else 'errored'}"
                                     for k, n in bad.items() if n))
        if outcomes.get("exit_status", 0) not in (0, None) and not reasons:
            reasons.append(f"pytest exits with status {outcomes['exit_status']}")
    interrupted = session.interrupted
    if interrupted is not None:
        # Whatever was judged before the signal, the run did not finish: not a pass, and
        # not a fail either.
        reason = interruption_text(interrupted)
        reasons.insert(0, reason)
        data["interrupted"] = dict(interrupted)
        if session.run is None and not isinstance(session.error, Exception):
            data["error"] = reason  # the run itself was what the signal stopped
    if reasons and data["verdict"] == "pass":
        data["verdict"] = "fail"
    if interrupted is not None:
        data["verdict"] = "interrupted"
    if reasons:
        data["verdict_reasons"] = reasons
    return clean(data)


def interruption_text(interrupted: Mapping[str, Any]) -> str:
    """One line for an interrupted session: the signal, and the engine step it cut short."""
    what = f"interrupted by {interrupted['signal']}" if interrupted.get("signal") else (
        "interrupted (pytest stopped the session)")
    return what + (f" while {interrupted['during']}" if interrupted.get("during") else "")


# ---------------------------------------------------------------- reading a verdict's views


def kl_by_step(entries: Sequence[Mapping[str, Any]]) -> list[tuple[int, float, float]]:
    """(step, mean, max) of KL across prompts at each continuation step of a depth view."""
    steps = max((len(e["kl"]) for e in entries), default=0)
    out = []
    for j in range(steps):
        column = [e["kl"][j] for e in entries if j < len(e["kl"]) and e["kl"][j] is not None]
        if column:
            out.append((j, sum(column) / len(column), max(column)))
    return out


def kl_by_bucket(entries: Sequence[Mapping[str, Any]], buckets: int = 4
                 ) -> list[tuple[int, int, float]]:
    """(first step, last step, mean KL) over a few equal spans of steps: a bug that grows
    along the continuation shows here."""
    steps = max((len(e["kl"]) for e in entries), default=0)
    size = max(1, -(-steps // buckets))
    out = []
    for start in range(0, steps, size):
        values = [v for e in entries for v in e["kl"][start:start + size] if v is not None]
        if values:
            out.append((start, min(start + size, steps) - 1, sum(values) / len(values)))
    return out
