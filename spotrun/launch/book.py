"""The one place a run's segments begin and end.

A segment is written twice: in the launch state (``launch/state.json``, what a controller
needs to pick the run up again) and in the run ledger (source ``"launcher"``, what the cost
report and ``status`` read). :class:`RunBook` keeps both, in that order, so every backend,
``spotrun stop`` and a launcher cleaning up after a dead predecessor record segments the same
way.
"""

from __future__ import annotations

import time

from ..records.events import EndReason, SegmentEnded, SegmentStarted, Source
from ..records.instance import InstanceInfo
from ..records.launch_state import STOP_FILE, LaunchState, RunStatus, Segment, save_state
from ..records.ledger import Ledger
from ..storage import Storage

__all__ = ["SOURCE", "RunBook", "close_books"]

#: The ledger's ``source`` for records a launcher writes.
SOURCE = Source.LAUNCHER


class RunBook:
    """A run's launch state and the launcher's ledger records.

    Args:
        storage: the run URL.
        state: the state to keep (this object is updated in place).
        heartbeat_s: the owner's poll interval; each save then stamps the state as written
            by a live launcher (``status`` shows it, a second launcher refuses to start).
            None for writers that are not a launcher (``spotrun stop``).
    """

    def __init__(self, storage: Storage, state: LaunchState, *, heartbeat_s: float | None = None) -> None:
        self.storage = storage
        self.state = state
        self.heartbeat_s = heartbeat_s

    def save(self) -> None:
        if self.heartbeat_s is not None:
            self.state.touch(self.heartbeat_s)
        save_state(self.storage, self.state)

    def begin(self, segment: Segment, instance: InstanceInfo) -> Segment:
        """Record that ``segment`` started on ``instance`` (a node of a multi-node attempt:
        with the segment's ``group`` and ``node``, so the cost report counts the attempt's N).

        State first: if the launcher dies between the two writes, ``--resume`` finds the
        segment and the ledger merely lacks its start (the cost report still sees the
        wrapper's records). A node of a multi-node attempt carries its ``group`` and
        ``node`` (rank) into the ledger.
        """
        return self.begin_many([(segment, instance)])[0]

    def begin_many(self, started: list[tuple[Segment, InstanceInfo]]) -> list[Segment]:
        """:meth:`begin` for every node of one attempt: one state write for all of them
        (a resumed launcher sees the whole attempt or none of it), then their ledger starts."""
        for segment, _ in started:
            self.state.segments.append(segment)
        self.save()
        ledger = Ledger(self.storage)
        for segment, instance in started:
            ledger.record(SegmentStarted(
                segment_id=segment.segment_id, instance=instance, started_at=segment.started_at, source=SOURCE,
                group=segment.group, node=segment.node if segment.group is not None else None,
            ))
        return [segment for segment, _ in started]

    def end(self, segment: Segment, reason: str, *, ended_at: float, exit_code: int | None = None,
            detail: str | None = None, unused: bool = False) -> None:
        """Record that ``segment`` ended (finished, interrupted, failed, stopped) at ``ended_at``;
        ``unused``: a machine started for an attempt that never used it (a replacement asked
        for at a loss and not needed)."""
        segment.ended_at = ended_at
        segment.end_reason = reason
        segment.exit_code = exit_code
        segment.detail = detail
        self.save()
        Ledger(self.storage).record(SegmentEnded(
            segment_id=segment.segment_id, reason=reason, ended_at=ended_at, source=SOURCE,
            unused=True if unused else None,
        ))

    def close_open(self, reason: str, detail: str, *, ended_at: float | None = None) -> list[Segment]:
        """End every segment still open (its launcher died, or ``stop`` ran without one)."""
        closed = [s for s in self.state.segments if s.open]
        for seg in closed:
            self.end(seg, reason, ended_at=time.time() if ended_at is None else ended_at, detail=detail)
        return closed


def close_books(storage: Storage, state: LaunchState) -> None:
    """No launcher left to do it (``spotrun stop``): end the open segments and mark the run
    stopped, keeping its checkpoints."""
    book = RunBook(storage, state)
    book.close_open(EndReason.STOPPED, "spotrun stop")
    state.status = RunStatus.STOPPED
    state.message = "stopped by spotrun stop; checkpoints kept"
    book.save()
    storage.remove(STOP_FILE)
