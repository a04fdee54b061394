"""Payload checksums: CRC32C per 16 MiB chunk, computed while bytes are written and
verified on several cores before a byte of a checkpoint is trusted.

Why CRC32C in chunks (manifest format 2) rather than one sha256 (format 1): sha256 runs at
about 1 GB/s on one core and sat on both the save and the restore path; CRC32C runs at
memory speed (hardware instructions, SSE4.2 / ARMv8) and releases the GIL, so the chunks
of a large write or read are checked in parallel threads. Chunks also localise damage and
match S3's own per-part checksum algorithm. The checksum guards against accidental damage
(torn writes, bit rot, truncation, a file from another checkpoint), which is what the
manifest is for; like sha256 stored beside the data, it was never a defence against
someone who can rewrite both.

Manifests of format 1 (sha256) still verify: :func:`problem` checks whichever the entry
carries.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import mmap
import os
import threading
from collections.abc import Sequence
from typing import Any

import crc32c as _crc32c

from .manifest import FileEntry

__all__ = ["CHUNK", "ChunkedCRC", "digest_of", "entry_for", "problem", "problem_in_file"]

#: Bytes per checksum chunk: one manifest value per 16 MiB (a 100 GiB file lists 6400).
CHUNK = 16 << 20
# Below this a write is checksummed inline; above it the chunks go to the pool.
_PARALLEL_MIN = 4 << 20

_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _nice() -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (AttributeError, OSError):
        return 0


def pool() -> concurrent.futures.ThreadPoolExecutor:
    """The checksum threads for the calling thread (CRC32C releases the GIL, so they use
    every core).

    One pool per niceness: Linux applies nice per thread and a new thread inherits its
    creator's, and a pool's threads are started from the threads that submit to it. So
    the background writer's checksums (nice 10) yield to training like the writer itself,
    while a restore's (nice 0, training is waiting) do not.
    """
    nice = _nice()
    found = _pools.get(nice)
    if found is None:
        with _pools_lock:
            found = _pools.get(nice)
            if found is None:
                found = _pools[nice] = concurrent.futures.ThreadPoolExecutor(
                    max_workers=max(2, min(8, os.cpu_count() or 2)),
                    thread_name_prefix=f"spotrun-crc{nice}")
    return found


def _forget_pools() -> None:
    # A forked child inherits the pool objects but not their threads: work sent to them
    # would never run. Start new pools there on first use.
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _crc(view: Any, value: int = 0) -> int:
    return int(_crc32c.crc32c(view, value))


def _hex(values: Sequence[int]) -> tuple[str, ...]:
    return tuple(f"{v:08x}" for v in values)


class ChunkedCRC:
    """CRC32C of every ``CHUNK`` bytes of a stream, fed in writes of any size.

    A large write is split at chunk boundaries and its pieces checksummed on the pool
    while the caller writes the bytes (:meth:`start` / :meth:`finish`), so checksumming
    costs the writer no time of its own.
    """

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        self.size = 0
        self._done: list[int] = []
        self._crc = 0
        self._fill = 0

    def _pieces(self, view: memoryview) -> list[tuple[memoryview, int, bool]]:
        """``(piece, seed, closes_chunk)`` for ``view``: seed is the running CRC for a
        piece continuing the open chunk, 0 for one starting a new chunk."""
        out = []
        pos, fill, n = 0, self._fill, view.nbytes
        while pos < n:
            take = min(self.chunk - fill, n - pos)
            out.append((view[pos : pos + take], self._crc if pos == 0 else 0,
                        fill + take == self.chunk))
            pos += take
            fill = 0
        return out

    def start(self, view: memoryview) -> list[Any]:
        """Begin checksumming ``view`` (on the pool when large); pass the result to
        :meth:`finish` before the next :meth:`start`. ``view`` must stay unchanged until
        then."""
        pieces = self._pieces(view)
        if view.nbytes < _PARALLEL_MIN:
            out: list[Any] = [(_crc(p, seed), closes) for p, seed, closes in pieces]
        else:
            submit = pool().submit
            out = [(submit(_crc, p, seed), closes) for p, seed, closes in pieces]
        out.append(view.nbytes)
        return out

    def finish(self, pending: list[Any]) -> None:
        """Fold in the CRCs begun by :meth:`start` (waits for them)."""
        *pieces, n = pending
        for value, closes in pieces:
            crc = value if isinstance(value, int) else value.result()
            if closes:
                self._done.append(crc)
                self._crc = 0
            else:
                self._crc = crc
        self.size += n
        self._fill = self.size % self.chunk

    def update(self, data: Any) -> None:
        self.finish(self.start(memoryview(data).cast("B")))

    @property
    def values(self) -> tuple[str, ...]:
        """The chunks' CRCs as 8-digit hex strings (the last chunk may be short)."""
        return _hex(self._done + ([self._crc] if self._fill else []))

    def entry(self) -> FileEntry:
        return FileEntry(size=self.size, crc32c=self.values, chunk=self.chunk)


def _chunk_crcs(view: memoryview, chunk: int) -> list[int]:
    n = view.nbytes
    if n < _PARALLEL_MIN:
        return [_crc(view[lo : lo + chunk]) for lo in range(0, n, chunk)]
    return list(pool().map(lambda lo: _crc(view[lo : lo + chunk]), range(0, n, chunk)))


def entry_for(data: Any, chunk: int = CHUNK) -> FileEntry:
    """The manifest entry (format 2) of ``data``, checksummed on every core."""
    view = memoryview(data).cast("B")
    return FileEntry(size=view.nbytes, crc32c=_hex(_chunk_crcs(view, chunk)), chunk=chunk)


def digest_of(entry: FileEntry) -> str:
    """A short printable form of the entry's checksum, for messages."""
    if entry.chunk:
        return f"crc32c {','.join(entry.crc32c[:2])}{',...' if len(entry.crc32c) > 2 else ''}"
    return f"sha256 {entry.sha256[:12]}..."


def problem(data: Any, entry: FileEntry) -> str | None:
    """Why ``data`` does not match ``entry`` (size, then checksum), or None when it does.

    Chunks are checked on the pool, several cores at once. A format-1 entry (sha256) is
    checked with sha256.
    """
    view = memoryview(data).cast("B")
    if view.nbytes != entry.size:
        return f"{view.nbytes} bytes, manifest says {entry.size} (truncated or overwritten)"
    if entry.chunk:
        got = _hex(_chunk_crcs(view, entry.chunk))
        if got != entry.crc32c:
            bad = next((i for i, (a, b) in enumerate(zip(got, entry.crc32c, strict=False)) if a != b),
                       min(len(got), len(entry.crc32c)))
            lo = bad * entry.chunk
            return (f"crc32c of bytes {lo}-{min(lo + entry.chunk, entry.size) - 1} does not "
                    "match the manifest (corrupted)")
        return None
    if entry.sha256:
        digest = hashlib.sha256(view).hexdigest()
        if digest != entry.sha256:
            return (f"sha256 {digest[:12]}..., manifest says {entry.sha256[:12]}... "
                    "(corrupted)")
        return None
    return "manifest lists no checksum for it (damaged manifest)"


def problem_in_file(path: str, entry: FileEntry) -> str | None:
    """:func:`problem` for a local file, read through one memory map (no copy in Python)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != entry.size:
            return f"{size} bytes, manifest says {entry.size} (truncated or overwritten)"
        if size == 0:
            return problem(b"", entry)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                return problem(view, entry)
            finally:
                view.release()
