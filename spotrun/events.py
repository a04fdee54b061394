"""Typed run events: what the training wrapper reports, and how it reaches the run ledger.

Components (the checkpoint loop, the saver, the interrupts inbox) report through one
callback, :data:`EventSink`, that takes these frozen dataclasses. The ledger is one such
sink (:func:`ledger_sink`); tests and tools can pass their own. A typo in an event name is
a type error here, not a silently missing ledger record.

The ledger's vocabularies live here too, as string enums (:class:`EndReason`,
:class:`Market`, :class:`Cloud`, :class:`Source`): what a writer may record and what a
reader accepts are one list. Each enum's ``parse`` reads a value from a record, old
spellings included (``"ec2"`` is :attr:`Cloud.AWS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, TypeVar, Union

from .errors import ConfigError
from .instance import InstanceInfo

if TYPE_CHECKING:
    from .ledger import Ledger

__all__ = [
    "CheckpointCommitted",
    "Cloud",
    "EndReason",
    "Event",
    "EventSink",
    "Market",
    "NoticeReceived",
    "SegmentEnded",
    "SegmentStarted",
    "Source",
    "TrainingResumed",
    "ledger_sink",
]

_V = TypeVar("_V", bound="_Vocab")


class _Vocab(str, Enum):
    """A ledger vocabulary: a ``str`` (so records stay plain JSON and compare equal to
    their text) that only takes the listed values."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {}

    @classmethod
    def parse(cls: type[_V], value: object) -> _V:
        """``value`` (a member, its text or an old spelling) as a member; a
        :class:`~spotrun.errors.ConfigError` naming the allowed values otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            text = cls._aliases().get(value, value)
            for member in cls:
                if member.value == text:
                    return member
        allowed = ", ".join(m.value for m in cls)
        raise ConfigError(f"{cls.__name__.lower()} {value!r} is not one of: {allowed}")


class EndReason(_Vocab):
    """Why a segment of compute ended, as a ``segment_ended`` record says."""

    FINISHED = "finished"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    STOPPED = "stopped"


class Market(_Vocab):
    """How an instance is bought. ``local``: not a cloud machine, or its metadata service
    could not be reached."""

    SPOT = "spot"
    ON_DEMAND = "on-demand"
    LOCAL = "local"


class Cloud(_Vocab):
    """Where a segment ran. ``simulated``: ``spotrun launch --local``; ``local``: no cloud."""

    AWS = "aws"
    GCP = "gcp"
    AZURE = "azure"
    SIMULATED = "simulated"
    LOCAL = "local"

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        # Cloud detection and the notice watchers call AWS "ec2" (its metadata service's
        # name); a record carrying that spelling means the same cloud.
        return {"ec2": "aws"}


class Source(_Vocab):
    """Who wrote a record: the training process itself, or a launcher watching it."""

    WRAPPER = "wrapper"
    LAUNCHER = "launcher"

@dataclass(frozen=True)
class SegmentStarted:
    segment_id: str
    instance: InstanceInfo
    started_at: float
    source: Source = Source.WRAPPER


@dataclass(frozen=True)
class SegmentEnded:
    segment_id: str
    reason: EndReason
    ended_at: float
    source: Source = Source.WRAPPER
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
