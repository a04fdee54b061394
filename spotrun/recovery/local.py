"""A node-local copy of the newest committed checkpoint, so a restart on the same machine
reads nothing from the run URL but the manifest.

The run URL stays the only commit point and the truth. While a save writes its files to the
run URL, each byte also goes to a local folder (``SPOTRUN_LOCAL_DIR``: memory such as
``/dev/shm/spotrun``, or local NVMe); once the run URL's manifest is committed, the local
folder is sealed under the step's name and older local copies are removed (a rank that did
not write the manifest seals at the commit's gather and removes them only once a later
collective proves the manifest was written: see ``Saver._committed``). A restore uses a
local copy only when every file the committed manifest lists is there with the manifest's
size and checksums; anything else (a flipped byte, a truncated file, an older step, another
run's folder, a copy some other writer left) is ignored with a log line, and the run URL is
read. Because the copy is checked byte for byte against what was committed, it does not
matter who wrote it: equal checksums are equal bytes.

The copy never costs a save: no room (a full tmpfs, a copy larger than the free space) or a
failed local write drops the copy for that step, with one warning, and the save goes on.

Layout under the local directory (the ranks of one machine share it)::

    <dir>/<run key>/run.json               the run URL (for people; the key is its hash)
    <dir>/<run key>/000000000100/...       the newest sealed copy: this machine's files of it
    <dir>/<run key>/.partial-<step>-<id>/  a rank's copy being written (gone once sealed)

A restore reads each file from the nearest place that holds it byte for byte
(:class:`NearestReader`): this machine's copy, else a peer's (what this node holds of that
step for others, then its buddy node over the peer channel, :mod:`spotrun.recovery.peer`),
else the run URL; a file no nearer source holds simply comes from the run URL.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..format.checksum import problem_in_file
from ..format.manifest import Manifest
from ..records.layout import checkpoint_dir
from ..storage.base import write_all
from ..units import format_bytes
from .localdir import DEFAULT_LOCAL_DIR, LOCAL_DIR_ENV, local_dir_from_env, room, run_key

if TYPE_CHECKING:
    from .peer import PeerLink

__all__ = ["DEFAULT_LOCAL_DIR", "LOCAL_DIR_ENV", "LocalCopy", "NearestReader", "TeeStorage", "TeeWriter"]

log = logging.getLogger(__name__)

_PARTIAL = ".partial-"
_FETCH_LOCK = ".fetch-lock-"  # one per file fetched from a peer: one rank of a machine fetches it


class LocalCopy:
    """The local copies of one run on this machine.

    Writers call :meth:`begin` before a save writes its files, write them through
    :meth:`storage`, then :meth:`seal` once the run URL committed the step (or :meth:`drop`
    when the save failed). A restore reads through :meth:`reader` with the committed manifest.
    Inside a multi-node attempt each file complete in the copy is handed to the peer link at
    once (sent to the buddy before the commit), and the rank that commits announces it in
    :meth:`seal` (see :mod:`.peer`).
    """

    def __init__(self, directory: str | os.PathLike[str], run_url: str) -> None:
        self.directory = Path(directory)
        self.run_url = run_url
        self.root = self.directory / run_key(run_url)
        self._partial: Path | None = None
        self._step: int | None = None
        self._failed: str | None = None
        #: The peer channel (set by :meth:`from_env` inside a multi-node attempt): sealed
        #: files go to the buddy, a restore asks peers before the run URL.
        self.peer: PeerLink | None = None

    @classmethod
    def from_env(cls, run_url: str) -> LocalCopy | None:
        """The local copy ``SPOTRUN_LOCAL_DIR`` asks for: unset means the default (memory,
        where ``/dev/shm`` exists), ``off`` (or ``0``, ``none``) means none."""
        directory = local_dir_from_env()
        if directory is None:
            return None
        from .peer import PeerLink

        copy = cls(directory, run_url)
        copy.peer = PeerLink.from_env(run_url, directory)
        return copy

    # -- writing -----------------------------------------------------------------------------

    def begin(self, step: int, expected_bytes: int | None = None) -> bool:
        """Start the copy of ``step``; False (and no copy) when ``expected_bytes`` (about
        what this process will write) would break the room rule (:func:`.localdir.room`)."""
        self.drop()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            meta = self.root / "run.json"
            if not meta.exists():
                meta.write_text(json.dumps({"run_url": self.run_url}) + "\n")
            # The copy being replaced is freed only after the new one is sealed; and part of
            # the device stays free for others (NCCL's shared memory lives in /dev/shm).
            need = expected_bytes or 0
            fits, free, total = room(self.root, need)
            if not fits:
                log.warning("no local copy of step %d: %s has %s free of %s, the copy needs "
                            "about %s and a quarter (at most 8 GiB) stays free (the run URL still "
                            "gets every byte)", step, self.directory, format_bytes(free),
                            format_bytes(total), format_bytes(need))
                return False
            partial = self.root / f"{_PARTIAL}{step}-{uuid.uuid4().hex[:8]}"
            partial.mkdir()
        except OSError as exc:
            log.warning("no local copy of step %d: %s (the run URL still gets every byte)", step, exc)
            return False
        self._partial, self._step, self._failed = partial, step, None
        return True

    def storage(self, storage: Any) -> TeeStorage:
        """``storage`` (the run URL) with every file of the step being copied also written
        here: what a save writes through instead of the run URL itself."""
        return TeeStorage(storage, self)

    @contextlib.contextmanager
    def tee(self, rel: str, primary: Any) -> Iterator[Any]:
        """``primary`` (the run URL's writer of ``rel``, a path relative to the run URL) with
        every byte also written to the local copy. A file outside the step being copied, or
        no copy under way: ``primary`` itself."""
        prefix = None if self._step is None else checkpoint_dir(self._step) + "/"
        if self._partial is None or self._failed is not None or not rel.startswith(prefix or "\0"):
            yield primary
            return
        path = self._partial / rel[len(prefix):]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            local = open(path, "wb", buffering=0)  # noqa: SIM115 - closed below
        except OSError as exc:
            self._fail(exc)
            yield primary
            return
        writer = TeeWriter(primary, local, self._fail)
        step = self._step
        try:
            yield writer
        except BaseException:
            with contextlib.suppress(OSError):
                local.close()
            raise
        try:
            local.close()
        except OSError as exc:
            self._fail(exc)
        if self.peer is not None and self._failed is None and writer.intact and step == self._step:
            # The file is complete here: its send starts now, while the run URL's upload of
            # it may still run, so the buddy usually has it before the step is committed.
            self.peer.offer(step, rel[len(prefix or ""):], path)

    def seal(self, step: int, *, announce: bool = False, keep_older: bool = False) -> bool:
        """The run URL committed ``step``: keep this copy as the newest, remove older ones.
        Ranks of one machine share the folder: each moves its own files in. False when the
        copy was dropped or failed. ``announce`` (the rank that wrote the manifest, so knows
        the commit happened): tell every node's peer server, whatever became of this copy.
        ``keep_older`` (a rank that only knows its files were gathered for the commit): the
        older copies stay until :meth:`prune` (the commit may yet fail, or its writer die
        before the manifest, and then the older step is the one restored)."""
        if announce and self.peer is not None:
            self.peer.announce(step)
        partial, copying = self._partial, self._step
        self._partial = self._step = None
        if partial is None or copying != step:
            return False
        if self._failed is not None:
            shutil.rmtree(partial, ignore_errors=True)
            return False
        final = self.root / checkpoint_dir(step)
        try:
            for path in sorted(partial.rglob("*")):
                if path.is_file():
                    name = path.relative_to(partial).as_posix()
                    target = final / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, target)
        except OSError as exc:
            self._fail(exc)
            return False
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        if not keep_older:
            self._remove_older_than(step)
        return True

    def prune(self, step: int) -> None:
        """``step`` is known committed: remove this machine's older copies."""
        try:
            self._remove_older_than(step)
        except OSError as exc:
            log.warning("older local copies not removed (%s); the next commit removes them", exc)

    def drop(self) -> None:
        """Abandon the copy under way (the save failed, or another begins)."""
        partial, step = self._partial, self._step
        self._partial = self._step = None
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        if step is not None and self.peer is not None:
            self.peer.cancel(step)  # what the buddy got of it stays pending, never sealed

    def _fail(self, exc: BaseException) -> None:
        if self._failed is None:
            self._failed = str(exc)
            log.warning("local copy of step %s dropped: %s (the run URL still gets every byte)",
                        self._step, exc)

    def _remove_older_than(self, step: int) -> None:
        # Partials of this step or newer belong to other ranks of this machine, still writing.
        for child in self.root.iterdir():
            if child.name.isdigit():
                older = int(child.name) < step
            elif child.name.startswith(_PARTIAL):
                older = int(child.name[len(_PARTIAL):].split("-")[0]) < step
            else:
                continue
            if older:
                shutil.rmtree(child, ignore_errors=True)

    # -- reading -----------------------------------------------------------------------------

    def reader(self, storage: Any, manifest: Manifest) -> NearestReader:
        """``storage`` (the run URL) for restoring ``manifest``'s step, with each file read
        from this machine's copy instead when that copy matches the manifest byte for byte."""
        folder = self.root / checkpoint_dir(manifest.step)
        if not folder.is_dir():
            held = sorted(c.name for c in self.root.iterdir() if c.name.isdigit()) if self.root.is_dir() else []
            why = f"it holds step {int(held[-1])}" if held else "there is none"
            log.info("no local copy of step %d in %s (%s); reading %s", manifest.step,
                     self.directory, why, "peers, then the run URL" if self.peer else "the run URL")
            folder = None
        return NearestReader(storage, manifest, folder, peer=self.peer, root=self.root)


class NearestReader:
    """A run URL :class:`~spotrun.storage.Storage` for one restore whose reads of the
    checkpoint's files come from the local copy where it matches the committed manifest
    (size and checksums, checked once per file before its first use), else from a peer (the
    file this node holds for others, else fetched from the buddy into this machine's copy,
    checked the same way), else from the run URL. Counts the bytes each source served, by
    where the bytes were when the restore began: :attr:`local_bytes` were on this machine
    already (its own copy, a file a peer sent here earlier to hold, a file another rank of
    this machine fetched first), :attr:`peer_bytes` crossed the peer channel during this
    restore, :attr:`url_bytes` came from the run URL."""

    def __init__(self, storage: Any, manifest: Manifest, folder: Path | None, *,
                 peer: PeerLink | None = None, root: Path | None = None) -> None:
        self._storage = storage
        self._manifest = manifest
        self._folder = folder
        self._peer = peer
        self._root = root  # the local copies' folder: where files fetched from a peer land
        self._prefix = checkpoint_dir(manifest.step) + "/"
        self._checked: dict[str, str | None] = {}  # rel -> local path, or None: use the URL
        self.local_bytes = 0
        self.peer_bytes = 0
        self.url_bytes = 0

    def bytes_by_source(self) -> dict[str, int]:
        """The checkpoint bytes this restore read from each source."""
        return {"local": self.local_bytes, "peer": self.peer_bytes, "url": self.url_bytes}

    def _local(self, rel: str) -> str | None:
        if rel in self._checked:
            return self._checked[rel]
        found = None
        name = rel[len(self._prefix):] if rel.startswith(self._prefix) else None
        entry = None if name is None else self._manifest.files.get(name)
        if self._folder is not None and entry is not None:
            path = self._folder / name
            try:
                problem = problem_in_file(str(path), entry)
            except FileNotFoundError:
                problem = "not in the local copy"
            except OSError as exc:
                problem = str(exc)
            if problem is None:
                found = str(path)
                self.local_bytes += entry.size
            elif self._peer is None or problem != "not in the local copy":
                log.warning("local copy of %s not used (%s); reading %s", rel, problem,
                            "a peer's" if self._peer else "the run URL")
        if found is None and entry is not None and name is not None and self._peer is not None:
            got = self._from_peer(name, entry)
            if got is not None:
                found, source = got
                if source == "peer":
                    self.peer_bytes += entry.size
                else:
                    self.local_bytes += entry.size  # another rank of this machine fetched it
        if found is None and entry is not None:
            self.url_bytes += entry.size
        self._checked[rel] = found
        return found

    def _from_peer(self, name: str, entry: Any) -> tuple[str, str] | None:
        """``name`` from a peer, checked against the manifest: the copy this node holds for
        others, else the buddy's, fetched into this machine's copy. (path, "peer") when it
        was fetched now over the channel, (path, "local") when it was on this machine
        already (held here for others, or another rank of this machine fetched it first);
        None: read the run URL."""
        assert self._peer is not None
        step = self._manifest.step
        for held in self._peer.held_paths(step, name):
            try:
                problem = problem_in_file(str(held), entry)
            except FileNotFoundError:
                continue
            except OSError as exc:
                problem = str(exc)
            if problem is None:
                # On this machine already (a peer sent it before the loss): no transfer now.
                return str(held), "local"
            log.warning("peer copy of %s held here not used (%s); asking the buddy", name, problem)
        if self._root is None:
            return None
        target = self._root / checkpoint_dir(step) / name
        try:
            self._root.mkdir(parents=True, exist_ok=True)
            for old in self._root.glob(f"{_FETCH_LOCK}*"):  # older restores' locks
                if not old.name.startswith(f"{_FETCH_LOCK}{step}-"):
                    old.unlink(missing_ok=True)
            lock = open(self._root / f"{_FETCH_LOCK}{step}-{name.replace('/', '_')}", "a")  # noqa: SIM115
        except OSError as exc:
            log.warning("peer copy of %s not used (%s); reading the run URL", name, exc)
            return None
        with lock:
            # One rank of this machine fetches a file; the others (every rank reads rank 0's
            # payload) wait for it and read this machine's copy: one transfer, one file in memory.
            fcntl.flock(lock, fcntl.LOCK_EX)  # the holder's fetch is bounded by the peer timeouts
            with contextlib.suppress(OSError):
                if problem_in_file(str(target), entry) is None:
                    return str(target), "local"
            path = self._fetch(step, name, entry, target)
            return None if path is None else (path, "peer")

    def _fetch(self, step: int, name: str, entry: Any, target: Path) -> str | None:
        assert self._peer is not None and self._root is not None
        partial = self._root / f"{_PARTIAL}{step}-{uuid.uuid4().hex[:8]}"
        try:
            partial.mkdir(parents=True)
            if not room(partial, entry.size)[0]:
                log.warning("no room in %s for a peer's copy of %s; reading the run URL",
                            self._root.parent, name)
                return None
            dest = partial / name.replace("/", "_")
            served_by = self._peer.fetch(step, name, dest, entry.size)
            if served_by is None:
                log.info("no peer holds step %d %s; reading the run URL", step, name)
                return None
            problem = problem_in_file(str(dest), entry)
            if problem is not None:
                log.warning("peer copy of %s from %s not used (%s); reading the run URL",
                            name, served_by, problem)
                return None
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(dest, target)  # now this machine's copy too (a restart reads it here)
            return str(target)
        except OSError as exc:
            log.warning("peer copy of %s not used (%s); reading the run URL", name, exc)
            return None
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def local_path(self, rel: str) -> str | None:
        return self._local(rel) or self._storage.local_path(rel)

    def verified(self, rel: str) -> bool:
        """Whether ``rel`` is served from a copy this reader has already checked against the
        committed manifest (size and checksums): a reader that verifies what it reads can
        skip a second pass over the same bytes. (Sealed copies are never rewritten in place:
        a copy is written under a temporary name and renamed.)"""
        return self._checked.get(rel) is not None

    def read_bytes(self, rel: str) -> bytes | bytearray:
        path = self._local(rel)
        if path is None:
            return self._storage.read_bytes(rel)
        with open(path, "rb") as f:
            return f.read()

    def open_read(self, rel: str) -> Any:
        path = self._local(rel)
        return self._storage.open_read(rel) if path is None else open(path, "rb")

    def display(self, rel: str = "") -> str:
        path = self._checked.get(rel) if rel else None
        return path if path is not None else self._storage.display(rel)

    def summary(self) -> str:
        peer = f"{format_bytes(self.peer_bytes)} from peers, " if self._peer is not None else ""
        return (f"{format_bytes(self.local_bytes)} from this machine's copy, {peer}"
                f"{format_bytes(self.url_bytes)} from the run URL")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


class TeeStorage:
    """A run URL :class:`~spotrun.storage.Storage` whose :meth:`open_write` also feeds the
    local copy; everything else is the run URL's."""

    def __init__(self, storage: Any, copy: LocalCopy) -> None:
        self._storage = storage
        self._copy = copy

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[Any]:
        with self._storage.open_write(rel) as primary, self._copy.tee(rel, primary) as writer:
            yield writer

    def write_bytes(self, rel: str, data: bytes) -> Any:
        with self.open_write(rel) as f:
            f.write(data)
        return f.entry

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


class TeeWriter:
    """Writes to the run URL's writer and to a local file; a local failure drops the local
    side (through ``on_error``) and never reaches the save."""

    def __init__(self, primary: Any, local: Any, on_error: Any) -> None:
        self._primary = primary
        self._local: Any = local
        self._on_error = on_error

    @property
    def intact(self) -> bool:
        """Whether the local side got every byte written so far."""
        return self._local is not None

    def write(self, data: Any) -> int:
        if self._local is not None:
            try:
                write_all(self._local, memoryview(data).cast("B"))
            except OSError as exc:
                self._local = None
                self._on_error(exc)
        return self._primary.write(data)

    def __getattr__(self, name: str) -> Any:
        # flush, tell, entry, writable, ...: the run URL's writer answers.
        return getattr(self._primary, name)
