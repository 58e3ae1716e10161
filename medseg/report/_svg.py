"""A small SVG line chart for the study report's HU histogram: vector output, a few
milliseconds, no plotting library to start (matplotlib's import and figure cost about
0.3-0.9 s per study)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from xml.sax.saxutils import escape

__all__ = ["line_chart_svg", "nice_ticks"]

_FONT = "font-family='DejaVu Sans, Arial, sans-serif'"


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    span = hi - lo
    if not span > 0:
        return [lo]
    raw = span / max(1, target)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1.0, 2.0, 5.0, 10.0) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10)
            for i in range(math.floor((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    text = f"{v:g}"
    return text.replace("-", "\u2212")


def line_chart_svg(x: Sequence[float], series: Sequence[tuple[str, str, Sequence[float]]], *,
                   x_range: tuple[float, float], x_label: str, y_label: str,
                   vline: tuple[float, str] | None = None, empty_text: str = "no data",
                   width: int = 650, height: int = 280) -> str:
    """An SVG document: one polyline per ``(name, colour, y values)`` over ``x`` (points
    outside ``x_range`` dropped), axes with round ticks, a legend, and an optional dashed
    vertical line ``(x, label)``. The y axis starts at 0."""
    left, right, top, bottom = 62, 16, 14, 46
    pw, ph = width - left - right, height - top - bottom
    x0, x1 = x_range
    keep = [i for i, v in enumerate(x) if x0 <= v <= x1]
    y_max = max((float(s[2][i]) for s in series for i in keep), default=0.0)
    y_ticks = nice_ticks(0.0, y_max if y_max > 0 else 1.0)
    y_top = max(y_ticks[-1], y_max) if y_max > 0 else 1.0
    if y_ticks[-1] < y_top:
        y_ticks.append(y_ticks[-1] + (y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0))
        y_top = y_ticks[-1]

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * pw

    def py(v: float) -> float:
        return top + ph - v / y_top * ph

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
           f"viewBox='0 0 {width} {height}' {_FONT} font-size='11'>",
           f"<rect width='{width}' height='{height}' fill='white'/>"]
    for t in y_ticks:
        y = py(t)
        out.append(f"<line x1='{left}' x2='{left + pw}' y1='{y:.1f}' y2='{y:.1f}' "
                   "stroke='#e6e6e6'/>")
        out.append(f"<text x='{left - 6}' y='{y + 4:.1f}' text-anchor='end'>{_fmt(t)}</text>")
    for t in nice_ticks(x0, x1, 6):
        x_px = px(t)
        out.append(f"<line x1='{x_px:.1f}' x2='{x_px:.1f}' y1='{top + ph}' "
                   f"y2='{top + ph + 4}' stroke='#333'/>")
        out.append(f"<text x='{x_px:.1f}' y='{top + ph + 17}' "
                   f"text-anchor='middle'>{_fmt(t)}</text>")
    out.append(f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='none' "
               "stroke='#333'/>")
    out.append(f"<text x='{left + pw / 2:.1f}' y='{height - 8}' "
               f"text-anchor='middle'>{escape(x_label)}</text>")
    out.append(f"<text transform='translate(16 {top + ph / 2:.1f}) rotate(-90)' "
               f"text-anchor='middle'>{escape(y_label)}</text>")
    if vline is not None and x0 <= vline[0] <= x1:
        x_px = px(vline[0])
        out.append(f"<line x1='{x_px:.1f}' x2='{x_px:.1f}' y1='{top}' y2='{top + ph}' "
                   "stroke='#666' stroke-dasharray='5 3'/>")
        out.append(f"<text x='{x_px + 4:.1f}' y='{top + 14}' font-size='9' "
                   f"fill='#444'>{escape(vline[1])}</text>")
    drawn = [s for s in series if any(float(s[2][i]) > 0 for i in keep)]
    for _name, colour, ys in drawn:
        pts = " ".join(f"{px(float(x[i])):.1f},{py(float(ys[i])):.1f}" for i in keep)
        out.append(f"<polyline points='{pts}' fill='none' stroke='{escape(colour)}' "
                   "stroke-width='1.5' stroke-linejoin='round'/>")
    for n, (name, colour, _ys) in enumerate(drawn):
        y = top + 14 + 16 * n
        lx = left + pw - 110
        out.append(f"<line x1='{lx}' x2='{lx + 22}' y1='{y - 4}' y2='{y - 4}' "
                   f"stroke='{escape(colour)}' stroke-width='2'/>")
        out.append(f"<text x='{lx + 28}' y='{y}'>{escape(name)}</text>")
    if not drawn:
        out.append(f"<text x='{left + pw / 2:.1f}' y='{top + ph / 2:.1f}' "
                   f"text-anchor='middle'>{escape(empty_text)}</text>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
