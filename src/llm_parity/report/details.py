"""The acceptance report's detail sections: per-prompt tables and plots, the depth views,
the error analysis and the performance cases (report/document.py builds the rest and
orders them all)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from llm_parity.compare.gates import GridCase, higher_is_better
from llm_parity.compare.performance import speedup_pairs
from llm_parity.report import plots
from llm_parity.report.blocks import Block, Bullets, Figure, Heading, Para, Plain, Status, Table
from llm_parity.report.text import bound_text, code_token, fmt, port_bounds_text, value_text
from llm_parity.report.verdict import TAIL_WARNING, kl_by_step


def _match_cell(prompt: dict[str, Any]) -> Status:
    if prompt["top1_match"]:
        return Status("yes", True)
    if prompt.get("near_tie"):
        return Status("near-tie", None)
    return Status("NO", False)


def _short(text: str, width: int = 44) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def gate_lines(data: dict[str, Any], metric: str, view: str = "first_token",
               transform=lambda v: v) -> list[plots.Line]:
    """Gate thresholds on one metric, in the plotted quantity: per-prompt gates solid,
    run gates (a bound on an aggregate, not on each prompt) dashed. Gates relative to the
    noise floor bound a ratio, not the metric, and are not drawn."""
    out: list[plots.Line] = []
    seen = set()
    entries = {"first_token": data["prompts"], "sequence": data.get("sequences", [])}[view]
    for entry in entries:
        for g in entry.get("gates", []):
            if (g["metric"] == metric and g.get("over", view) == view and g["name"] not in seen
                    and not g.get("relative_to")):
                seen.add(g["name"])
                whose = "each prompt" if view == "first_token" else f"each prompt's {g['aggregate']}"
                out.append(plots.Line(transform(g["threshold"]), f"{whose} {bound_text(g)}"))
    for g in data["gates"]:
        if (g["metric"] == metric and g.get("over", "first_token") == view
                and not g.get("relative_to")):
            out.append(plots.Line(transform(g["threshold"]),
                                  f"{g['aggregate']} {bound_text(g)}", dashed=True))
    return out


def prompts_section(data: dict[str, Any]) -> list[Block]:
    prompts = data["prompts"]
    has_full = any(p.get("kl_full") is not None for p in prompts)
    header = ["prompt", "text", "tokens", "reference top-1", "candidate top-1", "match",
              "margin", "cosine", "KL"] + (["KL full vocab"] if has_full else []) + ["result"]
    rows = []
    for p in prompts:
        row = [p["id"], Plain(_short(p["prompt"], 34), p["prompt"]), p.get("token_count", ""), code_token(p["reference_top1"]),
               code_token(p["candidate_top1"]), _match_cell(p), value_text(p.get("top1_margin")),
               value_text(p["cosine"]), value_text(p["kl"])]
        if has_full:
            row.append(value_text(p.get("kl_full")))
        row.append(Status("pass" if p.get("passed", True) else "FAIL", p.get("passed", True)))
        rows.append(row)
    numeric = {2, 6, 7, 8} | ({9} if has_full else set())
    blocks: list[Block] = [
        Heading(2, "Prompts"),
        Para("First generated token of each prompt. Margin: the reference's log-prob gap "
             "between its first and second choice; a flip below the near-tie margin "
             f"({fmt((data.get('protocol') or {}).get('near_tie_margin'))}) is one bf16 "
             "rounding can cause. KL is over the candidate's top-k bins plus one tail bin, a "
             "lower bound on the full-vocabulary KL."),
    ]
    labels = [p["id"] for p in prompts]
    failed = [not p.get("passed", True) for p in prompts]
    kl_svg = plots.prompt_bars(
        labels, [p["kl"] for p in prompts], title="KL(reference ‖ candidate) per prompt",
        lines=gate_lines(data, "kl"), failed=failed,
        axis_note="log scale; red bars: prompts that fail a gate")
    one_minus = lambda v: None if v is None else max(1.0 - v, 0.0)  # noqa: E731
    cos_svg = plots.prompt_bars(
        labels, [one_minus(p["cosine"]) for p in prompts], title="Cosine similarity per prompt",
        lines=gate_lines(data, "cosine", transform=one_minus), failed=failed,
        tick_label=plots.cosine_decade_label,
        value_label=_cosine_label,
        axis_note="bar length: distance from 1 (log scale), labelled as the cosine")
    blocks.append(Figure(kl_svg + cos_svg, "Per-prompt KL and cosine against the gate "
                         "thresholds (solid: every prompt; dashed: the run's aggregate)."))
    blocks.append(Table(header, rows, numeric=numeric, wide=True))
    return blocks


def _cosine_label(distance: float | None) -> str:
    """A cosine given as its distance from 1, with enough digits to show that distance."""
    if distance is None:
        return "n/a"
    if distance <= 0:
        return "1"
    digits = min(12, math.ceil(-math.log10(distance)) + 1)
    return f"{1 - distance:.{digits}f}"


def depth_section(data: dict[str, Any]) -> list[Block]:
    sequences = data.get("sequences") or []
    decodes = data.get("decodes") or []
    if not sequences and not decodes:
        return []
    protocol = data.get("protocol") or {}
    blocks: list[Block] = [Heading(2, "Beyond the first token")]
    if sequences:
        total = sum(len(e["kl"]) for e in sequences)
        blocks.append(Para(
            f"Teacher-forced: the reference continued each of {len(sequences)} prompts for "
            f"{protocol.get('continuation', '?')} tokens and the candidate scored that same text "
            f"in one pass, {total} positions in all (the prefill path)."))
        marks = []
        for e in sequences:
            for j, (match, tie) in enumerate(zip(e["top1_match"], e["near_tie"])):
                if not match and e["kl"][j] is not None:
                    marks.append((j, e["kl"][j], "near-tie" if tie else "defect"))
        svg = plots.position_lines(
            [e["kl"] for e in sequences], title="KL by continuation step (teacher-forced)",
            lines=gate_lines(data, "kl", view="sequence"), marks=marks,
            axis_note=f"log scale; {len(sequences)} prompts")
        blocks.append(Figure(svg, "KL at each continuation step: a defect that builds up "
                             "with context (a cache or position bug) shows as a rising line."))
        by_step = kl_by_step(sequences)
        quarter = max(1, len(by_step) // 4)
        rows = []
        for start in range(0, len(by_step), quarter):
            chunk = by_step[start:start + quarter]
            rows.append([f"{chunk[0][0]}-{chunk[-1][0]}", fmt(sum(c[1] for c in chunk) / len(chunk)),
                         fmt(max(c[2] for c in chunk))])
        blocks.append(Table(["steps", "mean KL", "max KL"], rows, numeric={1, 2}))
    if decodes:
        diverged = [e for e in decodes if e.get("divergence")]
        agreed = sum(e["divergence"]["step"] if e.get("divergence") else e["positions"]
                     for e in decodes)
        generated = sum(e.get("steps_generated", e["positions"]) for e in decodes)
        blocks.append(Para(
            f"Free-running: each engine decoded greedily on its own. {agreed} of {generated} "
            f"steps agreed before the first divergence; {len(diverged)} of {len(decodes)} "
            "prompts diverged."))
        if diverged:
            rows = []
            for e in diverged:
                d = e["divergence"]
                rows.append([e["id"], d["step"], code_token(d["reference_token"]),
                             code_token(d["candidate_token"]), value_text(d.get("reference_margin")),
                             Status("near-tie", None) if d["near_tie"] else Status("defect", False),
                             code_token("…" + " ".join(d.get("context", "").split())[-40:])])
            blocks.append(Table(["prompt", "step", "reference", "candidate", "margin", "kind",
                                 "text before it"], rows, numeric={1, 4}, wide=True))
    return blocks


def error_analysis_section(data: dict[str, Any]) -> list[Block]:
    prompts = data["prompts"]
    protocol = data.get("protocol") or {}
    margin = protocol.get("near_tie_margin")
    items: list[str] = []
    flips = [p for p in prompts if not p["top1_match"]]
    near = [p for p in flips if p.get("near_tie")]
    if flips:
        items.append(f"First token: {len(flips)} of {len(prompts)} prompts flipped top-1; "
                     f"{len(near)} were near-ties (the token chosen less than {fmt(margin)} "
                     f"below the reference's top-1), {len(flips) - len(near)} were defects.")
        for p in sorted(flips, key=lambda p: -(p.get("choice_gap") or 0))[:8]:
            kind = "near-tie" if p.get("near_tie") else "defect"
            items.append(f"{p['id']}: reference {code_token(p['reference_top1'])}, candidate "
                         f"{code_token(p['candidate_top1'])}, {value_text(p.get('choice_gap'))} below "
                         f"the reference's top-1, reference margin "
                         f"{value_text(p.get('top1_margin'))} ({kind}).")
    else:
        close = [p for p in prompts if p.get("top1_margin") is not None
                 and margin is not None and p["top1_margin"] < margin]
        text = f"First token: no top-1 flip on any of the {len(prompts)} prompts."
        if close:
            tightest = min(close, key=lambda p: p["top1_margin"])
            text += (f" {len(close)} had a reference margin inside the near-tie margin and still "
                     f"matched (tightest: {tightest['id']}, {fmt(tightest['top1_margin'])}).")
        items.append(text)
    for metric, name in (("kl", "KL"), ("cosine", "cosine")):
        scored = [p for p in prompts if p.get(metric) is not None]
        if not scored:
            continue
        higher = higher_is_better(metric)
        worst = sorted(scored, key=lambda p: p[metric], reverse=not higher)[:3]
        limit = next((g for p in prompts for g in p.get("gates", [])
                      if g["metric"] == metric), None)
        text = f"Worst {name}: " + ", ".join(f"{p['id']} {fmt(p[metric])}" for p in worst)
        if limit is not None and metric == "kl" and worst[0][metric] > 0:
            text += (f"; the worst is {_times(limit['threshold'] / worst[0][metric])} below "
                     f"the per-prompt gate ({bound_text(limit)})")
        elif limit is not None and metric == "cosine" and worst[0][metric] < 1:
            ratio = (1 - limit["threshold"]) / (1 - worst[0][metric])
            text += (f"; the worst is {_times(ratio)} closer to 1 than the per-prompt gate "
                     f"({bound_text(limit)}) asks")
        items.append(text + ".")
    full = [(p["kl"], p["kl_full"]) for p in prompts if p.get("kl_full") is not None
            and p.get("kl") is not None]
    tails = [(p.get("p_tail"), p["id"]) for p in prompts if p.get("p_tail") is not None]
    if full:
        kl_bins = sum(a for a, _ in full) / len(full)
        kl_full = sum(b for _, b in full) / len(full)
        items.append(f"Top-k bound: mean KL over the top-{protocol.get('logprobs', 'k')} bins "
                     f"{fmt(kl_bins)} against {fmt(kl_full)} over the full vocabulary "
                     + (f"({100 * kl_bins / kl_full:.0f}% of it)." if kl_full else "."))
    if tails:
        tail, where = max(tails)
        text = (f"Reference mass outside the candidate's top-{protocol.get('logprobs', 'k')}: "
                f"at most {fmt(tail)} ({where})")
        if tail > TAIL_WARNING:
            text += (f"; above {fmt(TAIL_WARNING)} the bin KL is a loose lower bound of the "
                     "full-vocabulary KL (raise --logprobs to tighten it)")
        items.append(text + ".")
    sequences = data.get("sequences") or []
    if sequences:
        positions = [(e["kl"][j], e["id"], j) for e in sequences for j in range(len(e["kl"]))
                     if e["kl"][j] is not None]
        flips_seq = [(e["id"], j, e["near_tie"][j]) for e in sequences
                     for j in range(len(e["top1_match"])) if not e["top1_match"][j]]
        near_seq = sum(1 for *_, tie in flips_seq if tie)
        items.append(f"Teacher-forced: {len(flips_seq)} top-1 flips in {len(positions)} "
                     f"positions ({near_seq} near-ties, {len(flips_seq) - near_seq} defects).")
        worst = sorted(positions, reverse=True)[:5]
        items.append("Worst positions by KL: " + ", ".join(
            f"{pid} step {j} ({fmt(v)})" for v, pid, j in worst) + ".")
        by_step = kl_by_step(sequences)
        if len(by_step) >= 8:
            quarter = len(by_step) // 4
            first = sum(s[1] for s in by_step[:quarter]) / quarter
            last = sum(s[1] for s in by_step[-quarter:]) / quarter
            ratio = last / first if first else float("inf")
            trend = ("grows with context - look at the KV cache and position handling"
                     if ratio > 2 else "does not grow with context")
            items.append(f"Mean KL over the last quarter of the steps is {_times(ratio)} the first "
                         f"quarter's: the error {trend}.")
    decodes = data.get("decodes") or []
    defects = [e for e in decodes if e.get("divergence") and not e["divergence"]["near_tie"]]
    if decodes:
        diverged = [e for e in decodes if e.get("divergence")]
        text = f"Free-running: {len(diverged)} of {len(decodes)} prompts diverged"
        if diverged:
            text += (f", {len(diverged) - len(defects)} at near-ties and {len(defects)} where "
                     "the reference was sure (defects)")
            earliest = min(diverged, key=lambda e: e["divergence"]["step"])
            text += f"; earliest at step {earliest['divergence']['step']} ({earliest['id']})"
        items.append(text + ".")
    return [Heading(2, "Error analysis"), Bullets(items)]


def _speedups(cases: Sequence[dict[str, Any]]) -> list[tuple[dict, dict, float]]:
    """(eager, compiled, eager TPOT / compiled TPOT), paired as the speedup gate pairs them."""
    by_id = {GridCase(c["mode"], c["input_len"], c["output_len"]).id: c
             for c in cases if c.get("tpot_ms")}
    grid = [GridCase(c["mode"], c["input_len"], c["output_len"]) for c in by_id.values()]
    return [(by_id[e.id], by_id[c.id], by_id[e.id]["tpot_ms"] / by_id[c.id]["tpot_ms"])
            for e, c in speedup_pairs(grid)]


def performance_section(perf: dict[str, Any] | None) -> list[Block]:
    """Performance tables and TPOT chart, from {"cases": [...], "gates": [...]}."""
    if not perf or not perf.get("cases"):
        return []
    order = {"eager": 0, "compiled": 1, "reference": 3}  # the baseline last
    cases = sorted(perf["cases"], key=lambda c: (order.get(c.get("mode"), 2), str(c.get("mode")),
                                                 c["input_len"], c["output_len"]))
    blocks: list[Block] = [Heading(2, "Performance")]
    rows = []
    for c in cases:
        cv = c.get("tpot_ms_cv")
        rows.append([c.get("mode"), c["input_len"], c["output_len"], _ms(c.get("ttft_ms")),
                     _ms(c.get("tpot_ms")), "n/a" if cv is None else f"{100 * cv:.1f}%",
                     _ms(c.get("latency_ms")), value_text(c.get("throughput_tok_s")),
                     c.get("rounds", "")])
    blocks.append(Para("Each figure is the median over the measured rounds; CV is the "
                       "coefficient of variation of TPOT across them."))
    blocks.append(Table(["mode", "input tokens", "output tokens", "TTFT ms", "TPOT ms",
                         "TPOT CV", "latency ms", "output tok/s", "rounds"], rows,
                        numeric={1, 2, 3, 4, 5, 6, 7, 8}))
    speedups = _speedups(cases)
    if speedups:
        blocks.append(Para("Compiled (graph) mode against eager, by TPOT:"))
        blocks.append(Table(["input tokens", "eager TPOT ms", "compiled TPOT ms", "speedup"], [
            [c["input_len"], f"{_ms(e['tpot_ms'])} (out {e['output_len']})",
             f"{_ms(c['tpot_ms'])} (out {c['output_len']})", f"{s:.2f}x"]
            for e, c, s in speedups], numeric={0, 1, 2, 3}))
    modes = list(dict.fromkeys(c["mode"] for c in cases))
    groups = sorted({c["input_len"] for c in cases})
    values = {}
    for c in cases:
        if c.get("tpot_ms") is None:
            continue
        values[(f"in {c['input_len']}", f"{c['mode']}")] = (
            c["tpot_ms"], c.get("tpot_ms_min"), c.get("tpot_ms_max"),
            f"{c['tpot_ms']:.3g}")
    if values:
        svg = plots.grouped_bars([f"in {g}" for g in groups], modes, values,
                                 title="TPOT by input length and mode", y_label="TPOT (ms)",
                                 axis_note="median over rounds; whiskers: fastest to slowest "
                                           "round")
        blocks.append(Figure(svg, "Time per output token for each grid case (lower is "
                                  "better)."))
    gates = perf.get("gates") or []
    if gates:
        blocks.append(Para("Performance gates:"))
        blocks.append(Table(["gate", "metric", "aggregate", "threshold", "measured", "result"], [
            [g["name"], g["metric"] + (f" ({g['mode']})" if g.get("mode") else ""),
             g["aggregate"], bound_text(g), value_text(g.get("value")),
             Status("pass" if g.get("passed") else "FAIL", bool(g.get("passed")))]
            for g in gates], numeric={3, 4}))
    return blocks


def _times(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2g}x"


def _ms(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def quantization_section(data: dict[str, Any]) -> list[Block]:
    """A quantized candidate's two questions, apart: the port (every gate above, against
    the quantized weights) and what the quantization costs against the original."""
    block = data.get("quantization")
    if not block:
        return []
    scheme, port, cost = block["scheme"], block["port"], block["quantization"]
    blocks: list[Block] = [Heading(2, "Quantization"), Para(
        f"The candidate is quantized: {scheme['scheme']} ({scheme['method']}, "
        f"{scheme['format']}), weights {scheme['weights']}, activations "
        f"{scheme['activations']}; kept unquantized: "
        f"{', '.join(scheme.get('ignore') or []) or 'nothing'}. It is judged twice.")]
    rows = [["the port", f"the candidate against {port['reference']}",
             Status(port["verdict"].upper() if port["verdict"] != "pass" else "pass",
                    port["verdict"] == "pass"),
             ", ".join(port["failed_gates"]) or "-"]]
    if cost.get("judged"):
        rows.append(["the quantization",
                     f"the float32 run of the quantized weights against the unquantized "
                     f"original ({cost['original']})",
                     Status("pass" if cost["verdict"] == "pass" else "FAIL",
                            cost["verdict"] == "pass"),
                     ", ".join(cost.get("failed_gates") or []) or "-"])
    else:
        rows.append(["the quantization", "not judged", Status("-", None),
                     str(cost.get("reason"))])
    blocks.append(Table(["question", "compared", "result", "failed gates"], rows))
    if port.get("left_out"):
        blocks.append(Para("The port is judged by the gates read against its floor: those "
                           "with an absolute bound, set for bf16 rounding, are left out "
                           f"({', '.join(port['left_out'])}), since rounding activations to "
                           "int8 in bf16 moves the floor itself past them."))
    if port.get("bounds"):
        blocks.append(Para("Bounds of its own for a quantized port ([quantization.port_bounds]"
                           f" in thresholds.toml): {port_bounds_text(port['bounds'])}."))
    if cost.get("gates"):
        blocks.append(Para("What the quantization costs, by the [quantization] gates:"))
        blocks.append(Table(["gate", "over", "metric", "aggregate", "threshold", "measured",
                             "result"], [
            [g["name"], g.get("over", "first_token"), g["metric"], g["aggregate"],
             bound_text(g), value_text(g["value"]),
             Status("pass" if g["passed"] else "FAIL", g["passed"])] for g in cost["gates"]],
            numeric={4, 5}))
    return blocks
