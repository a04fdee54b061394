"""The run ledger: what happened during a run, one small JSON object per event.

Records live under ``RUN_URL/ledger/`` (:data:`spotrun.layout.LEDGER_DIR`), one object each,
named ``{time_ns:020d}-{uuid12}.json`` so that lexical order is time order. Every record is
created with :meth:`Storage.write_if_absent` under a name no other writer can pick, so
concurrent writers (several ranks, a relaunched process, the launcher on another machine)
never overwrite, lose or tear each other's records, on local disk and on S3 alike (S3 has no
append; a single growing file would need read-modify-write and would lose records).

Every record carries ``event``, ``time`` (epoch seconds, float), ``pid``, ``host`` and a
unique ``id``, plus the event's own fields. The events the cost report understands:

=====================  =======================================================================
``segment_started``    ``segment_id``, ``instance`` (an :class:`InstanceInfo` dict),
                       ``started_at``, ``source`` (``"wrapper"`` or ``"launcher"``)
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

import json
import logging
import os
import socket
import time as _time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .instance import InstanceInfo
from .layout import LEDGER_DIR
from .storage import Storage

__all__ = ["SEGMENT_END_REASONS", "Ledger"]

log = logging.getLogger("spotrun")

SEGMENT_END_REASONS = ("finished", "interrupted", "failed", "stopped")
_RESERVED = ("event", "pid", "host", "id")


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
            raise ValueError(f"event must be a non-empty string, got {event!r}")
        clash = [k for k in _RESERVED if k in fields]
        if clash:
            raise ValueError(f"ledger fields {clash} are set by the ledger itself")
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
            name = f"{max(0, int(round(when * 1e9))):020d}-{rid[:12]}.json"
            if self.storage.write_if_absent(f"{LEDGER_DIR}/{name}", data):
                return record
        # Five uuid4 collisions in a row do not happen; a storage that always says "exists" does.
        raise OSError(f"could not create a ledger record under {self.storage.display(LEDGER_DIR)}")

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
        out.sort(key=lambda r: (r["time"], str(r["id"])))
        return out

    # -- conveniences ------------------------------------------------------------------

    def segment_started(
        self, *, segment_id: str, instance: InstanceInfo, started_at: float, source: str
    ) -> dict:
        """A segment of compute began (``source``: ``"wrapper"`` or ``"launcher"``)."""
        return self.append(
            "segment_started",
            time=started_at,
            segment_id=str(segment_id),
            instance=instance.to_dict(),
            started_at=float(started_at),
            source=source,
        )

    def segment_ended(
        self,
        *,
        segment_id: str,
        reason: str,
        ended_at: float,
        source: str,
        steps_done: int | None = None,
        last_step_at: float | None = None,
    ) -> dict:
        """A segment ended (``reason``: finished, interrupted, failed or stopped).

        The wrapper also says how far training got (``steps_done``, and when the last step
        completed), so lost work is measured in training time, not in shutdown time.
        """
        if reason not in SEGMENT_END_REASONS:
            raise ValueError(f"reason must be one of {SEGMENT_END_REASONS}, got {reason!r}")
        extra: dict[str, Any] = {}
        if steps_done is not None:
            extra["steps_done"] = int(steps_done)
        if last_step_at is not None:
            extra["last_step_at"] = float(last_step_at)
        return self.append(
            "segment_ended",
            time=ended_at,
            segment_id=str(segment_id),
            reason=reason,
            ended_at=float(ended_at),
            source=source,
            **extra,
        )

    def checkpoint_committed(
        self,
        *,
        segment_id: str,
        step: int,
        committed_at: float,
        stall_s: float,
        save_s: float,
        nbytes: int,
        captured_at: float | None = None,
    ) -> dict:
        """A checkpoint was committed; ``stall_s`` is how long training paused for it and
        ``captured_at`` when its state was taken (an async save commits later)."""
        return self.append(
            "checkpoint_committed",
            time=committed_at,
            segment_id=str(segment_id),
            step=int(step),
            committed_at=float(committed_at),
            stall_s=float(stall_s),
            save_s=float(save_s),
            nbytes=int(nbytes),
            **({} if captured_at is None else {"captured_at": float(captured_at)}),
        )

    def training_resumed(
        self, *, segment_id: str, step: int, process_started_at: float, first_step_at: float
    ) -> dict:
        """The first training step after restore ran (step 0 in a fresh run)."""
        return self.append(
            "training_resumed",
            time=first_step_at,
            segment_id=str(segment_id),
            step=int(step),
            process_started_at=float(process_started_at),
            first_step_at=float(first_step_at),
        )

    def notice_received(
        self,
        *,
        segment_id: str,
        source: str,
        action: str,
        notice_time: float | None,
        detected_at: float,
        deadline: float | None,
    ) -> dict:
        """An interruption notice (or rebalance recommendation) reached the process."""
        return self.append(
            "notice_received",
            time=detected_at,
            segment_id=str(segment_id),
            source=source,
            action=action,
            notice_time=None if notice_time is None else float(notice_time),
            detected_at=float(detected_at),
            deadline=None if deadline is None else float(deadline),
        )
