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

from .errors import ConfigError, LedgerRecordError
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
    "parse_record",
    "parse_records",
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
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ConfigError(f"{cls.__name__.lower()} {shown} is not one of: {allowed}")


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
    # A multi-node job: the launcher's id for the attempt all its nodes belong to, and this
    # node's rank. None for a single-node segment (and in records older than them).
    group: str | None = None
    node: int | None = None


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
                                   started_at=event.started_at, source=event.source,
                                   group=event.group, node=event.node)
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


# -- reading records back -------------------------------------------------------------------

#: Times a record may carry: epoch seconds from 1970 to the last second of year 9999 (what
#: a report can print); NaN, infinities and 1e300 are damage, not times.
MAX_TIME = 253_402_300_799.0
_TIMES = {
    "segment_started": (("started_at",), ()),
    "segment_ended": (("ended_at",), ("last_step_at",)),
    "checkpoint_committed": (("committed_at",), ("captured_at",)),
    "training_resumed": (("process_started_at", "first_step_at"), ()),
    "notice_received": (("detected_at",), ("notice_time", "deadline")),
}
_SECONDS = {"checkpoint_committed": ("stall_s", "save_s")}
_COUNTS = {"checkpoint_committed": ("step", "nbytes"), "training_resumed": ("step",),
           "segment_ended": ("steps_done",)}
_INSTANCE_TEXT = ("instance_id", "instance_type", "region", "availability_zone")


def _show(value: object) -> str:
    # A hostile or damaged record may hold megabytes: quote a bounded prefix of it.
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(record: dict, key: str, *, low: float, high: float, optional: bool = False) -> float | None:
    value = record.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        raise LedgerRecordError(f"{key} {_show(value)} is not a number in [{low:g}, {high:g}]")
    return float(value)


def _group_fields(record: dict, out: dict) -> None:
    # Optional (single-node segments and older records have neither); checked when present.
    group, node = record.get("group"), record.get("node")
    if group is not None and (not isinstance(group, str) or not group or len(group) > 200):
        raise LedgerRecordError(f"group {_show(group)} is not a non-empty string")
    if node is not None and (isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < 2**31):
        raise LedgerRecordError(f"node {_show(node)} is not a node rank >= 0")
    if node is not None and group is None:
        raise LedgerRecordError(f"node {node} has no group: a node rank needs the attempt's group id")


def parse_record(record: dict) -> dict:
    """A ledger record checked against its event, with its vocabularies normalised
    (``cloud: "ec2"`` reads as ``"aws"``); a :class:`~spotrun.errors.LedgerRecordError`
    naming the first bad field otherwise. Records of events this spotrun does not know are
    returned unchanged, so a newer writer's extra events do not break an older reader."""
    event = record.get("event")
    out = dict(record)
    out["time"] = _number(record, "time", low=0.0, high=MAX_TIME)
    if event not in _TIMES:
        return out
    sid = record.get("segment_id")
    if isinstance(sid, bool) or not isinstance(sid, (str, int)) or str(sid) == "":
        raise LedgerRecordError(f"segment_id {_show(sid)} is not a non-empty string")
    out["segment_id"] = str(sid)
    required, optional = _TIMES[event]
    for key in required:
        out[key] = _number(record, key, low=0.0, high=MAX_TIME)
    for key in optional:
        out[key] = _number(record, key, low=0.0, high=MAX_TIME, optional=True)
    for key in _SECONDS.get(event, ()):
        # Optional (a stall nobody measured is no stall), but a number when present.
        seconds = _number(record, key, low=0.0, high=MAX_TIME, optional=True)
        out[key] = 0.0 if seconds is None else seconds
    for key in _COUNTS.get(event, ()):
        value = record.get(key)
        if value is None and key in ("steps_done", "nbytes"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise LedgerRecordError(f"{key} {_show(value)} is not a count >= 0")
    try:
        if event in ("segment_started", "segment_ended"):
            out["source"] = Source.parse(record.get("source")).value
        if event == "segment_ended":
            out["reason"] = EndReason.parse(record.get("reason")).value
        if event == "segment_started":
            _group_fields(record, out)
            inst = record.get("instance")
            if not isinstance(inst, dict):
                raise LedgerRecordError(f"instance {_show(inst)} is not an object")
            clean: dict[str, object] = {}
            for key in _INSTANCE_TEXT:
                value = inst.get(key)
                if value is not None and not isinstance(value, str):
                    raise LedgerRecordError(f"instance {key} {_show(value)} is not a string")
                clean[key] = value
            if inst.get("cloud") is not None:
                clean["cloud"] = Cloud.parse(inst["cloud"]).value
            if inst.get("market") is not None:
                clean["market"] = Market.parse(inst["market"]).value
            out["instance"] = {k: v for k, v in clean.items() if v is not None}
    except ConfigError as exc:
        raise LedgerRecordError(str(exc)) from None
    if event == "notice_received":
        for key in ("source", "action"):
            if not isinstance(record.get(key), str):
                raise LedgerRecordError(f"{key} {_show(record.get(key))} is not a string")
    return out


def parse_records(records: list[dict]) -> tuple[list[dict], list[str]]:
    """The records :func:`parse_record` accepts, and one warning per record it refused."""
    good: list[dict] = []
    warnings: list[str] = []
    for r in records:
        try:
            good.append(parse_record(r))
        except LedgerRecordError as exc:
            warnings.append(f"skipped ledger record {str(r.get('id', '?'))[:40]!r} "
                            f"({str(r.get('event', '?'))[:40]!r}): {exc}")
    return good, warnings
