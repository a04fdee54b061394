"""A self-contained HTML page for a cost report: inline CSS and SVG, nothing fetched.

The page has a timeline (one bar per segment, labelled with its market; on-demand bars
outlined; checkpoints as ticks, notices as triangles, interruptions as red crosses at the
segment's end; the grey part of a bar is its startup, the hatched part its lost work), a
cumulative-cost chart (what the run paid against what on-demand would have cost for the same
work), the summary with SageMaker's figure beside ours, and the cost table, where estimated
prices are flagged. No scripts, fonts, images or links to anything outside the page. Both
charts use a ``viewBox`` and ``width="100%"``, so they scale to the window, down to a minimum
width below which they scroll sideways (their text stays readable on a 400 px screen).

Every value that comes from the ledger is escaped (:func:`html.escape`, quotes included):
anyone who can write to the run's bucket can write a ledger record.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any

from .render import attempt_label, fmt_bytes, fmt_duration, fmt_instances, fmt_pct, fmt_time, fmt_usd

if TYPE_CHECKING:
    from .report import CostReport

__all__ = ["report_html"]

#: Chart text size in viewBox units, and the narrowest a chart is drawn (CSS px): a chart
#: scales with the page, so on a phone-width window (400 px) it would shrink its text to a
#: few pixels; below the minimum width it scrolls sideways instead, its text at least
#: ``_FONT * _MIN_CHART_PX / _VIEW_W`` px (11.2).
_FONT = 14
_MIN_CHART_PX = 800

_CSS = f"""
body{{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222;max-width:80em}}
h1{{font-size:1.3em;overflow-wrap:anywhere}} h2{{font-size:1.1em;margin-top:1.6em}}
table{{border-collapse:collapse;font-size:.9em}} th,td{{padding:.3em .6em;border-bottom:1px solid #ddd}}
th{{text-align:left;background:#f4f4f4}} td.n{{text-align:right;font-variant-numeric:tabular-nums}}
.summary td:first-child{{color:#555}} .warn{{color:#a40}} .legend span{{margin-right:1.2em;white-space:nowrap}}
.estimate{{color:#a40;font-weight:600}} .scroll,.chart{{overflow-x:auto}}
svg{{display:block;height:auto}} svg text{{font-size:{_FONT}px;fill:#333}}
.chart svg{{min-width:{_MIN_CHART_PX}px}}
.legend .sw{{display:inline-block;width:1.1em;height:.8em;margin-right:.35em;vertical-align:-.05em}}
@media (max-width:600px){{body{{margin:.8em}}}}
"""

_COLORS = {"finished": "#3a8f3a", "interrupted": "#d08a1c", "unknown": "#c0392b",
           "failed": "#8e44ad", "stopped": "#607d8b", "running": "#2e86c1"}

# Chart geometry in viewBox units; the browser scales the whole drawing to the page width.
_LEFT, _WIDTH, _RIGHT = 230, 740, 30
_VIEW_W = _LEFT + _WIDTH + _RIGHT


def _a(value: object) -> str:
    """A value for an attribute or text node, escaped (quotes included)."""
    return escape(str(value), quote=True)


def _span(report: CostReport) -> tuple[float, float]:
    t0 = min(s.start for s in report.segments)
    t1 = max(s.end for s in report.segments)
    return t0, max(t1 - t0, 1e-9)


def _axis(t0: float, span: float, top: float, bottom: float) -> list[str]:
    parts = []
    for k in range(5):
        x = _LEFT + _WIDTH * k / 4
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#eee"/>')
        parts.append(f'<text x="{x:.1f}" y="{top - 6}" text-anchor="middle">+{_a(fmt_duration(span * k / 4))}</text>')
    return parts


def _timeline(report: CostReport) -> str:
    segs = report.segments
    if not segs:
        return "<p>No segments.</p>"
    t0, span = _span(report)
    row_h = 30
    height = 30 + row_h * len(segs) + 20

    def x(t: float) -> float:
        return _LEFT + (t - t0) / span * _WIDTH

    parts = [
        f'<svg id="timeline" viewBox="0 0 {_VIEW_W} {height}" width="100%" '
        'preserveAspectRatio="xMinYMin meet" role="img" aria-label="run timeline">',
        '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="3" height="6" fill="#c0392b" opacity=".45"/>'
        "</pattern></defs>",
        *_axis(t0, span, 18, height - 12),
    ]
    for i, s in enumerate(segs):
        y = 24 + i * row_h
        color = _COLORS.get(s.end_reason, "#777")
        market = s.instance.market
        on_demand = market == "on-demand"
        label = f"{s.segment_id[:10]} {s.instance.instance_type or ''} {market}"
        if s.node is not None:
            label += f" n{s.node}"
        parts.append(f'<text class="market market-{_a(market)}" x="4" y="{y + 15}">{_a(label)}</text>')
        outline = ' stroke="#111" stroke-width="2.5"' if on_demand else ""
        parts.append(
            f'<rect class="segment market-{_a(market)}" x="{x(s.start):.1f}" y="{y}" '
            f'width="{max(1.0, x(s.end) - x(s.start)):.1f}" height="20" fill="{color}"{outline}>'
            f"<title>{_a(s.segment_id)}: {_a(market)}, {_a(s.end_reason)}, {_a(fmt_duration(s.duration_s))}"
            "</title></rect>"
        )
        if s.startup_s > 0:
            width = x(s.start + s.startup_s) - x(s.start)
            parts.append(f'<rect x="{x(s.start):.1f}" y="{y}" width="{width:.1f}" height="20" fill="#999" '
                         f'opacity=".7"><title>startup {_a(fmt_duration(s.startup_s))}</title></rect>')
        if s.lost_work_s > 0:
            lost_x = x(s.end - s.lost_work_s)
            parts.append(f'<rect x="{lost_x:.1f}" y="{y}" width="{x(s.end) - lost_x:.1f}" height="20" '
                         f'fill="url(#hatch)"><title>lost work {_a(fmt_duration(s.lost_work_s))}</title></rect>')
        for c in s.checkpoints:
            cx = x(float(c["committed_at"]))
            parts.append(f'<line class="checkpoint" x1="{cx:.1f}" y1="{y - 2}" x2="{cx:.1f}" y2="{y + 22}" '
                         f'stroke="#1f4e99" stroke-width="2"><title>checkpoint step {_a(c["step"])}</title></line>')
        for n in s.notices:
            nx = x(float(n["detected_at"]))
            parts.append(f'<polygon class="notice" points="{nx - 5:.1f},{y - 6} {nx + 5:.1f},{y - 6} {nx:.1f},{y + 2}" '
                         f'fill="#e67e22"><title>notice ({_a(n["source"])}: {_a(n["action"])})</title></polygon>')
        if s.interrupted:
            ex = x(s.end)
            parts.append(f'<g class="interruption" stroke="#c0392b" stroke-width="3"><title>interrupted</title>'
                         f'<line x1="{ex - 6:.1f}" y1="{y + 4}" x2="{ex + 6:.1f}" y2="{y + 16}"/>'
                         f'<line x1="{ex - 6:.1f}" y1="{y + 16}" x2="{ex + 6:.1f}" y2="{y + 4}"/></g>')
    parts.append("</svg>")
    return '<div class="chart">' + "".join(parts) + "</div>"


# The lost-work swatch: the timeline's hatch pattern, in CSS.
_HATCH = ";background-image:repeating-linear-gradient(45deg,#c0392b 0 2px,transparent 2px 5px)"


def _sw(color: str, extra: str = "") -> str:
    """A colour swatch for the legend."""
    return f'<span class="sw" style="background:{color}{extra}"></span>'


def _timeline_legend() -> str:
    ended = [("finished", "finished"), ("interrupted", "interrupted"), ("unknown", "killed/unknown"),
             ("failed", "failed"), ("stopped", "stopped"), ("running", "running")]
    items = [f"<span>{_sw(_COLORS[k])}{_a(label)}</span>" for k, label in ended]
    items += [
        f'<span>{_sw("#fff", ";outline:2.5px solid #111;outline-offset:-2.5px")}black outline: on-demand</span>',
        f'<span>{_sw("#999")}startup</span>',
        f'<span>{_sw("#e8b0a8", _HATCH)}lost work</span>',
        f'<span>{_sw("#1f4e99", ";width:.25em")}checkpoint</span>',
        f'<span>{_sw("#e67e22", ";clip-path:polygon(0 0,100% 0,50% 100%)")}notice</span>',
        '<span><span class="x" style="color:#c0392b;font-weight:700">&#x2715;</span> interruption</span>',
    ]
    return ('<p class="legend"><span>Bar colour: how the segment ended.</span> '
            + " ".join(items) + "</p>")


def _usd(seconds: float, price: Any) -> float:
    return 0.0 if price is None else seconds / 3600.0 * price.usd_per_hour


def cumulative_points(report: CostReport) -> dict[str, list[tuple[float, float]]]:
    """(time, dollars so far) corners of the two cumulative lines: what the run paid, and
    what on-demand would have cost for the same useful work (spread evenly over each
    segment's wall time; both lines are flat between segments)."""
    lines: dict[str, list[tuple[float, float]]] = {"spot": [], "on_demand": []}
    if not report.segments:
        return lines
    t0 = min(s.start for s in report.segments)
    paid = od = 0.0
    lines["spot"].append((t0, 0.0))
    lines["on_demand"].append((t0, 0.0))
    for s in sorted(report.segments, key=lambda s: s.start):
        lines["spot"].append((s.start, paid))
        lines["on_demand"].append((s.start, od))
        paid += _usd(s.duration_s, s.price)
        od += _usd(s.useful_s, s.on_demand_price)
        lines["spot"].append((s.end, paid))
        lines["on_demand"].append((s.end, od))
    return lines


def _cumulative(report: CostReport) -> str:
    if not report.segments:
        return ""
    lines = cumulative_points(report)
    top = max(v for pts in lines.values() for _, v in pts)
    if top <= 0:
        return "<p>No priced segment: no cumulative cost to draw.</p>"
    t0, span = _span(report)
    height, plot_top, plot_bottom = 230, 24, 190

    def xy(t: float, v: float) -> str:
        px = _LEFT + (t - t0) / span * _WIDTH
        py = plot_bottom - v / top * (plot_bottom - plot_top)
        return f"{px:.1f},{py:.1f}"

    parts = [
        f'<svg id="cumulative" viewBox="0 0 {_VIEW_W} {height}" width="100%" '
        'preserveAspectRatio="xMinYMin meet" role="img" aria-label="cumulative cost">',
        *_axis(t0, span, plot_top - 6, plot_bottom),
    ]
    for tick in y_ticks(top):
        py = plot_bottom - tick / top * (plot_bottom - plot_top)
        parts.append(f'<line class="y-grid" x1="{_LEFT}" y1="{py:.1f}" x2="{_LEFT + _WIDTH}" y2="{py:.1f}" '
                     'stroke="#eee"/>')
        parts.append(f'<text class="y-tick" x="{_LEFT - 8}" y="{py + 5:.1f}" text-anchor="end">'
                     f'{_a(_tick_usd(tick))}</text>')
    styles = {"spot": ("#d08a1c", "", "paid (this run)"),
              "on_demand": ("#1f4e99", ' stroke-dasharray="6 4"', "on-demand, same work")}
    for key, (color, dash, name) in styles.items():
        pts = " ".join(xy(t, v) for t, v in lines[key])
        last = lines[key][-1][1]
        parts.append(f'<polyline class="cum-{key.replace("_", "-")}" points="{pts}" fill="none" '
                     f'stroke="{color}" stroke-width="2.5"{dash}><title>{_a(name)}: {_a(fmt_usd(last))}</title>'
                     '</polyline>')
    # The key: a line sample and the label in the line's colour. Inline ``style``, not the
    # ``fill`` attribute: a stylesheet rule (``svg text{fill:...}``) overrides an attribute,
    # never an inline style.
    # One row under the plot, clear of the y-axis labels on the left.
    for i, (key, (color, dash, name)) in enumerate(styles.items()):
        kx, ky = _LEFT + 300 * i, height - 8
        parts.append(f'<line class="key-{key.replace("_", "-")}" x1="{kx}" y1="{ky - 5}" x2="{kx + 30}" '
                     f'y2="{ky - 5}" stroke="{color}" stroke-width="2.5"{dash}/>')
        parts.append(f'<text class="key key-{key.replace("_", "-")}" x="{kx + 36}" y="{ky}" '
                     f'style="fill:{color}">{_a(name)}</text>')
    parts.append("</svg>")
    return '<div class="chart">' + "".join(parts) + "</div>"


def y_ticks(top: float, most: int = 5) -> list[float]:
    """Dollar ticks from 0 to ``top``: steps of 1, 2, 2.5 or 5 x 10^k, at most ``most`` + 1 marks,
    the highest at or below ``top``."""
    import math

    if top <= 0:
        return [0.0]
    raw = top / most
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= raw)
    n = int(top / step + 1e-9)
    return [round(k * step, 12) for k in range(n + 1)]


def _tick_usd(v: float) -> str:
    if v == 0:
        return "$0"
    return f"${v:,.0f}" if v >= 100 else (f"${v:.2f}" if v >= 0.1 else f"${v:.4g}")


def _recovery(d: dict[str, Any]) -> list[str]:
    """The recovery table: one row per attempt that followed a loss (cost.recovery)."""
    from .recovery import PARTS

    recs = d.get("recoveries") or []
    if not recs:
        return []
    headers = ["#", "Attempt (lost -> recovered)", "Mode", "Lost at (UTC)", "Loss -> first step",
               *(label.capitalize() for _, label in PARTS), "Local (on the machine)", "Peer (fetched)",
               "From run URL", "Instances"]
    rows = []
    for n, r in enumerate(recs, 1):
        cells = [str(n), _a(f"{r.get('previous') or '?'} -> {r['attempt']}"), _a(r.get("mode") or "?"),
                 _a(fmt_time(r["lost_at"]))]
        nums = [
            "no step yet" if r["total_s"] is None else fmt_duration(r["total_s"]),
            *("?" if r.get(key) is None else fmt_duration(r[key]) for key, _ in PARTS),
            fmt_bytes(r.get("bytes_local")), fmt_bytes(r.get("bytes_peer")), fmt_bytes(r.get("bytes_url")),
            fmt_instances(r.get("instances_started"), r.get("instances_kept")),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells)
                    + "".join(f'<td class="n">{_a(c)}</td>' for c in nums) + "</tr>")
    return [
        "<h2>Recovery</h2>",
        '<div class="scroll"><table id="recovery-table"><thead><tr>'
        + "".join(f"<th>{_a(h)}</th>" for h in headers) + "</tr></thead><tbody>" + "".join(rows)
        + "</tbody></table></div>",
        "<p>From each loss to the first training step of the attempt after it, wall-clock, once per "
        "interruption; '?' is not in the ledger (its time is in the part before it). Bytes the "
        "restore read: local were already on the restoring machine (its own copy, or files it held "
        "for other nodes), peer were fetched from another node over the peer channel during the "
        "restore, the rest came from the run URL. The restarts figure above is what the same "
        "stretch cost in billed instance time, every node counted.</p>",
    ]


def report_html(report: CostReport) -> str:
    """The report as one self-contained HTML page (see the module docstring)."""
    d = report.to_dict()
    t = d["totals"]
    sm = d["sagemaker"]
    vintage = d["snapshot_vintage"]
    rows = []
    any_estimate = False
    # Columns only multi-node and multi-region runs need.
    nodes = any(s.get("group") is not None for s in d["segments"])
    regions = len(d.get("regions") or []) > 1
    for s in d["segments"]:
        inst = s["instance"]
        price = s["price"]
        cells = [
            _a(s["segment_id"]),
            *([_a(attempt_label(s))] if nodes else []),
            _a(inst.get("instance_type") or "?"),
            _a(inst.get("market")),
            *([_a(inst.get("region") or "")] if regions else []),
            _a(inst.get("availability_zone") or inst.get("region") or inst.get("cloud") or ""),
            _a(fmt_time(s["start"])),
            _a(s["end_reason"]),
        ]
        if price is None:
            rate = "n/a"
        elif price.get("estimate"):
            any_estimate = True
            rate = (f'<span class="estimate" title="an estimate, not market data: {_a(price["detail"])}">'
                    f'{price["usd_per_hour"]:.4f} (estimate)</span>')
        else:
            rate = _a(f"{price['usd_per_hour']:.4f}")
        source = "" if price is None else price["source"] + (f" {price['vintage']}" if price.get("vintage") else "")
        nums = [
            _a(fmt_duration(s["duration_s"])),
            rate,
            _a(fmt_usd(s["cost_usd"])),
            _a(f"{fmt_duration(s['lost_work_s'])} / {fmt_usd(s['lost_work_usd'])}"),
            _a(f"{fmt_duration(s['restart_overhead_s'])} / {fmt_usd(s['restart_overhead_usd'])}"),
            _a(f"{fmt_duration(s['stall_s'])} / {fmt_usd(s['stall_usd'])}"),
            _a(fmt_usd(s["on_demand_usd"])),
            _a(source or (s["price_error"] or "")),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells)
                    + "".join(f'<td class="n">{c}</td>' for c in nums) + "</tr>")
    summary = [
        ("Interruptions", str(t["interruptions"])),
        ("Compute time", fmt_duration(t["duration_s"])),
        ("Useful time", fmt_duration(t["useful_s"])),
        ("Cost (what this run paid)", fmt_usd(t["cost_usd"])),
        ("Lost work", f"{fmt_usd(t['lost_work_usd'])} ({fmt_duration(t['lost_work_s'])})"),
        ("Restarts", f"{fmt_usd(t['restart_overhead_usd'])} ({fmt_duration(t['restart_overhead_s'])})"),
        ("Checkpoint stalls", f"{fmt_usd(t['stall_usd'])} ({fmt_duration(t['stall_s'])})"),
        ("On-demand cost of the useful work", fmt_usd(t["on_demand_usd"])),
        ("Savings (spotrun: on-demand cost of the same work - paid)",
         f"{fmt_usd(t['savings_usd'])} ({fmt_pct(t['savings_pct'])})"),
        ("SageMaker's figure (1 - billable / training seconds)",
         f"{fmt_pct(sm['savings_pct'])}: billable {fmt_duration(sm['billable_s'])}, "
         f"training {fmt_duration(sm['training_s'])}"),
    ]
    headers = ["Segment", *(["Attempt/node"] if nodes else []), "Instance", "Market",
               *(["Region"] if regions else []), "Zone", "Start (UTC)", "Ended", "Duration", "$/hour", "Cost",
               "Lost work", "Restart", "Stalls", "On-demand (useful)", "Price source"]
    notes = []
    if nodes:
        notes.append(f"<p>Each node of a multi-node attempt is a segment ({t['attempts']} attempts, "
                     f"{t['segments']} segments); lost work and restarts count every node.</p>")
    notes += [f'<p class="note">Note: {_a(n)}.</p>' for n in d.get("notes") or []]
    if any_estimate:
        notes.append('<p class="estimate">Prices marked (estimate) are not market data: the shipped '
                     "snapshot's spot price is on-demand x 0.30. Pass --spot-price or let spotrun ask "
                     "the AWS APIs when the figure matters.</p>")
    if vintage:
        notes.append(f"<p>Snapshot prices are AWS list prices of {_a(vintage)}.</p>")
    html = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>spotrun cost: {_a(d['run_url'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>spotrun cost: {_a(d['run_url'])}</h1>",
        "<h2>Timeline</h2>",
        _timeline(report),
        _timeline_legend(),
        "<h2>Cumulative cost</h2>",
        _cumulative(report),
        "<h2>Summary</h2>",
        '<table class="summary">' + "".join(f'<tr><td>{_a(k)}</td><td class="n">{_a(v)}</td></tr>' for k, v in summary)
        + "</table>",
        "<p>SageMaker managed spot training reports savings as 1 - BillableTimeInSeconds / "
        "TrainingTimeInSeconds: the share of the job's wall time no instance was billed (waits "
        "for capacity). It says nothing about the price per hour; spotrun's savings compare "
        "dollars for the same useful work.</p>",
        "<h2>Segments</h2>",
        '<div class="scroll"><table id="cost-table"><thead><tr>' + "".join(f"<th>{_a(h)}</th>" for h in headers)
        + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>",
        *notes,
        *_recovery(d),
        "<h2>Price sources</h2><ul>" + "".join(f"<li>{_a(p)}</li>" for p in d["price_sources"]) + "</ul>",
    ]
    if d["warnings"]:
        items = "".join(f"<li>{_a(w)}</li>" for w in d["warnings"])
        html.append(f'<h2>Warnings</h2><ul class="warn">{items}</ul>')
    html.append("</body></html>")
    return "\n".join(html) + "\n"
