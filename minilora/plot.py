"""Tiny SVG charts: loss curves, matrix heat maps and histograms, with no plotting dependency.

Why SVG: it is plain text (a few lines of XML per shape), every browser and notebook opens it, and writing it
by hand keeps minilora's dependencies to torch/triton/safetensors/tokenizers/numpy. These charts are for
reading a training run and for the tutorials' pictures, not for publication: a legend beside the plotting
areas (never over the data), y-axes labelled at both ends, linear axes (or `log_y=True` for loss curves spanning
decades), and stacked panels sharing the x-axis (`panel_chart`: the trainer's loss over learning rate).

Deliberately not handled: interactive charts, dates on axes, more than a handful of series.
"""

import math
from html import escape
from pathlib import Path

from .files import write_text

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 55  # margins around the plotting area, in pixels


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 × 10^k steps) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw_step = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = min((m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step), default=raw_step)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _axis_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round ticks whose first and last values enclose [lo, hi]: the axis runs from the first to the last tick,
    so both ends carry a label (the range is widened outwards to the next round value)."""
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.02  # a point exactly on a round value should not sit on the frame
    # ...but data that cannot be negative (memory, counts, a loss) keep an axis that starts at 0 at the lowest:
    # padding 2.3 GiB .. 120 GiB downwards once drew the chapter 2 memory chart from -50 GiB.
    lo, hi = (max(lo - pad, 0.0) if lo >= 0 else lo - pad), hi + pad
    step = _nice_ticks(lo, hi, count)
    step = step[1] - step[0] if len(step) > 1 else (hi - lo)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [round(i * step, 12) for i in range(first, last + 1)]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">\n'
        f'<rect width="{width}" height="{height}" fill="white"/>\n'
        f'<text class="title" x="{width / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>\n'
    )
    return head + "\n".join(body) + "\n</svg>\n"


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    path: str | Path,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "loss",
    log_y: bool = False,
) -> Path:
    """Draw named (x, y) series as lines with markers; write an SVG file atomically and return its path."""
    return panel_chart([(series, ylabel, log_y)], path, title=title, xlabel=xlabel)


def panel_chart(
    panels: list[tuple[dict[str, list[tuple[float, float]]], str, bool]],
    path: str | Path,
    title: str = "",
    xlabel: str = "step",
    heights: tuple[int, ...] = (),
) -> Path:
    """Panels stacked over one shared x-axis, each (series, ylabel, log_y); the legend sits right of the panels,
    outside every plotting area, so it never covers data. `heights`: each panel's height in pixels (default:
    the first 305, the others 110 — a main chart over smaller companions, e.g. loss over learning rate)."""
    heights = heights or tuple(305 if i == 0 else 110 for i in range(len(panels)))
    names = [name for series, _, _ in panels for name in series]
    legend_w = 30 + 7 * max((len(n) for n in names), default=0)
    plot_w = WIDTH - LEFT - RIGHT
    width, gap = WIDTH + legend_w, 30
    xs = [x for series, _, _ in panels for pts in series.values() for x, _ in pts] or [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs)
    x_hi = x_hi if x_hi > x_lo else x_lo + 1
    body, top, color_of = [], TOP, {}
    for k, ((series, ylabel, log_y), plot_h) in enumerate(zip(panels, heights)):
        last = k == len(panels) - 1
        for name in series:
            color_of.setdefault(name, COLORS[len(color_of) % len(COLORS)])
        body += _panel(series, color_of, (LEFT, top, plot_w, plot_h), (x_lo, x_hi), ylabel, log_y, x_labels=last)
        top += plot_h + gap
    body.append(f'<text x="{LEFT + plot_w / 2}" y="{top - gap + 44}" text-anchor="middle">{escape(xlabel)}</text>')
    body.append('<g class="legend">')
    for i, (name, color) in enumerate(color_of.items()):
        y = TOP + 12 + 18 * i
        x = LEFT + plot_w + 14
        body.append(f'<line x1="{x}" x2="{x + 16}" y1="{y - 4}" y2="{y - 4}" stroke="{color}" stroke-width="2"/>')
        body.append(f'<text x="{x + 22}" y="{y}" fill="{color}">{escape(name)}</text>')
    body.append("</g>")
    return _write(path, _svg(width, top - gap + BOTTOM, body, title))


def _panel(series, color_of: dict, box: tuple, x_range: tuple, ylabel: str, log_y: bool, x_labels: bool) -> list[str]:
    """One plotting area: frame, y ticks (labelled at both ends), x ticks, and each series as a polyline."""
    left, top, plot_w, plot_h = box
    x_lo, x_hi = x_range
    ty = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    keep = (lambda y: math.isfinite(y) and y > 0) if log_y else math.isfinite
    ys = [ty(y) for pts in series.values() for _, y in pts if keep(y)] or [0.0, 1.0]
    ticks = _axis_ticks(min(ys), max(ys))
    y_lo, y_hi = ticks[0], ticks[-1]

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(v: float) -> float:  # v already transformed
        return top + (1 - (v - y_lo) / (y_hi - y_lo)) * plot_h

    body = ['<g class="panel">',
            f'<rect class="plot-area" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
            f'stroke="#444"/>', '<g class="y-ticks">']
    for t in ticks:
        label = _fmt(10**t) if log_y else _fmt(t)
        body.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>')
        body.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end" data-y="{py(t):.1f}">{label}</text>')
    body.append("</g>")
    if x_labels:
        for t in _nice_ticks(x_lo, x_hi):
            body.append(f'<text x="{px(t):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{_fmt(t)}</text>')
    body.append(f'<text class="ylabel" x="16" y="{top + plot_h / 2}" text-anchor="middle" '
                f'transform="rotate(-90 16 {top + plot_h / 2})">{escape(ylabel)}</text>')
    for name, pts in series.items():
        pts = [(x, ty(y)) for x, y in pts if keep(y)]
        if pts:
            coords = " ".join(f"{px(x):.1f},{py(v):.1f}" for x, v in pts)
            body.append(f'<polyline data-series="{escape(name)}" points="{coords}" fill="none" '
                        f'stroke="{color_of[name]}" stroke-width="1.8"/>')
            if len(pts) <= 60:
                body += [f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="2.5" fill="{color_of[name]}"/>' for x, v in pts]
    body.append("</g>")
    return body


def heatmaps(matrices: dict[str, list[list[float]]], path: str | Path, title: str = "", cell: int = 8) -> Path:
    """Draw matrices side by side as blue (negative) / white (0) / red (positive) grids, one shared scale."""
    peak = max((abs(v) for m in matrices.values() for row in m for v in row), default=1.0) or 1.0
    body, x0 = [], 20
    height = TOP + max(len(m) for m in matrices.values()) * cell + 40
    for name, m in matrices.items():
        rows, cols = len(m), len(m[0]) if m else 0
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                body.append(
                    f'<rect x="{x0 + j * cell}" y="{TOP + i * cell}" width="{cell}" height="{cell}" '
                    f'fill="{_diverging(v / peak)}"/>'
                )
        body.append(f'<rect x="{x0}" y="{TOP}" width="{cols * cell}" height="{rows * cell}" '
                    f'fill="none" stroke="#444"/>')
        body.append(f'<text x="{x0 + cols * cell / 2}" y="{TOP + rows * cell + 18}" '
                    f'text-anchor="middle">{escape(name)}</text>')
        x0 += cols * cell + 40
    bar_h = max(len(m) for m in matrices.values()) * cell  # the colour bar: -peak (blue) .. 0 .. +peak (red)
    for k in range(20):
        t = 1 - 2 * (k + 0.5) / 20
        body.append(f'<rect x="{x0}" y="{TOP + k * bar_h / 20:.1f}" width="12" height="{bar_h / 20 + 0.5:.1f}" '
                    f'fill="{_diverging(t)}"/>')
    body.append(f'<rect x="{x0}" y="{TOP}" width="12" height="{bar_h}" fill="none" stroke="#444"/>')
    for value, y in ((peak, TOP + 4), (0.0, TOP + bar_h / 2 + 4), (-peak, TOP + bar_h + 4)):
        body.append(f'<text x="{x0 + 16}" y="{y:.1f}">{_fmt(value)}</text>')
    return _write(path, _svg(max(x0 + 70, 200), height, body, title))


def _diverging(t: float) -> str:
    """Map t in [-1, 1] to a colour: -1 blue, 0 white, +1 red."""
    t = max(-1.0, min(1.0, t))
    fade = int(255 * (1 - abs(t)))
    return f"rgb(255,{fade},{fade})" if t >= 0 else f"rgb({fade},{fade},255)"


def histogram(
    values: list[float], path: str | Path, title: str = "", bins: int = 50,
    marks: list[float] | None = None, xlabel: str = "value",
) -> Path:
    """Draw a histogram of `values`, with optional vertical marks (e.g. the 16 NF4 code points)."""
    lo, hi = min(values), max(values)
    if hi == lo:
        hi = lo + 1
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top_count = max(counts) or 1
    bar_w = plot_w / bins
    body = [f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>']
    for i, c in enumerate(counts):
        h = c / top_count * plot_h
        body.append(f'<rect x="{LEFT + i * bar_w:.1f}" y="{TOP + plot_h - h:.1f}" width="{bar_w:.1f}" '
                    f'height="{h:.1f}" fill="#9ecae1" stroke="#6baed6"/>')
    for m in marks or []:
        x = LEFT + (m - lo) / (hi - lo) * plot_w
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#d62728"/>')
    for t in _nice_ticks(lo, hi):
        x = LEFT + (t - lo) / (hi - lo) * plot_w
        body.append(f'<text x="{x:.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">{_fmt(t)}</text>')
    for t in _nice_ticks(0, top_count):  # the y axis: how many values fell in a bin
        if 0 <= t <= top_count:
            y_pix = TOP + plot_h - t / top_count * plot_h
            body.append(f'<text x="{LEFT - 6}" y="{y_pix + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    body.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 12}" text-anchor="middle">{escape(xlabel)}</text>')
    body.append(f'<text x="16" y="{TOP + plot_h / 2}" text-anchor="middle" '
                f'transform="rotate(-90 16 {TOP + plot_h / 2})">count</text>')
    return _write(path, _svg(WIDTH, HEIGHT, body, title))


def _write(path: str | Path, svg: str) -> Path:
    path = Path(path)
    write_text(path, svg)
    return path
