"""Small charts drawn on the server as SVG: no chart library, no script, every label escaped.

>>> svg = line_chart([("w1 <b>", [(0.0, 1.0), (2.0, 3.0)])], unit="ev/s")
>>> svg.startswith("<svg") and "w1 &lt;b&gt;" in svg and "<b>" not in svg
True
>>> "<line" in interval_chart([("A", 0.1, (0.05, 0.15)), ("B", None, None)], percent=True)
True
"""
from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

#: line colours, one per series (presentation attributes: the console's CSP allows no inline style)
COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04")
W, H, PAD_L, PAD_B, PAD_T = 420, 140, 52, 18, 8


def _fmt(v: float, percent: bool = False) -> str:
    if percent:
        return f"{100 * v:.1f}%"
    if abs(v) >= 10_000:
        return f"{v / 1000:,.0f}k"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}".rstrip("0").rstrip(".") or "0"


def line_chart(series: Sequence[tuple[str, Sequence[tuple[float, float]]]], unit: str = "",
               width: int = W, height: int = H) -> Markup:
    """Lines over time (``(label, [(t, value)])``, ``t`` in seconds), the last value of each in its legend."""
    points = [p for _, pts in series for p in pts]
    if not points:
        return Markup(f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
                      f'role="img"><text x="{width // 2}" y="{height // 2}" text-anchor="middle" '
                      'fill="#6b7280">no data yet</text></svg>')
    t0, t1 = min(p[0] for p in points), max(p[0] for p in points)
    top = max(max(p[1] for p in points), 1e-9) * 1.1
    x = (lambda t: PAD_L + (t - t0) / (t1 - t0) * (width - PAD_L - 4)) if t1 > t0 else (lambda t: width - 4)
    y0 = height - PAD_B

    def y(v: float) -> float:
        return y0 - v / top * (y0 - PAD_T)

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">',
             f'<line x1="{PAD_L}" y1="{y0}" x2="{width}" y2="{y0}" stroke="#9ca3af"/>',
             f'<text x="{PAD_L - 4}" y="{PAD_T + 8}" text-anchor="end" font-size="10">{_fmt(top)}</text>',
             f'<text x="{PAD_L - 4}" y="{y0}" text-anchor="end" font-size="10">0</text>',
             f'<text x="{PAD_L}" y="{height - 4}" font-size="10">{(t1 - t0) / 60:.1f} min</text>']
    legend = []
    for k, (label, pts) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        if pts:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
            legend.append(f'<tspan fill="{colour}">{escape(label)}: {_fmt(pts[-1][1])} {escape(unit)}</tspan>')
    parts.append(f'<text x="{width - 4}" y="{PAD_T + 8}" text-anchor="end" font-size="10">{" · ".join(legend)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def interval_chart(rows: Sequence[tuple[str, float | None, tuple[float, float] | None]], percent: bool = False,
                   width: int = W) -> Markup:
    """One dot per row with its 95 % interval as a bar (``(label, value, (low, high))``); rows without a value
    say so."""
    height = 22 * len(rows) + 24
    values = [v for _, v, _ in rows if v is not None] + [b for _, _, ci in rows if ci for b in ci]
    hi = max(values + [1e-9]) * 1.05
    lo = min(values + [0.0])
    span = hi - lo or 1.0

    def x(v: float) -> float:
        return 90 + (v - lo) / span * (width - 100)

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">',
             f'<text x="90" y="{height - 4}" font-size="10">{_fmt(lo, percent)}</text>',
             f'<text x="{width - 10}" y="{height - 4}" text-anchor="end" font-size="10">{_fmt(hi, percent)}</text>']
    for k, (label, v, ci) in enumerate(rows):
        cy = 16 + 22 * k
        parts.append(f'<text x="84" y="{cy + 4}" text-anchor="end" font-size="12">{escape(label)}</text>')
        if v is None:
            parts.append(f'<text x="90" y="{cy + 4}" font-size="11" fill="#6b7280">no messages yet</text>')
            continue
        colour = COLOURS[k % len(COLOURS)]
        if ci:
            parts.append(f'<line x1="{x(ci[0]):.1f}" y1="{cy}" x2="{x(ci[1]):.1f}" y2="{cy}" stroke="{colour}" '
                         'stroke-width="6" stroke-opacity="0.35"/>')
        parts.append(f'<circle cx="{x(v):.1f}" cy="{cy}" r="4" fill="{colour}"/>')
        parts.append(f'<text x="{x(v):.1f}" y="{cy - 6}" text-anchor="middle" font-size="10">{_fmt(v, percent)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
