"""The end-of-run terminal summary, rendered from the verdict alone, so the summary, the
JSON and the reports can never tell different stories."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from llm_parity.compare.gates import GridCase
from llm_parity.compare.layer_gates import layer_gate_line
from llm_parity.compare.metrics import aggregate
from llm_parity.compare.performance import REFERENCE, performance_gate_message, speedup_pairs
from llm_parity.report.messages import localization_lines
from llm_parity.report.text import fmt, port_bounds_text, text_table
from llm_parity.report.verdict import TAIL_WARNING, kl_by_bucket

_VIEWS = (("prompts", "first token"), ("sequences", "sequence"), ("decodes", "decode"))


def precision_summary(data: Mapping[str, Any]) -> list[str]:
    if data.get("verdict") in ("error", "interrupted") and not data.get("prompts"):
        return [f"verdict: {data['verdict'].upper()}   {data.get('error', '')}"]
    candidate, reference = data["candidate"], data.get("reference") or {}
    protocol = data.get("protocol") or {}
    lines = [
        f"verdict: {str(data['verdict']).upper()}   model: {data['model']}   candidate: "
        f"{candidate['backend']} on {candidate['device']} in {candidate['dtype']}   "
        f"reference: hf on {reference.get('device')} in {reference.get('dtype')}",
        f"{protocol.get('prompt_count')} prompts ({protocol.get('prompts')}), first generated "
        f"token, top-{protocol.get('logprobs')} log-probs; gates from {protocol.get('thresholds')}",
    ]
    if candidate.get("workers"):
        lines.append(f"prompts split across {candidate['workers']} workers (pytest-xdist), "
                     "judged together")
    lines.append("")
    lines += quantization_lines(data)
    configurations = data.get("configurations")
    if configurations:
        lines.append(f"gates of the base configuration, {configurations['base']}:")
    lines += _gates_table(data.get("gates") or [])
    lines += configuration_lines(data)
    lines += layer_gate_lines(data)
    lines += quantization_gate_lines(data)
    for gate in data.get("gates") or []:
        if gate.get("note"):
            lines.append(f"note: {gate['name']}: {gate['note']}")
    for entry in data.get("not_judged") or []:
        lines.append(f"NOT JUDGED {entry['name']} ({entry['scope']}, over {entry['over']}): "
                     f"{entry['reason']}" + ("; strict = true makes this a failure"
                                             if entry.get("strict") else ""))
    for reason in data.get("verdict_reasons") or []:
        lines.append(f"verdict reason: {reason}")
    counts = []
    for key, name in _VIEWS:
        entries = data.get(key) or []
        if entries:
            failed = [e["id"] for e in entries if not e.get("passed", True)]
            counts.append(f"{name} {len(entries) - len(failed)}/{len(entries)}"
                          + (f" (failing: {', '.join(failed)})" if failed else ""))
    lines.append("prompts passing their per-prompt gates: " + "; ".join(counts))
    prompts = data.get("prompts") or []
    flips = [p for p in prompts if not p.get("top1_match")]
    near = sum(1 for p in flips if p.get("near_tie"))
    excusing = [g["name"] for g in data.get("gates") or [] if g.get("excuse_near_ties")]
    lines.append(f"top-1 flips: {len(flips)} ({near} near-ties, {len(flips) - near} defects)"
                 + (f"; near-ties excused by {', '.join(excusing)}" if near and excusing else ""))
    worst = sorted((p for p in prompts if p.get("kl") is not None), key=lambda p: -p["kl"])[:3]
    lines.append("worst KL: " + ", ".join(f"{p['id']} {fmt(p['kl'])}" for p in worst))
    lines += _depth_lines(data)
    lines += _noise_floor_lines(data)
    localization = data.get("localization")
    quiet = localization and (localization.get("skipped") or localization.get("for_gates"))
    if localization and (not quiet or data["verdict"] != "pass"
                         or localization.get("mode") == "always"):
        lines += localization_lines(localization)
    tail = (data.get("aggregate") or {}).get("p_tail_max")
    if tail is not None and tail > TAIL_WARNING:
        lines.append(f"warning: up to {fmt(tail)} of the reference mass lies outside the "
                     f"candidate's top-{protocol.get('logprobs')}; the KL shown is a loose "
                     "lower bound (raise --logprobs)")
    timings = data.get("timings") or {}
    if timings:
        lines.append("time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s"
                                          for k, v in timings.items()))
    return lines


def quantization_lines(data: Mapping[str, Any]) -> list[str]:
    """A quantized candidate's two questions, said before the port's gates."""
    block = data.get("quantization")
    if not block:
        return []
    scheme, port, cost = block["scheme"], block["port"], block["quantization"]
    lines = [f"quantized candidate: {scheme['scheme']} ({scheme['method']}, weights "
             f"{scheme['weights']}, activations {scheme['activations']})",
             f"  the port: {port['verdict'].upper()}, judged by the gates below against "
             f"{port['reference']}; the gates with an absolute bound are left out (int8 "
             f"rounding moves the floor itself past them): "
             f"{', '.join(port.get('left_out') or []) or 'none'}"]
    if port.get("bounds"):
        lines.append("  its own bounds ([quantization.port_bounds]): "
                     + port_bounds_text(port["bounds"]))
    if cost.get("judged"):
        lines.append(f"  the quantization: {cost['verdict'].upper()}, the quantized weights "
                     f"against the unquantized original {cost['original']} (gates below)")
    else:
        lines.append(f"  the quantization: not judged: {cost.get('reason')}")
    return lines + [""]


def quantization_gate_lines(data: Mapping[str, Any]) -> list[str]:
    cost = (data.get("quantization") or {}).get("quantization") or {}
    if not cost.get("gates"):
        return []
    return ["", "quantization gates (the float32 run of the quantized weights against the "
                "unquantized original's):", *_gates_table(cost["gates"])]


def layer_gate_lines(data: Mapping[str, Any]) -> list[str]:
    """The layer gates judged on localization's capture, one line each."""
    gates = data.get("layer_gates") or []
    if not gates:
        return []
    return ["", f"layer gates (configuration {gates[0].get('configuration')}; each captured "
                "point's difference from the reference over the bf16 floor's, the largest "
                "over the localized prompts):"] + [
        f"  {'pass' if g['passed'] else 'FAIL'} {g['name']}: {layer_gate_line(g)}"
        for g in gates]


def configuration_lines(data: Mapping[str, Any]) -> list[str]:
    """The configuration x gate matrix, the switch that introduces an error, and how each
    configuration differs from the base on the positions both compared."""
    block = data.get("configurations")
    if not block:
        return []
    entries = block["entries"]
    names = [e["name"] for e in entries]
    gates = list({g["name"]: None for e in entries for g in e["gates"]})
    width = max(16, *(len(n) + 2 for n in names))
    lines = ["", f"configurations (each judged against the same reference and floor; base: "
                 f"{block['base']}):",
             f"{'gate':<28}" + "".join(f"{n:<{width}}" for n in names)]
    for gate in gates:
        cells = []
        for e in entries:
            found = next((g for g in e["gates"] if g["name"] == gate), None)
            cells.append("-" if found is None else
                         f"{'pass' if found['passed'] else 'FAIL'} {fmt(found['value'])}")
        lines.append(f"{gate:<28}" + "".join(f"{c:<{width}}" for c in cells))
    lines.append(f"{'verdict':<28}" + "".join(f"{e['verdict'].upper():<{width}}"
                                               for e in entries))
    for e in entries:
        args = ", ".join(f"{k}={json.dumps(v)}" for k, v in e["args"].items()) or "no arguments"
        lines.append(f"  {e['name']}: {args}" + (f", runs={e['runs']}" if e["runs"] > 1 else "")
                     + (f"  {e['description']}" if e.get("description") else ""))
    for e in entries:
        if e["verdict"] == "error":
            lines.append(f"{e['name']} could not run: {e['error']}")
        elif e["introduces_error"]:
            lines.append(f"{e['name']} fails where {block['base']} passes: {e['switch']} "
                         "introduces the error")
        for view, v in (e.get("vs_base") or {}).items():
            if not v.get("positions"):
                continue
            kl = ""
            if v.get("kl_ratio") is not None:
                kl = (f", KL to the reference x{fmt(v['kl_ratio'])} "
                      f"[{fmt(v['kl_ratio_low'])}, {fmt(v['kl_ratio_high'])}] of {block['base']}'s")
                if v.get("kl_gap_in_floors") is not None:
                    kl += f" ({v['kl_gap_in_floors']:+.1f} floors)"
            lines.append(f"  {e['name']} vs {block['base']}, {view.replace('_', ' ')}: top-1 "
                         f"agrees at {v['positions'] - v['top1_differ']}/{v['positions']} "
                         "positions" + (f" ({v['top1_differ_near_ties']} of the "
                                        f"{v['top1_differ']} differences at near-ties)"
                                        if v["top1_differ"] else "") + kl)
    return lines


def _gates_table(gates: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [f"{'gate':<28}{'over':<13}{'metric':<13}{'aggregate':<10}{'bound':>9}{'value':>11}"
             f"  {'result':<8}95% interval over prompts"]
    for g in gates:
        interval = "" if not g.get("interval") else (
            f"[{fmt(g['interval'][0])}, {fmt(g['interval'][1])}]"
            + (" (judged at the unsafe end)" if g.get("conservative") else ""))
        metric = f"{g['metric']}/floor" if g.get("relative_to") else g["metric"]
        bound = (">= " if g["bound"] == "min" else "<= ") + fmt(g["threshold"])
        value = math.nan if g.get("value") is None else g["value"]
        lines.append(f"{g['name']:<28}{g.get('over', ''):<13}{metric:<13}{g['aggregate']:<10}"
                     f"{bound:>9}{fmt(value):>11}  {'pass' if g['passed'] else 'FAIL':<8}"
                     f"{interval}".rstrip())
    return lines


def _depth_lines(data: Mapping[str, Any]) -> list[str]:
    sequences, decodes = data.get("sequences") or [], data.get("decodes") or []
    if not sequences:
        return []
    kl = sorted(v for e in sequences for v in e["kl"] if v is not None)
    if not kl:
        return []
    lines = [f"teacher-forced: {len(kl)} positions over {len(sequences)} prompts, KL mean "
             f"{fmt(sum(kl) / len(kl))}, p95 {fmt(aggregate(kl, 'p95'))}, max {fmt(kl[-1])}",
             "  KL mean by continuation step: " + ", ".join(
                 f"{start}-{end}: {fmt(value)}" for start, end, value in kl_by_bucket(sequences))]
    diverged = [e for e in decodes if e.get("divergence")]
    defects = [e for e in diverged if not e["divergence"]["near_tie"]]
    agreed = sum(e["divergence"]["step"] if e.get("divergence") else e["positions"]
                 for e in decodes)
    total = sum(e.get("steps_generated", 0) for e in decodes)
    lines.append(f"free-running: {agreed}/{total} steps agreed before divergence; "
                 f"{len(diverged)} of {len(decodes)} prompts diverged "
                 f"({len(diverged) - len(defects)} at near-ties, {len(defects)} at defects)")
    return lines


def _noise_floor_lines(data: Mapping[str, Any]) -> list[str]:
    floor = data.get("noise_floor")
    if not floor:
        return []
    parts = [f"{view.replace('_', ' ')} {fmt(entry.get('kl_mean', math.nan))} (candidate "
             f"{fmt(entry.get('kl_ratio', math.nan))}x)" for view, entry in floor["views"].items()]
    flips = sum(entry["flips"] for entry in floor["views"].values())
    margin = (data.get("protocol") or {}).get("near_tie_margin", 0.0)
    lines = [f"noise floor (hf {floor['dtype']} on {floor['device']} against the reference): "
             f"KL mean {'; '.join(parts)}",
             f"  rounding alone flipped {flips} top-1 tokens, largest reference margin "
             f"{fmt(floor['max_flip_margin'])}"]
    if floor["max_flip_margin"] > margin:
        lines.append(f"warning: rounding alone flipped a token whose reference margin "
                     f"({fmt(floor['max_flip_margin'])}) is above near_tie_margin "
                     f"({fmt(margin)}): such flips count as defects; raise near_tie_margin "
                     "in thresholds.toml")
    return lines


def performance_summary(data: Mapping[str, Any]) -> list[str]:
    """The measured grid as a table, the speedups it shows, and the gates' verdicts."""
    perf = data.get("performance") or {}
    cases = perf.get("cases") or []
    max_cv = perf.get("max_cv", 0.1)
    lines = []
    candidate = next((c for c in cases if c.get("mode") != REFERENCE), None)
    if candidate is not None:
        lines.append(f"candidate: {candidate.get('backend')} on {candidate.get('device')} in "
                     f"{candidate.get('dtype')}"
                     + (f", vllm {candidate['vllm']}" if candidate.get("vllm") else ""))
    lines.append("each figure: median [min-max] over the rounds, then the coefficient of "
                 f"variation (! above max_cv {max_cv:.0%})")
    rows = []
    for c in cases:
        cells = [_spread(c, name, digits, max_cv) for name, digits in (
            ("ttft_ms", 2), ("tpot_ms", 2), ("latency_ms", 1), ("throughput_tok_s", 1))]
        rows.append((c["key"], str(c.get("rounds", "")), *cells, c.get("tpot_method", "")))
    lines += text_table(("case", "rounds", "TTFT ms", "TPOT ms", "latency ms",
                         "output tok/s", "TPOT from"), rows)
    tpot = {c["key"]: c["tpot_ms"] for c in cases if c.get("tpot_ms")}
    measured = [GridCase(c["mode"], c["input_len"], c["output_len"]) for c in cases]
    pairs = [(e, c) for e, c in speedup_pairs(measured) if e.id in tpot and c.id in tpot]
    if pairs:
        lines.append("compiled speedup (eager TPOT / compiled TPOT): " + ", ".join(
            f"in{c.input_len} {tpot[e.id] / tpot[c.id]:.2f}x" for e, c in pairs))
    versus = []
    for c in cases:
        baseline = f"{REFERENCE}-in{c['input_len']}-out{c['output_len']}"
        if c["mode"] != REFERENCE and c["key"] in tpot and baseline in tpot:
            versus.append(f"{c['key']} {tpot[baseline] / tpot[c['key']]:.2f}x")
    if versus:
        ref = next(c for c in cases if c["mode"] == REFERENCE)
        lines.append(f"TPOT speedup over plain Transformers ({ref.get('dtype')} on "
                     f"{ref.get('device')}, {ref.get('threads', '?')} threads): "
                     + ", ".join(versus))
    if perf.get("engines"):
        lines.append("engines, in order: " + ", ".join(perf["engines"]))
    for gate in perf.get("gates") or []:
        lines.append(f"{'PASS' if gate['passed'] else 'FAIL'} {performance_gate_message(gate)}")
        lines += [f"     warning: {text}" for text in gate.get("warnings") or []]
    for key, why in (perf.get("not_measured") or {}).items():
        lines.append(f"not measured: {key} {why}")
    return lines


def _spread(case: Mapping[str, Any], name: str, digits: int, max_cv: float) -> str:
    if case.get(name) is None:
        return "-"
    cv = case.get(f"{name}_cv")
    wide = cv is None or cv > max_cv
    return (f"{case[name]:.{digits}f} [{case[f'{name}_min']:.{digits}f}-"
            f"{case[f'{name}_max']:.{digits}f}] cv {'n/a' if cv is None else f'{cv:.1%}'}"
            + ("!" if wide else ""))

