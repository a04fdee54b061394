"""``spotrun status`` and ``spotrun stop``: a run's launch, from its run URL alone."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..cost.render import fmt_duration, fmt_pct, fmt_usd
from ..errors import ConfigError
from ..records.events import EndReason
from ..records.launch_state import RunStatus, load_state
from ..storage import Storage
from .base import backend_for
from .common import cost_report, is_done, last_checkpoint

__all__ = ["format_status", "run_status", "stop_run"]


def _ledger_segments(storage: Storage) -> list[dict[str, Any]]:
    """Segments as the launcher recorded them in the ledger, oldest first."""
    from ..records.events import Source, parse_records
    from ..records.ledger import Ledger

    segs: dict[str, dict[str, Any]] = {}
    # Damaged or hostile records are skipped here as in the cost report (which warns).
    records, _ = parse_records(Ledger(storage).records())
    for r in records:
        if r.get("source") != Source.LAUNCHER or r["event"] not in ("segment_started", "segment_ended"):
            continue
        s = segs.setdefault(r["segment_id"], {"segment_id": r["segment_id"]})
        if r["event"] == "segment_started":
            s["instance"] = r.get("instance")
            s["started_at"] = r.get("started_at")
            s["region"] = (r.get("instance") or {}).get("region")
            if r.get("group") is not None:  # a node of a multi-node attempt
                s["group"], s["node"] = r["group"], r.get("node")
        else:
            s["ended_at"] = r.get("ended_at")
            s["reason"] = r.get("reason")
    return sorted(segs.values(), key=lambda s: s.get("started_at") or 0.0)


def _attempts_ended(segments: list[dict[str, Any]], reason: EndReason) -> int:
    return len({s.get("group") or s["segment_id"] for s in segments if s.get("reason") == reason})


def run_status(storage: Storage, *, live: bool = True, offline: bool = True) -> dict[str, Any]:
    """What ``spotrun status`` shows, as a JSON-able dict.

    ``live``: ask EC2 for the current instance's state (EC2 runs only). ``offline``: price
    the cost so far from the shipped snapshot, no AWS pricing calls.
    """
    from ..cost.report import require_run

    require_run(storage)
    state = load_state(storage)
    segments = _ledger_segments(storage)
    out: dict[str, Any] = {
        "run_url": storage.display(),
        "mode": state.mode if state else None,
        "run_id": state.run_id if state else None,
        "status": (RunStatus.FINISHED.value if is_done(storage) else str(state.status) if state else "unknown"),
        "controller_alive": state.controller_alive() if state else False,
        "segments": segments,
        # An attempt of N nodes is one interruption (or failure), not N.
        "interruptions": _attempts_ended(segments, EndReason.INTERRUPTED),
        "failures": _attempts_ended(segments, EndReason.FAILED),
        "last_checkpoint": last_checkpoint(storage),
        "done": is_done(storage),
        "current": None,
        "message": state.message if state else None,
        "writer": None,
    }
    from ..records.lease import read_lease

    try:
        lease = read_lease(storage)
    except Exception as exc:  # noqa: BLE001 - status shows what it can
        out["writer"] = {"text": f"unknown ({exc})"}
    else:
        if lease is not None:
            out["writer"] = {**lease.to_dict(), "text": lease.state_text()}
    cur = state.current if state else None
    if cur is not None:
        current: dict[str, Any] = {
            "segment_id": cur.segment_id, "instance_id": cur.instance_id,
            "instance_type": cur.instance_type, "market": cur.market,
            "availability_zone": cur.availability_zone,
            "running_for_s": round(time.time() - cur.started_at, 1),
        }
        if state is not None:
            current.update(backend_for(state.mode).current_details(state, cur, live=live))
        out["current"] = current
    running = state.running if state else []
    if state is not None and (len(running) > 1 or (running and running[0].group)):
        out["attempt"] = _attempt(state, running, live=live)
        _judge_beats(state, storage, out["attempt"]["nodes"], controller_alive=out["controller_alive"])
    else:
        out["attempt"] = None
    report = cost_report(storage, offline=offline)
    out["cost"] = report.to_dict() if report is not None else None
    if state is not None:
        from .limits import limits_status

        spent = out["cost"]["totals"].get("cost_usd") if out["cost"] else None
        out["limits"] = limits_status(state.options, storage, waiting_since=state.waiting_since,
                                      spent_usd=spent)
    else:
        out["limits"] = None
    return out


def _attempt(state: Any, running: list[Any], *, live: bool) -> dict[str, Any]:
    """The running attempt of a multi-node run: its nodes, in rank order, with their state."""
    details = backend_for(state.mode).nodes_details(state, running, live=live)
    nodes = [{"node": s.node, "segment_id": s.segment_id, "instance_id": s.instance_id,
              "instance_type": s.instance_type, "market": s.market, "region": s.region,
              "availability_zone": s.availability_zone, **details.get(s.instance_id, {})}
             for s in running]
    # Survivors kept by --recovery replace stay in the attempt they started in; the running
    # attempt is the newest group among the nodes.
    newest = max(running, key=lambda s: (s.started_at, s.group or ""))
    return {"group": newest.group, "nodes": nodes,
            "requested_nodes": int(state.options.get("nodes") or len(running))}


def _judge_beats(state: Any, storage: Storage, nodes: list[dict[str, Any]], *, controller_alive: bool) -> None:
    """Each node's ``heartbeat`` (its record's age and what the launcher makes of it), added
    to ``nodes`` in place. Both modes: a node agent beats wherever it runs (``--local
    --nodes N`` starts the same agent), though only the EC2 controller judges by the beat;
    the local launcher sees its node processes and needs none."""
    from ..records.heartbeat import read_node_beat, silence_limit

    opts = state.options or {}
    off = str((opts.get("env") or {}).get("SPOTRUN_HEARTBEAT_S", "")).strip() in ("0", "0.0")
    ec2 = state.mode == "ec2"
    silence = float(opts.get("node_silence_s", 120.0) or 0.0) if ec2 else 0.0
    beats = {n["instance_id"]: read_node_beat(storage, n["instance_id"]) for n in nodes}
    limits = {iid: silence_limit(silence, b.beat.interval_s if b.beat else None) for iid, b in beats.items()}
    late = {iid for iid, b in beats.items() if silence > 0 and b.age_s is not None and b.age_s >= limits[iid]}
    # The controller's own rule: every node of a multi-node attempt silent at once is the
    # run URL, not N machines; it warns and terminates none (spotrun.launch.ec2_silence).
    all_quiet = len(nodes) > 1 and late == set(beats)
    for n in nodes:
        iid = n["instance_id"]
        b = beats[iid]
        hb: dict[str, Any] = {"age_s": None if b.age_s is None else round(b.age_s, 1),
                              "interval_s": b.beat.interval_s if b.beat else None,
                              "seq": b.beat.seq if b.beat else None,
                              "limit_s": limits[iid] if silence > 0 else None,
                              "silent": iid in late, "error": b.error}
        hb["text"] = _beat_text(b.age_s, b.error, hb, off=off, ec2=ec2, silence=silence, all_quiet=all_quiet,
                                controller_alive=controller_alive, recovery=str(opts.get("recovery") or "replace"))
        n["heartbeat"] = hb


def _beat_text(age: float | None, error: str | None, hb: dict[str, Any], *, off: bool, ec2: bool,
               silence: float, all_quiet: bool, controller_alive: bool, recovery: str) -> str:
    if error is not None:
        return f"heartbeat unreadable ({error})"
    if age is None:
        if off:
            return "no heartbeat (SPOTRUN_HEARTBEAT_S=0 in --env)"
        judged = "; judged from its first beat" if ec2 and silence > 0 else ""
        return f"no heartbeat yet (booting or in --setup{judged})"
    text = f"last beat {age:.0f}s ago"
    if not ec2:
        # The local launcher watches its node processes, not their beats: a stale beat is
        # worth a word only when it is well past the writer's own interval.
        if hb["interval_s"] and age >= 3 * hb["interval_s"]:
            text += " (stale; the local launcher judges its nodes by their processes, not this)"
        return text
    if silence <= 0:
        return text + " (--node-silence 0: not judged)"
    if not hb["silent"]:
        if hb["interval_s"] and hb["limit_s"] > silence:  # a slow writer: its own three beats rule
            text += f" (beats every {hb['interval_s']:g}s: silent after {hb['limit_s']:.0f}s)"
        return text
    text = f"silent {age:.0f}s (limit {hb['limit_s']:.0f}s)"
    if all_quiet:
        return text + ": every node is, more likely the run URL than the machines; the controller terminates none"
    if not controller_alive:
        return text + ": no live controller acts on it (spotrun launch --resume RUN_URL)"
    then = "starts one replacement in its slot" if recovery == "replace" else "relaunches every node"
    return text + f": the controller terminates it and {then}"


def format_status(st: dict[str, Any]) -> str:
    lines = [f"run        {st['run_url']}"]
    if st["mode"]:
        alive = "controller alive" if st["controller_alive"] else "no live controller"
        lines.append(f"launch     {st['mode']} (run id {st['run_id']}), {st['status']}, {alive}")
    else:
        lines.append(f"launch     none recorded ({st['status']})")
    cp = st["last_checkpoint"]
    lines.append(f"checkpoint {'step ' + str(cp) if cp is not None else 'none committed'}"
                 + ("; done.json written" if st["done"] else ""))
    writer = st.get("writer")
    lines.append(f"writer     {writer['text'] if writer else 'none (no lease)'}")
    lines.append(f"segments   {len(st['segments'])}, interruptions {st['interruptions']}, "
                 f"failures {st['failures']}")
    regions = {s.get("region") for s in st["segments"] if s.get("region")}
    for s in st["segments"]:
        inst = s.get("instance") or {}
        dur = (s.get("ended_at") or time.time()) - (s.get("started_at") or time.time())
        where = f" {s.get('region') or '?':<14}" if len(regions) > 1 else ""
        node = f"  node {s['node']} of {s['group']}" if s.get("group") is not None else ""
        lines.append(f"  {s['segment_id']:<22} {inst.get('instance_type') or '?':<12} "
                     f"{inst.get('market') or '?':<9}{where} {fmt_duration(dur):>9}  "
                     f"{s.get('reason') or 'running'}{node}")
    cur = st["current"]
    if cur:
        extra = f", EC2 state {cur['state']}" if cur.get("state") else ""
        lines.append(f"current    {cur['instance_id']} ({cur['instance_type']} {cur['market']} "
                     f"in {cur['availability_zone'] or '?'}), up {cur['running_for_s']:.0f}s{extra}")
    att = st.get("attempt")
    if att:
        lines.append(f"nodes      {len(att['nodes'])} of {att['requested_nodes']} in attempt {att['group']}")
        label = "EC2 state" if st["mode"] == "ec2" else "state"
        for n in att["nodes"]:
            state = n.get("state") or n.get("state_error") or "?"
            where = ", ".join(w for w in (n["availability_zone"], n["region"]) if w) or "?"
            beat = f"; {n['heartbeat']['text']}" if n.get("heartbeat") else ""
            lines.append(f"  node {n['node']}: {n['instance_id']} ({n['instance_type']} {n['market']} in "
                         f"{where}), {label} {state}{beat}")
    lim = st.get("limits")
    if lim and lim.get("text"):
        lines += lim["text"]
    if st["message"]:
        lines.append(f"last word  {st['message']}")
    cost = st.get("cost")
    if cost and cost.get("segments"):
        lines += _cost_lines(cost)
    return "\n".join(lines)


def _cost_lines(cost: dict[str, Any]) -> list[str]:
    """The cost so far, in words: what was paid, against on-demand, and what went where."""
    from ..cost.report import RUNNING  # cost reads launch state: imported here, not at the top

    t = cost.get("totals") or {}
    running = [s for s in cost["segments"] if s.get("end_reason") == RUNNING]
    paid = fmt_usd(t.get("cost_usd"))
    if running:
        paid += " (the running segment priced to now)"
    lines = [f"cost       {paid} so far over {fmt_duration(t.get('duration_s'))} of compute"]
    if t.get("savings_usd") is not None:
        lines.append(f"           on-demand for the same work {fmt_usd(t.get('on_demand_usd'))}: "
                     f"saved {fmt_usd(t['savings_usd'])} ({fmt_pct(t.get('savings_pct'))})")
    elif not t.get("complete", True):
        lines.append("           some segments have no price (see spotrun cost for why)")
    lines.append(f"           lost work {fmt_usd(t.get('lost_work_usd'))} ({fmt_duration(t.get('lost_work_s'))}), "
                 f"restarts {fmt_usd(t.get('restart_overhead_usd'))}, "
                 f"checkpoint stalls {fmt_usd(t.get('stall_usd'))}")
    lines += _recovery_lines(cost)
    short: list[str] = []
    for s in cost["segments"]:
        for kind, p in (("market", s.get("price")), ("on-demand", s.get("on_demand_price"))):
            if not p:
                continue
            text = f"{kind} {p['source']}" + (f" {p['vintage']}" if p.get("vintage") else "")
            text += " (ESTIMATED: not market data)" if p.get("estimate") else ""
            if text not in short:
                short.append(text)
    lines.append(f"           prices: {', '.join(short) or 'none'} (spotrun cost RUN_URL says more)")
    return lines


def _recovery_lines(cost: dict[str, Any]) -> list[str]:
    """Recovery in two lines: how many, loss -> first step (median), and the latest one's
    split, bytes by source and instances (``spotrun cost`` has the table)."""
    from ..cost.recovery import PARTS
    from ..cost.render import fmt_bytes, fmt_instances

    recs = cost.get("recoveries") or []
    if not recs:
        return []
    t = cost.get("recovery_totals") or {}
    n = len(recs)
    median = "" if t.get("median_s") is None else f", median {fmt_duration(t['median_s'])}"
    last = recs[-1]
    instances = fmt_instances(last.get("instances_started"), last.get("instances_kept"))
    parts = ", ".join(f"{label} {fmt_duration(last[key])}" for key, label in PARTS if last.get(key) is not None)
    total = "no training step yet" if last["total_s"] is None else fmt_duration(last["total_s"])
    return [
        f"recovery   {n} recover{'ies' if n != 1 else 'y'}, loss -> first step {fmt_duration(t.get('total_s'))} "
        f"in all{median}",
        f"           latest ({last.get('mode') or 'mode unknown'}): {total} ({parts}); restored "
        f"{fmt_bytes(last.get('bytes_local'))} local, {fmt_bytes(last.get('bytes_peer'))} peer, "
        f"{fmt_bytes(last.get('bytes_url'))} run URL; instances {instances}",
    ]


def stop_run(storage: Storage, *, wait_s: float | None = None,
             sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Stop the run's compute, keep its checkpoints; returns what was done.

    The backend that launched the run does it (:func:`~.base.backend_for`): EC2 terminates
    every instance tagged with the run id, with or without a live controller; local signals
    the launcher on this host, or leaves it a stop request in the run URL.
    """
    state = load_state(storage)
    if state is None:
        raise ConfigError(f"no launch recorded at {storage.display()}; nothing to stop")
    result: dict[str, Any] = {"run_url": storage.display(), "mode": state.mode, "terminated": [],
                              "signalled": None}
    result.update(backend_for(state.mode).stop(storage, state, wait_s=wait_s, sleep=sleep))
    return result
