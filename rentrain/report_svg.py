"""Line charts as inline SVG for the reports: no plotting library, no script, prints as it shows."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rentrain.report_html import esc

WIDTH, HEIGHT = 520, 240
LEFT, RIGHT, TOP, BOTTOM = 64, 14, 28, 34  # margins: tick labels left and below, the title above
MAX_POINTS = 600  # longer series are averaged in buckets: a 20,000-step run stays a small page
Point = tuple[float, float]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round values (1, 2, 2.5, 5 x 10^n apart) from low to high, about `count` of them."""
    if not high > low:
        return [low]
    raw = (high - low) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9)
    last = math.floor(high / step + 1e-9)
    return [i * step for i in range(first, last + 1)]


def thin(points: Sequence[Point], max_points: int = MAX_POINTS) -> list[Point]:
    """At most `max_points`: consecutive points averaged together."""
    if len(points) <= max_points:
        return list(points)
    size = math.ceil(len(points) / max_points)
    buckets = [points[i : i + size] for i in range(0, len(points), size)]
    return [(sum(x for x, _ in b) / len(b), sum(y for _, y in b) / len(b)) for b in buckets]


def moving_average(points: Sequence[Point], window: int) -> list[Point]:
    """Each point's y averaged with up to `window - 1` points before it: the trend under a noisy loss."""
    averaged: list[Point] = []
    total = 0.0
    for i, (x, y) in enumerate(points):
        total += y
        if i >= window:
            total -= points[i - window][1]
        averaged.append((x, total / min(i + 1, window)))
    return averaged


def _label(value: float) -> str:
    return f"{value:.3g}"


class _Frame:
    """Maps data coordinates into the plot area."""

    def __init__(self, points: Sequence[Point]):
        xs = [x for x, _ in points]
        ys = [y for _, y in points]
        self.x_low, self.x_high = min(xs), max(xs)
        self.y_low, self.y_high = min(ys), max(ys)
        if self.x_high == self.x_low:
            self.x_high = self.x_low + 1
        if self.y_high == self.y_low:
            pad = abs(self.y_low) * 0.1 or 1.0
            self.y_low, self.y_high = self.y_low - pad, self.y_high + pad

    def x(self, value: float) -> float:
        return LEFT + (value - self.x_low) / (self.x_high - self.x_low) * (WIDTH - LEFT - RIGHT)

    def y(self, value: float) -> float:
        return HEIGHT - BOTTOM - (value - self.y_low) / (self.y_high - self.y_low) * (HEIGHT - TOP - BOTTOM)


def _axes(frame: _Frame, x_label: str) -> str:
    parts = [
        f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
        'fill="none" stroke="#999"/>'
    ]
    for tick in nice_ticks(frame.y_low, frame.y_high):
        y = frame.y(tick)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{LEFT - 5}" y="{y + 4:.1f}" text-anchor="end">{esc(_label(tick))}</text>')
    for tick in nice_ticks(frame.x_low, frame.x_high):
        x = frame.x(tick)
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 15}" text-anchor="middle">{esc(_label(tick))}</text>')
    parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 4}" text-anchor="middle">{esc(x_label)}</text>')
    return "\n".join(parts)


def _polyline(frame: _Frame, points: Sequence[Point], colour: str, width: float) -> str:
    coordinates = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in points)
    return f'<polyline points="{coordinates}" fill="none" stroke="{colour}" stroke-width="{width}"/>'


def line_chart(points: Sequence[Point], title: str, x_label: str = "step", trend: bool = False) -> str:
    """An SVG chart of y over x. `trend`: the points drawn light, their moving average dark over them."""
    if not points:
        return ""
    shown = thin(points)
    frame = _Frame(shown)
    lines = [_polyline(frame, shown, "#9db7d9" if trend else "#1f5fae", 1.2)]
    if trend and len(shown) > 2:
        lines.append(_polyline(frame, moving_average(shown, max(2, len(shown) // 20)), "#1f5fae", 2))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'role="img" aria-label="{esc(title)}" font-family="sans-serif" font-size="11" fill="#333">\n'
        f'<text x="{LEFT}" y="{TOP - 9}" font-size="13" font-weight="bold">{esc(title)}</text>\n'
        f"{_axes(frame, x_label)}\n" + "\n".join(lines) + "\n</svg>\n"
    )
