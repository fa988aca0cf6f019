"""Plain-text helpers shared by the terminal summary, test messages and verdict diffs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, indent: str = "",
               rule: bool = True) -> list[str]:
    """Columns padded to their widest cell, the header first, then a rule of dashes."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    out = [indent + "  ".join(c.ljust(w) for c, w in zip(cells[0], widths)).rstrip()]
    if rule:
        out.append(indent + "  ".join("-" * w for w in widths))
    out += [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
            for row in cells[1:]]
    return out


# Cells of the acceptance report (report/document.py, report/details.py).


def value_text(value: Any) -> str:
    return "n/a" if value is None else fmt(value)


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.4g}%"


def code_token(text: Any) -> str:
    """A token as the tokenizer shows it, safe inside a `code` span."""
    return "`" + str(text).replace("`", "ˋ") + "`"


def bound_text(gate: dict[str, Any]) -> str:
    return f"{'≥' if gate['bound'] == 'min' else '≤'} {fmt(gate['threshold'])}"


def port_bounds_text(bounds: dict[str, float]) -> str:
    """A quantized port's own bounds ([quantization.port_bounds]), as one phrase."""
    return ", ".join(f"{name} <= {bound:g}" for name, bound in bounds.items())


def gate_label(gate: dict[str, Any]) -> str:
    return f"{gate['aggregate']} {gate['metric']} {bound_text(gate)}"
