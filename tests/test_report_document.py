"""The acceptance report (Markdown and HTML) from made-up runs: what it says, that it
says it from the data, and that the HTML stands alone."""

from __future__ import annotations

import copy
import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from html.parser import HTMLParser

import pytest
from synthetic import (
    failed_session,
    make_session,
    performance_block,
    render_report,
    write_session_outputs,
)

from llm_parity.report.document import render_verdict
from llm_parity.report.verdict import clean, verdict_dict


@pytest.fixture(scope="module")
def mixed():
    """Six prompts: one defect (p-01), one near-tie (p-02), depth with one divergence."""
    return make_session(defect_prompts=(1,), near_tie_prompts=(2,), steps=8, diverge={3: 5})


@pytest.fixture(scope="module")
def clean_pass():
    return make_session(seed=3)


def data_of(session):
    return clean(verdict_dict(session))


def sections(markdown: str) -> list[str]:
    return re.findall(r"^## (.+)$", markdown, flags=re.M)


def test_markdown_reads_top_down_with_the_verdict_first(clean_pass):
    md = render_report(clean_pass, ".md")
    lines = md.splitlines()
    assert lines[0] == "# llm-parity acceptance report: made-up/model"
    assert re.fullmatch(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d UTC by llm-parity 0\.1\.0\.",
                        lines[2])
    assert lines[4].startswith("**PASS: the candidate (hf on cpu in bfloat16) against the "
                               "reference (hf on cpu in float32) on 6 prompts")
    assert sections(md) == ["Gates", "Model", "Hardware and software", "Prompts",
                            "Error analysis", "Protocol"]


def test_failing_verdict_names_what_failed(mixed):
    data = data_of(mixed)
    md = render_verdict(data)
    assert md.splitlines()[2].startswith("**FAIL:")
    failed = [g["name"] for g in data["gates"] if not g["passed"]]
    assert failed  # the flips drag the top-1 rate under 0.99
    for name in failed:
        assert f"- Failed: **{name}**" in md
    assert "- Failing prompts: p-01." in md


def _table_rows(md: str, header_start: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip("|"))])
    return rows


def test_gate_table_has_threshold_measured_and_result(mixed):
    data = data_of(mixed)
    rows = _table_rows(render_verdict(data), "| gate | over | metric | aggregate | threshold | "
                                             "measured |")
    assert [r[0] for r in rows] == [g["name"] for g in data["gates"]]
    by_name = {r[0]: r for r in rows}
    top1 = by_name["top1_match_rate"]
    assert top1[4] == "≥ 0.99"
    # The defect counts; the near-tie flip is excused by the founding gate (and said so).
    assert top1[5] == f"{5 / 6:.4g}"
    assert "counts a top-1 flip inside the near-tie margin as a match" in render_verdict(data)
    low, high = next(g["interval"] for g in data["gates"] if g["name"] == "top1_match_rate")
    assert top1[6] == f"{low:.4g} to {high:.4g}"  # resampling prompts
    assert top1[7] == "FAIL"
    assert by_name["sequence_kl_mean"][1] == "teacher-forced"
    assert by_name["decode_kl_mean"][1] == "free-running"
    per_prompt = {r[0]: r for r in _table_rows(render_verdict(data), "| gate | over | metric | "
                                                                  "aggregate | threshold | prompts")}
    assert per_prompt["top1_defect"][5:8] == ["5/6", "1", "p-01"]
    assert per_prompt["kl"][6:8] == [f"{max(p['kl'] for p in data['prompts']):.4g}", "p-01"]


def test_a_gate_every_prompt_meets_equally_names_no_worst_prompt(clean_pass):
    rows = _table_rows(render_report(clean_pass, ".md"), "| gate | over | metric | aggregate | "
                                                        "threshold | prompts")
    top1_defect = next(r for r in rows if r[0] == "top1_defect")
    assert top1_defect[5:8] == ["6/6", "0", "(all equal)"]


def test_prompt_table_has_every_prompt_with_tokens_match_cosine_and_kl(mixed):
    data = data_of(mixed)
    rows = _table_rows(render_verdict(data), "| prompt | text |")
    assert [r[0] for r in rows] == [p["id"] for p in data["prompts"]]
    match = {r[0]: r[5] for r in rows}
    assert match == {"p-00": "yes", "p-01": "NO", "p-02": "near-tie", "p-03": "yes",
                     "p-04": "yes", "p-05": "yes"}
    first = data["prompts"][0]
    assert rows[0][3] == f"`{first['reference_top1']}`"
    assert rows[0][7] == f"{first['cosine']:.4g}"
    assert rows[0][8] == f"{first['kl']:.4g}" if first["kl"] >= 1e-3 else f"{first['kl']:.2e}"
    # prompt text is literal: markup characters are escaped, not interpreted
    assert r"\*retrieval\* \| \`RAG\`?" in rows[0][1]


def test_error_analysis_is_computed_from_the_data(mixed):
    data = data_of(mixed)
    md = render_verdict(data)
    analysis = md.split("## Error analysis", 1)[1].split("##", 1)[0]
    assert ("First token: 2 of 6 prompts flipped top-1; 1 were near-ties (the token chosen "
            "less than 0.5 below the reference's top-1), 1 were defects.") in analysis
    assert "p-01: reference" in analysis and "(defect)" in analysis
    assert "p-02: reference" in analysis and "(near-tie)" in analysis
    worst_kl = max(data["prompts"], key=lambda p: p["kl"])
    assert f"Worst KL: {worst_kl['id']} " in analysis
    positions = sum(len(e["kl"]) for e in data["sequences"])
    assert f"in {positions} positions" in analysis
    assert "Free-running: 1 of 6 prompts diverged" in analysis
    assert "earliest at step 5 (p-03)" in analysis


def test_no_flip_says_so_and_reports_the_tightest_call(clean_pass):
    analysis = render_report(clean_pass, ".md").split("## Error analysis", 1)[1]
    assert "no top-1 flip on any of the 6 prompts" in analysis


def test_error_verdict_renders_the_reason():
    session = failed_session("candidate (vllm): the engine died while scoring")
    md = render_report(session, ".md")
    assert "ERROR: the precision run did not finish" in md
    assert "candidate (vllm): the engine died while scoring" in md
    html = render_report(session, ".html")
    assert 'class="banner error"' in html


class _Balance(HTMLParser):
    VOID = {"meta", "br", "hr", "img", "input", "link", "line", "rect", "circle", "path",
            "polygon", "polyline"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def parse_html(text):
    parser = _Balance()
    parser.feed(text)
    parser.close()
    assert not parser.errors, parser.errors[:5]
    assert parser.stack == []
    return parser


def test_html_is_one_self_contained_page(mixed):
    data = data_of(mixed)
    data["performance"] = performance_block()
    html = render_verdict(data, ".html")
    parser = parse_html(html)
    tags = {tag for tag, _ in parser.tags}
    assert "script" not in tags and "link" not in tags and "img" not in tags and "iframe" not in tags
    for _, attrs in parser.tags:
        assert not any(k in attrs for k in ("src", "href")), attrs
    # the only URL is the SVG namespace
    assert set(re.findall(r"https?://[^\"' )]+", html)) == {"http://www.w3.org/2000/svg"}
    for svg in re.findall(r"<svg.*?</svg>", html, flags=re.S):
        ET.fromstring(svg)  # each figure is well-formed XML


def test_html_has_the_same_content_as_markdown(mixed):
    data = data_of(mixed)
    md, html = render_verdict(data, ".md"), render_verdict(data, ".html")
    for heading in sections(md):
        assert f"<h2>{heading}</h2>" in html
    for p in data["prompts"]:
        assert f"<td>{p['id']}</td>" in html
    assert '<td class="bad">NO</td>' in html and '<td class="neutral">near-tie</td>' in html
    # literal prompt text: escaped, never turned into markup
    assert "*retrieval* | `RAG`?" in html.replace("&#x27;", "'").replace("&quot;", '"')
    assert "<strong>retrieval" not in html


def _svgs(html):
    return {ET.fromstring(svg).findtext("{http://www.w3.org/2000/svg}title"): ET.fromstring(svg)
            for svg in re.findall(r"<svg.*?</svg>", html, flags=re.S)}


def test_per_prompt_bars_with_threshold_lines(mixed):
    data = data_of(mixed)
    svgs = _svgs(render_verdict(data, ".html"))
    ns = "{http://www.w3.org/2000/svg}"
    kl = svgs["KL(reference ‖ candidate) per prompt"]
    bars = kl.findall(f"{ns}rect")
    assert len(bars) == len(data["prompts"])
    assert bars[1].get("fill") == "#c0392b"  # p-01 fails its gates: drawn red
    texts = [t.text for t in kl.iter(f"{ns}text")]
    assert "each prompt ≤ 0.05" in texts and "mean ≤ 0.01" in texts
    cosine = svgs["Cosine similarity per prompt"]
    assert "each prompt ≥ 0.95" in [t.text for t in cosine.iter(f"{ns}text")]
    # the longest KL bar belongs to the worst prompt
    worst = max(range(len(bars)), key=lambda i: float(bars[i].get("width")))
    assert data["prompts"][worst]["kl"] == max(p["kl"] for p in data["prompts"])


def test_kl_by_position_only_with_depth_data(mixed, clean_pass):
    with_depth = _svgs(render_verdict(data_of(mixed), ".html"))
    assert "KL by continuation step (teacher-forced)" in with_depth
    without = _svgs(render_report(clean_pass, ".html"))
    assert set(without) == {"KL(reference ‖ candidate) per prompt", "Cosine similarity per prompt"}
    assert "Beyond the first token" not in render_report(clean_pass, ".md")


def test_performance_section_only_when_present(mixed):
    data = data_of(mixed)
    assert "## Performance" not in render_verdict(data)
    data = copy.deepcopy(data)
    data["performance"] = performance_block(compiled_tpot=13.0)
    md = render_verdict(data)
    assert "## Performance" in md
    rows = _table_rows(md, "| mode | input tokens |")
    assert [r[:3] for r in rows] == [["eager", "16", "100"], ["eager", "32", "100"],
                                     ["compiled", "16", "50"], ["compiled", "32", "50"],
                                     ["reference", "16", "100"]]
    assert rows[2][4] == "13"
    speedups = _table_rows(md, "| input tokens | eager TPOT ms |")
    assert speedups[0] == ["16", "26 (out 100)", "13 (out 50)", "2.00x"]
    assert "| compiled_speedup | speedup | min | ≥ 1.5 | 2 | pass |" in md
    svgs = _svgs(render_verdict(data, ".html"))
    grid = svgs["TPOT by input length and mode"]
    assert len(grid.findall("{http://www.w3.org/2000/svg}rect")) == 5 + 3  # bars + legend


def test_failed_performance_gate_turns_the_banner(mixed):
    data = data_of(make_session(seed=3))
    data["performance"] = performance_block(compiled_tpot=20.0)
    md = render_verdict(data)
    assert md.splitlines()[2].startswith("**PASS on precision, FAIL on speed:")
    assert "failed compiled_speedup" in md


def test_model_card_and_environment(clean_pass):
    md = render_report(clean_pass, ".md")
    for row in ("| architecture | LlamaForCausalLM |", "| parameters | 61,728 |",
                "| weight dtype | bfloat16 |", "| tensors | 20 |",
                "| weight size | 0.1 MB (123,456 bytes) |", "| transformers | 4.51.0 |",
                "| device name | Made-up CPU |"):
        assert row in md
    assert "Not present on this machine: vLLM, vLLM-Ascend, torch_npu, CANN." in md


@pytest.mark.parametrize("suffix", [".md", ".html"])
def test_write_outputs_writes_the_report(tmp_path, suffix, clean_pass):
    path = tmp_path / f"report{suffix}"
    session = copy.copy(clean_pass)
    session.settings = replace(clean_pass.settings, parity_reports=(path,))
    write_session_outputs(session)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!doctype html>" if suffix == ".html" else "# llm-parity")


def test_gates_relative_to_the_noise_floor_draw_no_line_on_the_metric_axis(mixed):
    from llm_parity.report.details import gate_lines

    data = data_of(mixed)
    data["gates"].append({"name": "kl_vs_floor", "metric": "kl", "aggregate": "mean",
                          "bound": "max", "threshold": 3.0, "value": 0.7, "passed": True,
                          "over": "first_token", "relative_to": "noise_floor"})
    lines = gate_lines(data, "kl")
    assert lines and all(line.value != 3.0 for line in lines)
