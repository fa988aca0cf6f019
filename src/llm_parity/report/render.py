"""Writing the report's blocks out: Markdown, or one self-contained HTML page whose
figures are inline SVG (no network needed to read it)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from html import escape
from typing import Any

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
from llm_parity.report.text import fmt

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>])")


def _cell_text(cell: Any) -> str:
    if isinstance(cell, Status):
        return cell.text
    if isinstance(cell, Plain):
        return _MD_SPECIAL.sub(r"\\\1", cell.text)
    return fmt(cell) if not isinstance(cell, str) else cell


def to_markdown(blocks: Iterable[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Banner):
            out += [f"**{block.headline}**", ""]
            out += [f"- {line}" for line in block.details]
            out.append("")
        elif isinstance(block, Para):
            out += [block.text, ""]
        elif isinstance(block, Bullets):
            out += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Code):
            out += ["```", block.text, "```", ""]
        elif isinstance(block, Table):
            align = ["---:" if i in block.numeric else "---" for i in range(len(block.header))]
            out.append("| " + " | ".join(block.header) + " |")
            out.append("|" + "|".join(align) + "|")
            for row in block.rows:
                cells = [_cell_text(c).replace("|", "\\|").replace("\n", " ") for c in row]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        # Figures are for the HTML version; the tables next to them carry the same numbers.
    return "\n".join(out).rstrip() + "\n"


_INLINE = re.compile(r"\*\*(.+?)\*\*|`([^`]+)`")


def _inline(text: str) -> str:
    """**bold** and `code` to HTML, everything else escaped."""
    out, last = [], 0
    for match in _INLINE.finditer(text):
        out.append(escape(text[last:match.start()]))
        if match.group(1) is not None:
            out.append(f"<strong>{escape(match.group(1))}</strong>")
        else:
            out.append(f"<code>{escape(match.group(2))}</code>")
        last = match.end()
    out.append(escape(text[last:]))
    return "".join(out)


_STYLE = """
:root{--ink:#1f2328;--muted:#656d76;--line:#d0d7de;--good:#1a7f37;--bad:#cf222e;--warn:#9a6700}
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;color:var(--ink);
max-width:1100px;margin:24px auto;padding:0 24px;line-height:1.45;font-size:15px}
h1{font-size:1.6em;margin:.2em 0 .6em}h2{font-size:1.25em;margin:1.8em 0 .5em;
padding-bottom:.25em;border-bottom:1px solid var(--line)}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:13px}
td,th{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}td.num,th.num{text-align:right;
font-variant-numeric:tabular-nums}table.kv td:first-child{color:var(--muted);white-space:nowrap}
.scroll{overflow-x:auto}code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
font-size:12px;background:#f6f8fa;padding:0 3px;border-radius:3px}
.good{color:var(--good);font-weight:600}.bad{color:#fff;background:var(--bad);font-weight:600}
.neutral{color:var(--warn);font-weight:600}td.plain{white-space:nowrap}
.banner{border-radius:6px;padding:12px 16px;margin:0 0 1em;border:1px solid}
.banner.pass{background:#dafbe1;border-color:#4ac26b}
.banner.fail,.banner.error,.banner.interrupted{background:#ffebe9;
border-color:#ff8182}.banner p{font-size:1.2em;font-weight:700;margin:0 0 .3em}
.banner ul{margin:0;padding-left:1.2em}figure{margin:.8em 0 1.2em}
figure .plots{display:flex;flex-wrap:wrap;gap:24px}figcaption{color:var(--muted);font-size:13px}
pre{background:#f6f8fa;padding:10px;overflow-x:auto;white-space:pre-wrap}
"""


def to_html(blocks: Iterable[Block], title: str) -> str:
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{escape(block.text)}</h{block.level}>")
        elif isinstance(block, Banner):
            items = "".join(f"<li>{_inline(line)}</li>" for line in block.details)
            body.append(f'<div class="banner {escape(block.verdict)}"><p>'
                        f"{_inline(block.headline)}</p><ul>{items}</ul></div>")
        elif isinstance(block, Para):
            body.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Code):
            body.append(f"<pre>{escape(block.text)}</pre>")
        elif isinstance(block, Table):
            body.append(_html_table(block))
        elif isinstance(block, Figure):
            body.append(f'<figure><div class="plots">{block.svg}</div>'
                        f"<figcaption>{_inline(block.caption)}</figcaption></figure>")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _html_table(table: Table) -> str:
    kv = all(not h for h in table.header)
    parts = [f'<table class="{"kv" if kv else ""}">']
    if not kv:
        parts.append("<tr>" + "".join(
            f'<th{" class=num" if i in table.numeric else ""}>{escape(h)}</th>'
            for i, h in enumerate(table.header)) + "</tr>")
    for row in table.rows:
        cells = []
        for i, cell in enumerate(row):
            classes = ["num"] if i in table.numeric else []
            if isinstance(cell, Status):
                classes.append({True: "good", False: "bad", None: "neutral"}[cell.good])
            attr = f' class="{" ".join(classes)}"' if classes else ""
            if isinstance(cell, Plain):
                attr = ' class="plain"'
                title = f' title="{escape(cell.full)}"' if cell.full != cell.text else ""
                cells.append(f"<td{attr}{title}>{escape(cell.text)}</td>")
            else:
                cells.append(f"<td{attr}>{_inline(_cell_text(cell))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    html_table = "".join(parts)
    return f'<div class="scroll">{html_table}</div>' if table.wide else html_table
