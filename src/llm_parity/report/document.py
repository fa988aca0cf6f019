"""The acceptance report a team attaches to a port: Markdown, or HTML by extension.

Everything is computed from the verdict (``report.verdict.full_verdict``), so the document
says exactly what the JSON says. The sections here build the report once as a list of
blocks (``report.blocks``); ``report.render`` writes them out as Markdown or as one
self-contained HTML page; figures (inline SVG) appear in the HTML only.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from llm_parity.compare.layer_gates import layer_gate_line
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
from llm_parity.report.details import (
    depth_section,
    error_analysis_section,
    performance_section,
    prompts_section,
    quantization_section,
)
from llm_parity.report.messages import ratio
from llm_parity.report.render import to_html, to_markdown
from llm_parity.report.text import bound_text, fmt, gate_label, pct, value_text

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
    blocks += quantization_section(data)
    blocks += _gates(data)
    blocks += _configurations(data)
    blocks += _localization(data)
    blocks += _model(data)
    blocks += _environment(data)
    blocks += prompts_section(data)
    blocks += depth_section(data)
    blocks += _noise_floor(data)
    blocks += error_analysis_section(data)
    blocks += performance_section(data.get("performance"))
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
        f"Top-1 agreement {pct(agg.get('top1_match_rate'))}, mean cosine "
        f"{value_text(agg.get('cosine_mean'))}, mean KL {value_text(agg.get('kl_mean'))}, mean "
        f"Spearman {value_text(agg.get('spearman_mean'))} (first generated token).",
        f"{len(gates) - len(failed_gates)} of {len(gates)} run gates pass; "
        f"{len(prompts) - len(failed_prompts)} of {len(prompts)} prompts pass every "
        "per-prompt gate"
        + (f"; {len(failed_depth)} prompts fail a continuation gate" if failed_depth else "")
        + ".",
    ]
    for g in failed_gates:
        details.append(f"Failed: **{g['name']}**, {gate_label(g)}, measured "
                       f"{value_text(g['value'])}.")
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
             bound_text(g) + ("x" if g.get("relative_to") else ""), value_text(g["value"]),
             _interval(g), Status("pass" if g["passed"] else "FAIL", g["passed"])]
            for g in data["gates"]]
    rows += [[g["name"], f"layers ({g['over']}, configuration {g.get('configuration')})",
              "ratio / floor", "max", bound_text(g) + "x", value_text(g["value"]), g.get("point", ""),
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
             n["metric"], bound_text(n), n["reason"]] for n in not_judged]))
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
                       Status(value_text(found["value"]) + ("" if found["passed"] else " FAIL"),
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
                                 pct(v["top1_agreement"]),
                                 f"{v['top1_differ']} ({v['top1_differ_near_ties']} near-ties)",
                                 value_text(v.get("kl_ratio")),
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
            [[p["name"], value_text(p["error"]), value_text(p["floor"]),
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
                     value_text(entry.get("kl_mean")), value_text(entry.get("candidate_kl_mean")),
                     value_text(entry.get("kl_ratio")), entry.get("flips")])
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
                     bound_text(gate), Status(f"{passing}/{len(results)}", passing == len(results)),
                     value_text(worst_value), worst_id])
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
                           Table(["", ""], [[k, v if isinstance(v, str) else value_text(v)]
                                            for k, v in rows])]
    timings = data.get("timings") or {}
    if timings:
        blocks.append(Para("Time spent: " + ", ".join(
            f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in timings.items())
            + f"; {sum(timings.values()):.1f} s in all."))
    return blocks


