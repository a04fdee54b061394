"""A run's console output, shipped to the run URL in whole chunks, and read back from anywhere.

Layout (the one place it is spelled: :func:`log_chunk_path`)::

    RUN_URL/logs/<segment>/node-<N>/<seq>.log

``<segment>`` is the launcher's segment id (``sim-3`` locally, the instance or job attempt
on EC2), ``<N>`` the node rank and ``<seq>`` a zero-padded chunk number counting from
``000000``. Each chunk is written whole with :meth:`Storage.write_bytes` (an atomic replace on
local disk, one PUT on S3), so a reader sees whole chunks or none; chunks of one node are
written one after the other, so a reader that finds chunk ``k`` has every chunk before it.

Writing: a :class:`LogShipper` buffers what a command prints and ships it from a background
thread, every ``flush_s`` seconds or ``max_chunk_bytes``, whichever comes first. Shipping never
breaks or blocks the command: a failed write is retried later (warnings rate-limited), and
while the store is down memory stays bounded (the oldest unshipped bytes are dropped past
``max_buffer_bytes``, and a ``[spotrun: N bytes of output dropped]`` line marks the gap).

On an instance the boot script pipes the command through the entry point::

    CMD 2>&1 | python -m spotrun.launch.logs ship --segment S --node R

which echoes to its stdout, ships, ignores the shutdown signals (so it reads until the
command's last byte and flushes it) and always exits 0 (under ``set -o pipefail`` the
pipeline's status stays the command's).

Reading: :func:`list_log_chunks`, :func:`read_logs` and :func:`follow_logs`, in the order the
launcher started the segments, then node, then chunk.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from ..errors import ConfigError, SpotrunError, StorageNotFoundError
from ..records.layout import DONE_MARKER, LOGS_DIR
from ..storage import MiB, Storage

if TYPE_CHECKING:
    from ..records.launch_state import LaunchState

__all__ = [
    "DEFAULT_FLUSH_S",
    "DEFAULT_MAX_BUFFER_BYTES",
    "DEFAULT_MAX_CHUNK_BYTES",
    "LogChunk",
    "LogShipper",
    "check_log_selection",
    "follow_logs",
    "list_log_chunks",
    "list_log_sources",
    "log_chunk_path",
    "main",
    "pump_in_thread",
    "read_logs",
    "require_run",
    "ship_stream",
    "with_headers",
]

log = logging.getLogger("spotrun.launch.logs")

DEFAULT_FLUSH_S = 5.0
DEFAULT_MAX_CHUNK_BYTES = 1 * MiB
#: Unshipped output kept while the store is unreachable (about 64 MiB: hours of a chatty log).
DEFAULT_MAX_BUFFER_BYTES = 64 * MiB
SEQ_DIGITS = 6
_READ_SIZE = 64 * 1024
# Segment ids become folder names: nothing that could climb out of logs/ or hide.
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_NODE_RE = re.compile(r"^node-(\d+)$")
_CHUNK_RE = re.compile(r"^(\d+)\.log$")
#: How long ``follow_logs`` keeps polling after the run ended, for the last chunks (at least).
FOLLOW_GRACE_S = 5.0
# At most one "shipping failed" warning this often per shipper (the first always shows).
_WARN_EVERY_S = 60.0


def _check_segment(segment: str) -> str:
    if not isinstance(segment, str) or not _SEGMENT_RE.match(segment):
        raise ConfigError(
            f"log segment id {segment!r} is not a plain name; use letters, digits, '.', '_' "
            "and '-' (e.g. sim-3 or an instance id)"
        )
    return segment


def _check_node(node: int) -> int:
    if isinstance(node, bool) or not isinstance(node, int) or node < 0:
        raise ConfigError(f"node rank {node!r} must be an integer >= 0")
    return node


def log_chunk_path(segment: str, node: int, seq: int) -> str:
    """The run-relative path of chunk ``seq`` of ``node``'s output in ``segment``.

    The only place the layout is spelled; ``seq`` is zero-padded so names sort like numbers
    (readers still sort by value, so a run past a million chunks stays in order).
    """
    return f"{_node_dir(_check_segment(segment), _check_node(node))}/{seq:0{SEQ_DIGITS}d}.log"


def _node_dir(segment: str, node: int) -> str:
    return f"{LOGS_DIR}/{segment}/node-{node}"


# -- writing ---------------------------------------------------------------------------


class _ByteQueue:
    """Unshipped output as a queue of the pieces written, with their total.

    Not one ``bytearray``: dropping its oldest bytes only moves its start, and the next
    append past the end of its allocation copies the whole buffer into a new one while the
    old is still held, so a full 64 MiB buffer cost about twice that at its peaks. Here a
    dropped piece is freed at once and nothing is ever copied whole.
    """

    def __init__(self) -> None:
        self._pieces: deque[bytes] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        if data:
            self._pieces.append(bytes(data))
            self._size += len(data)

    def drop(self, n: int) -> None:
        """Forget the oldest ``n`` bytes (all of them when there are fewer)."""
        while n > 0 and self._pieces:
            piece = self._pieces.popleft()
            if len(piece) > n:
                self._pieces.appendleft(piece[n:])
                self._size -= n
                return
            self._size -= len(piece)
            n -= len(piece)

    def take(self, n: int) -> bytes:
        """Remove and return the oldest ``n`` bytes (fewer when there are fewer)."""
        parts: list[bytes] = []
        while n > 0 and self._pieces:
            piece = self._pieces.popleft()
            if len(piece) > n:
                self._pieces.appendleft(piece[n:])
                piece = piece[:n]
            parts.append(piece)
            n -= len(piece)
            self._size -= len(piece)
        return b"".join(parts)


class LogShipper:
    """Ship a byte stream to ``RUN_URL/logs/<segment>/node-<node>/`` in whole chunks.

    :meth:`write` returns at once (it echoes, appends to a buffer and wakes the shipping
    thread); the thread writes a chunk when ``max_chunk_bytes`` are waiting or ``flush_s``
    seconds after the first byte not yet shipped. A chunk that fails to write is retried
    (same number, same bytes, so a PUT that succeeded but reported a failure is harmless)
    before any later one, with a backoff up to ``max(flush_s, 30)`` seconds; a warning goes to the
    ``spotrun`` logger, at most once a minute. Past ``max_buffer_bytes`` of unshipped output
    the oldest is dropped and the next chunk starts with a one-line marker saying how much.

    Args:
        storage: the run URL.
        segment: the launcher's segment id.
        node: the node rank.
        flush_s: the longest a byte waits before its chunk is written (while the store works).
        max_chunk_bytes: the largest chunk.
        max_buffer_bytes: the most unshipped output kept in memory.
        echo: a stream that also gets every byte, at once (the terminal, a local log file);
            when writing to it fails it is dropped, with one warning.
        start_seq: the first chunk number (0 for a new segment).
        resolve: when the destination is not known yet (a node of a multi-node job learns its
            attempt and rank from its cluster file, after its output has begun): called
            before each chunk until it returns ``(segment, node)``; output waits in memory
            meanwhile (bounded as above). ``segment``/``node`` are the fallback used when it
            still has no answer at :meth:`close`.
    """

    def __init__(
        self,
        storage: Storage,
        segment: str,
        node: int = 0,
        *,
        flush_s: float = DEFAULT_FLUSH_S,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        echo: BinaryIO | None = None,
        start_seq: int = 0,
        resolve: Callable[[], tuple[str, int] | None] | None = None,
    ) -> None:
        if flush_s <= 0:
            raise ConfigError(f"flush_s={flush_s} must be > 0 seconds, e.g. 5")
        if max_chunk_bytes < 1:
            raise ConfigError(f"max_chunk_bytes={max_chunk_bytes} must be >= 1, e.g. 1 MiB")
        if max_buffer_bytes < max_chunk_bytes:
            raise ConfigError(
                f"max_buffer_bytes={max_buffer_bytes} must be >= max_chunk_bytes={max_chunk_bytes}"
            )
        self.storage = storage
        self.segment = _check_segment(segment)
        self.node = _check_node(node)
        self.flush_s = float(flush_s)
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.max_buffer_bytes = int(max_buffer_bytes)
        self._echo = echo
        self._resolve = resolve
        self._cond = threading.Condition()
        # Unshipped output, never more than max_buffer_bytes of it (the chunk in flight,
        # _pending, is no longer in it).
        self._buf = _ByteQueue()
        # Monotonic time of the oldest byte in _buf (None when empty).
        self._first_at: float | None = None
        # The chunk being written or waiting for a retry: (seq, bytes). It leaves the buffer
        # when taken, so dropping old output never touches bytes that may already be stored.
        self._pending: tuple[int, bytes] | None = None
        self._retry_at = 0.0
        self._failures = 0
        self._warned_at: float | None = None
        self._suppressed = 0
        self._dropped = 0  # dropped since the last marker
        self._seq = int(start_seq)
        self._closing = False
        self._close_deadline: float | None = None
        self._closed = False
        #: Totals, for callers and tests.
        self.bytes_written = 0
        self.bytes_shipped = 0
        self.bytes_dropped = 0
        self.chunks_shipped = 0
        self._thread = threading.Thread(
            target=self._run, name=f"spotrun-logs-{segment}-node-{node}", daemon=True
        )
        self._thread.start()

    # -- the writer's side ---------------------------------------------------------------

    def write(self, data: bytes) -> int:
        """Echo ``data`` and queue it for shipping; never blocks on the store, never raises
        for a failing store or echo. Returns ``len(data)``."""
        n = len(data)
        if not n:
            return 0
        self._echo_write(data)
        with self._cond:
            self.bytes_written += n
            if self._closed:
                # A late writer (a grandchild still holding the pipe) after close: echoed only.
                self.bytes_dropped += n
                return n
            wake = not self._buf  # the thread sleeps untimed while there is nothing to ship
            if wake:
                self._first_at = time.monotonic()
            if n > self.max_buffer_bytes:  # only its newest bytes can be kept
                data = data[n - self.max_buffer_bytes:]
                self._dropped += n - len(data)
                self.bytes_dropped += n - len(data)
            # Make room first: the queue never holds more than the bound, not even briefly.
            over = len(self._buf) + len(data) - self.max_buffer_bytes
            if over > 0:
                self._buf.drop(over)
                self._dropped += over
                self.bytes_dropped += over
            self._buf.append(data)
            if wake or len(self._buf) >= self.max_chunk_bytes:
                self._cond.notify_all()
        return n

    def _echo_write(self, data: bytes) -> None:
        echo = self._echo
        if echo is None:
            return
        try:
            echo.write(data)
            echo.flush()
        except (OSError, ValueError) as exc:
            # A closed terminal or a full disk must not stop the shipping (or the command).
            self._echo = None
            log.warning("echoing the command's output stopped (%s: %s); "
                        "it is still shipped to %s", type(exc).__name__, exc,
                        self.storage.display(_node_dir(self.segment, self.node)))

    def flush(self) -> None:
        """Ask for the buffered output to be shipped now (does not wait for it)."""
        with self._cond:
            if self._buf:
                self._first_at = float("-inf")
            self._cond.notify_all()

    def close(self, timeout: float = 60.0) -> bool:
        """Ship everything written so far and stop the thread.

        Retries failing writes until ``timeout`` seconds have passed, then gives up with a
        warning naming how much was not shipped. Returns whether everything was shipped.
        Idempotent.
        """
        with self._cond:
            if not self._closing:
                self._closing = True
                self._close_deadline = time.monotonic() + max(0.0, timeout)
                self._retry_at = 0.0  # a failed chunk gets one more try at once
            self._cond.notify_all()
        self._thread.join(max(0.0, timeout) + 30.0)
        with self._cond:
            self._closed = True
            left = len(self._buf) + (len(self._pending[1]) if self._pending else 0)
            if left:
                self.bytes_dropped += left
                log.warning("%d bytes of output were not shipped to %s: the store kept "
                            "failing for %.0fs after the command ended; they are in the local "
                            "log only", left, self.storage.display(_node_dir(self.segment, self.node)),
                            timeout)
            return not left

    def __enter__(self) -> LogShipper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the shipping thread -------------------------------------------------------------

    def _due(self, now: float) -> float | None:
        """Seconds until there is something to do (0: now), None: nothing until woken."""
        if self._pending is not None:
            return max(0.0, self._retry_at - now)
        if not self._buf and not self._dropped:
            return None
        if self._closing or len(self._buf) >= self.max_chunk_bytes:
            return 0.0
        start = self._first_at if self._first_at is not None else now
        return max(0.0, start + self.flush_s - now)

    def _take(self) -> None:
        """Move the next chunk out of the buffer into ``_pending`` (lock held)."""
        marker = b""
        if self._dropped:
            marker = f"[spotrun: {self._dropped} bytes of output dropped]\n".encode()
            self._dropped = 0
        body = self._buf.take(self.max_chunk_bytes)
        # The rest (if any) is older than flush_s too: keep its clock, so it goes out next.
        self._first_at = self._first_at if self._buf else None
        self._pending = (self._seq, marker + body)
        self._seq += 1

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    wait = self._due(now)
                    if self._closing and (
                        wait is None or (self._close_deadline is not None and now >= self._close_deadline)
                    ):
                        return
                    if wait == 0.0:
                        break
                    if self._closing and self._close_deadline is not None:
                        wait = min(wait if wait is not None else float("inf"), self._close_deadline - now)
                    self._cond.wait(wait)
                if self._pending is None:
                    self._take()
                seq, data = self._pending  # type: ignore[misc]
            if self._resolve is not None and not self._resolved():
                with self._cond:  # not known yet: the output waits (no warning, no backoff)
                    self._retry_at = time.monotonic() + min(self.flush_s, 1.0)
                continue
            try:
                self.storage.write_bytes(log_chunk_path(self.segment, self.node, seq), data)
            except Exception as exc:  # noqa: BLE001 - nothing may stop the shipping thread
                with self._cond:
                    self._failures += 1
                    backoff = min(self.flush_s * 2 ** min(self._failures - 1, 10), max(self.flush_s, 30.0))
                    self._retry_at = time.monotonic() + backoff
                self._warn(seq, exc)
                continue
            with self._cond:
                self._pending = None
                self._failures = 0
                self.bytes_shipped += len(data)
                self.chunks_shipped += 1
                self._cond.notify_all()

    def _resolved(self) -> bool:
        """Whether the destination is known (asks ``resolve``; at close, takes the fallback)."""
        try:
            found = self._resolve() if self._resolve is not None else None
            if found is not None:
                found = _check_segment(found[0]), _check_node(found[1])
        except ConfigError as exc:
            # A cluster file that names no usable destination (e.g. a segment that would
            # climb out of logs/) will not get better: ship under our own name instead.
            log.warning("%s; shipping the logs to %s instead", exc,
                        self.storage.display(_node_dir(self.segment, self.node)))
            self._resolve = None
            return True
        except Exception as exc:  # noqa: BLE001 - a failing lookup is a "not yet"
            log.debug("log destination not known yet: %s", exc)
            found = None
        if found is None and not self._closing:
            return False
        if found is not None:
            self.segment, self.node = found
        self._resolve = None
        return True

    def _warn(self, seq: int, exc: BaseException) -> None:
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < _WARN_EVERY_S:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more failures since the last warning)" if self._suppressed else ""
        self._warned_at, self._suppressed = now, 0
        text = str(exc).splitlines()[0] if str(exc) else ""
        with self._cond:
            waiting = len(self._buf) + (len(self._pending[1]) if self._pending else 0)
        log.warning(
            "shipping log chunk %d to %s failed (%s%s)%s; retrying, %d bytes waiting "
            "(the command is unaffected; past %d MiB the oldest output is dropped)",
            seq, self.storage.display(_node_dir(self.segment, self.node)), type(exc).__name__,
            f": {text}" if text else "", more, waiting, self.max_buffer_bytes // MiB,
        )


def ship_stream(src: BinaryIO, shipper: LogShipper) -> int:
    """Read ``src`` until end of file into ``shipper``; returns the bytes read.

    Reads whatever is there (``os.read`` on the file descriptor, else ``read1``), so a
    partial line shows up as soon as it is written, not after 64 KiB.
    """
    total = 0
    try:
        fd = src.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    while True:
        if fd is not None:
            data = os.read(fd, _READ_SIZE)
        elif hasattr(src, "read1"):
            data = src.read1(_READ_SIZE)
        else:
            data = src.read(_READ_SIZE)
        if not data:
            return total
        total += len(data)
        shipper.write(data)


def pump_in_thread(src: BinaryIO, shipper: LogShipper) -> threading.Thread:
    """Start a daemon thread running ``ship_stream(src, shipper)``; returns it.

    A read error ends the thread with a warning (the shipper keeps what it got).
    """

    def pump() -> None:
        try:
            ship_stream(src, shipper)
        except (OSError, ValueError) as exc:
            log.warning("reading the command's output stopped (%s: %s)", type(exc).__name__, exc)

    thread = threading.Thread(target=pump, name="spotrun-logs-pump", daemon=True)
    thread.start()
    return thread


# -- reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LogChunk:
    """One stored chunk: where it belongs and where it is."""

    segment: str
    node: int
    seq: int

    @property
    def path(self) -> str:
        return log_chunk_path(self.segment, self.node, self.seq)


def _natural_key(name: str) -> list[int | str]:
    # re.split with a group alternates text, number, text...: positions always compare alike.
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", name))]


def _load_state_quietly(storage: Storage) -> LaunchState | None:
    from ..records.launch_state import load_state

    try:
        return load_state(storage)
    except SpotrunError as exc:
        log.debug("launch state unreadable (%s); ordering log segments by name", exc)
        return None


def _segment_order(names: Iterable[str], state: LaunchState | None) -> list[str]:
    """``names`` in the order the launcher started them (its state), others after, by name
    with numbers compared as numbers (``sim-10`` after ``sim-9``)."""
    known: dict[str, int] = {}
    if state is not None:
        for i, seg in enumerate(state.segments):
            known.setdefault(seg.segment_id, i)
            if seg.group is not None:  # a multi-node attempt ships its logs under its group
                known.setdefault(seg.group, i)
    return sorted(names, key=lambda n: (0, known[n], []) if n in known else (1, 0, _natural_key(n)))


def _segments(storage: Storage, state: LaunchState | None = None) -> list[str]:
    names = [n for n in storage.list_dir(LOGS_DIR) if _SEGMENT_RE.match(n)]
    return _segment_order(names, state if state is not None else _load_state_quietly(storage))


def _nodes(storage: Storage, segment: str) -> list[int]:
    found = (_NODE_RE.match(n) for n in storage.list_dir(f"{LOGS_DIR}/{segment}"))
    return sorted(int(m.group(1)) for m in found if m)


def _seqs(storage: Storage, segment: str, node: int) -> list[int]:
    found = (_CHUNK_RE.match(n) for n in storage.list_dir(_node_dir(segment, node)))
    return sorted(int(m.group(1)) for m in found if m)


def list_log_sources(storage: Storage) -> list[tuple[str, list[int]]]:
    """Every segment with logs, in launch order, with its node ranks."""
    return [(seg, _nodes(storage, seg)) for seg in _segments(storage)]


def require_run(storage: Storage) -> None:
    """Raise a one-line error when nothing at all is stored at the run URL."""
    if not storage.list_dir(""):
        raise StorageNotFoundError(
            f"no run at {storage.display()}: nothing is stored there; check the run URL"
        )


def check_log_selection(
    storage: Storage, segment: str | None = None, node: int | None = None
) -> list[tuple[str, int]]:
    """The ``(segment, node)`` pairs with logs that the selection covers, in order.

    Raises one-line errors for a run with no logs at all, or a ``segment``/``node`` with
    none (listing the known ones).
    """
    sources = list_log_sources(storage)
    if not sources:
        require_run(storage)
        raise StorageNotFoundError(
            f"no logs under {storage.display(LOGS_DIR)}: nothing was shipped there (a run "
            "started by `spotrun launch` ships its output as it runs); check the run URL"
        )
    if segment is not None and segment not in {s for s, _ in sources}:
        raise ConfigError(
            f"no segment {segment!r} in the logs of {storage.display()}; known segments: "
            + ", ".join(s for s, _ in sources)
        )
    if node is not None:
        nodes = sorted({n for s, ns in sources if segment in (None, s) for n in ns})
        if node not in nodes:
            where = f"segment {segment!r}" if segment is not None else "any segment"
            raise ConfigError(
                f"no node {node} in {where} of {storage.display()}; known nodes: "
                + ", ".join(str(n) for n in nodes)
            )
    return [(s, n) for s, ns in sources if segment in (None, s) for n in ns if node in (None, n)]


def list_log_chunks(
    storage: Storage, segment: str | None = None, node: int | None = None, *,
    state: LaunchState | None = None,
) -> list[LogChunk]:
    """The stored chunks, in order: segment (launch order), node, chunk number.

    ``segment``/``node`` narrow the listing; an unknown one gives an empty list. ``state``:
    the launch state, when the caller has just read it (else it is read here, for the order).
    """
    if segment is not None:
        _check_segment(segment)
    chunks: list[LogChunk] = []
    for seg in _segments(storage, state):
        if segment is not None and seg != segment:
            continue
        for n in _nodes(storage, seg):
            if node is not None and n != node:
                continue
            chunks.extend(LogChunk(seg, n, q) for q in _seqs(storage, seg, n))
    return chunks


def read_logs(
    storage: Storage, *, segment: str | None = None, node: int | None = None
) -> Iterator[tuple[str, int, bytes]]:
    """``(segment, node, bytes)`` per stored chunk, in :func:`list_log_chunks` order."""
    for chunk in list_log_chunks(storage, segment, node):
        yield chunk.segment, chunk.node, bytes(storage.read_bytes(chunk.path))


def _run_over(storage: Storage, state: LaunchState | None) -> bool:
    """Whether the run has ended: the launcher stopped running it, or ``done.json`` exists."""
    from ..records.launch_state import RunStatus

    if state is not None and state.status != RunStatus.RUNNING:
        return True
    return storage.exists(DONE_MARKER)


def follow_logs(
    storage: Storage,
    *,
    segment: str | None = None,
    node: int | None = None,
    interval: float = 2.0,
    grace: float | None = None,
    stop: threading.Event | None = None,
) -> Iterator[tuple[str, int, bytes]]:
    """Like :func:`read_logs`, then keep polling every ``interval`` seconds for new chunks
    and new segments until the run is over.

    The run is over when ``done.json`` exists or the launch state's status is no longer
    ``running``; the last chunks are shipped just after that (the shipper flushes when the
    command's output ends), so polling goes on until a poll finds nothing new and ``grace``
    seconds (default: ``max(2 x interval, FOLLOW_GRACE_S)``, 5 s) have passed since the end was seen. Within
    one node, chunks come in number order and never past a missing one (until the end).
    ``stop`` (an event) ends it early; so does Ctrl-C (KeyboardInterrupt, from the wait).
    """
    if segment is not None:
        _check_segment(segment)
    grace = max(2 * interval, FOLLOW_GRACE_S) if grace is None else grace
    stop = stop or threading.Event()
    next_seq: dict[tuple[str, int], int] = {}
    over_at: float | None = None
    while not stop.is_set():
        # Decide "over" before listing: whatever was shipped before the end is then listed.
        state = _load_state_quietly(storage)
        if over_at is None and _run_over(storage, state):
            over_at = time.monotonic()
        found = False
        for chunk in list_log_chunks(storage, segment, node, state=state):
            key = (chunk.segment, chunk.node)
            want = next_seq.get(key, 0)
            if chunk.seq < want:
                continue
            if chunk.seq > want and over_at is None:
                continue  # a later chunk before an earlier one is listed: wait for it
            data = bytes(storage.read_bytes(chunk.path))
            next_seq[key] = chunk.seq + 1
            found = True
            yield chunk.segment, chunk.node, data
        if over_at is not None and not found and time.monotonic() - over_at >= grace:
            return
        stop.wait(interval)


def with_headers(
    chunks: Iterable[tuple[str, int, bytes]], *, headers: bool
) -> Iterator[bytes]:
    """The bytes of ``chunks``; with ``headers``, a ``==> sim-2 node-0 <==`` line (like
    ``tail``) before the output of each segment and node, on a line of its own."""
    current: tuple[str, int] | None = None
    last = b"\n"
    for seg, n, data in chunks:
        if headers and (seg, n) != current:
            lead = (b"" if last == b"\n" else b"\n") + (b"\n" if current is not None else b"")
            yield lead + f"==> {seg} node-{n} <==\n".encode()
            current, last = (seg, n), b"\n"
        if data:
            last = data[-1:]
            yield data


# -- the instance side: python -m spotrun.launch.logs ship ----------------------------------


def _ship_main(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    shipper: LogShipper | None = None
    try:
        from ..storage import open_storage

        storage = open_storage(args.run_url)
        resolve = _cluster_resolver(storage, args.cluster_instance) if args.cluster_instance else None
        shipper = LogShipper(storage, args.segment, args.node, flush_s=args.flush_s, echo=out,
                             resolve=resolve)
    except Exception as exc:  # noqa: BLE001 - the command's output must flow whatever happens
        log.warning("not shipping logs (%s: %s); echoing only", type(exc).__name__, exc)
    src = sys.stdin.buffer
    try:
        if shipper is not None:
            ship_stream(src, shipper)
        else:
            _echo_only(src, out)
    except (OSError, ValueError) as exc:
        log.warning("reading the command's output stopped (%s: %s)", type(exc).__name__, exc)
    finally:
        if shipper is not None:
            shipper.close(timeout=args.close_timeout)
    return 0


def _cluster_resolver(storage: Storage, instance_id: str) -> Callable[[], tuple[str, int] | None]:
    """``(attempt, node index)`` from the node's cluster file, once the launcher wrote it."""
    from .node import read_cluster

    def resolve() -> tuple[str, int] | None:
        spec = read_cluster(storage, instance_id)
        if spec is None:
            return None
        ids = [n["instance_id"] for n in spec.nodes]
        return spec.segment, ids.index(instance_id)

    return resolve


def _echo_only(src: BinaryIO, out: BinaryIO) -> None:
    fd = src.fileno()
    while True:
        data = os.read(fd, _READ_SIZE)
        if not data:
            return
        try:
            out.write(data)
            out.flush()
        except (OSError, ValueError):
            pass  # keep reading: a writer blocked on a full pipe would hang the command


def main(argv: list[str] | None = None) -> int:
    """``python -m spotrun.launch.logs ship ...``: see the module docstring. Exits 0."""
    # First: an instance shutting down signals every process; this one must keep reading
    # until the command's output ends and ship the last chunk.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    parser = argparse.ArgumentParser(
        prog="python -m spotrun.launch.logs",
        description="Ship a command's output to RUN_URL/logs/ while echoing it.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ship", help="read stdin until EOF, echo it to stdout, ship it in chunks; exit 0",
                       description="Read stdin until end of file, echo it to stdout and ship it to "
                       "RUN_URL/logs/SEGMENT/node-NODE/. Ignores SIGTERM, SIGINT and SIGHUP; exits 0 "
                       "even when shipping failed. Use as: CMD 2>&1 | python -m spotrun.launch.logs "
                       "ship --segment S --node R, under set -o pipefail.")
    p.add_argument("--segment", required=True, help="the launcher's segment id")
    p.add_argument("--node", type=int, default=0, help="the node rank (default 0)")
    p.add_argument("--cluster-instance", metavar="INSTANCE_ID", default=None,
                   help="a node of a multi-node job: ship under the attempt and node index its "
                   "cluster file (launch/nodes/INSTANCE_ID.json) names, once it exists; "
                   "--segment/--node are the fallback")
    p.add_argument("--run-url", default=None, help="the run URL (default: $SPOTRUN_URL)")
    p.add_argument("--flush-s", type=float, default=DEFAULT_FLUSH_S,
                   help=f"seconds a byte may wait before it is shipped (default {DEFAULT_FLUSH_S:g})")
    p.add_argument("--close-timeout", type=float, default=60.0,
                   help="seconds to keep retrying the last chunks after end of input (default 60)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # Bad arguments must not cut the pipe: echo what comes and exit 0 all the same.
        if exc.code in (0, None):
            return 0
        _echo_only(sys.stdin.buffer, sys.stdout.buffer)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return _ship_main(args)


if __name__ == "__main__":
    sys.exit(main())
