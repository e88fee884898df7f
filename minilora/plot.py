"""Tiny SVG charts: loss curves, matrix heat maps and histograms, with no plotting dependency.

Why SVG: it is plain text (a few lines of XML per shape), every browser and notebook opens it, and writing it
by hand keeps minilora's dependencies to torch/triton/safetensors/tokenizers/numpy. These charts are for
reading a training run and for the tutorials' pictures, not for publication: no legends beyond a label per
series, linear axes only (use `log_y=True` for loss curves spanning decades).

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


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">\n'
        f'<rect width="{width}" height="{height}" fill="white"/>\n'
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>\n'
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
    points = [(x, y) for pts in series.values() for x, y in pts if math.isfinite(y) and (y > 0 or not log_y)]
    if not points:
        points = [(0.0, 0.0), (1.0, 1.0)]
    ty = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(ty(p[1]) for p in points), max(ty(p[1]) for p in points)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    pad = (y_hi - y_lo) * 0.05 or 0.5
    y_lo, y_hi = y_lo - pad, y_hi + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return TOP + (1 - (ty(y) - y_lo) / (y_hi - y_lo)) * plot_h

    body = [f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>']
    for t in _nice_ticks(x_lo, x_hi):
        body.append(f'<text x="{px(t):.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">{_fmt(t)}</text>')
    for t in _nice_ticks(y_lo, y_hi):
        y_pix = TOP + (1 - (t - y_lo) / (y_hi - y_lo)) * plot_h
        label = _fmt(10**t) if log_y else _fmt(t)
        body.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y_pix:.1f}" y2="{y_pix:.1f}" stroke="#eee"/>')
        body.append(f'<text x="{LEFT - 6}" y="{y_pix + 4:.1f}" text-anchor="end">{label}</text>')
    body.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 12}" text-anchor="middle">{escape(xlabel)}</text>')
    body.append(
        f'<text x="16" y="{TOP + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {TOP + plot_h / 2})">{escape(ylabel)}</text>'
    )
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        pts = [(x, y) for x, y in pts if math.isfinite(y) and (y > 0 or not log_y)]
        if pts:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            body.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.8"/>')
            if len(pts) <= 60:
                body += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
        body.append(f'<text x="{LEFT + 10}" y="{TOP + 16 + 16 * i}" fill="{color}">{escape(name)}</text>')
    return _write(path, _svg(WIDTH, HEIGHT, body, title))


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
    return _write(path, _svg(max(x0, 200), height, body, title))


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
    body.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 12}" text-anchor="middle">{escape(xlabel)}</text>')
    return _write(path, _svg(WIDTH, HEIGHT, body, title))


def _write(path: str | Path, svg: str) -> Path:
    path = Path(path)
    write_text(path, svg)
    return path
