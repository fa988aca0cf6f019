"""The acceptance report a team attaches to a port: Markdown, or HTML by extension.

Everything is computed from the verdict (``report.verdict.full_verdict``), so the document
says exactly what the JSON says. The sections here build the report once as a list of
blocks (``report.blocks``); ``report.render`` writes them out as Markdown or as one
self-contained HTML page; figures (inline SVG) appear in the HTML only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llm_parity.compare.gates import GridCase, higher_is_better
from llm_parity.compare.layer_gates import layer_gate_line
from llm_parity.compare.performance import speedup_pairs
from llm_parity.report import plots
from llm_parity.report.blocks import (
    Banner,
    Block,
    Bullets,
    Code,
    Figure,
    Heading,
    Para,
    Plain,
    Status,
    Table,
)
from llm_parity.report.messages import ratio
from llm_parity.report.render import to_html, to_markdown
from llm_parity.report.text import fmt
from llm_parity.report.verdict import TAIL_WARNING, kl_by_step

if TYPE_CHECKING:
    pass

_VIEW_NAMES = {"first_token": "first token", "sequence": "teacher-forced",
               "decode": "free-running"}
_ENV_NAMES = {"python": "Python", "platform": "OS", "llm_parity": "llm-parity",
              "torch": "torch", "transformers": "transformers", "vllm": "vLLM",
              "vllm_ascend": "vLLM-Ascend", "torch_npu": "torch_npu", "cann": "CANN",
              "device": "candidate device", "device_name": "device name",
              "model_source": "model source", "model_path": "model path",
              "checkpoint_sha256": "checkpoint sha256"}


# ---------------------------------------------------------------- entry points


def render_verdict(data: dict[str, Any], suffix: str = ".md", *,
                   generated: str | None = None) -> str:
    """The report from a verdict as --parity-json writes it; ``generated`` is a date line."""
    blocks = build_blocks(data, generated)
    if suffix.lower() in (".html", ".htm"):
        return to_html(blocks, _title(data))
    return to_markdown(blocks)


# ---------------------------------------------------------------- content


def _title(data: dict[str, Any]) -> str:
    return f"llm-parity acceptance report: {data.get('model', '?')}"


def _engine(engine: dict[str, Any] | None) -> str:
    if not engine:
        return "?"
    text = f"{engine.get('backend')} on {engine.get('device')} in {engine.get('dtype')}"
    if engine.get("vllm"):
        text += f" (vLLM {engine['vllm']})"
    return text


def _bound(gate: dict[str, Any]) -> str:
    return f"{'≥' if gate['bound'] == 'min' else '≤'} {fmt(gate['threshold'])}"


def _value(value: Any) -> str:
    return "n/a" if value is None else fmt(value)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.4g}%"


def _tok(text: Any) -> str:
    """A token as the tokenizer shows it, safe inside a `code` span."""
    return "`" + str(text).replace("`", "ˋ") + "`"


def _gate_label(gate: dict[str, Any]) -> str:
    return f"{gate['aggregate']} {gate['metric']} {_bound(gate)}"


def build_blocks(data: dict[str, Any], generated: str | None = None) -> list[Block]:
    blocks: list[Block] = [Heading(1, _title(data))]
    if generated:
        version = (data.get("environment") or {}).get("llm_parity")
        blocks.append(Para(f"Generated {generated}"
                           + (f" by llm-parity {version}" if version else "") + "."))
    if data.get("verdict") == "error" or (data.get("verdict") == "interrupted"
                                          and not data.get("prompts")):
        kind = str(data["verdict"])
        blocks.append(Banner(kind, f"{kind.upper()}: the precision run did not finish, so "
                             "nothing was judged.", []))
        blocks.append(Code(str(data.get("error", ""))))
        blocks += _environment(data)
        return blocks
    blocks.append(_banner(data))
    blocks += _gates(data)
    blocks += _configurations(data)
    blocks += _localization(data)
    blocks += _model(data)
    blocks += _environment(data)
    blocks += _prompts(data)
    blocks += _depth(data)
    blocks += _noise_floor(data)
    blocks += _error_analysis(data)
    blocks += _performance(data.get("performance"))
    blocks += _protocol(data)
    return blocks


def _banner(data: dict[str, Any]) -> Banner:
    gates = data["gates"]
    prompts = data["prompts"]
    failed_gates = [g for g in gates if not g["passed"]]
    failed_prompts = [p for p in prompts if not p.get("passed", True)]
    depth = [*data.get("sequences", []), *data.get("decodes", [])]
    failed_depth = {p["id"] for p in depth if not p.get("passed", True)}
    agg = data["aggregate"]
    perf = data.get("performance") or {}
    perf_gates = perf.get("gates", [])
    failed_perf = [g for g in perf_gates if not g.get("passed")]
    verdict = data["verdict"]
    subject = (f"the candidate ({_engine(data.get('candidate'))}) against the reference "
               f"({_engine(data.get('reference'))}) on {len(prompts)} prompts")
    if verdict == "interrupted":
        reason = (data.get("verdict_reasons") or ["interrupted"])[0]
        headline = (f"INTERRUPTED: {subject}; {reason}. What follows was judged before the "
                    "session was cut short.")
    elif verdict == "pass" and not failed_perf:
        headline = f"PASS: {subject}, every gate met."
    elif verdict == "pass":
        headline = f"PASS on precision, FAIL on speed: {subject}."
    else:
        headline = f"FAIL: {subject}."
    details = [
        f"Top-1 agreement {_pct(agg.get('top1_match_rate'))}, mean cosine "
        f"{_value(agg.get('cosine_mean'))}, mean KL {_value(agg.get('kl_mean'))}, mean "
        f"Spearman {_value(agg.get('spearman_mean'))} (first generated token).",
        f"{len(gates) - len(failed_gates)} of {len(gates)} run gates pass; "
        f"{len(prompts) - len(failed_prompts)} of {len(prompts)} prompts pass every "
        "per-prompt gate"
        + (f"; {len(failed_depth)} prompts fail a continuation gate" if failed_depth else "")
        + ".",
    ]
    for g in failed_gates:
        details.append(f"Failed: **{g['name']}**, {_gate_label(g)}, measured "
                       f"{_value(g['value'])}.")
    for g in data.get("layer_gates") or []:  # on localization's capture (compare/layer_gates.py)
        if not g["passed"]:
            details.append(f"Failed: layer gate **{g['name']}**, {layer_gate_line(g)}.")
    if failed_prompts:
        details.append("Failing prompts: " + ", ".join(p["id"] for p in failed_prompts) + ".")
    configurations = (data.get("configurations") or {}).get("entries", [])
    if configurations:
        base = data["configurations"]["base"]
        bad = [c for c in configurations if c["verdict"] != "pass"]
        details.append(
            f"Judged in {len(configurations)} candidate configurations (the figures above are "
            f"{base}'s); " + ("all pass." if not bad else "failing: " + ", ".join(
                f"**{c['name']}** ({'could not run' if c['verdict'] == 'error' else str(len(c['failed_gates'])) + ' gates'}"
                + ("; its switch introduces the error" if c["introduces_error"] else "") + ")"
                for c in bad) + "."))
    if perf_gates:
        details.append(f"{len(perf_gates) - len(failed_perf)} of {len(perf_gates)} performance "
                       "gates pass" + ("." if not failed_perf else ": failed "
                                       + ", ".join(g["name"] for g in failed_perf) + "."))
    return Banner(verdict if not failed_perf or verdict == "interrupted" else "fail", headline,
                  details)


def _gates(data: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Gates")]
    rows = [[g["name"], _VIEW_NAMES.get(g.get("over", "first_token"), g.get("over")),
             g["metric"] + (" / floor" if g.get("relative_to") else ""), g["aggregate"],
             _bound(g) + ("x" if g.get("relative_to") else ""), _value(g["value"]),
             _interval(g), Status("pass" if g["passed"] else "FAIL", g["passed"])]
            for g in data["gates"]]
    rows += [[g["name"], f"layers ({g['over']}, configuration {g.get('configuration')})",
              "ratio / floor", "max", _bound(g) + "x", _value(g["value"]), g.get("point", ""),
              Status("pass" if g["passed"] else "FAIL", g["passed"])]
             for g in data.get("layer_gates") or []]
    blocks.append(Table(["gate", "over", "metric", "aggregate", "threshold", "measured",
                         "95% interval over prompts", "result"], rows, numeric={4, 5}))
    if any(g.get("relative_to") for g in data["gates"]):
        blocks.append(Para("A gate read against the noise floor divides the candidate's value "
                           "by what Transformers in the candidate's dtype gives against the "
                           "same reference: 1 means as close as bf16 rounding allows."))
    excusing = [g["name"] for g in data["gates"] if g.get("excuse_near_ties")]
    if excusing:
        blocks.append(Para(f"{', '.join(excusing)} counts a top-1 flip inside the near-tie "
                           "margin as a match: bf16 rounding alone flips such tokens. Every "
                           "flip is still listed below, near-ties apart from defects."))
    if any(g.get("conservative") for g in data["gates"]):
        blocks.append(Para("A conservative gate is judged at the failing end of its interval, "
                           "so a pass does not rest on a lucky draw of prompts."))
    not_judged = data.get("not_judged") or []
    if not_judged:
        strict = any(n.get("strict") for n in not_judged)
        blocks.append(Para("**Not judged.** These gates could not be judged in this run, so "
                           "its verdict says nothing about them"
                           + (" (strict: each counts as a failure):" if strict else ":")))
        blocks.append(Table(["gate", "scope", "over", "metric", "threshold", "why"], [
            [n["name"], n.get("scope", ""), _VIEW_NAMES.get(n.get("over"), n.get("over")),
             n["metric"], _bound(n), n["reason"]] for n in not_judged]))
    if data.get("verdict_reasons"):
        blocks.append(Bullets([f"Verdict: {reason}." for reason in data["verdict_reasons"]]))
    prompt_rows = _prompt_gate_rows(data)
    if prompt_rows:
        blocks.append(Para("Per-prompt gates hold on every prompt on its own, so one bad "
                           "prompt cannot hide in a mean:"))
        blocks.append(Table(["gate", "over", "metric", "aggregate", "threshold",
                             "prompts passing", "worst", "worst prompt"], prompt_rows,
                            numeric={4, 5, 6}))
    return blocks


def _configurations(data: dict[str, Any]) -> list[Block]:
    block = data.get("configurations")
    if not block:
        return []
    entries, base = block["entries"], block["base"]
    blocks: list[Block] = [Heading(2, "Configurations"), Para(
        f"The candidate was built once per configuration (a named set of engine arguments) "
        f"and every gate judged in each, against the same reference and noise floor. The "
        f"gates above are the base configuration's, **{base}**.")]
    blocks.append(Table(
        ["configuration", "engine arguments", "verdict", "gates failing", "switch from " + base],
        [[e["name"], ", ".join(f"{k}={json.dumps(v)}" for k, v in e["args"].items())
          + (f"; runs={e['runs']}" if e["runs"] > 1 else ""),
          Status(e["verdict"].upper(), e["verdict"] == "pass"),
          (f"{len(e['failed_gates'])} of {len(e['gates'])}" if e["verdict"] != "error"
           else Plain((e.get("error") or "")[:160])),
          e.get("switch", "(base)")] for e in entries]))
    gates = list({g["name"]: None for e in entries for g in e["gates"]})
    rows = []
    for gate in gates:
        row: list[Any] = [gate]
        for e in entries:
            found = next((g for g in e["gates"] if g["name"] == gate), None)
            row.append("-" if found is None else
                       Status(_value(found["value"]) + ("" if found["passed"] else " FAIL"),
                              bool(found["passed"])))
        rows.append(row)
    blocks.append(Para("Each gate in each configuration, its measured value:"))
    blocks.append(Table(["gate", *[e["name"] for e in entries]], rows,
                        numeric=set(range(1, len(entries) + 1)), wide=True))
    notes = []
    for e in entries:
        if e["introduces_error"]:
            notes.append(f"**{e['name']}** fails where {base} passes: `{e['switch']}` "
                         "introduces the error.")
        elif e["verdict"] == "error":
            notes.append(f"**{e['name']}** could not run: {e.get('error')}")
    if notes:
        blocks.append(Bullets(notes))
    compared = []
    for e in entries:
        for view, v in (e.get("vs_base") or {}).items():
            if v.get("positions"):
                compared.append([e["name"], _VIEW_NAMES.get(view, view), v["positions"],
                                 _pct(v["top1_agreement"]),
                                 f"{v['top1_differ']} ({v['top1_differ_near_ties']} near-ties)",
                                 _value(v.get("kl_ratio")),
                                 _interval({"interval": [v.get("kl_ratio_low"),
                                                         v.get("kl_ratio_high")]}),
                                 "" if v.get("kl_gap_in_floors") is None
                                 else f"{v['kl_gap_in_floors']:+.1f}"])
    if compared:
        blocks.append(Para(f"Each configuration against {base} on the positions both compared: "
                           "where their top-1 choices differ, and their mean KL to the "
                           "reference as a ratio (paired 95% interval over prompts) and as a "
                           "gap counted in noise floors. A difference between modes shows here "
                           "even when both pass the gates."))
        blocks.append(Table(["configuration", "view", "positions", "top-1 agreement",
                             "top-1 differences", f"KL / {base}'s", "95% interval",
                             "gap in floors"], compared, numeric={2, 3, 5, 7}))
    return blocks


def _localization(data: dict[str, Any]) -> list[Block]:
    loc = data.get("localization")
    if not loc or ((loc.get("skipped") or loc.get("for_gates")) and data.get("verdict") == "pass"
                   and loc.get("mode") != "always"):
        return []
    blocks: list[Block] = [Heading(2, "Where it diverges")]
    if loc.get("skipped") or loc.get("error"):
        blocks.append(Para(("Not localized: " + loc["skipped"]) if loc.get("skipped")
                           else "Localization could not finish: " + loc["error"]))
        return blocks
    head = next((r for r in loc["results"] if r["where"] == loc["where"]), loc["results"][0])
    count = len(head["positions"])
    positions = f"{count} position{'s' if count != 1 else ''}"
    blocks.append(Para(
        f"The worst prompt, **{head['prompt_id']}** ({positions} of the "
        f"{head['view'].replace('_', '-')} view), ran again through the reference, the "
        f"{head.get('floor_dtype') or 'rounding'} floor and the candidate (configuration "
        f"**{loc['configuration']}**) with every layer's output captured. Each point's "
        "difference from the reference is shown as a multiple of the floor's difference at "
        "the same point, so the growth of rounding error with depth is taken out: a correct "
        f"port sits near 1x everywhere; above {ratio(head['limit'])} a point has diverged."))
    if loc["diverged"]:
        answer = f"First diverging: **{loc['where']}**."
        before = [p["ratio"] for p in head["points"] if p["module"] == "output"
                  and head["layer"] is not None and p["layer"] < head["layer"]]
        if before:
            answer += (f" The {len(before)} layers before it are within "
                       f"{ratio(max(before))} their floors.")
    else:
        answer = "No captured point diverges: every layer is within its floor."
    blocks.append(Para(answer))
    notes = [n for n in (head.get("note"), loc.get("note"))
             if n and n != "every captured point is within its floor"]
    if notes:
        blocks.append(Bullets(notes))
    stream = [p for p in head["points"] if p["module"] in ("embed", "output", "final_norm")]
    labels = ["embedding" if p["module"] == "embed" else "final norm"
              if p["module"] == "final_norm" else f"layer {p['layer']}" for p in stream]
    blocks.append(Figure(plots.prompt_bars(
        labels, [p["ratio"] for p in stream], title="Ratio to the bf16 floor, by layer",
        lines=[plots.Line(head["limit"], f"limit {fmt(head['limit'])}x"),
               plots.Line(1.0, "floor (1x)", dashed=True)],
        failed=[p["diverged"] for p in stream],
        axis_note="each layer's output (the residual stream) against the same point of the "
                  "floor"), "Each layer's difference from the reference, in floors."))
    if head["layer"] is not None:
        inside = [p for p in head["points"] if p["layer"] == head["layer"]]
        blocks.append(Para(f"Inside layer {head['layer']}, in the order a token passes them:"))
        blocks.append(Table(
            ["point", "candidate's relative error", "floor's relative error", "ratio"],
            [[p["name"], _value(p["error"]), _value(p["floor"]),
              Status(ratio(p["ratio"]), not p["diverged"])] for p in inside],
            numeric={1, 2, 3}))
    return blocks


def _interval(gate: dict[str, Any]) -> str:
    interval = gate.get("interval")
    if not interval or interval[0] is None or interval[1] is None:
        return ""
    return f"{fmt(interval[0])} to {fmt(interval[1])}" + (" (judged)" if gate.get(
        "conservative") else "")


def _noise_floor(data: dict[str, Any]) -> list[Block]:
    floor = data.get("noise_floor")
    if not floor:
        return []
    blocks: list[Block] = [Heading(2, "Noise floor")]
    blocks.append(Para(
        f"Transformers in {floor['dtype']} on {floor['device']} against the same float32 "
        "reference, same prompts and positions: what rounding alone costs. The candidate's "
        "KL is shown as a multiple of it."))
    rows = []
    for view, entry in floor["views"].items():
        rows.append([_VIEW_NAMES.get(view, view), entry.get("positions"),
                     _value(entry.get("kl_mean")), _value(entry.get("candidate_kl_mean")),
                     _value(entry.get("kl_ratio")), entry.get("flips")])
    blocks.append(Table(["view", "positions", "floor KL mean", "candidate KL mean",
                         "candidate / floor", "rounding flips"], rows, numeric={1, 2, 3, 4, 5}))
    blocks.append(Para(f"Rounding alone flipped top-1 tokens with reference margins up to "
                       f"{fmt(floor.get('max_flip_margin'))}; flips below the near-tie margin "
                       f"({fmt((data.get('protocol') or {}).get('near_tie_margin'))}) are "
                       "reported as near-ties, not defects."))
    return blocks


def _prompt_gate_rows(data: dict[str, Any]) -> list[list[Any]]:
    by_gate: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for view, entries in (("first_token", data["prompts"]),
                          ("sequence", data.get("sequences", [])),
                          ("decode", data.get("decodes", []))):
        for entry in entries:
            for gate in entry.get("gates", []):
                over = gate.get("over", view)
                by_gate.setdefault((gate["name"], over), []).append((entry["id"], gate))
    rows = []
    for (name, over), results in by_gate.items():
        gate = results[0][1]
        measured = [(g["value"], pid) for pid, g in results if g["value"] is not None]
        if measured and len({value for value, _ in measured}) == 1:
            worst_value, worst_id = measured[0][0], "(all equal)"
        elif measured:
            pick = min if gate["bound"] == "min" else max
            worst_value, worst_id = pick(measured, key=lambda item: item[0])
        else:
            worst_value, worst_id = None, "-"
        passing = sum(1 for _, g in results if g["passed"])
        rows.append([name, _VIEW_NAMES.get(over, over), gate["metric"], gate["aggregate"],
                     _bound(gate), Status(f"{passing}/{len(results)}", passing == len(results)),
                     _value(worst_value), worst_id])
    return rows


def _model(data: dict[str, Any]) -> list[Block]:
    card = data.get("model_card") or {}
    if not card:
        return []
    files = card.get("weight_files") or []
    size = card.get("weight_bytes")
    rows = [
        ["checkpoint", data.get("model")],
        ["candidate checkpoint", data.get("candidate_model", data.get("model"))],
        ["architecture", card.get("architecture")],
        ["parameters", f"{card['parameters']:,}" if card.get("parameters") else "unknown"],
        ["layers / hidden size", f"{card.get('layers')} / {card.get('hidden_size')}"],
        ["attention heads / KV heads", f"{card.get('attention_heads')} / {card.get('kv_heads')}"],
        ["vocabulary", f"{card['vocab_size']:,}" if card.get("vocab_size") else "unknown"],
        ["max positions", card.get("max_position_embeddings")],
        ["RoPE theta", card.get("rope_theta")],
        ["tied embeddings", card.get("tie_word_embeddings")],
        ["weight dtype", card.get("weight_dtype")],
        ["weight files", f"{len(files)} ({', '.join(files)})" if files else "none found"],
        ["weight size", f"{size / 1e6:,.1f} MB ({size:,} bytes)" if size else "unknown"],
        ["tensors", card.get("tensors")],
    ]
    sha = (data.get("environment") or {}).get("checkpoint_sha256")
    if sha:
        rows.append(["checkpoint sha256", f"`{sha}`"])
    return [Heading(2, "Model"), Table(["", ""], [[k, _card_value(v)] for k, v in rows])]


def _card_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value:,g}" if isinstance(value, float) else f"{value:,}"
    return "unknown" if value is None else str(value)


def _environment(data: dict[str, Any]) -> list[Block]:
    env = data.get("environment") or {}
    if not env:
        return []
    skip = {"model", "parameters", "checkpoint_sha256"}
    rows = [[_ENV_NAMES.get(k, k), str(v)] for k, v in env.items()
            if v is not None and k not in skip]
    absent = [_ENV_NAMES.get(k, k) for k, v in env.items() if v is None]
    blocks: list[Block] = [Heading(2, "Hardware and software"),
                           Para(f"Candidate: {_engine(data.get('candidate'))}. Reference: "
                                f"{_engine(data.get('reference'))}."),
                           Table(["component", "version or name"], rows)]
    if absent:
        blocks.append(Para("Not present on this machine: " + ", ".join(absent) + "."))
    return blocks


def _match_cell(prompt: dict[str, Any]) -> Status:
    if prompt["top1_match"]:
        return Status("yes", True)
    if prompt.get("near_tie"):
        return Status("near-tie", None)
    return Status("NO", False)


def _short(text: str, width: int = 44) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _lines_for(data: dict[str, Any], metric: str, view: str = "first_token",
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
                out.append(plots.Line(transform(g["threshold"]), f"{whose} {_bound(g)}"))
    for g in data["gates"]:
        if (g["metric"] == metric and g.get("over", "first_token") == view
                and not g.get("relative_to")):
            out.append(plots.Line(transform(g["threshold"]),
                                  f"{g['aggregate']} {_bound(g)}", dashed=True))
    return out


def _prompts(data: dict[str, Any]) -> list[Block]:
    prompts = data["prompts"]
    has_full = any(p.get("kl_full") is not None for p in prompts)
    header = ["prompt", "text", "tokens", "reference top-1", "candidate top-1", "match",
              "margin", "cosine", "KL"] + (["KL full vocab"] if has_full else []) + ["result"]
    rows = []
    for p in prompts:
        row = [p["id"], Plain(_short(p["prompt"], 34), p["prompt"]), p.get("token_count", ""), _tok(p["reference_top1"]),
               _tok(p["candidate_top1"]), _match_cell(p), _value(p.get("top1_margin")),
               _value(p["cosine"]), _value(p["kl"])]
        if has_full:
            row.append(_value(p.get("kl_full")))
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
        lines=_lines_for(data, "kl"), failed=failed,
        axis_note="log scale; red bars: prompts that fail a gate")
    one_minus = lambda v: None if v is None else max(1.0 - v, 0.0)  # noqa: E731
    cos_svg = plots.prompt_bars(
        labels, [one_minus(p["cosine"]) for p in prompts], title="Cosine similarity per prompt",
        lines=_lines_for(data, "cosine", transform=one_minus), failed=failed,
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


def _depth(data: dict[str, Any]) -> list[Block]:
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
            lines=_lines_for(data, "kl", view="sequence"), marks=marks,
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
                rows.append([e["id"], d["step"], _tok(d["reference_token"]),
                             _tok(d["candidate_token"]), _value(d.get("reference_margin")),
                             Status("near-tie", None) if d["near_tie"] else Status("defect", False),
                             _tok("…" + " ".join(d.get("context", "").split())[-40:])])
            blocks.append(Table(["prompt", "step", "reference", "candidate", "margin", "kind",
                                 "text before it"], rows, numeric={1, 4}, wide=True))
    return blocks


def _error_analysis(data: dict[str, Any]) -> list[Block]:
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
            items.append(f"{p['id']}: reference {_tok(p['reference_top1'])}, candidate "
                         f"{_tok(p['candidate_top1'])}, {_value(p.get('choice_gap'))} below "
                         f"the reference's top-1, reference margin "
                         f"{_value(p.get('top1_margin'))} ({kind}).")
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
                     f"the per-prompt gate ({_bound(limit)})")
        elif limit is not None and metric == "cosine" and worst[0][metric] < 1:
            ratio = (1 - limit["threshold"]) / (1 - worst[0][metric])
            text += (f"; the worst is {_times(ratio)} closer to 1 than the per-prompt gate "
                     f"({_bound(limit)}) asks")
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


def _performance(perf: dict[str, Any] | None) -> list[Block]:
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
                     _ms(c.get("latency_ms")), _value(c.get("throughput_tok_s")),
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
             g["aggregate"], _bound(g), _value(g.get("value")),
             Status("pass" if g.get("passed") else "FAIL", bool(g.get("passed")))]
            for g in gates], numeric={3, 4}))
    return blocks


def _times(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2g}x"


def _ms(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def _protocol(data: dict[str, Any]) -> list[Block]:
    protocol = data.get("protocol") or {}
    if not protocol:
        return []
    rows = [
        ["prompt set", f"{protocol.get('prompts')} ({protocol.get('prompt_count')} prompts)"],
        ["long-context prompt set", protocol.get("long_prompts") or "none"],
        ["compared", f"first generated token; continuation of {protocol.get('continuation')} "
                     "tokens" if protocol.get("continuation") else "first generated token"],
        ["candidate top-k log-probs", protocol.get("logprobs")],
        ["near-tie margin", protocol.get("near_tie_margin")],
        ["thresholds", protocol.get("thresholds")],
    ]
    args = (data.get("candidate") or {}).get("engine_args")
    if args:
        rows.append(["candidate engine arguments", ", ".join(f"{k}={v}" for k, v in args.items())])
    blocks: list[Block] = [Heading(2, "Protocol"),
                           Table(["", ""], [[k, v if isinstance(v, str) else _value(v)]
                                            for k, v in rows])]
    timings = data.get("timings") or {}
    if timings:
        blocks.append(Para("Time spent: " + ", ".join(
            f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in timings.items())
            + f"; {sum(timings.values()):.1f} s in all."))
    return blocks


