"""Small, dependency-free SVG charts for the decision report (inline in the HTML, so the
report is one self-contained file)."""

from __future__ import annotations

import math
from html import escape

W, H = 640, 360
L, R, T, B = 70, 20, 30, 50
COLORS = {"reference": "#d62728", "specialist": "#2ca02c", "baseline": "#1f77b4", "base": "#9467bd"}


class Axis:
    def __init__(self, lo: float, hi: float, log: bool, pixels: tuple[float, float]):
        if log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi <= lo:
            hi = lo + 1
        self.lo, self.hi, self.log, self.p0, self.p1 = lo, hi, log, *pixels

    def __call__(self, v: float) -> float:
        x = math.log10(max(v, 1e-12)) if self.log else v
        return self.p0 + (x - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0)

    def ticks(self) -> list[float]:
        if self.log:
            return [10 ** e for e in range(math.floor(self.lo), math.ceil(self.hi) + 1)]
        span = self.hi - self.lo
        step = 10 ** math.floor(math.log10(span / 5)) if span > 0 else 1
        for m in (1, 2, 5, 10):
            if span / (step * m) <= 6:
                step *= m
                break
        start = math.ceil(self.lo / step) * step
        return [start + i * step for i in range(int((self.hi - start) / step) + 1)]


def _fmt(v: float, money: bool = False, pct: bool = False) -> str:
    if pct:
        return f"{100 * v:.0f}%"
    prefix = "$" if money else ""
    if v >= 1e6:
        return f"{prefix}{float(f'{v / 1e6:.3g}'):g}M"
    if v >= 1e3:
        return f"{prefix}{float(f'{v / 1e3:.3g}'):g}k"
    return f"{prefix}{float(f'{v:.3g}'):g}"


def _frame(title: str, x: Axis, y: Axis, xlabel: str, ylabel: str, *, xmoney=False, ymoney=False, ypct=False,
           xpct=False) -> list[str]:
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}" '
           f'class="chart"><title>{escape(title)}</title>',
           f'<text x="{W / 2}" y="18" text-anchor="middle" class="t">{escape(title)}</text>',
           f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" class="frame"/>']
    for tv in x.ticks():
        px = x(tv)
        if L - 0.5 <= px <= W - R + 0.5:
            out.append(f'<line x1="{px:.1f}" y1="{T}" x2="{px:.1f}" y2="{H - B}" class="grid"/>'
                       f'<text x="{px:.1f}" y="{H - B + 16}" text-anchor="middle">{_fmt(tv, xmoney, xpct)}</text>')
    for tv in y.ticks():
        py = y(tv)
        if T - 0.5 <= py <= H - B + 0.5:
            out.append(f'<line x1="{L}" y1="{py:.1f}" x2="{W - R}" y2="{py:.1f}" class="grid"/>'
                       f'<text x="{L - 6}" y="{py + 4:.1f}" text-anchor="end">{_fmt(tv, ymoney, ypct)}</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">{escape(xlabel)}</text>'
               f'<text transform="translate(16,{(T + H - B) / 2}) rotate(-90)" text-anchor="middle">{escape(ylabel)}</text>')
    return out


def _range(values: list[float], pad: float = 0.05, floor: float | None = None, ceil: float | None = None):
    lo, hi = min(values), max(values)
    span = (hi - lo) or abs(hi) * 0.1 or 0.1
    lo, hi = lo - span * pad, hi + span * pad
    if floor is not None:
        lo = max(lo, floor)
    if ceil is not None:
        hi = min(hi, ceil)
    return lo, hi


def quality_vs_cost(points: list[dict], metric: str) -> str:
    """points: {label, role, cost, value, lo, hi}; those with unknown cost are listed below the chart."""
    known = [p for p in points if p["cost"] is not None and p["cost"] > 0]
    title = f"Quality vs cost per 1M requests ({metric}, 95% CI)"
    if not known:
        return _empty(title, "no candidate has a known cost")
    x = Axis(min(p["cost"] for p in known) / 2, max(p["cost"] for p in known) * 2, True, (L, W - R))
    lo, hi = _range([p["lo"] for p in points] + [p["hi"] for p in points], floor=0, ceil=1)
    y = Axis(lo, hi, False, (H - B, T))
    out = _frame(title, x, y, "USD per 1M requests (log scale)", metric, xmoney=True, ypct=True)
    placed: list[tuple[float, float]] = []
    for p in sorted(known, key=lambda p: -p["value"]):
        px, py, c = x(p["cost"]), y(p["value"]), COLORS.get(p["role"], "#333")
        ly = py - 6
        while any(abs(ly - qy) < 13 and abs(px - qx) < 160 for qx, qy in placed):  # keep labels apart
            ly += 13
        placed.append((px, ly))
        out.append(f'<line x1="{px:.1f}" y1="{y(p["lo"]):.1f}" x2="{px:.1f}" y2="{y(p["hi"]):.1f}" stroke="{c}" '
                   f'stroke-width="2"/><circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="{c}"/>'
                   f'<text x="{px + 8:.1f}" y="{ly:.1f}" class="lbl">{escape(p["label"])}</text>')
    return "".join(out) + "</svg>"


def latency_bars(rows: list[dict]) -> str:
    """rows: {label, role, p50, p95}; None = unknown, drawn as a note."""
    title = "Latency per request: p50 (bar) and p95 (tick), ms"
    known = [r for r in rows if r["p50"] is not None]
    h = max(H, T + B + 34 * len(rows))
    if not known:
        return _empty(title, "no latency is known")
    top = max((r["p95"] or r["p50"]) for r in known) * 1.15
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {h}" role="img" aria-label="{escape(title)}" '
           f'class="chart"><title>{escape(title)}</title>',
           f'<text x="{W / 2}" y="18" text-anchor="middle" class="t">{escape(title)}</text>']
    x0, x1 = 200, W - 60
    for i, r in enumerate(rows):
        yy = T + 10 + 34 * i
        out.append(f'<text x="{x0 - 8}" y="{yy + 15}" text-anchor="end" class="lbl">{escape(r["label"][:30])}</text>')
        if r["p50"] is None:
            note = r.get("note") or "unknown"
            note = note if note.startswith("unknown") else "unknown: " + note
            out.append(f'<text x="{x0 + 4}" y="{yy + 15}" class="unk">{escape(note[:70])}</text>')
            continue
        c = COLORS.get(r["role"], "#333")
        w50 = (x1 - x0) * r["p50"] / top
        out.append(f'<rect x="{x0}" y="{yy}" width="{w50:.1f}" height="22" fill="{c}" opacity="0.8"/>')
        if r["p95"] is not None:
            px = x0 + (x1 - x0) * r["p95"] / top
            out.append(f'<line x1="{px:.1f}" y1="{yy - 3}" x2="{px:.1f}" y2="{yy + 25}" stroke="#000" stroke-width="2"/>')
        out.append(f'<text x="{x0 + w50 + 6:.1f}" y="{yy + 15}">{r["p50"]:,.1f}'
                   + (f' / {r["p95"]:,.1f}' if r["p95"] is not None else "") + "</text>")
    return "".join(out) + "</svg>"


def learning_curve(points: list[dict], fit: dict | None, reference: float, bar: float, metric: str) -> str:
    title = f"Learning curve: test {metric} vs train rows, power-law fit and projection"
    if not points:
        return _empty(title, "no learning curve yet (protege curve)")
    n_hi = (fit["n_max"] * 10) if fit else max(p["train_rows"] for p in points)
    x = Axis(min(p["train_rows"] for p in points) / 1.5, n_hi * 1.5, True, (L, W - R))
    vals = [p["ci95"][0] for p in points] + [p["ci95"][1] for p in points] + [reference, bar]
    if fit:
        vals += fit["at_10x"]["ci95"]
    lo, hi = _range(vals, floor=0, ceil=1)
    y = Axis(lo, hi, False, (H - B, T))
    out = _frame(title, x, y, "train rows (log scale)", metric, ypct=True)
    out.append(f'<line x1="{L}" y1="{y(reference):.1f}" x2="{W - R}" y2="{y(reference):.1f}" stroke="#d62728" '
               f'stroke-dasharray="6 4"/><text x="{W - R - 4}" y="{y(reference) - 5:.1f}" text-anchor="end" '
               f'fill="#d62728">reference {100 * reference:.1f}%</text>')
    if bar != reference:
        out.append(f'<line x1="{L}" y1="{y(bar):.1f}" x2="{W - R}" y2="{y(bar):.1f}" stroke="#d62728" '
                   f'stroke-dasharray="2 4"/><text x="{W - R - 4}" y="{y(bar) + 14:.1f}" text-anchor="end" '
                   f'fill="#d62728">within tolerance {100 * bar:.1f}%</text>')
    if fit:
        import numpy as np

        ns = np.geomspace(min(p["train_rows"] for p in points), n_hi, 40)
        boot = fit["_boot"]
        band_lo, band_hi, mid = [], [], []
        for n in ns:
            v = np.array([1 - a * n ** -b for a, b in boot])
            band_lo.append(np.percentile(v, 2.5))
            band_hi.append(np.percentile(v, 97.5))
            mid.append(1 - fit["a"] * n ** -fit["b"])
        clip = lambda v: min(max(v, lo), hi)  # noqa: E731
        poly = [f"{x(n):.1f},{y(clip(v)):.1f}" for n, v in zip(ns, band_hi)] + \
               [f"{x(n):.1f},{y(clip(v)):.1f}" for n, v in zip(ns[::-1], band_lo[::-1])]
        out.append(f'<polygon points="{" ".join(poly)}" fill="#2ca02c" opacity="0.15"/>')
        out.append(f'<polyline points="{" ".join(f"{x(n):.1f},{y(clip(v)):.1f}" for n, v in zip(ns, mid))}" '
                   f'fill="none" stroke="#2ca02c" stroke-width="2"/>')
        for key in ("at_2x", "at_10x"):
            p = fit[key]
            out.append(f'<circle cx="{x(p["n"]):.1f}" cy="{y(clip(p["value"])):.1f}" r="4" fill="none" stroke="#2ca02c" '
                       f'stroke-width="2"/><text x="{x(p["n"]):.1f}" y="{y(clip(p["value"])) + 18:.1f}" text-anchor="middle">'
                       f'{key[3:]}: {100 * p["value"]:.1f}%</text>')
    for p in points:
        px = x(p["train_rows"])
        out.append(f'<line x1="{px:.1f}" y1="{y(p["ci95"][0]):.1f}" x2="{px:.1f}" y2="{y(p["ci95"][1]):.1f}" '
                   f'stroke="#2ca02c" stroke-width="2"/><circle cx="{px:.1f}" cy="{y(p["value"]):.1f}" r="5" fill="#2ca02c"/>')
    return "".join(out) + "</svg>"


def cost_vs_volume(series: list[dict], break_even: float | None, monthly: float | None) -> str:
    """series: {label, role, points: [(requests, usd)]}."""
    title = "Monthly cost vs monthly requests"
    pts = [v for s in series for _, v in s["points"] if v is not None and v > 0]
    if not pts:
        return _empty(title, "no cost is known")
    volumes = [n for s in series for n, _ in s["points"]]
    x = Axis(min(volumes), max(volumes), True, (L, W - R))
    y = Axis(min(pts) / 2, max(pts) * 2, True, (H - B, T))
    out = _frame(title, x, y, "requests per month (log scale)", "USD per month (log scale)", ymoney=True)
    for s in series:
        c = COLORS.get(s["role"], "#333")
        line = [f"{x(n):.1f},{y(v):.1f}" for n, v in s["points"] if v is not None and v > 0]
        out.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="{c}" stroke-width="2.5"/>')
        n_last, v_last = s["points"][-1]
        if v_last:
            out.append(f'<text x="{x(n_last) - 4:.1f}" y="{y(v_last) - 6:.1f}" text-anchor="end" fill="{c}" '
                       f'class="lbl">{escape(s["label"])}</text>')
    if break_even and math.isfinite(break_even) and x.lo <= math.log10(break_even) <= x.hi:
        px = x(break_even)
        out.append(f'<line x1="{px:.1f}" y1="{T}" x2="{px:.1f}" y2="{H - B}" stroke="#000" stroke-dasharray="4 3"/>'
                   f'<text x="{px + 4:.1f}" y="{T + 14}">break-even {_fmt(break_even)}/month</text>')
    if monthly and x.lo <= math.log10(monthly) <= x.hi:
        px = x(monthly)
        out.append(f'<line x1="{px:.1f}" y1="{T}" x2="{px:.1f}" y2="{H - B}" stroke="#888" stroke-dasharray="1 3"/>'
                   f'<text x="{px + 4:.1f}" y="{H - B - 6}" fill="#555">your volume</text>')
    return "".join(out) + "</svg>"


STANDALONE_STYLE = ("<style>text{font-family:system-ui,sans-serif;font-size:11px;fill:#333}.t{font-size:13px;"
                    "font-weight:600}.lbl{font-size:11px}.frame{fill:none;stroke:#999}.grid{stroke:#eee}</style>")


def lines(title: str, series: list[dict], xlabel: str, ylabel: str, *, ypct: bool = False,
          ylim: tuple[float, float] | None = None, standalone: bool = False) -> str:
    """A line chart. series: {label, color, points: [(x, y)], dash (optional)}; the labels
    form a legend. `standalone`: a file of its own (the styles inline, a white background)."""
    pts = [p for s in series for p in s["points"]]
    if not pts:
        return _empty(title, "no points")
    x = Axis(*_range([p[0] for p in pts], pad=0.0), False, (L, W - R))
    y = Axis(*(ylim or _range([p[1] for p in pts])), False, (H - B, T))
    out = _frame(title, x, y, xlabel, ylabel, ypct=ypct)
    if standalone:
        out.insert(1, STANDALONE_STYLE + f'<rect width="{W}" height="{H}" fill="#fff"/>')
    for i, s in enumerate(series):
        line = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in s["points"])
        dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
        if len(s["points"]) <= 40:  # few points: each one marked (a single one draws no line)
            out.extend(f'<circle cx="{x(a):.1f}" cy="{y(b):.1f}" r="2.5" fill="{s["color"]}"/>' for a, b in s["points"])
        out.append(f'<polyline points="{line}" fill="none" stroke="{s["color"]}" stroke-width="2"{dash}/>'
                   f'<line x1="{L + 10}" y1="{T + 14 + 14 * i}" x2="{L + 30}" y2="{T + 14 + 14 * i}" '
                   f'stroke="{s["color"]}" stroke-width="2"{dash}/><text x="{L + 36}" y="{T + 18 + 14 * i}" '
                   f'class="lbl">{escape(s["label"])}</text>')
    return "".join(out) + "</svg>"


def _empty(title: str, why: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} 80" role="img" aria-label="{escape(title)}" '
            f'class="chart"><title>{escape(title)}</title><text x="{W / 2}" y="18" text-anchor="middle" class="t">'
            f'{escape(title)}</text><text x="{W / 2}" y="50" text-anchor="middle" class="unk">{escape(why)}</text></svg>')
