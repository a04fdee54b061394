"""What a run cost: segments from the ledger, priced, with lost work and restarts in dollars.

Merge rule (how ledger records become segments):

* records with the same ``segment_id`` form one segment;
* its start is the launcher's ``started_at`` when a launcher recorded one (on EC2 that is the
  launch request, so boot time shows), else the wrapper's, else the earliest
  ``process_started_at``/record time;
* its instance is the wrapper's, with every field the launcher recorded written over it
  (the launcher's view of instance id, type, zone and market is authoritative);
* its end is the launcher's ``segment_ended`` when there is one, else the wrapper's; with no
  end record (the process was killed), it ends at its last record's time with reason
  ``unknown``, which counts as an interruption.

Figures, per segment (all times in seconds):

* ``duration`` = end - start; ``cost`` = duration x the hourly price of its market (spot:
  time-weighted spot price; on-demand: on-demand price);
* ``startup`` = first training step - start (the whole segment if it never reached a step);
* ``restart_overhead`` = what getting training going again cost after this segment ended
  (:func:`attribute_restarts`, the one definition every view uses): its shutdown plus the
  startup of the attempt that followed it (every node of it). It is shown on the segment
  whose end caused it, so a segment's row and its interruption's line read the same figure;
  the first segment's startup is never a restart (on-demand would pay it too);
* ``lost_work`` = for a segment that did not finish, the training time after the state its
  last committed checkpoint captured: from that capture to the last completed step when the
  wrapper recorded its end (so a checkpoint taken on the notice loses nothing), else (the
  process was killed) to the segment's end; from its first training step when it committed
  none. Work that must be redone;
* ``shutdown`` = for an interrupted segment, from the wrapper's end (checkpoint committed,
  training over) to the segment's end as the launcher saw it: process and machine teardown.
  It is part of the restart overhead: both are what an interruption costs besides lost work;
* ``stall`` = the seconds training paused for checkpoints. Stalls are *not* useful work: an
  uninterrupted on-demand run would not need them to survive, so they are part of the price
  of running on spot (the same rule as ``spotrun estimate``). Stalls happen before the last
  commit and after the first step, so they never overlap lost work or restarts;
* ``useful`` = duration - lost_work - stall - the restart time spent *in* this segment (its own
  startup unless it is the first, and its shutdown); ``on_demand_cost`` = useful x
  the on-demand price of the segment's instance type: what the same work would have cost
  uninterrupted on on-demand.

Savings = total on-demand cost - total cost; percent of the on-demand cost.

Recovery (:mod:`spotrun.cost.recovery`): per attempt that followed a loss, the wall-clock time
from the loss to its first training step, split, with the restore's bytes by source and the
instances started. It is time, not money: its billed part is already in the restarts above.
The launcher's ``recovery_started`` records feed it and never make a segment.

Multi-node jobs: each node is its own segment (its instance), and the launcher's
``segment_started`` names the attempt all N nodes belong to (``group``) and the node's rank
(``node``). The training process writes its records (resumes, checkpoints, notices, its end)
from rank 0 only, so a node of a group with no such records of its own takes them from the
group's node that has them (node 0 first): the whole job starts, pauses for checkpoints and
stops together, so a node lost to an interruption loses the same training time as the head,
and lost work counts all N nodes. Every node of the first attempt is a first segment (its
startup is useful time); one interruption of a group is one interruption.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from ..errors import PriceUnavailableError, StorageNotFoundError
from ..records.events import Cloud, EndReason, Market, parse_records
from ..records.instance import InstanceInfo
from ..records.ledger import Ledger
from ..storage import Storage
from .attempts import group_attempts
from .prices import Price, PriceBook
from .recovery import Recovery, recoveries, recovery_records, recovery_totals

__all__ = ["CostReport", "SegmentCost", "build_segments", "price_segments", "report_for_run",
           "require_run"]

log = logging.getLogger(__name__)

#: A segment with no end record ends "unknown" (killed, or the machine vanished).
UNKNOWN = "unknown"
#: The segment the launcher runs now (no end record yet): priced to now, not an interruption.
RUNNING = "running"
INTERRUPTED_REASONS = (EndReason.INTERRUPTED.value, UNKNOWN)
NO_API_CLOUDS = (Cloud.SIMULATED, Cloud.LOCAL)


@dataclass
class SegmentCost:
    """What one segment (one stretch of compute: a process, or an instance) cost and did,
    merged from its ledger records. The segment itself, as a launcher records it, is
    :class:`spotrun.records.launch_state.Segment`."""

    segment_id: str
    instance: InstanceInfo
    start: float
    end: float
    end_reason: str
    sources: list[str] = field(default_factory=list)
    first_step_at: float | None = None
    resumed_step: int | None = None
    process_started_at: float | None = None
    # What the restore before the first step cost (the wrapper's training_resumed; None in
    # older records and where nothing was restored): for the recovery split.
    restore_started_at: float | None = None
    restore_s: float | None = None
    restore_bytes: dict[str, int | None] = field(default_factory=dict)
    training_ended_at: float | None = None  # the wrapper's end record, when it wrote one
    last_step_at: float | None = None
    checkpoints: list[dict] = field(default_factory=list)
    notices: list[dict] = field(default_factory=list)
    # A node of a multi-node attempt: the attempt's id and the node's rank (else None).
    group: str | None = None
    node: int | None = None
    # Set when this node wrote no training records and took its group's (see the docstring):
    # the segment they came from, and its checkpoints (for lost work and stalls only).
    training_from: str | None = None
    group_checkpoints: list[dict] = field(default_factory=list)
    # A machine no attempt used (the launcher's ``unused``: a replacement asked for at a loss
    # and stopped, not needed): no attempt, no interruption of training; its whole time is
    # the restart of the attempt it was started in (attribute_restarts).
    unused: bool = False
    # Filled in by price_segments.
    is_first: bool = False
    price: Price | None = None
    on_demand_price: Price | None = None
    price_error: str | None = None
    on_demand_error: str | None = None
    # Set by attribute_restarts: the restart this segment's end caused, as (segment, seconds)
    # parts, each priced at the segment the seconds were spent in.
    restart_parts: list[tuple[SegmentCost, float]] = field(default_factory=list, repr=False, compare=False)

    @property
    def interrupted(self) -> bool:
        return self.end_reason in INTERRUPTED_REASONS and not self.unused

    @property
    def duration_s(self) -> float:
        return max(0.0, self.end - self.start)

    @property
    def startup_s(self) -> float:
        if self.first_step_at is None:
            return self.duration_s
        return min(self.duration_s, max(0.0, self.first_step_at - self.start))

    @property
    def shutdown_s(self) -> float:
        if not self.interrupted or self.training_ended_at is None:
            return 0.0
        return max(0.0, min(self.end - self.training_ended_at, self.duration_s - self.startup_s))

    @property
    def restart_time_in_segment_s(self) -> float:
        """Restart time spent in this segment (whichever end caused it): its startup unless
        it is the first, and its shutdown. Not useful work."""
        return (0.0 if self.is_first else self.startup_s) + self.shutdown_s

    @property
    def restart_overhead_s(self) -> float:
        """The restart this segment's end caused (see :func:`attribute_restarts`)."""
        return float(sum(sec for _, sec in self.restart_parts))

    @property
    def restart_overhead_usd(self) -> float | None:
        if not self.restart_parts:
            return self._usd(0.0, self.price)  # $0 when priced, like the other figures
        return _sum([seg._usd(sec, seg.price) for seg, sec in self.restart_parts])

    @property
    def _training_checkpoints(self) -> list[dict]:
        return self.checkpoints or self.group_checkpoints

    @property
    def last_checkpoint(self) -> dict | None:
        done = [c for c in self._training_checkpoints if c["committed_at"] <= self.end]
        return max(done, key=lambda c: c["committed_at"]) if done else None

    @property
    def lost_work_s(self) -> float:
        if self.end_reason in (EndReason.FINISHED, RUNNING) or self.first_step_at is None:
            return 0.0
        ckpt = self.last_checkpoint
        if ckpt is None:
            since = self.first_step_at
        else:
            captured = ckpt.get("captured_at")
            since = max(ckpt["committed_at"] if captured is None else captured, self.first_step_at)
        # Training stopped at the last completed step, else when the wrapper ended, else
        # (killed) at the segment's end.
        until = next(t for t in (self.last_step_at, self.training_ended_at, self.end) if t is not None)
        until = min(until, self.end)
        # Lost work never exceeds what is left after the startup and shutdown.
        return max(0.0, min(until - since, self.duration_s - self.startup_s - self.shutdown_s))

    @property
    def stall_s(self) -> float:
        # A node that took its group's records paused for the same checkpoints.
        return float(sum(c.get("stall_s", 0.0) for c in self._training_checkpoints))

    @property
    def useful_s(self) -> float:
        return max(0.0, self.duration_s - self.lost_work_s - self.restart_time_in_segment_s - self.stall_s)

    def _usd(self, seconds: float, price: Price | None) -> float | None:
        return None if price is None else seconds / 3600.0 * price.usd_per_hour

    def to_dict(self) -> dict[str, Any]:
        p = self.price
        ckpt = self.last_checkpoint
        multi: dict[str, Any] = {}
        if self.group is not None:
            multi = {"group": self.group, "node": self.node, "training_from": self.training_from}
        if self.unused:
            multi["unused"] = True
        return {
            "segment_id": self.segment_id,
            **multi,
            "instance": self.instance.to_dict(),
            "start": self.start,
            "end": self.end,
            "end_reason": self.end_reason,
            "interrupted": self.interrupted,
            "sources": self.sources,
            "duration_s": self.duration_s,
            "first_step_at": self.first_step_at,
            "resumed_step": self.resumed_step,
            "startup_s": self.startup_s,
            "shutdown_s": self.shutdown_s,
            "restart_overhead_s": self.restart_overhead_s,
            "restart_parts": [{"segment_id": seg.segment_id, "s": sec} for seg, sec in self.restart_parts],
            "lost_work_s": self.lost_work_s,
            "last_checkpoint_step": None if ckpt is None else ckpt["step"],
            "stall_s": self.stall_s,
            "useful_s": self.useful_s,
            "checkpoints": self.checkpoints,
            "notices": self.notices,
            "price": None if p is None else p.to_dict(),
            "price_error": self.price_error,
            "on_demand_price": None if self.on_demand_price is None else self.on_demand_price.to_dict(),
            "on_demand_error": self.on_demand_error,
            "cost_usd": self._usd(self.duration_s, p),
            "lost_work_usd": self._usd(self.lost_work_s, p),
            "restart_overhead_usd": self.restart_overhead_usd,
            "stall_usd": self._usd(self.stall_s, p),
            "on_demand_usd": self._usd(self.useful_s, self.on_demand_price),
        }


def _share_group_records(segments: list[SegmentCost]) -> None:
    """Nodes of a group that lack training records take the group's (see the module
    docstring): the head is node 0 when it has them, else the lowest node that has. Only
    what a node lacks is filled in (a node whose own process wrote records keeps them)."""
    groups: dict[str, list[SegmentCost]] = {}
    for seg in segments:
        if seg.group is not None and not seg.unused:  # a spare never trained
            groups.setdefault(seg.group, []).append(seg)
    for members in groups.values():
        heads = sorted((s for s in members if s.first_step_at is not None or s.checkpoints),
                       key=lambda s: (s.first_step_at is None, s.node is None, s.node or 0, s.start,
                                      s.segment_id))
        if not heads:
            continue
        head = heads[0]
        for seg in members:
            if seg is head or seg.first_step_at is not None:
                continue
            seg.training_from = head.segment_id
            seg.first_step_at = head.first_step_at
            seg.resumed_step = head.resumed_step
            seg.process_started_at = head.process_started_at
            if seg.training_ended_at is None:
                seg.training_ended_at = head.training_ended_at
                seg.last_step_at = head.last_step_at
            if not seg.checkpoints:
                seg.group_checkpoints = head.checkpoints


def build_segments(
    records: list[dict],
    warnings: list[str] | None = None,
    *,
    running: Collection[str] = (),
    now: float | None = None,
) -> list[SegmentCost]:
    """Merge ledger records into segments (see the module docstring), sorted by start.

    Records whose fields do not fit their event (NaN or absurd times, wrong types, unknown
    reasons) are skipped, each with a line appended to ``warnings``; the rest are priced.
    A segment named in ``running`` with no end record is still going: it ends ``now``
    (default: the current time) with reason ``running``, and is no interruption.
    """
    records, bad = parse_records(records)
    if warnings is not None:
        warnings.extend(bad)
    groups: dict[str, list[dict]] = {}
    for r in records:
        sid = r.get("segment_id")
        # A recovery record names the attempt that follows a loss, not a stretch of compute
        # (cost.recovery reads it): it never makes or joins a segment.
        if sid is not None and r["event"] != "recovery_started":
            groups.setdefault(str(sid), []).append(r)
    segments = []
    for sid, recs in groups.items():
        recs.sort(key=lambda r: (r["time"], str(r.get("id"))))
        starts = {r.get("source"): r for r in recs if r["event"] == "segment_started"}
        ends = {r.get("source"): r for r in recs if r["event"] == "segment_ended"}
        resumes = [r for r in recs if r["event"] == "training_resumed"]
        inst: dict[str, Any] = {}
        for src in ("wrapper", None, "launcher"):  # later wins
            if src in starts:
                inst.update({k: v for k, v in (starts[src].get("instance") or {}).items() if v is not None})
        first = min(resumes, key=lambda r: r["first_step_at"]) if resumes else None
        start_rec = starts.get("launcher") or starts.get("wrapper") or next(iter(starts.values()), None)
        if start_rec is not None:
            start = float(start_rec["started_at"])
        elif first is not None:
            start = float(first["process_started_at"])
        else:
            start = recs[0]["time"]
        end_rec = ends.get("launcher") or ends.get("wrapper") or next(iter(ends.values()), None)
        # The attempt and rank: the launcher's word first (it starts the nodes).
        grouped = [r for r in (starts.get("launcher"), starts.get("wrapper"), *starts.values())
                   if r is not None and r.get("group") is not None]
        group = None if not grouped else str(grouped[0]["group"])
        node = None if not grouped else grouped[0].get("node")
        if end_rec is not None:
            end, reason = float(end_rec["ended_at"]), str(end_rec["reason"])
        elif sid in running:
            end, reason = time.time() if now is None else now, RUNNING
        else:
            end, reason = max(r["time"] for r in recs), UNKNOWN
        segments.append(
            SegmentCost(
                segment_id=sid,
                instance=InstanceInfo.from_dict(inst),
                start=start,
                end=max(start, end),
                end_reason=reason,
                sources=sorted({str(r.get("source")) for r in recs if r["event"].startswith("segment_")}),
                first_step_at=None if first is None else float(first["first_step_at"]),
                resumed_step=None if first is None else int(first["step"]),
                process_started_at=None if first is None else float(first["process_started_at"]),
                restore_started_at=None if first is None else first.get("restore_started_at"),
                restore_s=None if first is None else first.get("restore_s"),
                restore_bytes={} if first is None else {
                    key: first.get(f"bytes_{key}") for key in ("local", "peer", "url")},
                training_ended_at=float(ends["wrapper"]["ended_at"]) if "wrapper" in ends else None,
                last_step_at=(ends["wrapper"].get("last_step_at") if "wrapper" in ends else None),
                unused=bool(end_rec is not None and end_rec.get("unused")),
                checkpoints=[
                    {k: r.get(k) for k in ("step", "committed_at", "stall_s", "save_s", "nbytes", "captured_at")}
                    for r in recs
                    if r["event"] == "checkpoint_committed"
                ],
                notices=[
                    {k: r.get(k) for k in ("source", "action", "notice_time", "detected_at", "deadline")}
                    for r in recs
                    if r["event"] == "notice_received"
                ],
                group=group,
                node=node,
            )
        )
    _share_group_records(segments)
    segments.sort(key=lambda s: (s.start, s.segment_id))
    if segments:
        segments[0].is_first = True
        # Every node of the first attempt starts up once, as it would on on-demand.
        if segments[0].group is not None:
            for seg in segments:
                if seg.group == segments[0].group:
                    seg.is_first = True
    attribute_restarts(segments)
    return segments


def restart_row(attempt: list[SegmentCost]) -> SegmentCost:
    """The segment of an attempt that carries its restart (and its interruption line): the
    first interrupted node, else its first segment."""
    return next((s for s in attempt if s.interrupted), attempt[0])


def attribute_restarts(segments: list[SegmentCost]) -> None:
    """THE definition of restart overhead, used by the table, the interruptions, the totals,
    the HTML and the JSON: an attempt's end costs the shutdown of its segments (wrapper's
    end, checkpoint committed, to the segment's end) plus the startup (start to first
    training step) of every segment of the attempt that follows it. The whole amount is
    carried by one segment of the ending attempt (:func:`restart_row`); every other segment
    carries none. The first attempt's startup is useful time, never a restart."""
    attempts = group_attempts(segments)
    for seg in segments:
        seg.restart_parts = []
    for i, attempt in enumerate(attempts):
        nxt = attempts[i + 1] if i + 1 < len(attempts) else []
        parts = [(s, s.shutdown_s) for s in attempt if s.shutdown_s > 0]
        parts += [(s, s.startup_s) for s in nxt if not s.is_first]
        restart_row(attempt).restart_parts = parts
    # A spare (started at a loss, used by no attempt) was paid for the recovery of the
    # attempt it started in: all its time is that attempt's restart.
    for spare in (s for s in segments if s.unused):
        during = [a for a in attempts if min(s.start for s in a) <= spare.start] or attempts[:1]
        if during:
            restart_row(during[-1]).restart_parts.append((spare, spare.duration_s))


def price_segments(segments: list[SegmentCost], prices: PriceBook) -> None:
    """Attach a market price and an on-demand price to each segment (errors are recorded)."""
    for seg in segments:
        inst = seg.instance
        use_api = inst.cloud not in NO_API_CLOUDS
        try:
            if inst.market == Market.ON_DEMAND:
                seg.price = prices.on_demand(inst.instance_type, inst.region, use_api=use_api)
            else:
                # Spot, and "local" (a laptop or an unknown machine): priced as spot only
                # when a price can be found (an override, or a known instance type).
                seg.price = prices.spot(
                    inst.instance_type, inst.availability_zone, seg.start, seg.end,
                    region=inst.region, use_api=use_api,
                )
        except PriceUnavailableError as exc:
            seg.price_error = str(exc)
        try:
            seg.on_demand_price = prices.on_demand(inst.instance_type, inst.region, use_api=use_api)
        except PriceUnavailableError as exc:
            seg.on_demand_error = str(exc)


def _sum(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(sum(known)) if known else None


@dataclass
class CostReport:
    """The priced run: segments, totals, per-interruption detail, and warnings."""

    run_url: str
    segments: list[SegmentCost]
    generated_at: float = field(default_factory=time.time)
    warnings: list[str] = field(default_factory=list)
    #: The ledger's ``recovery_started`` records (:func:`~spotrun.cost.recovery.recovery_records`).
    recovery_records: list[dict] = field(default_factory=list)

    def recoveries(self) -> list[Recovery]:
        """What each recovery cost, loss to first step (:func:`~spotrun.cost.recovery.recoveries`)."""
        return recoveries(self.segments, self.recovery_records)

    def totals(self) -> dict[str, Any]:
        segs = [s.to_dict() for s in self.segments]
        cost = _sum([s["cost_usd"] for s in segs])
        od = _sum([s["on_demand_usd"] for s in segs])
        complete = all(s["cost_usd"] is not None and s["on_demand_usd"] is not None for s in segs)
        savings = None if (cost is None or od is None or not complete) else od - cost
        return {
            "segments": len(segs),
            "attempts": self.attempts(),
            "interruptions": len(self.interruptions()),
            "duration_s": sum(s.duration_s for s in self.segments),
            "useful_s": sum(s.useful_s for s in self.segments),
            "lost_work_s": sum(s.lost_work_s for s in self.segments),
            "restart_overhead_s": sum(s.restart_overhead_s for s in self.segments),
            "stall_s": sum(s.stall_s for s in self.segments),
            "checkpoints": sum(len(s.checkpoints) for s in self.segments),
            "cost_usd": cost,
            "lost_work_usd": _sum([s["lost_work_usd"] for s in segs]),
            "restart_overhead_usd": _sum([s["restart_overhead_usd"] for s in segs]),
            "stall_usd": _sum([s["stall_usd"] for s in segs]),
            "on_demand_usd": od,
            "savings_usd": savings,
            "savings_pct": None if savings is None or not od else 100.0 * savings / od,
            "complete": complete,
        }

    def attempts(self) -> int:
        """Attempts at the job: a group of nodes is one, a segment without a group one; a spare
        no attempt used is none."""
        return len({s.group if s.group is not None else ("", s.segment_id) for s in self.segments if not s.unused})

    def regions(self) -> list[str]:
        """The regions the segments ran in, in order of first use."""
        out: list[str] = []
        for s in self.segments:
            r = s.instance.region
            if r and r not in out:
                out.append(r)
        return out

    def notes(self) -> list[str]:
        """What the reader must know about what the figures leave out."""
        regions = self.regions()
        if len(regions) < 2:
            return []
        note = (f"this run used {len(regions)} regions ({', '.join(regions)}): cross-region data "
                "transfer (checkpoints read from another region's bucket) is a cost this report "
                "does not include")
        return [note]

    def _members(self, seg: SegmentCost) -> list[SegmentCost]:
        if seg.group is None:
            return [seg]
        return [s for s in self.segments if s.group == seg.group]

    def _group_interruption(self, seg: SegmentCost) -> dict[str, Any]:
        """One interruption of a multi-node attempt: every node's lost work and shutdown, and
        the next attempt's startups."""
        members = self._members(seg)
        names = {s.segment_id for s in members}
        later = [s for s in self.segments if s.segment_id not in names and s.start >= seg.start]
        nxt = min(later, key=lambda s: (s.start, s.segment_id)) if later else None
        row = restart_row(members)
        d = seg.to_dict()
        return {
            "segment_id": seg.segment_id,
            "group": seg.group,
            "nodes": len(members),
            "interrupted_nodes": sorted(s.node for s in members if s.interrupted and s.node is not None),
            "at": seg.end,
            "reason": seg.end_reason,
            "last_checkpoint_step": d["last_checkpoint_step"],
            "lost_work_s": sum(s.lost_work_s for s in members),
            "lost_work_usd": _sum([s._usd(s.lost_work_s, s.price) for s in members]),
            "next_segment_id": None if nxt is None else nxt.segment_id,
            "restart_overhead_s": row.restart_overhead_s,
            "restart_overhead_usd": row.restart_overhead_usd,
        }

    def interruptions(self) -> list[dict[str, Any]]:
        out = []
        groups_done: set[str] = set()
        for i, seg in enumerate(self.segments):
            if not seg.interrupted:
                continue
            if seg.group is not None:
                # One entry per interrupted attempt, at its first interrupted node.
                if seg.group not in groups_done:
                    groups_done.add(seg.group)
                    out.append(self._group_interruption(seg))
                continue
            nxt = self.segments[i + 1] if i + 1 < len(self.segments) else None
            d = seg.to_dict()
            out.append({
                "segment_id": seg.segment_id,
                "at": seg.end,
                "reason": seg.end_reason,
                "last_checkpoint_step": d["last_checkpoint_step"],
                "lost_work_s": seg.lost_work_s,
                "lost_work_usd": d["lost_work_usd"],
                "next_segment_id": None if nxt is None else nxt.segment_id,
                # The same figure as the segment's row (attribute_restarts).
                "restart_overhead_s": seg.restart_overhead_s,
                "restart_overhead_usd": seg.restart_overhead_usd,
            })
        return out

    def price_sources(self) -> list[str]:
        labels = []
        for seg in self.segments:
            for p in (seg.price, seg.on_demand_price):
                if p is not None and p.label() not in labels:
                    labels.append(p.label())
        return labels

    def sagemaker_figure(self) -> dict[str, Any]:
        """SageMaker managed spot training's own figure, for comparison with ours.

        SageMaker reports ``TrainingTimeInSeconds`` (the job, start to end, waits for
        capacity included) and ``BillableTimeInSeconds`` (the wall-clock seconds instances
        ran) and calls ``(1 - billable / training) x 100`` the savings. Here: training =
        first segment start to last segment end; billable = the wall-clock time during which
        any segment ran. Like SageMaker's (wall-clock, not multiplied by the instance count),
        time when several machines ran at once counts once: the nodes of an attempt, the
        survivors kept beside their replacement, a spare started at a loss.
        """
        if not self.segments:
            return {"training_s": 0.0, "billable_s": 0.0, "savings_pct": None}
        training = max(s.end for s in self.segments) - min(s.start for s in self.segments)
        billable, reached = 0.0, float("-inf")
        for s in sorted(self.segments, key=lambda s: s.start):
            if s.end > reached:
                billable += s.end - max(s.start, reached)
                reached = s.end
        return {
            "training_s": training,
            "billable_s": billable,
            "savings_pct": None if training <= 0 else 100.0 * (1.0 - billable / training),
        }

    def snapshot_vintage(self) -> str | None:
        """The shipped snapshot's date when any price came from it, else None."""
        for seg in self.segments:
            for p in (seg.price, seg.on_demand_price):
                if p is not None and p.vintage:
                    return p.vintage
        return None

    def to_dict(self) -> dict[str, Any]:
        recs = self.recoveries()
        return {
            "run_url": self.run_url,
            "generated_at": self.generated_at,
            "totals": self.totals(),
            "segments": [s.to_dict() for s in self.segments],
            "interruptions": self.interruptions(),
            "recoveries": [r.to_dict() for r in recs],
            "recovery_totals": recovery_totals(recs),
            "price_sources": self.price_sources(),
            "snapshot_vintage": self.snapshot_vintage(),
            "sagemaker": self.sagemaker_figure(),
            "regions": self.regions(),
            "notes": self.notes(),
            "warnings": self.warnings,
        }


def running_segments(storage: Storage) -> set[str]:
    """The segments the run's launcher says are running now (its launch state's open
    segments: one per node of a multi-node attempt), if any."""
    from ..records.launch_state import load_state

    try:
        state = load_state(storage)
    except Exception as exc:  # noqa: BLE001 - without a readable state, nothing is known to run
        log.warning("could not read the launch state (%s); no segment counted as running", exc)
        return set()
    if state is None or state.status != "running":
        return set()
    return {seg.segment_id for seg in state.segments if seg.open}


def require_run(storage: Storage) -> None:
    """Raise :class:`~spotrun.errors.StorageNotFoundError` when nothing at all is stored at
    the run URL (a typo, a run that never started): a report of nothing would look like a
    free run."""
    if not storage.list_dir(""):
        raise StorageNotFoundError(
            f"no run at {storage.display()}: nothing is stored there (no ledger, checkpoints or "
            "launch state); check the run URL"
        )


def report_for_run(
    storage: Storage,
    *,
    spot_price: float | None = None,
    on_demand_price: float | None = None,
    offline: bool = False,
    price_book: PriceBook | None = None,
    running: Collection[str] | None = None,
    now: float | None = None,
) -> CostReport:
    """Read the run's ledger and price it.

    ``spot_price``/``on_demand_price`` override every other source (USD per hour);
    ``offline`` never calls an AWS API; ``price_book`` replaces the default price lookup
    (tests pass one with stubbed clients). A run with no ledger records gives an empty
    report with a warning rather than an error, so a launcher can always print one.
    """
    prices = price_book or PriceBook(
        spot_price=spot_price, on_demand_price=on_demand_price, offline=offline
    )
    records = Ledger(storage).records()
    skipped: list[str] = []
    if running is None:
        running = running_segments(storage)
    segments = build_segments(records, skipped, running=running, now=now)
    price_segments(segments, prices)
    report = CostReport(run_url=storage.display(), segments=segments, warnings=skipped,
                        recovery_records=recovery_records(records))
    recoveries(segments, report.recovery_records, report.warnings)  # its warnings, once
    for line in skipped:
        log.warning("%s", line)
    if not segments:
        report.warnings.append(f"no ledger records under {storage.display('ledger')}: nothing to report")
    for seg in segments:
        if seg.price_error:
            report.warnings.append(f"segment {seg.segment_id}: {seg.price_error}")
        if seg.on_demand_error:
            report.warnings.append(f"segment {seg.segment_id}: {seg.on_demand_error}")
        for p in (seg.price, seg.on_demand_price):
            if p is not None and p.fallback:
                msg = f"segment {seg.segment_id}: {p.fallback}; used {p.source}"
                if msg not in report.warnings:
                    report.warnings.append(msg)
        if seg.end_reason == UNKNOWN:
            report.warnings.append(
                f"segment {seg.segment_id} has no end record (killed?); it ends at its last "
                "record and counts as an interruption"
            )
    return report
