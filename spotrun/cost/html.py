"""A self-contained HTML page for a cost report: inline CSS and SVG, nothing fetched.

The page has a timeline (one bar per segment; checkpoints as ticks, notices as triangles,
interruptions as red crosses at the segment's end; the grey part of a bar is its startup,
the hatched part its lost work) and the cost table. No scripts, fonts, images or links to
anything outside the page.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

from .render import fmt_duration, fmt_pct, fmt_time, fmt_usd

if TYPE_CHECKING:
    from .report import CostReport

__all__ = ["report_html"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em} th,td{padding:.3em .6em;border-bottom:1px solid #ddd}
th{text-align:left;background:#f4f4f4} td.n{text-align:right;font-variant-numeric:tabular-nums}
.summary td:first-child{color:#555} .warn{color:#a40} .legend span{margin-right:1.2em}
svg text{font-size:11px;fill:#333}
"""

_COLORS = {"finished": "#3a8f3a", "interrupted": "#d08a1c", "unknown": "#c0392b",
           "failed": "#8e44ad", "stopped": "#607d8b"}


def _timeline(report: CostReport) -> str:
    segs = report.segments
    if not segs:
        return "<p>No segments.</p>"
    t0 = min(s.start for s in segs)
    t1 = max(s.end for s in segs)
    span = max(t1 - t0, 1e-9)
    left, width, row_h = 150, 760, 28
    height = 30 + row_h * len(segs) + 20

    def x(t: float) -> float:
        return left + (t - t0) / span * width

    parts = [
        f'<svg id="timeline" width="{left + width + 30}" '
        f'height="{height}" role="img" aria-label="run timeline">',
        '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="3" height="6" fill="#c0392b" opacity=".45"/>'
        "</pattern></defs>",
    ]
    for k in range(5):
        t = t0 + span * k / 4
        parts.append(f'<line x1="{x(t):.1f}" y1="18" x2="{x(t):.1f}" y2="{height - 12}" stroke="#eee"/>')
        parts.append(f'<text x="{x(t):.1f}" y="12" text-anchor="middle">+{escape(fmt_duration(t - t0))}</text>')
    for i, s in enumerate(segs):
        y = 24 + i * row_h
        color = _COLORS.get(s.end_reason, "#777")
        label = f"{s.segment_id[:10]} {s.instance.instance_type or ''}"
        parts.append(f'<text x="4" y="{y + 15}">{escape(label)}</text>')
        parts.append(
            f'<rect class="segment" x="{x(s.start):.1f}" y="{y}" width="{max(1.0, x(s.end) - x(s.start)):.1f}" '
            f'height="20" fill="{color}"><title>{escape(s.segment_id)}: {escape(s.end_reason)}, '
            f"{escape(fmt_duration(s.duration_s))}</title></rect>"
        )
        if s.startup_s > 0:
            parts.append(f'<rect x="{x(s.start):.1f}" y="{y}" width="{x(s.start + s.startup_s) - x(s.start):.1f}" '
                         f'height="20" fill="#999" opacity=".7"><title>startup {escape(fmt_duration(s.startup_s))}</title></rect>')
        if s.lost_work_s > 0:
            parts.append(f'<rect x="{x(s.end - s.lost_work_s):.1f}" y="{y}" width="{x(s.end) - x(s.end - s.lost_work_s):.1f}" '
                         f'height="20" fill="url(#hatch)"><title>lost work {escape(fmt_duration(s.lost_work_s))}</title></rect>')
        for c in s.checkpoints:
            cx = x(float(c["committed_at"]))
            parts.append(f'<line class="checkpoint" x1="{cx:.1f}" y1="{y - 2}" x2="{cx:.1f}" y2="{y + 22}" '
                         f'stroke="#1f4e99" stroke-width="2"><title>checkpoint step {escape(str(c["step"]))}</title></line>')
        for n in s.notices:
            nx = x(float(n["detected_at"]))
            parts.append(f'<polygon class="notice" points="{nx - 5:.1f},{y - 6} {nx + 5:.1f},{y - 6} {nx:.1f},{y + 2}" '
                         f'fill="#e67e22"><title>notice ({escape(str(n["source"]))}: {escape(str(n["action"]))})</title></polygon>')
        if s.interrupted:
            ex = x(s.end)
            parts.append(f'<g class="interruption" stroke="#c0392b" stroke-width="3"><title>interrupted</title>'
                         f'<line x1="{ex - 6:.1f}" y1="{y + 4}" x2="{ex + 6:.1f}" y2="{y + 16}"/>'
                         f'<line x1="{ex - 6:.1f}" y1="{y + 16}" x2="{ex + 6:.1f}" y2="{y + 4}"/></g>')
    parts.append("</svg>")
    return "".join(parts)


def report_html(report: CostReport) -> str:
    d = report.to_dict()
    t = d["totals"]
    rows = []
    for s in d["segments"]:
        inst = s["instance"]
        price = s["price"]
        cells = [
            escape(s["segment_id"]),
            escape(f"{inst.get('instance_type') or '?'} ({inst.get('market')})"),
            escape(inst.get("availability_zone") or inst.get("region") or inst.get("cloud") or ""),
            escape(fmt_time(s["start"])),
            escape(s["end_reason"]),
        ]
        nums = [
            fmt_duration(s["duration_s"]),
            "n/a" if price is None else f"{price['usd_per_hour']:.4f}",
            fmt_usd(s["cost_usd"]),
            f"{fmt_duration(s['lost_work_s'])} / {fmt_usd(s['lost_work_usd'])}",
            f"{fmt_duration(s['restart_overhead_s'])} / {fmt_usd(s['restart_overhead_usd'])}",
            f"{fmt_duration(s['stall_s'])} / {fmt_usd(s['stall_usd'])}",
            fmt_usd(s["on_demand_usd"]),
            escape(price["source"] if price else (s["price_error"] or "")),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells)
                    + "".join(f'<td class="n">{escape(c)}</td>' for c in nums) + "</tr>")
    summary = [
        ("Interruptions", str(t["interruptions"])),
        ("Compute time", fmt_duration(t["duration_s"])),
        ("Useful time", fmt_duration(t["useful_s"])),
        ("Cost (what this run paid)", fmt_usd(t["cost_usd"])),
        ("Lost work", f"{fmt_usd(t['lost_work_usd'])} ({fmt_duration(t['lost_work_s'])})"),
        ("Restarts", f"{fmt_usd(t['restart_overhead_usd'])} ({fmt_duration(t['restart_overhead_s'])})"),
        ("Checkpoint stalls", f"{fmt_usd(t['stall_usd'])} ({fmt_duration(t['stall_s'])})"),
        ("On-demand cost of the useful work", fmt_usd(t["on_demand_usd"])),
        ("Savings", f"{fmt_usd(t['savings_usd'])} ({fmt_pct(t['savings_pct'])})"),
    ]
    headers = ["Segment", "Instance", "Zone", "Start (UTC)", "Ended", "Duration", "$/hour", "Cost",
               "Lost work", "Restart", "Stalls", "On-demand (useful)", "Price source"]
    html = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>spotrun cost: {escape(d['run_url'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>spotrun cost: {escape(d['run_url'])}</h1>",
        "<h2>Timeline</h2>",
        _timeline(report),
        '<p class="legend"><span>bar colour: how the segment ended (green finished, orange '
        "interrupted, red killed/unknown, purple failed, grey-blue stopped)</span><span>grey: startup</span>"
        "<span>hatched: lost work</span><span>blue tick: checkpoint</span><span>orange triangle: notice</span>"
        "<span>red cross: interruption</span></p>",
        "<h2>Summary</h2>",
        '<table class="summary">' + "".join(f'<tr><td>{escape(k)}</td><td class="n">{escape(v)}</td></tr>' for k, v in summary) + "</table>",
        "<h2>Segments</h2>",
        '<table id="cost-table"><thead><tr>' + "".join(f"<th>{escape(h)}</th>" for h in headers)
        + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>",
        "<h2>Price sources</h2><ul>" + "".join(f"<li>{escape(p)}</li>" for p in d["price_sources"]) + "</ul>",
    ]
    if d["warnings"]:
        html.append('<h2>Warnings</h2><ul class="warn">' + "".join(f"<li>{escape(w)}</li>" for w in d["warnings"]) + "</ul>")
    html.append("</body></html>")
    return "\n".join(html) + "\n"
