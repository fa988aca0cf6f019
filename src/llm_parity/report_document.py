"""The acceptance report a team attaches to a port: Markdown, or HTML by extension."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from llm_parity.report import fmt, table, verdict_dict, worst_prompts

if TYPE_CHECKING:
    from llm_parity.session import ParitySession


def render_markdown(session: ParitySession) -> str:
    data = verdict_dict(session)
    lines = [f"# llm-parity acceptance report: {data['model']}", ""]
    lines.append(f"**Verdict: {data['verdict'].upper()}**")
    lines.append("")
    if session.run is None:
        lines += ["The precision run did not finish:", "", "```", data.get("error", ""), "```"]
        return "\n".join(lines) + "\n"
    run = session.run
    precision = run.precision
    card = run.card
    lines += ["## Model", ""]
    lines += table(["field", "value"], [
        ("checkpoint", run.reference_model.name),
        ("candidate checkpoint", run.candidate_model.name),
        ("architecture", card.get("architecture")),
        ("parameters", f"{card['parameters']:,}" if card.get("parameters") else None),
        ("layers / hidden / heads / KV heads",
         f"{card.get('layers')} / {card.get('hidden_size')} / {card.get('attention_heads')} / "
         f"{card.get('kv_heads')}"),
        ("vocabulary", card.get("vocab_size")),
        ("weight dtype", card.get("weight_dtype")),
        ("weight files", f"{len(card['weight_files'])}, {card['weight_bytes'] / 1e6:.1f} MB, "
                         f"{card.get('tensors')} tensors"),
    ])
    lines += ["", "## Hardware and software", ""]
    lines += table(["component", "version"],
                   [(k, v) for k, v in data["environment"].items() if v is not None])
    lines += ["", "## Gates", ""]
    lines += table(["gate", "metric", "aggregate", "threshold", "measured", "result"], [
        (g["name"], g["metric"], g["aggregate"], f"{'>=' if g['bound'] == 'min' else '<='} "
         f"{fmt(g['threshold'])}", g["value"], "pass" if g["passed"] else "FAIL")
        for g in data["gates"]])
    lines += ["", "## Prompts", ""]
    lines += table(["prompt", "reference top-1", "candidate top-1", "match", "cosine", "KL",
                    "result"], [
        (p["id"], p["reference_top1"], p["candidate_top1"],
         "yes" if p["top1_match"] else ("near-tie" if p["near_tie"] else "NO"),
         p["cosine"], p["kl"], "pass" if p["passed"] else "FAIL")
        for p in data["prompts"]])
    lines += ["", "## Error analysis", ""]
    flips = precision.flips
    near = sum(1 for _, pos in flips if pos.near_tie)
    lines.append(f"- Top-1 flips: {len(flips)} of {len(data['prompts'])} prompts; {near} were "
                 f"near-ties (reference margin below {fmt(precision.near_tie_margin)}), "
                 f"{len(flips) - near} were defects.")
    for metric in ("kl", "cosine"):
        worst = ", ".join(f"{p.prompt.id} ({fmt(v)})" for v, p in worst_prompts(precision, metric))
        lines.append(f"- Worst {metric}: {worst}.")
    lines.append(f"- Largest reference mass outside the candidate's top-{precision.k}: "
                 f"{fmt(data['aggregate']['p_tail_max'])}.")
    return "\n".join(lines) + "\n"


def render_report(session: ParitySession, suffix: str) -> str:
    markdown = render_markdown(session)
    if suffix.lower() not in (".html", ".htm"):
        return markdown
    return markdown_to_html(markdown)


def markdown_to_html(markdown: str) -> str:
    """Just enough Markdown (headings, bold lines, lists, tables, code) for this report."""
    body: list[str] = []
    in_table = in_list = in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            body.append(html.escape(line))
            continue
        if in_table and not line.startswith("|"):
            body.append("</table>")
            in_table = False
        if in_list and not line.startswith("- "):
            body.append("</ul>")
            in_list = False
        if line.startswith("|---"):
            continue
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
            tag = "td" if in_table else "th"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells)
                        + "</tr>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            if not in_list:
                body.append("<ul>")
                in_list = True
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.startswith("**") and line.endswith("**"):
            body.append(f"<p><strong>{html.escape(line.strip('*'))}</strong></p>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    if in_list:
        body.append("</ul>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:.2em .6em;text-align:left}th{background:#eee}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>llm-parity report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
