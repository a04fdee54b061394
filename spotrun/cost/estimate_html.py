"""``spotrun estimate ... --html FILE``: the estimate as a self-contained page with two charts
against the checkpoint interval (log scale): the expected cost per run on spot beside the
on-demand cost, and the expected time per run beside the uninterrupted time, the chosen
interval marked (and Young's recommended one). Inline CSS and SVG, nothing fetched; the
charts share the cost report's CSS, so they stay legible from 400 px to 1280 px (a chart
keeps a minimum width and scrolls sideways below it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .estimate import JobEstimate, interval_curve
from .html import _CSS, _VIEW_W, _a, _tick_usd, y_ticks
from .render import fmt_duration, fmt_pct, fmt_usd

__all__ = ["estimate_html"]

_L, _W = 110, 860  # plot left edge and width, viewBox units (the page's _VIEW_W wide)
_SPOT, _OD, _CHOSEN, _REC = "#d08a1c", "#1f4e99", "#c0392b", "#3a8f3a"


def _x_ticks(lo: float, hi: float) -> list[float]:
    """Round durations (1 min ... 1 day steps) inside [lo, hi], for a log axis."""
    nice = [1, 10, 60, 300, 600, 1800, 3600, 2 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400]
    inside = [v for v in nice if lo <= v <= hi]
    if len(inside) > 6:
        inside = inside[:: math.ceil(len(inside) / 6)]
    return inside or [lo, hi]


def _chart(chart_id: str, title: str, curve: list[dict[str, float]], value: Callable[[dict], float],
           flat: float, flat_label: str, flat_color: str, label: Callable[[float], str],
           est: JobEstimate, *, from_zero: bool = True) -> str:
    height, top, bottom = 316, 56, 256  # the marks' labels in the band above the plot
    lo, hi = curve[0]["interval_s"], curve[-1]["interval_s"]
    ys = [value(p) for p in curve] + [flat]
    y_lo = 0.0
    if not from_zero:
        # Time differs from the uninterrupted run by a few percent: start the axis at a
        # round value just below the lowest figure, or the curve is a flat line.
        spread = max(ys) - min(ys) or max(ys) * 0.01 or 1.0
        ticks = y_ticks(spread)
        step = ticks[1] if len(ticks) > 1 else spread
        y_lo = math.floor(min(ys) / step) * step
    y_hi = y_lo + (max(ys) - y_lo) * 1.05 or 1.0

    def px(t: float) -> float:
        return _L + (math.log(t) - math.log(lo)) / max(math.log(hi) - math.log(lo), 1e-12) * _W

    def py(v: float) -> float:
        return bottom - (v - y_lo) / (y_hi - y_lo) * (bottom - top)

    parts = [f'<svg id="{chart_id}" viewBox="0 0 {_VIEW_W} {height}" width="100%" '
             f'preserveAspectRatio="xMinYMin meet" role="img" aria-label="{_a(title)}">']
    for tick in [y_lo + t for t in y_ticks(y_hi - y_lo)]:
        parts.append(f'<line x1="{_L}" y1="{py(tick):.1f}" x2="{_L + _W}" y2="{py(tick):.1f}" stroke="#eee"/>')
        parts.append(f'<text class="y-tick" x="{_L - 8}" y="{py(tick) + 5:.1f}" text-anchor="end">'
                     f"{_a(label(tick))}</text>")
    for tick in _x_ticks(lo, hi):
        parts.append(f'<line x1="{px(tick):.1f}" y1="{top}" x2="{px(tick):.1f}" y2="{bottom}" stroke="#eee"/>')
        parts.append(f'<text class="x-tick" x="{px(tick):.1f}" y="{bottom + 20}" text-anchor="middle">'
                     f"{_a(fmt_duration(tick))}</text>")
    parts.append(f'<text x="{_L + _W / 2}" y="{bottom + 44}" text-anchor="middle">checkpoint interval '
                 "(log scale)</text>")
    pts = " ".join(f"{px(p['interval_s']):.1f},{py(value(p)):.1f}" for p in curve)
    parts.append(f'<polyline class="spot" points="{pts}" fill="none" stroke="{_SPOT}" stroke-width="2.5"/>')
    parts.append(f'<line class="flat" x1="{_L}" y1="{py(flat):.1f}" x2="{_L + _W}" y2="{py(flat):.1f}" '
                 f'stroke="{flat_color}" stroke-width="2.5" stroke-dasharray="6 4"/>')
    marks = [(est.checkpoint_interval_s, _CHOSEN, "chosen" if est.interval_was_set else "chosen (recommended)")]
    if est.recommended_interval_s and est.interval_was_set:
        marks.append((est.recommended_interval_s, _REC, "recommended"))
    by_interval = {p["interval_s"]: p for p in curve}
    for i, (tau, color, name) in enumerate(marks):
        point = by_interval.get(tau)
        if point is None:
            continue  # the job is expected never to finish at this interval
        x, y = px(tau), py(value(point))
        parts.append(f'<line class="mark-{name.split()[0]}" x1="{x:.1f}" y1="{top - 8}" x2="{x:.1f}" '
                     f'y2="{bottom}" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{color}"/>')
        anchor = "start" if x < _L + _W * 0.6 else "end"
        dx = 8 if anchor == "start" else -8
        parts.append(f'<text class="mark-label" x="{x + dx:.1f}" y="{18 + 18 * i}" text-anchor="{anchor}" '
                     f'style="fill:{color}">{_a(name)} {_a(fmt_duration(tau))}: {_a(label(value(point)))}</text>')
    parts.append("</svg>")
    key = (f'<p class="legend"><span><span class="sw" style="background:{_SPOT}"></span>spot, expected '
           f'(re-work, restarts, stalls)</span> <span><span class="sw" style="background:{flat_color}">'
           f"</span>{_a(flat_label)}</span> <span><span class=\"sw\" style=\"background:{_CHOSEN}\"></span>"
           "chosen interval</span>"
           + (f' <span><span class="sw" style="background:{_REC}"></span>recommended (Young)</span>'
              if est.recommended_interval_s and est.interval_was_set else "")
           + "</p>")
    return f"<h2>{_a(title)}</h2>" + '<div class="chart">' + "".join(parts) + "</div>" + key


def estimate_html(est: JobEstimate) -> str:
    """The estimate as one self-contained HTML page (see the module docstring)."""
    curve = interval_curve(est)
    work_s = est.hours_per_run * 3600.0
    a = est.at_interval
    title = (f"spotrun estimate: {est.instance_type} in {est.region}, {est.hours_per_run:g} h/run x "
             f"{est.runs_per_month:g} runs/month")
    summary = [
        ("Interruption rate", f"{est.rate_per_hour:.4g}/hour"
         + (f" (mean {est.mtbi_hours:,.0f} h between interruptions)" if est.mtbi_hours else "")),
        ("Spot price", f"${est.spot_price.usd_per_hour:.4f}/h [{est.spot_price.label()}]"),
        ("On-demand price", f"${est.on_demand_price.usd_per_hour:.4f}/h [{est.on_demand_price.label()}]"),
        ("Checkpoint interval", fmt_duration(est.checkpoint_interval_s)
         + ("" if est.interval_was_set else " (the recommended one)")),
        ("Expected time per run", f"{fmt_duration(a['wall_s'])} (+{est.overhead_pct:.2f}%)"),
        ("Spot, expected", f"{fmt_usd(est.spot_cost_per_run)}/run, {fmt_usd(est.spot_cost_per_month)}/month"),
        ("On-demand", f"{fmt_usd(est.on_demand_cost_per_run)}/run, {fmt_usd(est.on_demand_cost_per_month)}/month"),
        ("Savings", f"{fmt_usd(est.savings_per_month)}/month ({fmt_pct(est.savings_pct)})"),
    ]
    charts = []
    if curve:
        charts.append(_chart("cost-vs-interval", "Expected cost per run", curve, lambda p: p["spot_cost"],
                             est.on_demand_cost_per_run, "on-demand (no interruptions, no checkpoints)",
                             _OD, _tick_usd, est))
        charts.append(_chart("time-vs-interval", "Expected time per run", curve,
                             lambda p: p["wall_s"] / 3600.0, work_s / 3600.0,
                             "uninterrupted, no checkpoints", _OD, lambda v: f"{v:.4g} h", est,
                             from_zero=False))
    else:
        charts.append("<p>At every interval drawn the job is expected never to finish.</p>")
    html = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_a(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_a(title)}</h1>",
        '<table class="summary">' + "".join(f'<tr><td>{_a(k)}</td><td class="n">{_a(v)}</td></tr>'
                                            for k, v in summary) + "</table>",
        *charts,
        "<p>The model: each interruption costs the restart plus half an interval of re-work, and "
        "each checkpoint stalls training for the save time (see docs/cost.md).</p>",
        "</body></html>",
    ]
    return "\n".join(html) + "\n"
