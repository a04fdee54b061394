"""``spotrun status`` and ``spotrun stop``: a run's launch, from its run URL alone."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from typing import Any

from ..cost.render import fmt_duration, fmt_pct, fmt_usd
from ..errors import ConfigError
from ..storage import Storage
from .common import cost_report, is_done, last_checkpoint
from .state import STOP_FILE, LaunchState, load_state, save_state

__all__ = ["format_status", "run_status", "stop_run"]


def _ledger_segments(storage: Storage) -> list[dict[str, Any]]:
    """Segments as the launcher recorded them in the ledger, oldest first."""
    from ..ledger import Ledger

    from ..events import parse_records

    segs: dict[str, dict[str, Any]] = {}
    # Damaged or hostile records are skipped here as in the cost report (which warns).
    records, _ = parse_records(Ledger(storage).records())
    for r in records:
        if r.get("source") != "launcher" or r["event"] not in ("segment_started", "segment_ended"):
            continue
        s = segs.setdefault(r["segment_id"], {"segment_id": r["segment_id"]})
        if r["event"] == "segment_started":
            s["instance"] = r.get("instance")
            s["started_at"] = r.get("started_at")
        else:
            s["ended_at"] = r.get("ended_at")
            s["reason"] = r.get("reason")
    return sorted(segs.values(), key=lambda s: s.get("started_at") or 0.0)


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
        "status": ("finished" if is_done(storage) else state.status if state else "unknown"),
        "controller_alive": state.controller_alive() if state else False,
        "segments": segments,
        "interruptions": sum(1 for s in segments if s.get("reason") == "interrupted"),
        "failures": sum(1 for s in segments if s.get("reason") == "failed"),
        "last_checkpoint": last_checkpoint(storage),
        "done": is_done(storage),
        "current": None,
        "message": state.message if state else None,
        "writer": None,
    }
    from ..lease import read_lease

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
        if live and state is not None and state.mode == "ec2":
            try:
                from .ec2 import Ec2Api

                current["state"] = Ec2Api.for_region(state.options.get("region")).describe(cur.instance_id).state
            except Exception as exc:  # noqa: BLE001 - status must work without AWS access
                current["state_error"] = str(exc)
        out["current"] = current
    report = cost_report(storage, offline=offline)
    out["cost"] = report.to_dict() if report is not None else None
    return out


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
    for s in st["segments"]:
        inst = s.get("instance") or {}
        dur = (s.get("ended_at") or time.time()) - (s.get("started_at") or time.time())
        lines.append(f"  {s['segment_id']:<22} {inst.get('instance_type') or '?':<12} "
                     f"{inst.get('market') or '?':<9} {fmt_duration(dur):>9}  {s.get('reason') or 'running'}")
    cur = st["current"]
    if cur:
        extra = f", EC2 state {cur['state']}" if cur.get("state") else ""
        lines.append(f"current    {cur['instance_id']} ({cur['instance_type']} {cur['market']} "
                     f"in {cur['availability_zone'] or '?'}), up {cur['running_for_s']:.0f}s{extra}")
    if st["message"]:
        lines.append(f"last word  {st['message']}")
    cost = st.get("cost")
    if cost and cost.get("segments"):
        lines += _cost_lines(cost)
    return "\n".join(lines)


def _cost_lines(cost: dict[str, Any]) -> list[str]:
    """The cost so far, in words: what was paid, against on-demand, and what went where."""
    t = cost.get("totals") or {}
    running = [s for s in cost["segments"] if s.get("end_reason") == "running"]
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


def stop_run(storage: Storage, *, wait_s: float | None = None, sleep: Any = time.sleep) -> dict[str, Any]:
    """Stop the run's compute, keep its checkpoints; returns what was done.

    EC2: asks a live controller to stop (``launch/stop.json``) and terminates every instance
    tagged with the run id itself, so it works with or without a controller. Local: sends
    SIGINT to the local launcher (which forwards it to the command and waits for its
    checkpoint) when it runs on this host.
    """
    state = load_state(storage)
    if state is None:
        raise ConfigError(f"no launch recorded at {storage.display()}; nothing to stop")
    result: dict[str, Any] = {"run_url": storage.display(), "mode": state.mode, "terminated": [],
                              "signalled": None}
    if state.mode == "local":
        pid = state.controller_pid
        if (state.status == "running" and pid and state.controller_host == socket.gethostname()):
            try:
                os.kill(pid, signal.SIGINT)
                result["signalled"] = pid
            except ProcessLookupError:
                pass
        if result["signalled"] is None:
            # Another host, or no launcher: it polls this file.
            storage.write_bytes(STOP_FILE, json.dumps({"requested_at": time.time()}).encode())
        return result

    from .ec2 import Ec2Api

    api = Ec2Api.for_region(state.options.get("region"))
    alive_controller = state.controller_alive()
    if alive_controller and state.controller_host == socket.gethostname() and state.controller_pid:
        try:
            os.kill(state.controller_pid, 0)
        except ProcessLookupError:
            alive_controller = False
        except PermissionError:
            pass
    storage.write_bytes(STOP_FILE, json.dumps({"requested_at": time.time()}).encode())
    ids = [s.instance_id for s in api.find_run_instances(state.run_id)
           if s.state not in ("terminated", "shutting-down")]
    api.terminate(ids)
    result["terminated"] = ids
    if alive_controller:
        # The controller writes the ledger and the state; give it a few polls to notice.
        deadline = time.time() + (wait_s if wait_s is not None else max(30.0, 3 * (state.poll_s or 0)))
        while time.time() < deadline:
            fresh = load_state(storage)
            if fresh is not None and fresh.status != "running":
                result["controller"] = "acknowledged"
                return result
            sleep(0.5)
        result["controller"] = "no answer"
    _close_books(storage, state)
    return result


def _close_books(storage: Storage, state: LaunchState) -> None:
    """No controller to do it: end the open segment in the ledger and mark the run stopped."""
    from .common import record_segment_end

    cur = state.current
    if cur is not None:
        cur.ended_at, cur.end_reason, cur.detail = time.time(), "stopped", "spotrun stop"
        record_segment_end(storage, segment_id=cur.segment_id, reason="stopped", ended_at=cur.ended_at)
    state.status = "stopped"
    state.message = "stopped by spotrun stop; checkpoints kept"
    save_state(storage, state)
    storage.remove(STOP_FILE)
