"""A trial's charts as small SVG files: learning curves, lr (and momentum) per step, grad norms.

Drawn by hand as SVG text rather than with matplotlib: a trial's artifacts must cost a small
fraction of even a one-epoch trial (benchmarks/artifact_overhead.py), and these take about a
millisecond each, stay sharp at any size in the dashboard and weigh a few kilobytes. The
browser does the text layout.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from search._text import finite

WIDTH, HEIGHT = 480, 270
TRAIN, VAL, MOMENTUM = "#1f77b4", "#ff7f0e", "#2ca02c"
LAYER_COLORS = ("#440154", "#3b528b", "#21918c", "#5ec962", "#c8a800", "#e8590c", "#c2255c",
                "#7048e8")  # forward order: dark (input side) to warm (output side)
FONT = 'font-family="DejaVu Sans,Helvetica,Arial,sans-serif"'


@dataclass
class Series:
    x: Sequence[float]
    y: Sequence[float | None]
    label: str
    color: str
    dash: bool = False
    markers: bool = True


@dataclass
class Panel:
    """One plot area: series on a left axis and, optionally, a right axis of its own."""

    series: list[Series]
    ylabel: str
    xlim: tuple[float, float]
    log_y: bool = False
    from_zero: bool = False
    integer_x: bool = True
    right: list[Series] = field(default_factory=list)
    right_label: str = ""


def nice_ticks(lo: float, hi: float, n: int = 5, *, integer: bool = False) -> list[float]:
    """About `n` round ticks (steps of 1, 2, 2.5 or 5 x 10^k) covering [lo, hi]."""
    span = hi - lo if hi > lo else abs(hi) or 1.0
    raw = span / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """1, 2, 5 x 10^k inside [lo, hi]; only powers of ten when that would be too many."""
    out = []
    for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        out += [m * 10.0 ** k for m in (1, 2, 5) if lo <= m * 10.0 ** k <= hi]
    if len(out) > 7:
        out = [v for v in out if math.isclose(10 ** round(math.log10(v)), v)]
        out = out[::math.ceil(len(out) / 7)]  # many decades: every second or third one
    return out


def tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        mantissa, exp = f"{v:.1e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{v:.4g}"


class _Scale:
    """Data to pixels on one axis, linear or log10."""

    def __init__(self, lo: float, hi: float, p0: float, p1: float, *, log: bool = False) -> None:
        self.log = log
        self.lo, self.hi = (math.log10(lo), math.log10(hi)) if log else (lo, hi)
        self.p0, self.p1 = p0, p1

    def __call__(self, v: float) -> float:
        v = math.log10(v) if self.log else v
        return self.p0 + (v - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0)


def _range(values: list[float], *, log: bool, from_zero: bool) -> tuple[float, float]:
    values = [v for v in values if finite(v) is not None and (v > 0 or not log)]
    if not values:
        return (0.1, 1.0) if log else (0.0, 1.0)
    lo, hi = min(values), max(values)
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
        pad = max(0.05, (hi - lo) * 0.06)
        return 10 ** (lo - pad), 10 ** (hi + pad)
    if from_zero and lo >= 0:
        lo = 0.0
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.05 or 0.05
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.06
    return (lo if from_zero and lo == 0 else lo - pad), hi + pad


def _text(x: float, y: float, text: str, *, size: int = 10, anchor: str = "middle",
          rotate: bool = False, extra: str = "") -> str:
    turn = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if rotate else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"'
            f'{turn}{extra}>{html.escape(text)}</text>')


def _lines(s: Series, sx: _Scale, sy: _Scale, log: bool) -> list[str]:
    """A polyline per unbroken run of finite points (gaps where values are missing)."""
    out, run = [], []
    points = [(x, y) for x, y in zip(s.x, s.y, strict=True)]
    dash = ' stroke-dasharray="5 3"' if s.dash else ""
    for x, y in [*points, (None, None)]:
        if x is not None and finite(y) is not None and (not log or y > 0):
            run.append((sx(x), sy(y)))
            continue
        if len(run) > 1:
            coords = " ".join(f"{px:.1f},{py:.1f}" for px, py in run)
            out.append(f'<polyline points="{coords}" fill="none" stroke="{s.color}" '
                       f'stroke-width="1.6"{dash}/>')
        if s.markers:
            out += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.4" fill="{s.color}"/>'
                    for px, py in run]
        run = []
    return out


def _panel(p: Panel, left: float, top: float, width: float, height: float) -> list[str]:
    out = [f'<rect x="{left:.1f}" y="{top:.1f}" width="{width:.1f}" height="{height:.1f}" '
           'fill="none" stroke="#999"/>']
    bottom = top + height
    sx = _Scale(*p.xlim, left, left + width)
    ylo, yhi = _range([v for s in p.series for v in s.y if v is not None],
                      log=p.log_y, from_zero=p.from_zero)
    sy = _Scale(ylo, yhi, bottom, top, log=p.log_y)
    for t in nice_ticks(*p.xlim, 6, integer=p.integer_x):
        if p.xlim[0] <= t <= p.xlim[1]:
            x = sx(t)
            out.append(f'<line x1="{x:.1f}" y1="{top:.1f}" x2="{x:.1f}" y2="{bottom:.1f}" '
                       'stroke="#eee"/>')
            out.append(_text(x, bottom + 13, tick_label(t)))
    yticks = log_ticks(ylo, yhi) if p.log_y else nice_ticks(ylo, yhi, 5)
    for t in yticks:
        if ylo <= t <= yhi:
            y = sy(t)
            out.append(f'<line x1="{left:.1f}" y1="{y:.1f}" x2="{left + width:.1f}" '
                       f'y2="{y:.1f}" stroke="#eee"/>')
            out.append(_text(left - 4, y + 3.5, tick_label(t), anchor="end"))
    out.append(_text(left + width / 2, bottom + 28, "epoch", size=11))
    out.append(_text(left - 38, top + height / 2, p.ylabel, size=11, rotate=True))
    for s in p.series:
        out += _lines(s, sx, sy, p.log_y)
    if p.right:
        rlo, rhi = _range([v for s in p.right for v in s.y if v is not None], log=False,
                          from_zero=False)
        sr = _Scale(rlo, rhi, bottom, top)
        for t in nice_ticks(rlo, rhi, 5):
            if rlo <= t <= rhi:
                out.append(_text(left + width + 4, sr(t) + 3.5, tick_label(t), anchor="start",
                                 extra=f' fill="{p.right[0].color}"'))
        out.append(_text(left + width + 40, top + height / 2, p.right_label, size=11,
                         rotate=True, extra=f' fill="{p.right[0].color}"'))
        for s in p.right:
            out += _lines(s, sx, sr, False)
    out += _legend([*p.series, *p.right], left + width - 6, top + 6)
    return out


def _legend(series: list[Series], right: float, top: float) -> list[str]:
    shown = [s for s in series if s.label]
    if not shown:
        return []
    width = 22 + 6.2 * max(len(s.label) for s in shown)
    out = [f'<rect x="{right - width:.1f}" y="{top:.1f}" width="{width:.1f}" '
           f'height="{6 + 13 * len(shown)}" fill="white" fill-opacity="0.85" stroke="#ddd"/>']
    for k, s in enumerate(shown):
        y = top + 12 + 13 * k
        dash = ' stroke-dasharray="4 2"' if s.dash else ""
        out.append(f'<line x1="{right - width + 4:.1f}" y1="{y - 3:.1f}" '
                   f'x2="{right - width + 18:.1f}" y2="{y - 3:.1f}" stroke="{s.color}" '
                   f'stroke-width="2"{dash}/>')
        out.append(_text(right - width + 21, y, s.label, size=9, anchor="start"))
    return out


def render(panels: list[Panel], title: str, *, width: int = WIDTH, height: int = HEIGHT) -> str:
    """An SVG document: the panels side by side under one title."""
    margin_l, margin_r, gap = 50, (48 if any(p.right for p in panels) else 12), 58
    top, bottom = 26, 36
    plot_w = (width - margin_l - margin_r - gap * (len(panels) - 1)) / len(panels)
    body = [_text(width / 2, 16, title, size=12, extra=' font-weight="bold"')]
    for k, p in enumerate(panels):
        body += _panel(p, margin_l + k * (plot_w + gap), top, plot_w, height - top - bottom)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" {FONT}>\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")


def curves_svg(history: list[dict[str, Any]], epochs: int, title: str) -> str:
    """Train/validation loss and accuracy per epoch, on the full epoch budget's x range."""
    x = [m["epoch"] for m in history]
    xlim = (0.7, epochs + 0.3)  # the budget: a pruned run visibly stops short of the end
    panels = [Panel([Series(x, [m.get(f"{split}_{what}") for m in history], split, color)
                     for split, color in (("train", TRAIN), ("val", VAL))], what, xlim)
              for what in ("loss", "accuracy")]
    return render(panels, title)


def lr_svg(x: list[float], lr: list[float], momentum: list[float] | None, epochs: int,
           title: str) -> str:
    """lr at every step (x in epochs) and, where the optimizer has one, momentum on the right."""
    right = [Series(x, momentum, "momentum", MOMENTUM, dash=True, markers=False)] \
        if momentum is not None else []
    panel = Panel([Series(x, lr, "lr", TRAIN, markers=False)], "lr", (0.0, float(epochs)),
                  from_zero=True, integer_x=True, right=right, right_label="momentum")
    return render([panel], title)


def grad_norms_svg(history: list[dict[str, Any]], epochs: int, title: str) -> str:
    """Each layer's weight-gradient norm per epoch, log scale (vanishing gradients show)."""
    layers = list(history[0].get("grad_norms") or {}) if history else []
    x = [m["epoch"] for m in history]
    many = len(layers) > 8
    series = []
    for k, layer in enumerate(layers):
        color = LAYER_COLORS[round(k / max(1, len(layers) - 1) * (len(LAYER_COLORS) - 1))]
        labelled = not many or k in (0, len(layers) // 2, len(layers) - 1)
        series.append(Series(x, [(m.get("grad_norms") or {}).get(layer) for m in history],
                             layer if labelled else "", color))
    panel = Panel(series, "gradient L2 norm", (0.7, epochs + 0.3), log_y=True)
    return render([panel], title)


def metrics_svg(history: list[dict[str, Any]], epochs: int, title: str) -> str:
    """Whatever numeric metrics a user's trainer reported, per epoch: losses (and errors) in
    one panel, every other metric in a second."""
    names = list(dict.fromkeys(k for m in history for k in m if k != "epoch"))
    losses = [n for n in names if "loss" in n.lower() or "error" in n.lower()]
    others = [n for n in names if n not in losses]
    colors = (TRAIN, VAL, MOMENTUM, *LAYER_COLORS)
    x = [m["epoch"] for m in history]
    xlim = (0.7 if min(x, default=1) >= 1 else -0.3, epochs + 0.3)
    panels = [Panel([Series(x, [m.get(n) for m in history], n, colors[i % len(colors)])
                     for i, n in enumerate(group)], label, xlim)
              for group, label in ((losses, "loss"), (others, "value")) if group]
    return render(panels or [Panel([], "value", xlim)], title)
