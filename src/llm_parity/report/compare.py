"""`llm-parity compare OLD.json NEW.json`: what moved between two verdicts.

Prints the verdicts, the gates (with any that changed state), the aggregate metrics,
the prompts that moved most, performance figures and versions that changed. The exit
status is 1 when a gate that passed in OLD fails in NEW (or NEW did not finish), so a CI
job can keep the last good verdict and call this on each new one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_parity.compare.gates import higher_is_better
from llm_parity.errors import VerdictFileError
from llm_parity.report.schema import SCHEMA_VERSION
from llm_parity.report.text import fmt, text_table

# Performance figures of a grid case, and which way is better.
_PERF_FIGURES = (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("latency_ms", "latency ms"),
                 ("throughput_tok_s", "tok/s"))
_REQUIRED = ("schema_version", "verdict", "gates", "prompts")



@dataclass
class Comparison:
    lines: list[str] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)  # gates that went pass -> fail

    @property
    def exit_code(self) -> int:
        return 1 if self.regressions else 0


def load_verdict(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise VerdictFileError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VerdictFileError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise VerdictFileError(f"{path}: not a verdict (expected a JSON object)")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise VerdictFileError(f"{path}: not an llm-parity verdict (no {', '.join(missing)})")
    if data["schema_version"] != SCHEMA_VERSION:
        raise VerdictFileError(
            f"{path}: schema_version {data['schema_version']!r}, but this llm-parity reads "
            f"version {SCHEMA_VERSION}; compare verdicts written by the same major version")
    return data


def _change(old: float | None, new: float | None, higher_is_better: bool) -> str:
    if old is None or new is None:
        return "" if old == new else "now measured" if old is None else "no longer measured"
    if old == new:
        return "="
    delta = new - old
    better = (delta > 0) == higher_is_better
    relative = f" ({delta / abs(old):+.1%})" if old and math.isfinite(old) else ""
    return f"{delta:+.3g}{relative} {'better' if better else 'worse'}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return text_table(header, rows, indent="  ", rule=False)


def _state(gate: dict[str, Any] | None) -> str:
    if gate is None:
        return "-"
    if gate.get("reason") is not None:
        return "not judged"
    return "pass" if gate.get("passed") else "FAIL"


def _bound(gate: dict[str, Any]) -> str:
    return f"{'>=' if gate.get('bound') == 'min' else '<='} {fmt(gate.get('threshold'))}"


def _gate_key(gate: dict[str, Any]) -> str:
    return gate["name"]


def _compare_gates(title: str, old: list[dict], new: list[dict], out: Comparison,
                   what: str = "gate") -> None:
    old_by = {_gate_key(g): g for g in old}
    new_by = {_gate_key(g): g for g in new}
    names = list(dict.fromkeys([*old_by, *new_by]))
    if not names:
        return
    rows = []
    for name in names:
        a, b = old_by.get(name), new_by.get(name)
        gate = b or a
        assert gate is not None
        higher = gate.get("bound") == "min"
        moved = _change(None if a is None else a.get("value"),
                        None if b is None else b.get("value"), higher)
        if a is None:
            moved = "new gate"
        elif b is None:
            moved = "gone"
        state = f"{_state(a)} -> {_state(b)}"
        if a is not None and a.get("passed") and b is not None and b.get("reason") is not None:
            # Judged and passing before, not judged now: nothing says it still passes.
            state += "  REGRESSION (not judged: " + b["reason"] + ")"
            out.regressions.append(f"{what} {name} (not judged)")
        elif a is not None and b is not None and a.get("passed") and not b.get("passed"):
            state += "  REGRESSION"
            out.regressions.append(f"{what} {name}")
        elif a is not None and b is not None and not a.get("passed") and b.get("passed"):
            state += "  fixed"
        rows.append((name, _bound(gate), fmt(a.get("value")) if a else "-",
                     fmt(b.get("value")) if b else "-", moved, state))
    out.lines += ["", title]
    out.lines += _table(("gate", "threshold", "old", "new", "change", "result"), rows)


def _prompt_gate_flips(old: dict[str, Any], new: dict[str, Any], out: Comparison) -> None:
    """Per-prompt gates (on each prompt of each view) that went from pass to fail."""
    flips, fixed = [], []
    for key in ("prompts", "sequences", "decodes"):
        old_by = {p["id"]: p for p in old.get(key) or []}
        for prompt in new.get(key) or []:
            before = old_by.get(prompt["id"])
            if before is None:
                continue
            was = {g["name"]: g for g in before.get("gates", [])}
            for gate in prompt.get("gates", []):
                prior = was.get(gate["name"])
                if prior is None:
                    continue
                where = f"{prompt['id']}" + ("" if key == "prompts" else f" ({key[:-1]})")
                text = (f"{where}: {gate['name']} {_bound(gate)}, {fmt(prior.get('value'))} -> "
                        f"{fmt(gate.get('value'))}")
                if prior.get("passed") and not gate.get("passed"):
                    flips.append(text)
                    out.regressions.append(f"prompt gate {gate['name']} on {where}")
                elif not prior.get("passed") and gate.get("passed"):
                    fixed.append(text)
    if flips:
        out.lines += ["", "Per-prompt gates that now fail (REGRESSION):"]
        out.lines += [f"  {line}" for line in flips]
    if fixed:
        out.lines += ["", "Per-prompt gates that now pass:"]
        out.lines += [f"  {line}" for line in fixed]


def _compare_aggregates(old: dict[str, Any], new: dict[str, Any], out: Comparison) -> None:
    a, b = old.get("aggregate") or {}, new.get("aggregate") or {}
    names = list(dict.fromkeys([*a, *b]))
    if not names:
        return
    rows = [(name, fmt(a.get(name)) if name in a else "-", fmt(b.get(name)) if name in b else "-",
             _change(a.get(name), b.get(name), higher_is_better(name)))
            for name in names]
    out.lines += ["", "Aggregate metrics (first generated token):"]
    out.lines += _table(("metric", "old", "new", "change"), rows)


def _compare_prompts(old: dict[str, Any], new: dict[str, Any], out: Comparison,
                     top: int) -> None:
    old_by = {p["id"]: p for p in old.get("prompts") or []}
    new_by = {p["id"]: p for p in new.get("prompts") or []}
    added = [i for i in new_by if i not in old_by]
    removed = [i for i in old_by if i not in new_by]
    common = [i for i in new_by if i in old_by]
    lines = []
    if added or removed:
        lines.append(f"  prompt set changed: {len(added)} added, {len(removed)} removed "
                     "(aggregates are over different prompts)")
    for pid in common:
        a, b = old_by[pid], new_by[pid]
        if a.get("top1_match") != b.get("top1_match") or a.get("candidate_top1") != b.get(
                "candidate_top1"):
            lines.append(f"  {pid}: candidate top-1 {a.get('candidate_top1')} -> "
                         f"{b.get('candidate_top1')} (reference {b.get('reference_top1')}; "
                         f"match {a.get('top1_match')} -> {b.get('top1_match')})")
    movers = []
    for pid in common:
        ka, kb = old_by[pid].get("kl"), new_by[pid].get("kl")
        if ka is not None and kb is not None and ka != kb:
            movers.append((abs(kb - ka), pid, ka, kb))
    movers.sort(reverse=True)
    if movers[:top]:
        lines.append("  largest KL moves: " + ", ".join(
            f"{pid} {fmt(ka)} -> {fmt(kb)}" for _, pid, ka, kb in movers[:top]))
    if lines:
        out.lines += ["", "Prompts:"] + lines


def _case_key(case: dict[str, Any]) -> str:
    return case.get("key") or f"{case.get('mode')}-in{case.get('input_len')}-out{case.get('output_len')}"


def _compare_performance(old: dict[str, Any], new: dict[str, Any], out: Comparison) -> None:
    a, b = old.get("performance") or {}, new.get("performance") or {}
    old_cases = {_case_key(c): c for c in a.get("cases") or []}
    new_cases = {_case_key(c): c for c in b.get("cases") or []}
    keys = list(dict.fromkeys([*old_cases, *new_cases]))
    if keys:
        rows = []
        for key in keys:
            ca, cb = old_cases.get(key), new_cases.get(key)
            for figure, label in _PERF_FIGURES:
                va = None if ca is None else ca.get(figure)
                vb = None if cb is None else cb.get(figure)
                if va is None and vb is None:
                    continue
                rows.append((key, label, fmt(va) if ca else "-", fmt(vb) if cb else "-",
                             _change(va, vb, higher_is_better(figure))
                             if ca and cb else ("new case" if ca is None else "gone")))
        out.lines += ["", "Performance (medians):"]
        out.lines += _table(("case", "figure", "old", "new", "change"), rows)
    _compare_gates("Performance gates:", a.get("gates") or [], b.get("gates") or [], out,
                   what="performance gate")


def _compare_setup(old: dict[str, Any], new: dict[str, Any], out: Comparison) -> None:
    rows = []
    for label, getter in (
        ("model", lambda d: d.get("model")),
        ("candidate", lambda d: " ".join(str((d.get("candidate") or {}).get(k))
                                         for k in ("backend", "device", "dtype"))),
        ("thresholds", lambda d: (d.get("protocol") or {}).get("thresholds")),
        ("prompt set", lambda d: (d.get("protocol") or {}).get("prompts")),
    ):
        rows.append((label, getter(old), getter(new)))
    env_a, env_b = old.get("environment") or {}, new.get("environment") or {}
    for key in dict.fromkeys([*env_a, *env_b]):
        if key in ("model_path", "platform"):
            continue
        rows.append((key, env_a.get(key), env_b.get(key)))
    changed = [(k, str(a), str(b)) for k, a, b in rows if a != b]
    if changed:
        out.lines += ["", "Setup that changed:"]
        out.lines += _table(("what", "old", "new"), changed)


def compare_verdicts(old: dict[str, Any], new: dict[str, Any], *, top: int = 5,
                     old_name: str = "OLD", new_name: str = "NEW") -> Comparison:
    out = Comparison()
    out.lines.append(f"verdict: {old['verdict']} -> {new['verdict']}   ({old_name} -> {new_name})")
    if new["verdict"] in ("error", "interrupted"):
        reason = new.get("error") or (new.get("verdict_reasons") or ["no reason recorded"])[0]
        out.lines.append(f"the new run did not finish: {reason}")
        if old["verdict"] not in ("error", "interrupted"):
            out.regressions.append("the new run did not finish")
    _compare_setup(old, new, out)
    _compare_gates("Gates:", [*(old.get("gates") or []), *(old.get("not_judged") or [])],
                   [*(new.get("gates") or []), *(new.get("not_judged") or [])], out)
    _prompt_gate_flips(old, new, out)
    _compare_aggregates(old, new, out)
    _compare_prompts(old, new, out, top)
    _compare_performance(old, new, out)
    out.lines.append("")
    if out.regressions:
        out.lines.append(f"{len(out.regressions)} regression(s): " + "; ".join(out.regressions))
    else:
        out.lines.append("no gate went from pass to fail")
    return out


def run(old_path: str, new_path: str, top: int = 5) -> Comparison:
    old = load_verdict(old_path)
    new = load_verdict(new_path)
    return compare_verdicts(old, new, top=top, old_name=str(old_path), new_name=str(new_path))
