"""A node's liveness record: ``launch/nodes/alive/<instance id>.json``, overwritten every
``SPOTRUN_HEARTBEAT_S`` seconds (30 by default; 0: none) by the node agent's own thread.

Why: the EC2 controller sees a node only through EC2's state. A machine that drops off the
network while EC2 still calls it ``running`` (a kernel hang, a dead NIC) leaves its peers
blocked in a collective until the process group's timeout, every instance billing. With this
record the controller sees it go quiet (:mod:`spotrun.launch.ec2_silence`).

One small object per node, replaced in place: on S3 one PUT per node per interval, about
2,900 a day per node at 30 s (0.015 USD a day at 0.005 USD per 1,000 PUTs), and nothing to
clean up. The writer never blocks training (a daemon thread of the agent, which itself runs
no training) and a failed write is logged and tried again at the next beat, never fatal.

The record carries a counter and the node's wall time, but the controller judges silence by
its *own* clock: the time it first read each new record (content changed). Two machines'
clocks may differ; a controller's never differs from itself. ``spotrun status``, which reads
once and cannot watch for a change, ages a record by the store's time of the write
(:func:`read_node_beat`) and judges it by the controller's rule (:func:`silence_limit`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..config import env_float
from ..errors import ConfigError, StorageNotFoundError
from ..storage import Storage
from .layout import HEARTBEAT_DIR

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "SLOW_BEATS",
    "Heartbeat",
    "HeartbeatWriter",
    "NodeBeat",
    "heartbeat_file",
    "heartbeat_interval",
    "read_heartbeat",
    "read_node_beat",
    "silence_limit",
]

log = logging.getLogger(__name__)

# A file name under the run URL on every backend, as a cluster file's (spotrun.launch.node).
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

#: Seconds between two beats of a node agent (``SPOTRUN_HEARTBEAT_S``). Well under the
#: controller's default ``--node-silence`` (120 s): four beats may fail before a node is
#: declared lost.
DEFAULT_HEARTBEAT_S = 30.0

#: A node is silent after ``--node-silence``, or this many of its own beat intervals when
#: longer (a node started with a long SPOTRUN_HEARTBEAT_S is not silent between beats).
SLOW_BEATS = 3


def silence_limit(node_silence_s: float, interval_s: float | None) -> float:
    """Seconds without a new beat after which a node whose record states ``interval_s`` is
    silent under ``--node-silence node_silence_s`` (the controller's rule; ``status`` shows it)."""
    return max(node_silence_s, SLOW_BEATS * (interval_s or 0.0))


def heartbeat_file(instance_id: str) -> str:
    """Where node ``instance_id``'s liveness record lives, relative to the run URL."""
    if not _SAFE_ID.fullmatch(instance_id or ""):
        raise ConfigError(f"instance id {instance_id!r} cannot name a heartbeat file; use letters, digits, - or _")
    return f"{HEARTBEAT_DIR}/{instance_id}.json"


def heartbeat_interval() -> float:
    """``SPOTRUN_HEARTBEAT_S`` (default 30; 0 turns the beat off)."""
    value = env_float("SPOTRUN_HEARTBEAT_S", DEFAULT_HEARTBEAT_S)
    if not 0 <= value <= 3600:
        raise ConfigError(f"SPOTRUN_HEARTBEAT_S={value:g} must be 0 (off) to 3600 seconds; e.g. 30")
    return value


@dataclass(frozen=True)
class Heartbeat:
    """One beat. ``seq`` counts the beats of one agent process; ``attempt`` is the segment
    id of the cluster file the agent runs (or waits after), None before it has one."""

    instance_id: str
    seq: int
    time: float
    pid: int
    host: str
    attempt: str | None = None
    #: The writer's interval (``SPOTRUN_HEARTBEAT_S``): the controller, which cannot see a
    #: node's environment, waits at least three of them before calling the node silent.
    interval_s: float | None = None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: Any) -> Heartbeat:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        seq, t = data.get("seq"), data.get("time")
        if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(t, (int, float)):
            raise ValueError("seq or time missing")
        attempt, interval = data.get("attempt"), data.get("interval_s")
        return cls(instance_id=str(data.get("instance_id", "")), seq=seq, time=float(t),
                   pid=int(data.get("pid") or 0), host=str(data.get("host", "")),
                   attempt=attempt if isinstance(attempt, str) else None,
                   interval_s=float(interval) if isinstance(interval, (int, float))
                   and not isinstance(interval, bool) and interval > 0 else None)


def read_heartbeat(storage: Storage, instance_id: str) -> bytes | None:
    """The raw record of node ``instance_id`` (None when it has none yet). Raw bytes: the
    controller compares them between polls; a record it cannot parse still changes when the
    node writes. Storage errors propagate (the caller skips that poll, never judges on them)."""
    rel = heartbeat_file(instance_id)
    try:
        return bytes(storage.read_bytes(rel))
    except (FileNotFoundError, StorageNotFoundError):
        return None


@dataclass(frozen=True)
class NodeBeat:
    """What a reader outside the controller (``spotrun status``) knows of one node's beat:
    ``age_s`` None when the node has written none yet; ``beat`` None when there is none or
    it cannot be parsed; ``error`` when the store could not be read."""

    instance_id: str
    age_s: float | None = None
    beat: Heartbeat | None = None
    error: str | None = None


def read_node_beat(storage: Storage, instance_id: str, *, now: Callable[[], float] = time.time) -> NodeBeat:
    """Node ``instance_id``'s record and how long ago it was last written. Never raises for a
    store it cannot read (the answer carries the error): ``status`` shows what it can.

    The age comes from the store's own time of the write (S3's LastModified, a file's mtime),
    not the record's ``time``: that is the node's clock, and the node is the machine in
    doubt (a hung or misset clock is what we look for); the store stamps a beat when it
    *arrives*, which is also what the controller judges (a beat that never lands is
    silence). It is compared with this machine's clock, so an unsynchronised reader's skew
    shows in the age; the controller, which acts, uses no wall clock at all (see
    :mod:`spotrun.launch.ec2_silence`). The record's time is the fallback on a store that
    keeps no times."""
    rel = heartbeat_file(instance_id)
    try:
        raw = read_heartbeat(storage, instance_id)
        if raw is None:
            return NodeBeat(instance_id)
        written = storage.modified(rel)
    except (FileNotFoundError, StorageNotFoundError):  # removed between the two reads
        return NodeBeat(instance_id)
    except Exception as exc:  # noqa: BLE001 - status shows what it can
        return NodeBeat(instance_id, error=str(exc))
    try:
        beat: Heartbeat | None = Heartbeat.from_json(json.loads(raw))
    except (ValueError, TypeError):  # an odd record still says the node wrote something
        beat = None
    if written is None:
        written = beat.time if beat is not None else None
    age = None if written is None else max(0.0, now() - written)
    if age is None:
        return NodeBeat(instance_id, beat=beat, error="the store keeps no time for it")
    return NodeBeat(instance_id, age_s=age, beat=beat)


class HeartbeatWriter:
    """Writes node ``instance_id``'s record every ``interval_s`` from a daemon thread until
    :meth:`stop`. ``attempt`` names the attempt the node runs now; each beat asks it."""

    def __init__(self, storage: Storage, instance_id: str, interval_s: float,
                 attempt: Callable[[], str | None] = lambda: None) -> None:
        self.storage = storage
        self.instance_id = instance_id
        self.interval_s = interval_s
        self.attempt = attempt
        self.beats = 0
        self.failures = 0
        self._file = heartbeat_file(instance_id)
        self._host = socket.gethostname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spotrun-heartbeat", daemon=True)

    @classmethod
    def start(cls, storage: Storage, instance_id: str, interval_s: float | None = None,
              attempt: Callable[[], str | None] = lambda: None) -> HeartbeatWriter | None:
        """A started writer, or None when the beat is off (interval 0) or misconfigured
        (logged: liveness reporting never stops a node)."""
        try:
            interval = heartbeat_interval() if interval_s is None else interval_s
            if interval <= 0:
                return None
            writer = cls(storage, instance_id, interval, attempt)
        except ConfigError as exc:
            log.warning("no heartbeat for this node: %s", exc)
            return None
        writer._thread.start()
        return writer

    def _run(self) -> None:
        while True:
            self.beat()
            if self._stop.wait(self.interval_s):
                return

    def beat(self) -> bool:
        """Write one record now; False (logged, retried at the next beat) when it failed."""
        try:
            hb = Heartbeat(self.instance_id, self.beats, time.time(), os.getpid(), self._host, self.attempt(),
                           self.interval_s)
            self.storage.write_bytes(self._file, hb.to_bytes())
        except Exception as exc:  # noqa: BLE001 - a missed beat is retried; it never ends the node
            self.failures += 1
            # The first failure of a streak and every tenth: a dead store is not a log flood.
            if self.failures == 1 or self.failures % 10 == 0:
                log.warning("node %s: could not write its heartbeat to %s (%s; %d failed in a row); "
                            "trying again in %gs", self.instance_id, self.storage.display(self._file), exc,
                            self.failures, self.interval_s)
            return False
        self.beats += 1
        self.failures = 0
        return True

    def stop(self, wait_s: float = 0.0) -> None:
        """No more beats (a write under way finishes on its own; ``wait_s``: wait for it)."""
        self._stop.set()
        if wait_s > 0 and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=wait_s)
