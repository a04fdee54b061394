"""The launcher's own record of a run, kept at ``RUN_URL/launch/state.json``.

Keeping it in the run URL (not on the controller's disk) is what makes ``spotrun launch
--resume RUN_URL`` and ``spotrun status``/``stop`` work from any machine: whoever holds the
URL holds the whole story. One writer at a time (the controller, or ``spotrun stop`` when no
controller is alive); each write replaces the whole file atomically
(:meth:`Storage.write_bytes`), so a reader sees the old state or the new one, never a mix.
"""

from __future__ import annotations

import enum
import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import LaunchError, StorageError
from ..storage import Storage
from .layout import LAUNCH_DIR

__all__ = [
    "STATE_FILE",
    "STATE_VERSION",
    "STOP_FILE",
    "LaunchState",
    "RunStatus",
    "Segment",
    "exit_record_path",
    "load_state",
    "new_run_id",
    "save_state",
]

STATE_VERSION = 1
STATE_FILE = f"{LAUNCH_DIR}/state.json"
#: Written by ``spotrun stop``; a live controller sees it on its next poll and stops.
STOP_FILE = f"{LAUNCH_DIR}/stop.json"


class RunStatus(str, enum.Enum):
    """A run's status in its launch state (``detached``: only ever a launcher's outcome,
    when Ctrl-C left compute running or there was nothing to account). A ``str``, so a
    state read back from JSON compares equal to it."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"
    DETACHED = "detached"

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def exit_record_path(segment_id: str) -> str:
    """Where an EC2 instance's user data writes its command's exit code."""
    return f"{LAUNCH_DIR}/exit-{segment_id}.json"


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class Segment:
    """One instance (or one simulated instance) running the command once."""

    segment_id: str
    instance_id: str
    instance_type: str | None
    market: str  # "spot" | "on-demand"
    started_at: float
    availability_zone: str | None = None
    subnet_id: str | None = None
    fleet_id: str | None = None
    ended_at: float | None = None
    end_reason: str | None = None  # finished | interrupted | failed | stopped
    exit_code: int | None = None
    detail: str | None = None
    #: A node of a multi-node attempt: the attempt's id (shared by its N nodes) and the
    #: node's index in its cluster file. None for a single-instance segment.
    group: str | None = None
    node: int | None = None
    #: The EC2 region the instance ran in (None in states written before region failover:
    #: the run's ``--region``).
    region: str | None = None

    @property
    def open(self) -> bool:
        return self.ended_at is None


@dataclass
class LaunchState:
    """Everything a controller needs to pick a run up again."""

    mode: str  # "ec2" | "local"
    run_id: str
    created_at: float
    status: str = RunStatus.RUNNING  # a RunStatus (its text, once read back from JSON)
    options: dict[str, Any] = field(default_factory=dict)
    segments: list[Segment] = field(default_factory=list)
    interruptions: int = 0
    failures: int = 0
    launch_template_id: str | None = None
    attempts: int = 0
    controller_pid: int | None = None
    controller_host: str | None = None
    heartbeat_at: float | None = None
    poll_s: float | None = None
    message: str | None = None
    #: region -> the run's launch template there (``launch_template_id`` is the home
    #: region's, kept for states and tools that know only one).
    launch_templates: dict[str, str] = field(default_factory=dict)
    #: region -> the run's cluster placement group there (``--placement-group``).
    placement_groups: dict[str, str] = field(default_factory=dict)
    #: When a full round of every pool (every region, every market allowed) last found no
    #: capacity, None once capacity came (``--max-wait`` counts from it across ``--resume``).
    waiting_since: float | None = None
    version: int = STATE_VERSION

    @property
    def current(self) -> Segment | None:
        """The segment still running (at most one per run; for an N-node run, node 0 of
        the running attempt), or None."""
        running = self.running
        return running[0] if running else None

    @property
    def running(self) -> list[Segment]:
        """The open segments: the running attempt's nodes in rank order (one for a
        single-node run), or [] when nothing runs."""
        found = [s for s in self.segments if s.open]
        return sorted(found, key=lambda s: s.node or 0)

    def regions_used(self, home: str | None) -> list[str | None]:
        """Every region the run may have instances or resources in, home first: the
        ``--regions`` asked for (else ``home``), then any a segment, launch template or
        placement group was recorded in. ``home`` None: the SDK's default region."""
        out: list[str | None] = list(self.options.get("regions") or []) or [home]
        for r in [*(s.region for s in self.segments), *self.launch_templates, *self.placement_groups]:
            if r and r not in out:
                out.append(r)
        return out

    def touch(self, poll_s: float | None = None) -> None:
        self.controller_pid = os.getpid()
        self.controller_host = socket.gethostname()
        self.heartbeat_at = time.time()
        if poll_s is not None:
            self.poll_s = poll_s

    def controller_alive(self, now: float | None = None) -> bool:
        """Whether a controller wrote a heartbeat recently (three polls, at least 30 s)."""
        if self.heartbeat_at is None or self.status != RunStatus.RUNNING:
            return False
        now = time.time() if now is None else now
        return now - self.heartbeat_at < max(30.0, 3 * (self.poll_s or 0.0))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LaunchState:
        version = int(data.get("version", 1))
        if version > STATE_VERSION:
            raise LaunchError(
                f"launch state version {version} is newer than this spotrun understands "
                f"({STATE_VERSION}); upgrade spotrun"
            )
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        segs = [
            Segment(**{k: v for k, v in s.items() if k in Segment.__dataclass_fields__})
            for s in known.pop("segments", [])
        ]
        return cls(segments=segs, **known)


def load_state(storage: Storage) -> LaunchState | None:
    """The run's launch state, or None when no launcher has run there."""
    if not storage.exists(STATE_FILE):
        return None
    for attempt in range(4):
        try:
            raw = storage.read_bytes(STATE_FILE)
            break
        except StorageError:
            # The controller replaces the file every poll; on S3 a read racing a PUT can fail
            # its precondition (the object changed under it). The next read sees the new one.
            if attempt == 3:
                raise
            time.sleep(0.1 * (attempt + 1))
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise LaunchError(
            f"{storage.display(STATE_FILE)} is not valid JSON ({exc}); "
            "fix or delete it (the checkpoints are unaffected)"
        ) from exc
    return LaunchState.from_dict(data)


def save_state(storage: Storage, state: LaunchState) -> None:
    data = json.dumps(state.to_dict(), indent=1, sort_keys=True).encode()
    storage.write_bytes(STATE_FILE, data)
