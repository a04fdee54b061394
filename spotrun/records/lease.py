"""One writer per run: a lease under the run URL (:data:`spotrun.records.layout.LEASE`).

Two trainers on one run URL would write the same step folders and prune each other's
checkpoints. So the trainer (rank 0 of it; other ranks never touch the lease) holds a lease
while it may write: who it is (segment id, host, pid), when it last renewed it, when it
expires. A second trainer is refused with :class:`~spotrun.errors.LeaseHeldError` naming the
owner. Every change is a compare-and-swap on the version last read
(:meth:`Storage.replace_tagged`: S3 conditional writes, an atomic create elsewhere), so two
writers can never both win a race for it.

Taking over. A lease may be taken over when it was released (a clean exit, including exit 75
after the stop checkpoint); when its owner is provably gone (its pid is dead on this host);
when a launcher says its segment's process ended (``SPOTRUN_LEASE_TAKEOVER``); or when it
expired (no heartbeat for ``SPOTRUN_LEASE_TTL`` seconds, 30 by default). A new writer that
finds a lease it cannot prove dead watches it: renewed means a live owner (refused at once),
expired means a dead one (taken over), so a relaunch after a kill -9 elsewhere waits at most
the rest of the TTL. Expiry compares the owner's clock with this one: renewals every TTL / 3
leave two thirds of the TTL to absorb clock skew.

Losing it. The owner renews from a daemon thread. If a renewal finds that someone else took
the lease (the owner was stalled past its expiry), the owner logs it and its next save raises
:class:`~spotrun.errors.LeaseLostError`; every save also re-reads the lease just before it
writes its payload and again before its manifest, so a lost writer stops at once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from ..config import env_float, env_str
from ..errors import (
    ConfigError,
    LeaseError,
    LeaseHeldError,
    LeaseLostError,
    SpotrunError,
)
from ..procfs import pid_gone, pid_started
from ..storage import Storage
from .layout import LAUNCH_DIR, LEASE, LEDGER_DIR, parse_step

__all__ = [
    "DEFAULT_TTL_S",
    "Lease",
    "LeaseInfo",
    "acquire_run_lease",
    "clean_stale_temporaries",
    "read_lease",
    "release_run_lease",
]

log = logging.getLogger(__name__)

LEASE_FORMAT = 1
DEFAULT_TTL_S = 30.0
TAKEOVER_ENV = "SPOTRUN_LEASE_TAKEOVER"
#: A temporary older than this is an orphan whoever wrote it: live writers fill their
#: temporaries continuously and rename them away within moments of the last byte.
STALE_TMP_S = 600.0
# Temporaries of Storage's local atomic writes: ".<name>.tmp-<12 or 32 hex digits>".
_TMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{12}(?:[0-9a-f]{20})?$")

# Tokens of the leases this process holds right now: a lease naming this pid but not listed
# here was left behind by an earlier Checkpointer in this process and may be taken over.
_HELD: set[str] = set()


def _fmt_utc(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t)) + "Z"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass
class LeaseInfo:
    """One version of the lease as stored (JSON)."""

    token: str
    segment_id: str
    host: str
    pid: int
    boot_id: str
    pid_started: int | None
    world_size: int
    acquired_at: float
    renewed_at: float
    expires_at: float
    ttl_s: float
    released_at: float | None = None
    format: int = LEASE_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaseInfo:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**fields)

    def owner_text(self) -> str:
        return f"segment {self.segment_id}, pid {self.pid} on host {self.host}"

    def expired(self, now: float) -> bool:
        return self.released_at is not None or now >= self.expires_at

    def state_text(self, now: float | None = None) -> str:
        """One line for ``spotrun ls``/``status``: who holds it and until when."""
        now = time.time() if now is None else now
        if self.released_at is not None:
            return f"released by {self.owner_text()} at {_fmt_utc(self.released_at)}"
        if now >= self.expires_at:
            return (f"expired at {_fmt_utc(self.expires_at)} ({now - self.expires_at:.0f}s ago); "
                    f"last held by {self.owner_text()}")
        return (f"held by {self.owner_text()}, renewed {max(0.0, now - self.renewed_at):.0f}s ago, "
                f"expires {_fmt_utc(self.expires_at)} (in {self.expires_at - now:.0f}s)")

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        out = asdict(self)
        out.pop("token")
        now = time.time() if now is None else now
        out["state"] = ("released" if self.released_at is not None
                        else "expired" if now >= self.expires_at else "held")
        return out

    def same_machine(self) -> bool:
        if self.host != socket.gethostname():
            return False
        mine = _boot_id()
        # Hostnames repeat across machines (containers, copied images); the boot id does not.
        return not (self.boot_id and mine and self.boot_id != mine)


def read_lease(storage: Storage) -> LeaseInfo | None:
    """The run's current lease, or None when there is none (or it cannot be parsed)."""
    found = storage.read_tagged(LEASE)
    if found is None:
        return None
    try:
        return LeaseInfo.from_json(found[0])
    except (ValueError, TypeError) as exc:
        log.warning("unreadable lease at %s (%s)", storage.display(LEASE), exc)
        return None


def _owner_gone(info: LeaseInfo) -> str | None:
    """Why the owner is provably gone, or None when it may be alive."""
    if not info.same_machine():
        return None
    if info.pid == os.getpid():
        if info.token in _HELD:
            return None
        return "it was left behind by an earlier checkpointer in this process"
    if pid_gone(info.pid, info.pid_started):
        return f"its process (pid {info.pid} on this host) is gone"
    return None


class Lease:
    """This process's claim to be the run's only writer.

    Args:
        storage: the run URL.
        segment_id: the segment this process is (named in errors and ``spotrun status``).
        world_size: ranks in the run (recorded: temporaries of a run of one are provably
            dead once its process is).
        ttl_s, heartbeat_s, wait_s: default from ``SPOTRUN_LEASE_TTL``,
            ``SPOTRUN_LEASE_HEARTBEAT``, ``SPOTRUN_LEASE_WAIT`` (see :mod:`spotrun.config`).
        takeover: segment ids whose processes a launcher saw end; default from
            ``SPOTRUN_LEASE_TAKEOVER``.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        segment_id: str,
        world_size: int = 1,
        ttl_s: float | None = None,
        heartbeat_s: float | None = None,
        wait_s: float | None = None,
        takeover: set[str] | None = None,
    ) -> None:
        self.storage = storage
        self.segment_id = segment_id
        self.world_size = world_size
        self.ttl_s = env_float("SPOTRUN_LEASE_TTL", DEFAULT_TTL_S) if ttl_s is None else ttl_s
        self.heartbeat_s = (env_float("SPOTRUN_LEASE_HEARTBEAT", self.ttl_s / 3)
                            if heartbeat_s is None else heartbeat_s)
        self.wait_s = (env_float("SPOTRUN_LEASE_WAIT", self.ttl_s + self.heartbeat_s)
                       if wait_s is None else wait_s)
        if self.ttl_s <= 0:
            raise ConfigError(f"SPOTRUN_LEASE_TTL={self.ttl_s} must be positive; e.g. 30")
        if not 0 < self.heartbeat_s < self.ttl_s:
            raise ConfigError(
                f"SPOTRUN_LEASE_HEARTBEAT={self.heartbeat_s} must be above 0 and below the "
                f"lease TTL ({self.ttl_s}s); e.g. a third of it")
        if self.wait_s < 0:
            raise ConfigError(f"SPOTRUN_LEASE_WAIT={self.wait_s} must be 0 or more seconds")
        if takeover is None:
            takeover = {s.strip() for s in (env_str(TAKEOVER_ENV) or "").split(",") if s.strip()}
        self.takeover = takeover
        self.token = uuid.uuid4().hex
        self.info: LeaseInfo | None = None
        #: The lease this one replaced, and why it could be (None for a new lease).
        self.previous: LeaseInfo | None = None
        self.takeover_reason: str | None = None
        #: True when the previous owner is provably gone (not merely silent past expiry).
        self.previous_gone = False
        self._tag: str | None = None
        self._lost: LeaseLostError | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking it -------------------------------------------------------------------------

    def _new_info(self, now: float) -> LeaseInfo:
        pid = os.getpid()
        return LeaseInfo(token=self.token, segment_id=self.segment_id, host=socket.gethostname(),
                         pid=pid, boot_id=_boot_id(), pid_started=pid_started(pid),
                         world_size=self.world_size, acquired_at=now, renewed_at=now,
                         expires_at=now + self.ttl_s, ttl_s=self.ttl_s)

    def _read(self) -> tuple[LeaseInfo | None, str] | None:
        found = self.storage.read_tagged(LEASE)
        if found is None:
            return None
        data, tag = found
        try:
            return LeaseInfo.from_json(data), tag
        except (ValueError, TypeError) as exc:
            log.warning("unreadable lease at %s (%s); taking it over",
                        self.storage.display(LEASE), exc)
            return None, tag

    def _why_takeable(self, info: LeaseInfo | None, now: float) -> tuple[str, bool] | None:
        """Why this lease may be taken over and whether its owner is provably gone; None
        while its owner may be alive."""
        if info is None:
            return "it was unreadable", False
        if info.released_at is not None:
            return f"released at {_fmt_utc(info.released_at)}", True
        gone = _owner_gone(info)
        if gone:
            return gone, True
        if info.same_machine():
            return None  # alive on this host: no launcher's word or clock overrides that
        if info.segment_id in self.takeover:
            return f"the launcher saw segment {info.segment_id} end", True
        if now >= info.expires_at:
            why = (f"it expired at {_fmt_utc(info.expires_at)} (no heartbeat for "
                   f"{now - info.renewed_at:.0f}s)")
            return why, False
        return None

    def _won(self, info: LeaseInfo, tag: str) -> None:
        self.info, self._tag = info, tag
        _HELD.add(self.token)

    def _mine_after_all(self) -> bool:
        """After a failed conditional write: did an earlier try of it land (lost answer)?"""
        found = self._read()
        if found is not None and found[0] is not None and found[0].token == self.token:
            self._won(found[0], found[1])
            return True
        return False

    def acquire(self) -> None:
        """Become the run's writer, or raise :class:`LeaseHeldError` naming the owner."""
        give_up = time.monotonic() + self.wait_s
        watched: str | None = None
        while True:
            now = time.time()
            found = self._read()
            mine = self._new_info(now)
            if found is None:
                tag = self.storage.create_tagged(LEASE, mine.to_json())
                if tag is not None:
                    self._won(mine, tag)
                elif not self._mine_after_all():
                    continue  # another writer created it first: look at theirs
                log.info("lease on %s taken (segment %s)", self.storage.display(), self.segment_id)
                return
            info, tag = found
            takeable = self._why_takeable(info, now)
            if takeable is not None:
                why, gone = takeable
                new_tag = self.storage.replace_tagged(LEASE, mine.to_json(), tag)
                if new_tag is None and not self._mine_after_all():
                    continue  # someone else changed it first: judge the new version
                if new_tag is not None:
                    self._won(mine, new_tag)
                self.previous, self.takeover_reason, self.previous_gone = info, why, gone
                log.info("lease on %s taken over from %s: %s", self.storage.display(),
                         info.owner_text() if info else "an unreadable lease", why)
                return
            assert info is not None
            alive_here = info.same_machine()
            left = info.expires_at - now
            if alive_here or (watched is not None and tag != watched) \
                    or time.monotonic() + left > give_up:
                raise LeaseHeldError(self._held_message(info, now, alive_here))
            if watched is None:
                log.warning("%s holds the lease on %s until %s; waiting up to %.0fs to see "
                            "whether it is still alive", info.owner_text(), self.storage.display(),
                            _fmt_utc(info.expires_at), left)
                watched = tag
            time.sleep(min(1.0, max(0.05, left)))

    def _held_message(self, info: LeaseInfo, now: float, alive_here: bool) -> str:
        state = ("its process is running on this host" if alive_here else
                 f"renewed {max(0.0, now - info.renewed_at):.0f}s ago")
        return (
            f"{self.storage.display()} already has a writer: {info.owner_text()} ({state}; "
            f"its lease expires {_fmt_utc(info.expires_at)}, in {max(0.0, info.expires_at - now):.0f}s "
            f"unless renewed); a run takes one trainer at a time: stop that one or wait for it "
            f"to finish, or use another run URL (if it is gone, start again once its lease expires)"
        )

    # -- keeping it ------------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Renew every ``heartbeat_s`` from a daemon thread until released or lost."""
        self._thread = threading.Thread(target=self._beat, name="spotrun-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self._lock:
                    self._renew()
            except Exception as exc:  # noqa: BLE001 - retried next beat; check() enforces expiry
                expires = self.info.expires_at if self.info else 0.0
                log.warning("could not renew the lease on %s (%s); retrying in %.0fs (it expires "
                            "%s)", self.storage.display(), exc, self.heartbeat_s, _fmt_utc(expires))
            if self._lost is not None:
                return

    def _renew(self) -> None:
        """Extend the lease (call with the lock held); marks it lost when someone took it."""
        if self._lost is not None or self.info is None or self._tag is None:
            return
        if self._stop.is_set() and self.info.released_at is not None:
            return  # released while this renewal waited for the lock: leave it released
        now = time.time()
        info = LeaseInfo(**{**asdict(self.info), "renewed_at": now, "expires_at": now + self.ttl_s})
        tag = self.storage.replace_tagged(LEASE, info.to_json(), self._tag)
        if tag is not None:
            self.info, self._tag = info, tag
            return
        found = self._read()
        if found is not None and found[0] is not None and found[0].token == self.token:
            self.info, self._tag = found[0], found[1]
            return
        self._lose(found[0] if found else None)

    def _lose(self, thief: LeaseInfo | None) -> None:
        who = thief.owner_text() if thief else "nobody (the lease was removed)"
        self._lost = LeaseLostError(
            f"the lease on {self.storage.display()} was taken over by {who}; this process "
            f"(segment {self.segment_id}) no longer owns the run and will not write another "
            "checkpoint: stop it and let the other writer continue (earlier checkpoints are intact)"
        )
        log.error("%s", self._lost)
        _HELD.discard(self.token)
        self._stop.set()

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def check(self) -> None:
        """Before a write: confirm this process still holds the lease, or raise
        :class:`LeaseLostError`. Renews first when the heartbeat has fallen behind."""
        if self._lost is not None:
            raise self._lost
        with self._lock:
            try:
                found = self._read()
            except (SpotrunError, OSError) as exc:
                # Cannot look: the compare-and-swap still guarantees that nobody took a
                # lease before its expiry, so a lease well inside its time is still ours.
                if self.info is not None and time.time() < self.info.expires_at - self.heartbeat_s:
                    log.debug("could not re-read the lease (%s); it is ours until %s", exc,
                              _fmt_utc(self.info.expires_at))
                    return
                raise
            if found is None or found[0] is None or found[0].token != self.token:
                self._lose(found[0] if found else None)
            else:
                self.info, self._tag = found[0], found[1]
                if time.time() > self.info.expires_at - self.heartbeat_s:
                    self._renew()
        if self._lost is not None:
            raise self._lost

    # -- letting go ------------------------------------------------------------------------

    def stop_heartbeat(self) -> None:
        # No join: a renewal in flight finishes under the lock and then sees the stop flag,
        # and a second Ctrl-C must not wait for a slow storage call.
        self._stop.set()

    def release(self) -> None:
        """Mark the lease released so the next writer takes it at once (a clean exit)."""
        self.stop_heartbeat()
        _HELD.discard(self.token)
        with self._lock:
            if self._lost is not None or self.info is None or self._tag is None:
                return
            now = time.time()
            info = LeaseInfo(**{**asdict(self.info), "released_at": now, "expires_at": now})
            try:
                tag = self.storage.replace_tagged(LEASE, info.to_json(), self._tag)
            except SpotrunError as exc:
                log.warning("could not release the lease on %s (%s); the next writer takes it "
                            "over when it expires at %s", self.storage.display(), exc,
                            _fmt_utc(self.info.expires_at))
                return
            if tag is None:
                log.warning("the lease on %s had been taken over before release", self.storage.display())
                return
            self.info, self._tag = info, tag
            log.debug("lease on %s released", self.storage.display())


# -- the Checkpointer's use ----------------------------------------------------------------


def acquire_run_lease(storage: Storage, group: Any, segment_id: str) -> Lease | None:
    """Rank 0 takes the lease (and cleans stale temporaries); every rank learns the outcome.

    Returns the lease on rank 0, None on other ranks. Raises on every rank when rank 0
    could not take it, so no rank is left waiting in a collective.
    """
    lease: Lease | None = None
    failure: BaseException | None = None
    if group.is_main:
        try:
            lease = Lease(storage, segment_id=segment_id, world_size=group.world_size)
            lease.acquire()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the others
            failure, lease = exc, None
    if group.distributed:
        message = group.broadcast(None if failure is None else str(failure))
        if message is not None and failure is None:
            raise LeaseError(f"rank 0 could not take the run's lease: {message}")
    if failure is not None:
        raise failure
    if lease is not None:
        lease.start_heartbeat()
        try:
            clean_stale_temporaries(storage, writer_gone=lease.previous_gone and (
                lease.previous is not None and lease.previous.world_size == 1))
        except Exception as exc:  # noqa: BLE001 - tidying must never stop a run
            log.warning("could not clean stale temporaries at %s: %s", storage.display(), exc)
    return lease


def release_run_lease(lease: Lease | None, *, writing: bool) -> None:
    """On leaving the Checkpointer: release, unless a save may still be writing (then the
    lease just stops being renewed and expires, or is taken over once this process is gone)."""
    if lease is None:
        return
    if writing:
        lease.stop_heartbeat()
    else:
        lease.release()


# -- item: stale temporaries ---------------------------------------------------------------


def clean_stale_temporaries(storage: Storage, *, writer_gone: bool,
                            now: float | None = None) -> tuple[int, int]:
    """Delete temporaries that dead writers left behind; returns (files, bytes) removed.

    Call only while holding the lease. The rule: a temporary in a checkpoint folder, the
    run folder or the lease folder is removed when ``writer_gone``: the writer the lease
    came from is provably gone (it released the lease, or its pid died on this host, or a
    launcher saw it end) and ran as a single process, since no one else writes there
    (a lease that merely expired proves nothing: its owner may be stalled); otherwise, and
    always under ``ledger/`` and ``launch/`` (which the launcher and every rank write
    without the lease), only when untouched for :data:`STALE_TMP_S` seconds. A live writer
    fills its temporary continuously and renames it within moments of its last byte, so an
    old one is an orphan (e.g. the 0-byte ledger temporaries a full disk leaves).

    Local disk only: object stores have no temporaries (an object appears whole or not at
    all).
    """
    if not storage.is_local:
        return 0, 0
    now = time.time() if now is None else now
    proven = writer_gone
    root = storage.full()
    folders: list[tuple[str, bool]] = [(root, proven), (os.path.join(root, LEASE), proven),
                                       (os.path.join(root, LEDGER_DIR), False),
                                       (os.path.join(root, LAUNCH_DIR), False)]
    try:
        folders += [(os.path.join(root, n), proven) for n in os.listdir(root)
                    if parse_step(n) is not None]
    except OSError:
        return 0, 0
    removed = freed = 0
    for folder, dead_writer in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if not _TMP_RE.match(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if not entry.is_file(follow_symlinks=False):
                    continue
                if not (dead_writer or now - st.st_mtime >= STALE_TMP_S):
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue  # its writer finished (or another cleaner got it) meanwhile
            removed += 1
            freed += st.st_size
            log.debug("removed stale temporary %s", entry.path)
    if removed:
        log.info("removed %d stale temporary file(s) (%.1f MiB) left by dead writers under %s",
                 removed, freed / (1 << 20), storage.display())
    return removed, freed
