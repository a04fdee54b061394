"""Plain-text rendering of cost reports, estimates and portfolios."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ..units import format_bytes

if TYPE_CHECKING:
    from .report import CostReport

__all__ = ["fmt_bytes", "fmt_duration", "fmt_instances", "fmt_usd", "recovery_lines", "report_text"]


def fmt_usd(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) < 10:
        return f"${value:,.4f}"
    return f"${value:,.2f}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{s % 60:04.1f}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def fmt_bytes(n: int | None) -> str:
    return "?" if n is None else format_bytes(int(n))


def fmt_instances(started: int | None, kept: int | None) -> str:
    """``1 started, 2 kept``; ``?`` parts where the ledger does not say."""
    return f"{'?' if started is None else started} started, {'?' if kept is None else kept} kept"


def recovery_lines(d: dict[str, Any]) -> list[str]:
    """The recovery section of a report dict (``to_dict()``): one row per attempt that
    followed a loss, loss -> first step and its split, bytes by source, instances."""
    from .recovery import PARTS

    recs = d.get("recoveries") or []
    if not recs:
        return []
    headers = ["#", "attempt", "mode", "loss -> step", *(label for _, label in PARTS),
               "local", "peer", "run URL", "instances"]
    rows = []
    for n, r in enumerate(recs, 1):
        rows.append([
            str(n),
            _after(r),
            r.get("mode") or "?",
            "no step yet" if r["total_s"] is None else fmt_duration(r["total_s"]),
            *("?" if r.get(key) is None else fmt_duration(r[key]) for key, _ in PARTS),
            fmt_bytes(r.get("bytes_local")), fmt_bytes(r.get("bytes_peer")), fmt_bytes(r.get("bytes_url")),
            fmt_instances(r.get("instances_started"), r.get("instances_kept")),
        ])
    right = {0, *range(3, 4 + len(PARTS) + 3)}
    out = ["", "Recovery (from each loss to the first training step of the attempt after it)"]
    out += ["  " + line for line in table(headers, rows, right=right)]
    out.append("  ('?': not in the ledger; an unknown part's time is in the part before it.")
    out.append("  Bytes the restore read: local = already on the restoring machine, its own copy or "
               "files it held for other nodes;")
    out.append("  peer = fetched from another node over the peer channel during the restore; "
               "run URL = read from the run URL)")
    return out


def _after(r: dict[str, Any]) -> str:
    """``a1b2 -> c3d4``: the attempt that lost and the one that recovered (ids shortened)."""
    return f"{str(r.get('previous') or '?')[:10]} -> {str(r['attempt'])[:10]}"


def fmt_time(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> list[str]:
    right = right or set()
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def attempt_label(segment: dict[str, Any]) -> str:
    """``a1b2c3d4e5/1``: a node's attempt (its group id, shortened) and rank; "" without one;
    ``spare`` for a machine started at a loss that no attempt used."""
    if segment.get("unused"):
        return "spare"
    if segment.get("group") is None:
        return ""
    node = segment.get("node")
    return f"{str(segment['group'])[:10]}/{'?' if node is None else node}"


def report_text(report: CostReport) -> str:
    d: dict[str, Any] = report.to_dict()
    t = d["totals"]
    out = [f"spotrun cost: {d['run_url']}", ""]
    # Columns that only multi-node and multi-region runs need (single-node, one-region
    # reports stay as they were).
    nodes = any(s.get("group") is not None for s in d["segments"])
    regions = len(d.get("regions") or []) > 1
    rows = []
    for s in d["segments"]:
        inst = s["instance"]
        price = s["price"]
        rows.append([
            s["segment_id"][:12],
            *([attempt_label(s)] if nodes else []),
            f"{inst.get('instance_type') or '?'} {inst.get('market')}",
            *([inst.get("region") or ""] if regions else []),
            inst.get("availability_zone") or inst.get("region") or inst.get("cloud") or "",
            fmt_time(s["start"]),
            fmt_duration(s["duration_s"]),
            s["end_reason"],
            "n/a" if price is None else f"{price['usd_per_hour']:.4f}" + ("*" if price.get("estimate") else ""),
            fmt_usd(s["cost_usd"]),
            fmt_duration(s["lost_work_s"]),
            fmt_duration(s["restart_overhead_s"]),
            fmt_duration(s["stall_s"]),
        ])
    headers = ["segment", *(["attempt/node"] if nodes else []), "instance", *(["region"] if regions else []),
               "zone", "start (UTC)", "duration", "ended", "$/h", "cost", "lost", "restart", "stall"]
    right = {headers.index(h) for h in ("duration", "$/h", "cost", "lost", "restart", "stall")}
    out += table(headers, rows, right=right)
    if nodes:
        out.append("  (each node of an attempt is a segment; lost work and restarts count every node)")
    out += ["", "Totals"]
    segments_text = str(t["segments"])
    if nodes:
        segments_text += f" ({t['attempts']} attempt{'s' if t['attempts'] != 1 else ''})"
    summary = [
        ("segments", segments_text),
        ("interruptions", str(t["interruptions"])),
        ("checkpoints", str(t["checkpoints"])),
        ("compute time", fmt_duration(t["duration_s"])),
        ("useful time", fmt_duration(t["useful_s"])),
        ("cost (what this run paid)", fmt_usd(t["cost_usd"])),
        ("  of which lost work", f"{fmt_usd(t['lost_work_usd'])} ({fmt_duration(t['lost_work_s'])})"),
        ("  of which restarts", f"{fmt_usd(t['restart_overhead_usd'])} ({fmt_duration(t['restart_overhead_s'])})"),
        ("  of which checkpoint stalls", f"{fmt_usd(t['stall_usd'])} ({fmt_duration(t['stall_s'])})"),
        ("on-demand cost of the useful work", fmt_usd(t["on_demand_usd"])),
        ("savings", f"{fmt_usd(t['savings_usd'])} ({fmt_pct(t['savings_pct'])})"),
        *([("recovery (loss -> first step)", _recovery_total(d["recovery_totals"]))]
          if d.get("recovery_totals", {}).get("recoveries") else []),
        ("SageMaker's figure (1 - billable/training)",
         f"{fmt_pct(d['sagemaker']['savings_pct'])} (billable {fmt_duration(d['sagemaker']['billable_s'])}, "
         f"training {fmt_duration(d['sagemaker']['training_s'])})"),
    ]
    width = max(len(k) for k, _ in summary)
    out += [f"  {k.ljust(width)}  {v}" for k, v in summary]
    if d["interruptions"]:
        out += ["", "Interruptions"]
        for i in d["interruptions"]:
            ck = i["last_checkpoint_step"]
            if i.get("group") is not None:
                what = (f"attempt {str(i['group'])[:10]} ({i['nodes']} node{'s' if i['nodes'] != 1 else ''}; segment "
                        f"{i['segment_id'][:12]} {i['reason']}): every node lost")
            else:
                what = f"segment {i['segment_id'][:12]} ({i['reason']}): lost"
            out.append(
                f"  {fmt_time(i['at'])}  {what} "
                f"{fmt_duration(i['lost_work_s'])} = {fmt_usd(i['lost_work_usd'])} since "
                + ("its first step" if ck is None else f"checkpoint step {ck}")
                + (
                    f"; restart took {fmt_duration(i['restart_overhead_s'])} = {fmt_usd(i['restart_overhead_usd'])}"
                    if i["restart_overhead_s"] is not None
                    else "; not relaunched"
                )
            )
    out += recovery_lines(d)
    if d.get("notes"):
        out += ["", "Notes"]
        out += [f"  - {n}" for n in d["notes"]]
    if any((s["price"] or {}).get("estimate") for s in d["segments"]):
        out += ["", "* an estimate, not market data (the shipped snapshot's spot price is on-demand x 0.30)"]
    out += ["", "Price sources" + (f" (snapshot prices: AWS list prices of {d['snapshot_vintage']})"
                                   if d["snapshot_vintage"] else "")]
    out += [f"  - {label}" for label in d["price_sources"]] or ["  - none"]
    if d["warnings"]:
        out += ["", "Warnings"]
        out += [f"  ! {w}" for w in d["warnings"]]
    return "\n".join(out) + "\n"


def _recovery_total(t: dict[str, Any]) -> str:
    n = t["recoveries"]
    median = "" if t.get("median_s") is None else f", median {fmt_duration(t['median_s'])}"
    return f"{fmt_duration(t['total_s'])} over {n} recover{'ies' if n != 1 else 'y'}{median}"
