"""Typed run events: what the training wrapper reports, and how it reaches the run ledger.

Components (the checkpoint loop, the saver, the interrupts inbox) report through one
callback, :data:`EventSink`, that takes these frozen dataclasses. The ledger is one such
sink (``Ledger.record``, the one door every record goes through); tests and tools can pass
their own. Each event's fields are listed once, in its dataclass: the ledger writes what the
dataclass holds. A typo in an event name is a type error here, not a silently missing record.

The ledger's vocabularies live here too, as string enums (:class:`EndReason`,
:class:`Market`, :class:`Cloud`, :class:`Source`): what a writer may record and what a
reader accepts are one list. Each enum's ``parse`` reads a value from a record, old
spellings included (``"ec2"`` is :attr:`Cloud.AWS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, TypeVar

from ..errors import ConfigError, LedgerRecordError
from .instance import InstanceInfo

__all__ = [
    "CheckpointCommitted",
    "Cloud",
    "EndReason",
    "Event",
    "EventSink",
    "Market",
    "NoticeReceived",
    "RecoveryStarted",
    "SegmentEnded",
    "SegmentStarted",
    "Source",
    "TrainingResumed",
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

class _Event:
    """What every event shares: its ledger name (``kind``), the field that is its record's
    ``time``, and one way to become a record. The dataclass fields below are the one list of
    each event's fields: the ledger writes them, tests and tools read them."""

    kind: ClassVar[str]
    time_field: ClassVar[str]

    def fields(self) -> dict[str, Any]:
        """The record's fields (JSON values): enums as their text, the instance as a dict,
        and optional fields left out while they are None (so readers see no empty keys)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            if isinstance(value, InstanceInfo):
                value = value.to_dict()
            elif isinstance(value, Enum):
                value = value.value
            out[f.name] = value
        return out

    def _coerce(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class SegmentStarted(_Event):
    """A segment of compute began (``source``: the wrapper, or a launcher watching it).

    A node of a multi-node job also names its ``group`` (the launcher's id for the attempt
    all N nodes belong to) and ``node`` (its rank); the cost report gives the nodes that
    wrote no records of their own the group's training figures.
    """

    kind: ClassVar[str] = "segment_started"
    time_field: ClassVar[str] = "started_at"

    segment_id: str
    instance: InstanceInfo
    started_at: float
    source: Source = Source.WRAPPER
    # A multi-node job: the launcher's id for the attempt all its nodes belong to, and this
    # node's rank. None for a single-node segment (and in records older than them).
    group: str | None = None
    node: int | None = None

    def __post_init__(self) -> None:
        if self.group is not None and (not isinstance(self.group, str) or not self.group):
            raise ConfigError(f"group {self.group!r} must be a non-empty string (the attempt's id)")
        if self.node is not None:
            if self.group is None:
                raise ConfigError(f"node {self.node!r} needs a group: pass the attempt's group id too")
            if isinstance(self.node, bool) or not isinstance(self.node, int) or self.node < 0:
                raise ConfigError(f"node {self.node!r} must be a node rank >= 0")
        self._coerce(segment_id=str(self.segment_id), started_at=float(self.started_at),
                     source=Source.parse(self.source))


@dataclass(frozen=True)
class SegmentEnded(_Event):
    """A segment ended. The wrapper also says how far training got (``steps_done``, and when
    the last step completed), so lost work is measured in training time, not shutdown time."""

    kind: ClassVar[str] = "segment_ended"
    time_field: ClassVar[str] = "ended_at"

    segment_id: str
    reason: EndReason
    ended_at: float
    source: Source = Source.WRAPPER
    steps_done: int | None = None
    last_step_at: float | None = None
    # True for a machine no attempt used: a replacement started at a loss (``--recovery
    # replace``) that was stopped because the run finished, stopped or relaunched whole. The
    # cost report books its time as the restart it was paid for, not as an attempt.
    unused: bool | None = None

    def __post_init__(self) -> None:
        if self.unused is not None and not isinstance(self.unused, bool):
            raise ConfigError(f"unused {self.unused!r} must be true or false")
        self._coerce(segment_id=str(self.segment_id), reason=EndReason.parse(self.reason),
                     ended_at=float(self.ended_at), source=Source.parse(self.source),
                     steps_done=None if self.steps_done is None else int(self.steps_done),
                     last_step_at=_optional_float(self.last_step_at))


@dataclass(frozen=True)
class CheckpointCommitted(_Event):
    """A checkpoint was committed; ``stall_s`` is how long training paused for it and
    ``captured_at`` when its state was taken (an async save commits later)."""

    kind: ClassVar[str] = "checkpoint_committed"
    time_field: ClassVar[str] = "committed_at"

    segment_id: str
    step: int
    committed_at: float
    stall_s: float
    save_s: float
    nbytes: int
    captured_at: float | None = None

    def __post_init__(self) -> None:
        self._coerce(segment_id=str(self.segment_id), step=int(self.step),
                     committed_at=float(self.committed_at), stall_s=float(self.stall_s),
                     save_s=float(self.save_s), nbytes=int(self.nbytes),
                     captured_at=_optional_float(self.captured_at))


@dataclass(frozen=True)
class TrainingResumed(_Event):
    """The first training step after restore ran (step 0 in a fresh run)."""

    kind: ClassVar[str] = "training_resumed"
    time_field: ClassVar[str] = "first_step_at"

    segment_id: str
    step: int
    process_started_at: float
    first_step_at: float
    # What the restore before that step cost (None where nothing was restored, and in older
    # records): when it began, how long it took, and its bytes by where they were when it
    # began: local (on the restoring machine: its own copy, or files held there for other
    # nodes), peer (fetched from another node over the peer channel), the run URL.
    restore_started_at: float | None = None
    restore_s: float | None = None
    bytes_local: int | None = None
    bytes_peer: int | None = None
    bytes_url: int | None = None

    def __post_init__(self) -> None:
        self._coerce(segment_id=str(self.segment_id), step=int(self.step),
                     process_started_at=float(self.process_started_at),
                     first_step_at=float(self.first_step_at),
                     restore_started_at=_optional_float(self.restore_started_at),
                     restore_s=_optional_float(self.restore_s),
                     **{k: None if getattr(self, k) is None else int(getattr(self, k))
                        for k in ("bytes_local", "bytes_peer", "bytes_url")})


#: ``recovery_started`` modes: survivors kept and the lost nodes replaced, a whole new attempt,
#: or a shrunk (``--min-nodes``) job grown back to N at a planned stop (nothing lost).
RECOVERY_MODES = ("replace", "relaunch", "grow")


@dataclass(frozen=True)
class RecoveryStarted(_Event):
    """A launcher lost node(s) of an attempt and starts the next one (the launcher writes it,
    under the *next* attempt's ``group``). ``mode``: "replace" kept the survivors and started
    only replacements, "relaunch" started a whole new attempt, "grow" grew a job that went on
    shrunk (``--min-nodes``) back to N at a planned stop (``lost`` empty, ``lost_at`` the stop's
    request). ``lost_at``: when the loss was
    known (the notice, or the node seen gone); ``capacity_at``: when every machine of the next
    attempt was running (None while unknown). The nodes' own ``training_resumed`` records
    carry the rest of the split (process start, restore, first step)."""

    kind: ClassVar[str] = "recovery_started"
    time_field: ClassVar[str] = "lost_at"

    segment_id: str  # the next attempt's group id (its nodes' segments name it as their group)
    lost_at: float
    mode: str
    lost: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    instances_started: int = 0
    capacity_at: float | None = None
    source: Source = Source.LAUNCHER
    #: Why the nodes were lost, in words (e.g. "node 1 (i-..) silent for 130s ... while EC2
    #: said running; terminated by spotrun"); None in records written before it was kept.
    #: Not named ``reason``: readers take that key for a segment end's EndReason.
    detail: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in RECOVERY_MODES:
            raise ConfigError(f"recovery mode {self.mode!r} must be 'replace', 'relaunch' or 'grow'")
        self._coerce(segment_id=str(self.segment_id), lost_at=float(self.lost_at),
                     lost=tuple(str(x) for x in self.lost), kept=tuple(str(x) for x in self.kept),
                     instances_started=int(self.instances_started),
                     capacity_at=_optional_float(self.capacity_at), source=Source.parse(self.source),
                     detail=None if self.detail is None else str(self.detail))

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "lost": list(self.lost), "kept": list(self.kept)}


@dataclass(frozen=True)
class NoticeReceived(_Event):
    """An interruption notice (or rebalance recommendation) reached the process."""

    kind: ClassVar[str] = "notice_received"
    time_field: ClassVar[str] = "detected_at"

    segment_id: str
    source: str
    action: str
    notice_time: float | None
    detected_at: float
    deadline: float | None

    def __post_init__(self) -> None:
        self._coerce(segment_id=str(self.segment_id), notice_time=_optional_float(self.notice_time),
                     detected_at=float(self.detected_at), deadline=_optional_float(self.deadline))

    def fields(self) -> dict[str, Any]:
        # Unknown times are written as null (records have always carried both keys).
        return {**super().fields(), "notice_time": self.notice_time, "deadline": self.deadline}


Event = SegmentStarted | SegmentEnded | CheckpointCommitted | TrainingResumed | NoticeReceived | RecoveryStarted
EventSink = Callable[[Event], None]


# -- reading records back -------------------------------------------------------------------

#: Times a record may carry: epoch seconds from 1970 to the last second of year 9999 (what
#: a report can print); NaN, infinities and 1e300 are damage, not times.
MAX_TIME = 253_402_300_799.0
_TIMES = {
    "segment_started": (("started_at",), ()),
    "segment_ended": (("ended_at",), ("last_step_at",)),
    "checkpoint_committed": (("committed_at",), ("captured_at",)),
    "training_resumed": (("process_started_at", "first_step_at"), ("restore_started_at",)),
    "notice_received": (("detected_at",), ("notice_time", "deadline")),
    "recovery_started": (("lost_at",), ("capacity_at",)),
}
_SECONDS = {"checkpoint_committed": ("stall_s", "save_s"), "training_resumed": ("restore_s",)}
_COUNTS = {"checkpoint_committed": ("step", "nbytes"),
           "training_resumed": ("step", "bytes_local", "bytes_peer", "bytes_url"),
           "segment_ended": ("steps_done",), "recovery_started": ("instances_started",)}
# Counts a record may leave out (older records, or nothing of that kind happened).
_OPTIONAL_COUNTS = ("steps_done", "nbytes", "bytes_local", "bytes_peer", "bytes_url")
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
        out[key] = seconds if seconds is not None or key == "restore_s" else 0.0
    for key in _COUNTS.get(event, ()):
        value = record.get(key)
        if value is None and key in _OPTIONAL_COUNTS:
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
    if event == "recovery_started":
        if record.get("mode") not in RECOVERY_MODES:
            raise LedgerRecordError(f"mode {_show(record.get('mode'))} is not 'replace', 'relaunch' or 'grow'")
        for key in ("lost", "kept"):
            ids = record.get(key, [])
            if not isinstance(ids, list) or len(ids) > 4096 or not all(isinstance(x, str) for x in ids):
                raise LedgerRecordError(f"{key} {_show(ids)} is not a list of node ids")
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
