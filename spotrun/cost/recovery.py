"""What each recovery cost: from a loss to the first training step of the attempt after it.

One function, :func:`recoveries`, computes it from the ledger (the cost table, its JSON,
``spotrun status`` and the HTML report all show what it returns). Sources, per attempt that
followed a loss (an attempt: a multi-node group, or one segment):

* the launcher's ``recovery_started`` record (under the attempt's id): when the loss was
  known (``lost_at``), when every machine of the attempt was running (``capacity_at``), the
  mode (``replace`` kept the survivors, ``relaunch`` started a whole attempt), the nodes lost
  and kept, the instances started;
* without one (older ledgers, a bare Checkpointer run restarted by hand or by a supervisor):
  the loss is the previous attempt's end (its first interrupted segment's end), capacity is
  the attempt's own start (its first segment's), and the instances are counted from the
  segments' instance ids (an id the previous attempt also ran on was kept);
* the wrapper's ``training_resumed`` of the attempt (rank 0 writes it; the node whose own
  process wrote it): the process start, the restore's start and length, the bytes restored
  (all ranks together) by where they were when the restore began: ``local``, already on the
  restoring machine (its own copy, or files it held for other nodes, sent before the loss);
  ``peer``, fetched from another node over the peer channel during the restore; ``url``, read
  from the run URL. The first step.

The time from the loss to the first step is split at those points, in order: waiting for
capacity (loss -> capacity), boot and setup (capacity -> process start), process start and
rendezvous (process start -> restore start: interpreter, imports, rendezvous, lease,
listing), restore, and restore -> first step. Each point is clamped between the one before it
and the first step, so the parts always add up to the total; a point a ledger does not have
(older records carry no restore times) leaves its part unknown (None) and its time in the
part before it. An attempt that never reached a step has no total (its parts so far are
shown).
"""

from __future__ import annotations

import itertools
import logging
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..records.events import parse_records
from ..records.instance import InstanceInfo
from .attempts import group_attempts

if TYPE_CHECKING:
    from .report import SegmentCost

__all__ = ["PARTS", "Recovery", "recoveries", "recovery_records", "recovery_totals"]

log = logging.getLogger(__name__)

#: The parts of a recovery, in order: (key, what the text says).
PARTS = (
    ("waiting_s", "waiting for capacity"),
    ("boot_s", "boot/setup"),
    ("start_s", "process start + rendezvous"),
    ("restore_s", "restore"),
    ("first_step_s", "restore -> first step"),
)
_SOURCES = ("local", "peer", "url")
#: The instance id a process records when it knows none (off the cloud).
_NO_ID = InstanceInfo().instance_id


@dataclass
class Recovery:
    """One attempt's recovery from the loss before it (see the module docstring)."""

    attempt: str  # the attempt that recovered: its group id, or its segment id
    previous: str | None  # the attempt that lost a node (None: not in this ledger)
    source: str  # "launcher" (a recovery_started record) or "segments" (inferred)
    mode: str | None  # "replace" / "relaunch" (the launcher's word), None when unknown
    lost_at: float
    capacity_at: float | None = None
    process_started_at: float | None = None
    restore_started_at: float | None = None
    restore_ended_at: float | None = None
    first_step_at: float | None = None
    bytes: dict[str, int | None] = field(default_factory=dict)
    instances_started: int | None = None
    instances_kept: int | None = None
    lost: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def points(self) -> list[float | None]:
        """loss, capacity, process start, restore start, restore end, first step: each
        clamped between the last known one before it and the first step."""
        raw = [self.lost_at, self.capacity_at, self.process_started_at, self.restore_started_at,
               self.restore_ended_at, self.first_step_at]
        out: list[float | None] = []
        last = self.lost_at
        end = self.first_step_at
        for t in raw:
            if t is None:
                out.append(None)
                continue
            t = max(t, last)
            if end is not None:
                t = min(t, max(end, self.lost_at))
            out.append(t)
            last = t
        return out

    def split(self) -> dict[str, float | None]:
        """The parts (seconds; :data:`PARTS`). A point the ledger does not have leaves the
        part ending there unknown (None) and the time until the next known point in the last
        known part before it (so old records show process start -> first step as one part)."""
        pts = self.points()
        out: dict[str, float | None] = {key: None for key, _ in PARTS}
        known = [i for i, t in enumerate(pts) if t is not None]
        for a, b in itertools.pairwise(known):
            out[PARTS[a][0]] = pts[b] - pts[a]  # type: ignore[operator]
        return out

    @property
    def total_s(self) -> float | None:
        pts = self.points()
        return None if pts[-1] is None else pts[-1] - self.lost_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "previous": self.previous,
            "source": self.source,
            "mode": self.mode,
            "lost_at": self.lost_at,
            "capacity_at": self.capacity_at,
            "process_started_at": self.process_started_at,
            "restore_started_at": self.restore_started_at,
            "first_step_at": self.first_step_at,
            "total_s": self.total_s,
            **self.split(),
            "bytes_local": self.bytes.get("local"),
            "bytes_peer": self.bytes.get("peer"),
            "bytes_url": self.bytes.get("url"),
            "instances_started": self.instances_started,
            "instances_kept": self.instances_kept,
            "lost": list(self.lost),
            "kept": list(self.kept),
        }


def recovery_records(records: list[dict]) -> list[dict]:
    """The ledger's well-formed ``recovery_started`` records (damaged ones are skipped:
    :func:`~spotrun.cost.report.build_segments` already warned about them)."""
    good, _ = parse_records([r for r in records if isinstance(r, dict) and r.get("event") == "recovery_started"])
    return good


def _attempt_key(seg: SegmentCost) -> str:
    return seg.group if seg.group is not None else seg.segment_id


def _head(attempt: list[SegmentCost]) -> SegmentCost | None:
    """The segment whose own process recorded the attempt's first step (rank 0's)."""
    own = [s for s in attempt if s.first_step_at is not None and s.training_from is None]
    return min(own, key=lambda s: (s.first_step_at, s.segment_id)) if own else None


def _loss_of(previous: list[SegmentCost]) -> float:
    interrupted = [s.end for s in previous if s.interrupted]
    return min(interrupted) if interrupted else max(s.end for s in previous)


def _counted_instances(previous: list[SegmentCost] | None,
                       attempt: list[SegmentCost]) -> tuple[int | None, int | None]:
    """Instances started and kept, from the segments' instance ids (None when an id is
    unknown: a bare process off the cloud records the placeholder id, and cannot tell a new
    machine from the same one)."""
    ids = [s.instance.instance_id for s in attempt]
    if previous is None or any(i in (None, "", _NO_ID) for i in ids):
        return None, None
    before = {s.instance.instance_id for s in previous}
    kept = sum(1 for i in ids if i in before)
    return len(ids) - kept, kept


def recoveries(segments: list[SegmentCost], records: list[dict],
               warnings: list[str] | None = None) -> list[Recovery]:
    """One :class:`Recovery` per attempt that followed a loss (a ``recovery_started`` names
    it, or the attempt before it was interrupted), oldest first. ``segments``: the report's
    (:func:`~spotrun.cost.report.build_segments`), ``records``: its ``recovery_started``
    records (:func:`recovery_records`). A record that names no attempt of the ledger, or
    whose loss is after the attempt's first step, is ignored (a line in ``warnings``)."""

    attempts = group_attempts(segments)
    index = {_attempt_key(a[0]): i for i, a in enumerate(attempts)}
    launcher: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: (r["lost_at"], str(r.get("id")))):
        key = r["segment_id"]
        if key not in index:
            # The attempt has not started yet (the launcher is still recovering), or a stray.
            log.debug("recovery record %s names no attempt in the ledger", key[:40])
            continue
        launcher.setdefault(key, []).append(r)
    out: list[Recovery] = []
    for i, attempt in enumerate(attempts):
        key = _attempt_key(attempt[0])
        previous = attempts[i - 1] if i > 0 else None
        head = _head(attempt)
        rec = None
        for candidate in launcher.get(key, []):  # the earliest loss that fits, if there are two
            if head is not None and candidate["lost_at"] > head.first_step_at:  # type: ignore[operator]
                if warnings is not None:
                    warnings.append(f"recovery record {str(candidate.get('id'))[:40]!r} of attempt {key[:40]} "
                                    "says the loss was after its first training step; ignored")
                continue
            rec = rec or candidate
        if rec is None and not (previous is not None and any(s.interrupted for s in previous)):
            continue
        start = min(s.start for s in attempt)
        if rec is not None:
            started, kept = int(rec.get("instances_started", 0)), len(rec.get("kept") or [])
            capacity = rec.get("capacity_at")
            rec_ = Recovery(attempt=key, previous=None if previous is None else _attempt_key(previous[0]),
                            source="launcher", mode=rec.get("mode"), lost_at=float(rec["lost_at"]),
                            capacity_at=start if capacity is None else float(capacity),
                            instances_started=started, instances_kept=kept,
                            lost=list(rec.get("lost") or []), kept=list(rec.get("kept") or []))
        else:
            assert previous is not None
            started_n, kept_n = _counted_instances(previous, attempt)
            rec_ = Recovery(attempt=key, previous=_attempt_key(previous[0]), source="segments", mode=None,
                            lost_at=_loss_of(previous), capacity_at=start,
                            instances_started=started_n, instances_kept=kept_n)
        if head is not None:
            rec_.process_started_at = head.process_started_at
            rec_.first_step_at = head.first_step_at
            rec_.restore_started_at = head.restore_started_at
            if head.restore_started_at is not None and head.restore_s is not None:
                rec_.restore_ended_at = head.restore_started_at + head.restore_s
            rec_.bytes = dict(head.restore_bytes)
        out.append(rec_)
    return out


def recovery_totals(items: list[Recovery]) -> dict[str, Any]:
    """The recoveries together: how many, their total and median time (loss -> first
    step, over those that reached one), each part's sum, bytes by source, instances."""
    totals = [r.total_s for r in items if r.total_s is not None]
    splits = [r.split() for r in items]
    out: dict[str, Any] = {
        "recoveries": len(items),
        "total_s": float(sum(totals)),
        "median_s": statistics.median(totals) if totals else None,
    }
    for key, _ in PARTS:
        known = [s[key] for s in splits if s[key] is not None]
        out[key] = float(sum(known)) if known else None  # type: ignore[arg-type]
    for src in _SOURCES:
        known_b = [r.bytes.get(src) for r in items if r.bytes.get(src) is not None]
        out[f"bytes_{src}"] = int(sum(known_b)) if known_b else None  # type: ignore[arg-type]
    started = [r.instances_started for r in items if r.instances_started is not None]
    kept = [r.instances_kept for r in items if r.instances_kept is not None]
    out["instances_started"] = int(sum(started)) if started else None
    out["instances_kept"] = int(sum(kept)) if kept else None
    return out
