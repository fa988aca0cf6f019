"""Inline SVG charts for the HTML report: computed here from plain numbers, no scripts, no
fonts or files fetched, so the report renders the same offline as on a dashboard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

INK = "#222"
MUTED = "#777"
GRID = "#e3e3e3"
BAR = "#4c78a8"
BAD = "#c0392b"
WARN = "#e08a00"
SERIES = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#9d755d", "#e45756")
FONT = "font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif"


@dataclass(frozen=True)
class Line:
    """A horizontal or vertical reference line: a gate threshold, in the plotted quantity."""

    value: float
    label: str
    dashed: bool = False


def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _text(x: float, y: float, text: str, *, size: int = 11, anchor: str = "start",
          color: str = INK, weight: str = "normal", extra: str = "") -> str:
    return (f'<text x="{_num(x)}" y="{_num(y)}" font-size="{size}" text-anchor="{anchor}" '
            f'fill="{color}" font-weight="{weight}"{extra}>{escape(text)}</text>')


def _svg(width: float, height: float, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_num(width)} {_num(height)}" '
            f'width="{_num(width)}" height="{_num(height)}" role="img" '
            f'style="max-width:100%;height:auto;{FONT}"><title>{escape(title)}</title>'
            + "".join(body) + "</svg>")


def decade_label(exponent: int) -> str:
    if -3 <= exponent <= 3:
        return f"{10.0 ** exponent:g}"
    return f"1e{exponent}"


def cosine_decade_label(exponent: int) -> str:
    """Tick of a "1 - cosine" axis, shown as the cosine it stands for."""
    if -6 <= exponent < 0:
        return f"{1 - 10.0 ** exponent:.{-exponent}f}"
    return f"1-{decade_label(exponent)}"


class LogScale:
    """Decades wide enough for the data and the thresholds; zeros sit at the floor."""

    def __init__(self, values: Sequence[float], lines: Sequence[Line], start: float, end: float,
                 max_decades: int = 8) -> None:
        positive = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
        positive += [line.value for line in lines if line.value > 0]
        if not positive:
            positive = [1e-3]
        self.hi = math.ceil(math.log10(max(positive)) - 1e-9)
        self.lo = min(math.floor(math.log10(min(positive))), self.hi - 1)
        self.lo = max(self.lo, self.hi - max_decades)
        self.start, self.end = start, end

    def __call__(self, value: float) -> float:
        if value is None or not math.isfinite(value) or value <= 0:
            return self.start
        exponent = min(max(math.log10(value), self.lo), self.hi)
        return self.start + (exponent - self.lo) / (self.hi - self.lo) * (self.end - self.start)

    def decades(self) -> range:
        return range(self.lo, self.hi + 1)


def prompt_bars(
    labels: Sequence[str],
    values: Sequence[float | None],
    *,
    title: str,
    lines: Sequence[Line] = (),
    failed: Sequence[bool] = (),
    tick_label: Callable[[int], str] = decade_label,
    value_label: Callable[[float | None], str] = lambda v: "n/a" if v is None else f"{v:.3g}",
    axis_note: str = "",
) -> str:
    """One horizontal bar per prompt on a log axis, with the gate thresholds as lines."""
    row = 16
    left = 12 + 6.6 * max((len(label) for label in labels), default=4)
    right, width = 60, 520
    top = 52 + 12 * max(len(lines) - 1, 0)
    height = top + row * len(labels) + 34
    scale = LogScale(list(values), lines, left, width - right)
    body = [_text(0, 14, title, size=13, weight="bold")]
    if axis_note:
        body.append(_text(0, 29, axis_note, size=10, color=MUTED))
    bottom = top + row * len(labels)
    decades = list(scale.decades())
    every = 1 if len(decades) <= 6 else 2  # keep tick labels apart
    for exponent in decades:
        x = scale(10.0 ** exponent)
        body.append(f'<line x1="{_num(x)}" y1="{top - 4}" x2="{_num(x)}" y2="{bottom}" '
                    f'stroke="{GRID}"/>')
        if (scale.hi - exponent) % every == 0:
            body.append(_text(x, bottom + 13, tick_label(exponent), size=10, anchor="middle",
                              color=MUTED))
    for i, (label, value) in enumerate(zip(labels, values)):
        y = top + i * row
        bad = bool(failed[i]) if i < len(failed) else False
        color = BAD if bad else BAR
        x_end = scale(value) if value is not None else left
        body.append(_text(left - 6, y + 11.5, label, size=10.5, anchor="end",
                          color=BAD if bad else INK))
        if value is not None:
            body.append(f'<rect x="{_num(left)}" y="{y + 2}" width="{_num(max(x_end - left, 1))}" '
                        f'height="{row - 4}" fill="{color}"><title>{escape(label)}: '
                        f'{escape(value_label(value))}</title></rect>')
        body.append(_text(x_end + 4, y + 11.5, value_label(value), size=9.5, color=MUTED))
    for k, line in enumerate(lines):
        x = scale(line.value)
        label_y = top - 8 - 12 * (len(lines) - 1 - k)
        dash = ' stroke-dasharray="5,3"' if line.dashed else ""
        body.append(f'<line x1="{_num(x)}" y1="{label_y + 2}" x2="{_num(x)}" y2="{bottom + 2}" '
                    f'stroke="{BAD}" stroke-width="1.5"{dash}/>')
        anchor = "end" if x > (left + width - right) / 2 else "start"
        body.append(_text(x + (-3 if anchor == "end" else 3), label_y, line.label, size=10,
                          anchor=anchor, color=BAD))
    return _svg(width, height + 4, body, title)


def position_lines(
    series: Sequence[Sequence[float | None]],
    *,
    title: str,
    lines: Sequence[Line] = (),
    marks: Sequence[tuple[int, float, str]] = (),
    axis_note: str = "",
    x_label: str = "continuation step",
) -> str:
    """Values by step across prompts: the mean in bold, the maximum dashed, the middle half
    of the prompts as a band; gate thresholds as horizontal lines and top-1 flips as marks
    (kind 'defect' or 'near-tie')."""
    width, height = 1000, 330
    left, right, top, bottom = 56, 150, 40, 36
    steps = max((len(s) for s in series), default=1)
    plot_bottom = height - bottom
    mean, peak, low, high = [], [], [], []
    for j in range(steps):
        column = sorted(s[j] for s in series if j < len(s) and s[j] is not None)
        stats = ((sum(column) / len(column), column[-1], _quantile(column, 0.25),
                  _quantile(column, 0.75)) if column else (None,) * 4)
        for target, value in zip((mean, peak, low, high), stats):
            target.append(value)
    shown = [v for v in (*mean, *peak, *low, *high) if v is not None]
    scale = LogScale(shown + [v for _, v, _ in marks], lines, plot_bottom, top)

    def x_of(step: float) -> float:
        return left + (step / max(steps - 1, 1)) * (width - left - right)

    body = [_text(0, 14, title, size=13, weight="bold")]
    if axis_note:
        body.append(_text(0, 29, axis_note, size=10, color=MUTED))
    for exponent in scale.decades():
        y = scale(10.0 ** exponent)
        body.append(f'<line x1="{left}" y1="{_num(y)}" x2="{_num(width - right)}" '
                    f'y2="{_num(y)}" stroke="{GRID}"/>')
        body.append(_text(left - 6, y + 3.5, decade_label(exponent), size=10, anchor="end",
                          color=MUTED))
    tick_every = max(1, round(steps / 16))
    for step in range(0, steps, tick_every):
        body.append(_text(x_of(step), plot_bottom + 14, str(step), size=10, anchor="middle",
                          color=MUTED))
    body.append(_text((left + width - right) / 2, height - 4, x_label, size=10.5,
                      anchor="middle", color=MUTED))

    def points(values: Sequence[float | None]) -> list[str]:
        return [f"{_num(x_of(j))},{_num(scale(v))}" for j, v in enumerate(values)
                if v is not None]

    band = points(high) + list(reversed(points(low)))
    if band:
        body.append(f'<polygon points="{" ".join(band)}" fill="{BAR}" fill-opacity="0.18" '
                    'stroke="none"/>')
    if points(peak):
        body.append(f'<polyline points="{" ".join(points(peak))}" fill="none" stroke="{INK}" '
                    'stroke-width="1.2" stroke-dasharray="4,2"/>')
    if points(mean):
        body.append(f'<polyline points="{" ".join(points(mean))}" fill="none" stroke="{BAR}" '
                    'stroke-width="2.4"/>')
    for step, value, kind in marks:
        color = BAD if kind == "defect" else WARN
        body.append(f'<circle cx="{_num(x_of(step))}" cy="{_num(scale(value))}" r="4" '
                    f'fill="{color}" stroke="white"><title>{escape(kind)} at step {step}'
                    '</title></circle>')
    for line in lines:
        y = scale(line.value)
        dash = ' stroke-dasharray="6,3"' if line.dashed else ""
        body.append(f'<line x1="{left}" y1="{_num(y)}" x2="{_num(width - right)}" '
                    f'y2="{_num(y)}" stroke="{BAD}" stroke-width="1.4"{dash}/>')
        body.append(_text(width - right + 6, y + 3.5, line.label, size=10, color=BAD))
    lx, ly = width - right + 6, (top + plot_bottom) / 2
    body.append(f'<line x1="{lx}" y1="{_num(ly)}" x2="{lx + 20}" y2="{_num(ly)}" '
                f'stroke="{BAR}" stroke-width="2.4"/>')
    body.append(_text(lx + 24, ly + 3.5, "mean over prompts", size=10))
    ly += 15
    body.append(f'<line x1="{lx}" y1="{_num(ly)}" x2="{lx + 20}" y2="{_num(ly)}" '
                f'stroke="{INK}" stroke-width="1.2" stroke-dasharray="4,2"/>')
    body.append(_text(lx + 24, ly + 3.5, "max over prompts", size=10))
    ly += 15
    body.append(f'<rect x="{lx}" y="{_num(ly - 5)}" width="20" height="10" fill="{BAR}" '
                'fill-opacity="0.18"/>')
    body.append(_text(lx + 24, ly + 3.5, "middle half of prompts", size=10))
    if marks:
        for label, color in (("top-1 defect", BAD), ("near-tie flip", WARN)):
            ly += 15
            body.append(f'<circle cx="{lx + 10}" cy="{_num(ly)}" r="4" fill="{color}"/>')
            body.append(_text(lx + 24, ly + 3.5, label, size=10))
    return _svg(width, height, body, title)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values."""
    at = q * (len(ordered) - 1)
    below = math.floor(at)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (at - below)


def grouped_bars(
    groups: Sequence[str],
    series: Sequence[str],
    values: dict[tuple[str, str], tuple[float, float | None, float | None, str]],
    *,
    title: str,
    y_label: str,
    axis_note: str = "",
) -> str:
    """Vertical bars on a linear axis from zero: one group per grid row, one bar per series.

    ``values[(group, series)]`` is (value, low, high, caption); low/high draw a range whisker.
    """
    width, height = 760, 320
    left, right, top, bottom = 56, 130, 40, 44
    plot_bottom = height - bottom
    peak = max((max(v[0], v[2] or 0) for v in values.values()), default=1.0) or 1.0
    step = _nice_step(peak / 5)
    ceiling = step * math.ceil(peak / step)

    def y_of(v: float) -> float:
        return plot_bottom - v / ceiling * (plot_bottom - top)

    body = [_text(0, 14, title, size=13, weight="bold")]
    if axis_note:
        body.append(_text(0, 29, axis_note, size=10, color=MUTED))
    tick = 0.0
    while tick <= ceiling + 1e-9:
        y = y_of(tick)
        body.append(f'<line x1="{left}" y1="{_num(y)}" x2="{width - right}" y2="{_num(y)}" '
                    f'stroke="{GRID}"/>')
        body.append(_text(left - 6, y + 3.5, f"{tick:g}", size=10, anchor="end", color=MUTED))
        tick += step
    body.append(_text(12, (top + plot_bottom) / 2, y_label, size=10.5, anchor="middle",
                      color=MUTED, extra=f' transform="rotate(-90 12 {_num((top + plot_bottom) / 2)})"'))
    group_width = (width - left - right) / max(len(groups), 1)
    bar = min(34.0, group_width * 0.8 / max(len(series), 1))
    for g, group in enumerate(groups):
        present = [s for s in series if (group, s) in values]
        start = left + g * group_width + (group_width - bar * len(present)) / 2
        for i, name in enumerate(present):
            value, low, high, caption = values[(group, name)]
            x = start + i * bar
            color = SERIES[series.index(name) % len(SERIES)]
            body.append(f'<rect x="{_num(x + 1)}" y="{_num(y_of(value))}" width="{_num(bar - 2)}" '
                        f'height="{_num(plot_bottom - y_of(value))}" fill="{color}"><title>'
                        f'{escape(name)} {escape(group)}: {escape(caption)}</title></rect>')
            if low is not None and high is not None:
                cx = x + bar / 2
                body.append(f'<line x1="{_num(cx)}" y1="{_num(y_of(low))}" x2="{_num(cx)}" '
                            f'y2="{_num(y_of(high))}" stroke="{INK}" stroke-width="1"/>')
            body.append(_text(x + bar / 2, y_of(max(value, high or 0)) - 4, caption, size=9.5,
                              anchor="middle", color=INK))
        body.append(_text(left + (g + 0.5) * group_width, plot_bottom + 15, group, size=10.5,
                          anchor="middle"))
    ly = top + 4
    for i, name in enumerate(series):
        body.append(f'<rect x="{width - right + 10}" y="{ly}" width="12" height="10" '
                    f'fill="{SERIES[i % len(SERIES)]}"/>')
        body.append(_text(width - right + 27, ly + 9, name, size=10.5))
        ly += 16
    return _svg(width, height, body, title)


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power
