"""Typed run events: what the training wrapper reports, and how it reaches the run ledger.

Components (the checkpoint loop, the saver, the interrupts inbox) report through one
callback, :data:`EventSink`, that takes these frozen dataclasses. The ledger is one such
sink (:func:`ledger_sink`); tests and tools can pass their own. A typo in an event name is
a type error here, not a silently missing ledger record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Union

from .instance import InstanceInfo

if TYPE_CHECKING:
    from .ledger import Ledger

__all__ = [
    "CheckpointCommitted",
    "EndReason",
    "Event",
    "EventSink",
    "NoticeReceived",
    "SegmentEnded",
    "SegmentStarted",
    "Source",
    "TrainingResumed",
    "ledger_sink",
]

#: Why a segment of compute ended (``SEGMENT_END_REASONS`` in :mod:`spotrun.ledger`).
EndReason = Literal["finished", "interrupted", "failed", "stopped"]
#: Who wrote a record: the training process itself, or a launcher watching it.
Source = Literal["wrapper", "launcher"]


@dataclass(frozen=True)
class SegmentStarted:
    segment_id: str
    instance: InstanceInfo
    started_at: float
    source: Source = "wrapper"


@dataclass(frozen=True)
class SegmentEnded:
    segment_id: str
    reason: EndReason
    ended_at: float
    source: Source = "wrapper"
    steps_done: int | None = None
    last_step_at: float | None = None


@dataclass(frozen=True)
class CheckpointCommitted:
    segment_id: str
    step: int
    committed_at: float
    stall_s: float
    save_s: float
    nbytes: int
    captured_at: float | None = None


@dataclass(frozen=True)
class TrainingResumed:
    segment_id: str
    step: int
    process_started_at: float
    first_step_at: float


@dataclass(frozen=True)
class NoticeReceived:
    segment_id: str
    source: str
    action: str
    notice_time: float | None
    detected_at: float
    deadline: float | None


Event = Union[SegmentStarted, SegmentEnded, CheckpointCommitted, TrainingResumed, NoticeReceived]
EventSink = Callable[[Event], None]


def ledger_sink(ledger: Ledger) -> EventSink:
    """A sink that writes each event as one ledger record (raises what the ledger raises)."""

    def write(event: Event) -> None:
        if isinstance(event, SegmentStarted):
            ledger.segment_started(segment_id=event.segment_id, instance=event.instance,
                                   started_at=event.started_at, source=event.source)
        elif isinstance(event, SegmentEnded):
            ledger.segment_ended(segment_id=event.segment_id, reason=event.reason,
                                 ended_at=event.ended_at, source=event.source,
                                 steps_done=event.steps_done, last_step_at=event.last_step_at)
        elif isinstance(event, CheckpointCommitted):
            ledger.checkpoint_committed(
                segment_id=event.segment_id, step=event.step, committed_at=event.committed_at,
                stall_s=event.stall_s, save_s=event.save_s, nbytes=event.nbytes,
                captured_at=event.captured_at,
            )
        elif isinstance(event, TrainingResumed):
            ledger.training_resumed(segment_id=event.segment_id, step=event.step,
                                    process_started_at=event.process_started_at,
                                    first_step_at=event.first_step_at)
        elif isinstance(event, NoticeReceived):
            ledger.notice_received(segment_id=event.segment_id, source=event.source,
                                   action=event.action, notice_time=event.notice_time,
                                   detected_at=event.detected_at, deadline=event.deadline)
        else:  # pragma: no cover - the Event union is closed
            raise TypeError(f"not a spotrun event: {event!r}")

    return write
