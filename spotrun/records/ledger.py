"""The run ledger: what happened during a run, one small JSON object per event.

Records live under ``RUN_URL/ledger/`` (:data:`spotrun.records.layout.LEDGER_DIR`), one object each,
named ``{time_ns:020d}-{uuid12}.json`` so that lexical order is time order. Every record is
created with :meth:`Storage.write_if_absent` under a name no other writer can pick, so
concurrent writers (several ranks, a relaunched process, the launcher on another machine)
never overwrite, lose or tear each other's records, on local disk and on S3 alike (S3 has no
append; a single growing file would need read-modify-write and would lose records).

Every record carries ``event``, ``time`` (epoch seconds, float), ``pid``, ``host`` and a
unique ``id``, plus the event's own fields. The events the cost report understands:

=====================  =======================================================================
``segment_started``    ``segment_id``, ``instance`` (an :class:`InstanceInfo` dict),
                       ``started_at``, ``source`` (``"wrapper"`` or ``"launcher"``);
                       a node of a multi-node job also ``group`` and ``node`` (its rank)
``segment_ended``      ``segment_id``, ``reason`` (finished, interrupted, failed, stopped),
                       ``ended_at``, ``source``
``checkpoint_committed``  ``segment_id``, ``step``, ``committed_at``, ``stall_s``, ``save_s``,
                       ``nbytes``
``training_resumed``   ``segment_id``, ``step``, ``process_started_at``, ``first_step_at``
``notice_received``    ``segment_id``, ``source``, ``action``, ``notice_time``,
                       ``detected_at``, ``deadline``
=====================  =======================================================================

A record's ``time`` is the time of the event it describes (``started_at``, ``ended_at``,
``committed_at``, ``first_step_at``, ``detected_at``), so sorting by time replays the run even
when a record is written after the fact (a launcher noting an instance's launch request).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import socket
import threading
import time as _time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..config import env_float_or_default
from ..errors import ConfigError, StorageError
from ..procfs import pid_gone
from ..storage import Storage
from .events import (
    CheckpointCommitted,
    EndReason,
    Event,
    EventSink,
    NoticeReceived,
    RecoveryStarted,
    SegmentEnded,
    SegmentStarted,
    TrainingResumed,
)
from .layout import LEDGER_DIR, is_temporary

__all__ = ["DEFAULT_FLUSH_S", "SEGMENT_END_REASONS", "BackgroundLedger", "Ledger",
           "clean_dead_writers_temporaries", "ledger_sink"]

log = logging.getLogger(__name__)

#: The reasons a ``segment_ended`` record may carry (:class:`spotrun.records.events.EndReason`).
SEGMENT_END_REASONS = tuple(r.value for r in EndReason)
_RESERVED = ("event", "pid", "host", "id")


#: Order of records with the same time (see Ledger.records).
_TIE_ORDER = {"segment_started": 0, "segment_ended": 2}


class Ledger:
    """Append-only event records under a run URL.

    Safe to use from several processes and machines at once: each :meth:`append` creates a
    new uniquely named object; nothing is ever rewritten.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._host = socket.gethostname()

    # -- core --------------------------------------------------------------------------

    def append(self, event: str, **fields: Any) -> dict:
        """Write one record and return it.

        ``time`` (epoch seconds) defaults to now; ``event``, ``pid``, ``host`` and ``id``
        are filled in here and may not be passed. Values must be JSON-serialisable.
        """
        if not event or not isinstance(event, str):
            raise ConfigError(f"event must be a non-empty string, got {event!r}")
        clash = [k for k in _RESERVED if k in fields]
        if clash:
            raise ConfigError(f"ledger fields {clash} are set by the ledger itself; rename them")
        when = fields.pop("time", None)
        when = _time.time() if when is None else float(when)
        for _ in range(5):
            rid = uuid.uuid4().hex
            record = {
                "event": event,
                "time": when,
                "pid": os.getpid(),
                "host": self._host,
                "id": rid,
                **fields,
            }
            data = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
            # Negative times (never expected) would break the lexical order; clamp the name only.
            name = f"{max(0, round(when * 1e9)):020d}-{rid[:12]}.json"
            if self.storage.write_if_absent(f"{LEDGER_DIR}/{name}", data):
                return record
        # Five uuid4 collisions in a row do not happen; a storage that always says "exists" does.
        raise StorageError(f"could not create a ledger record under {self.storage.display(LEDGER_DIR)}: "
                           "the store says every new name already exists; check the storage backend")

    def records(self) -> list[dict]:
        """Every record, sorted by (time, id). Unreadable records are skipped with a warning."""
        names = [
            n
            for n in self.storage.list_dir(LEDGER_DIR)
            if n.endswith(".json") and not n.startswith(".")
        ]
        if not names:
            return []

        def load(name: str) -> dict | None:
            rel = f"{LEDGER_DIR}/{name}"
            try:
                record = json.loads(self.storage.read_bytes(rel))
                if not isinstance(record, dict) or "event" not in record:
                    raise ValueError("not a ledger record")
                record["time"] = float(record.get("time", 0.0))
                record.setdefault("id", name)
                return record
            except Exception as exc:  # noqa: BLE001 - a user may have edited a file
                log.warning("skipping unreadable ledger record %s: %s", self.storage.display(rel), exc)
                return None

        if self.storage.is_local or len(names) < 4:
            loaded = [load(n) for n in names]
        else:
            # One GET per record: overlap them so a long run's ledger reads in seconds on S3.
            with ThreadPoolExecutor(max_workers=16) as pool:
                loaded = list(pool.map(load, names))
        out = [r for r in loaded if r is not None]
        # At equal times a segment's start comes first and its end last: a segment can end at
        # its start time (the end is clamped to the earliest time evidence supports, and EC2's
        # state-transition time has whole seconds), and random ids must not reorder them.
        out.sort(key=lambda r: (r["time"], _TIE_ORDER.get(r.get("event"), 1), str(r["id"])))
        return out

    # -- events ------------------------------------------------------------------------

    def record(self, event: Event) -> dict:
        """Write one typed event (:mod:`spotrun.records.events`) as a record: the one door every
        spotrun event goes through. Its ``time`` is the event's own time field."""
        if not isinstance(event, _EVENT_TYPES):
            raise TypeError(f"not a spotrun event: {event!r}")
        if isinstance(event, SegmentStarted):
            # A writer starts: what killed writers left in the ledger goes now (as the lease
            # holder's start removes the checkpoint temporaries of a writer proven gone).
            clean_dead_writers_temporaries(self.storage)
        fields = event.fields()
        return self.append(event.kind, time=fields[event.time_field], **fields)

    # Keyword shorthands for scripts and tests: each builds its event, so the field list is
    # the dataclass's and nothing here repeats it.
    def segment_started(self, **fields: Any) -> dict:
        return self.record(SegmentStarted(**fields))

    def segment_ended(self, **fields: Any) -> dict:
        return self.record(SegmentEnded(**fields))

    def checkpoint_committed(self, **fields: Any) -> dict:
        return self.record(CheckpointCommitted(**fields))

    def training_resumed(self, **fields: Any) -> dict:
        return self.record(TrainingResumed(**fields))

    def notice_received(self, **fields: Any) -> dict:
        return self.record(NoticeReceived(**fields))

    def recovery_started(self, **fields: Any) -> dict:
        return self.record(RecoveryStarted(**fields))


_EVENT_TYPES = (SegmentStarted, SegmentEnded, CheckpointCommitted, TrainingResumed, NoticeReceived,
                RecoveryStarted)


def ledger_sink(ledger: Ledger) -> EventSink:
    """A sink that writes each event as one ledger record (raises what the ledger raises)."""
    return ledger.record


#: How long the training process waits at exit for its ledger records (``SPOTRUN_LEDGER_FLUSH_S``).
DEFAULT_FLUSH_S = 5.0
#: Records waiting to be written; beyond this, new ones are dropped (with a warning).
DEFAULT_MAX_PENDING = 256
#: A single write running longer than this is reported once as hanging.
DEFAULT_SLOW_AFTER_S = 30.0
# Drop warnings are repeated at most this often, with a running count.
_DROP_LOG_EVERY = 60.0
_STOP = object()


def _writer_gone(path: str) -> bool:
    """Whether the ledger temporary at ``path`` was written by a process of this host that
    is gone: its record (whole, since a record is one small write) names its pid and host."""
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read(1 << 16))
        pid, host = record["pid"], record["host"]
    except (OSError, ValueError, TypeError, KeyError):
        return False  # empty or torn (a full disk): only the age rule may remove it
    if host != socket.gethostname() or type(pid) is not int or pid <= 0 or pid == os.getpid():
        return False
    return pid_gone(pid)


def clean_dead_writers_temporaries(storage: Storage) -> int:
    """Remove the ledger temporaries (``ledger/.<record>.tmp-<id>``) whose writer is provably
    gone; returns how many. Best effort, local disk only (an object store has none).

    The checkpoint temporaries' rule: a temporary goes at once when its writer is proven
    dead, here a process of this host that no longer runs (the record inside names its pid
    and host); any other (another host's, a live process's, an empty one a full disk left)
    only once it is old, which the lease holder's sweep does
    (:func:`spotrun.records.lease.clean_stale_temporaries`). A live writer's temporary is never
    touched: its pid still runs.
    """
    folder = storage.local_path(LEDGER_DIR)
    if folder is None:
        return 0
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        try:
            if not (is_temporary(entry.name) and entry.is_file(follow_symlinks=False)
                    and _writer_gone(entry.path)):
                continue
            os.unlink(entry.path)
        except OSError:
            continue  # gone meanwhile, or not ours to remove: best effort
        removed += 1
        log.debug("removed ledger temporary %s of a writer that is gone", entry.path)
    if removed:
        log.info("removed %d ledger temporary file(s) left by killed writers under %s",
                 removed, storage.display(LEDGER_DIR))
    return removed


class BackgroundLedger:
    """Writes a :class:`Ledger`'s records from one background thread, so that a slow or
    hanging storage never blocks training.

    :meth:`submit` never blocks: it queues the call (records keep their event ``time``,
    taken by the caller) and returns. Records are written one at a time, in submission
    order. At most ``max_pending`` wait; beyond that new ones are dropped with a warning
    (bookkeeping must not grow memory without bound while the storage hangs). A write that
    runs longer than ``slow_after`` seconds is reported once. :meth:`close` waits a bounded
    time for what is queued; records still queued at interpreter exit get the same bounded
    wait (an ``atexit`` hook), so an exception path does not silently lose them.
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        slow_after: float = DEFAULT_SLOW_AFTER_S,
    ) -> None:
        self.ledger = ledger
        self._write = ledger.record
        self.slow_after = float(slow_after)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, int(max_pending)))
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._busy_since: float | None = None  # time.monotonic() when the current write began
        self._warned_slow = False
        self._dropped = 0
        self._last_drop_log = float("-inf")

    @property
    def dropped(self) -> int:
        """Records dropped so far because too many were waiting."""
        return self._dropped

    @property
    def pending(self) -> int:
        """Records queued or being written."""
        return self._queue.unfinished_tasks

    def submit(self, event: Event) -> bool:
        """Queue ``event`` for writing; False when it had to be dropped. Never blocks."""
        self._warn_if_hanging()
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self._dropped += 1
            now = _time.monotonic()
            if now - self._last_drop_log >= _DROP_LOG_EVERY:
                self._last_drop_log = now
                log.warning(
                    "run ledger at %s is not keeping up (%d records waiting); dropped %d "
                    "record(s) so far, latest %s. Training goes on; the cost report will miss "
                    "them. Check that the storage answers",
                    self.ledger.storage.display(LEDGER_DIR), self._queue.maxsize,
                    self._dropped, type(event).__name__,
                )
            return False
        self._ensure_thread()
        return True

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every queued record is written (or failed)."""
        deadline = _time.monotonic() + max(0.0, timeout)
        done = self._queue.all_tasks_done
        with done:
            while self._queue.unfinished_tasks:
                left = deadline - _time.monotonic()
                if left <= 0:
                    return False
                done.wait(left)
        return True

    def close(self, timeout: float) -> bool:
        """Flush with a bound, then let the thread end. False (and a warning) when records
        were still unwritten at the bound; the thread is a daemon and is left behind."""
        if self.flush(timeout):
            with self._lock:
                thread, self._thread = self._thread, None
            if thread is not None:
                try:
                    self._queue.put(_STOP, timeout=1.0)
                except queue.Full:  # a submit raced in: the thread stays, harmlessly
                    return True
                thread.join(1.0)
            return True
        log.warning(
            "run ledger at %s: %d record(s) not written within %.3g s (the storage is hanging "
            "or slow); exiting without them. Training state is unaffected; raise "
            "SPOTRUN_LEDGER_FLUSH_S to wait longer",
            self.ledger.storage.display(LEDGER_DIR), self.pending, timeout,
        )
        return False

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(
                target=self._run, name="spotrun-ledger", daemon=True
            )
            self._thread.start()
        _live_writers.add(self)

    def _warn_if_hanging(self) -> None:
        since = self._busy_since
        if since is None or self._warned_slow:
            return
        running = _time.monotonic() - since
        if running > self.slow_after:
            self._warned_slow = True
            log.warning(
                "a run ledger write to %s has been running for %.0f s; training goes on, "
                "records wait in memory (at most %d, later ones are dropped)",
                self.ledger.storage.display(LEDGER_DIR), running, self._queue.maxsize,
            )

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self._busy_since = _time.monotonic()
                try:
                    self._write(item)
                except Exception as exc:  # noqa: BLE001 - bookkeeping must not kill the run
                    log.warning("could not write the run ledger (%s): %s", type(item).__name__, exc)
                finally:
                    self._busy_since = None
            finally:
                self._queue.task_done()


_live_writers: weakref.WeakSet[BackgroundLedger] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    # Daemon threads die when the interpreter ends: give queued records one bounded chance.
    writers = [w for w in list(_live_writers) if w.pending]
    if not writers:
        return
    bound = env_float_or_default("SPOTRUN_LEDGER_FLUSH_S", DEFAULT_FLUSH_S)
    deadline = _time.monotonic() + bound
    for w in writers:
        w.close(max(0.0, deadline - _time.monotonic()))
