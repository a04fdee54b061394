"""A node-local copy of the newest committed checkpoint, so a restart on the same machine
reads nothing from the run URL but the manifest.

The run URL stays the only commit point and the truth. While a save writes its files to the
run URL, each byte also goes to a local folder (``SPOTRUN_LOCAL_DIR``: memory such as
``/dev/shm/spotrun``, or local NVMe); once the run URL's manifest is committed, the local
folder is sealed under the step's name and older local copies are removed. A restore uses a
local copy only when every file the committed manifest lists is there with the manifest's
size and checksums; anything else (a flipped byte, a truncated file, an older step, another
run's folder, a copy some other writer left) is ignored with a log line, and the run URL is
read. Because the copy is checked byte for byte against what was committed, it does not
matter who wrote it: equal checksums are equal bytes.

The copy never costs a save: no room (a full tmpfs, a copy larger than the free space) or a
failed local write drops the copy for that step, with one warning, and the save goes on.

Layout under the local directory::

    <dir>/<run key>/run.json               the run URL (for people; the key is its hash)
    <dir>/<run key>/000000000100/...       the newest sealed copy: its files + manifest.json
    <dir>/<run key>/.partial-<step>-<id>/  a copy being written (removed on failure)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..checksum import problem_in_file
from ..config import env_str
from ..layout import MANIFEST, checkpoint_dir
from ..manifest import Manifest

__all__ = ["DEFAULT_LOCAL_DIR", "LOCAL_DIR_ENV", "LocalCopy", "TeeStorage", "TeeWriter"]

log = logging.getLogger(__name__)

LOCAL_DIR_ENV = "SPOTRUN_LOCAL_DIR"
#: In memory where the machine has one; off (``SPOTRUN_LOCAL_DIR=off``) where memory is short.
DEFAULT_LOCAL_DIR = "/dev/shm/spotrun"
#: Free space to keep beyond the copy itself, so the copy never fills a tmpfs to the brim.
_HEADROOM = 1.10
_PARTIAL = ".partial-"


def _run_key(run_url: str) -> str:
    return hashlib.sha256(run_url.encode()).hexdigest()[:16]


class LocalCopy:
    """The local copies of one run on this machine.

    Writers call :meth:`begin` before a save writes its files, pass each file through
    :meth:`tee`, then :meth:`seal` once the run URL committed the step (or :meth:`drop` when
    the save failed). Readers call :meth:`find` with the committed manifest.
    """

    def __init__(self, directory: str | os.PathLike[str], run_url: str) -> None:
        self.directory = Path(directory)
        self.run_url = run_url
        self.root = self.directory / _run_key(run_url)
        self._partial: Path | None = None
        self._step: int | None = None
        self._failed: str | None = None

    @classmethod
    def from_env(cls, run_url: str) -> LocalCopy | None:
        """The local copy ``SPOTRUN_LOCAL_DIR`` asks for: unset means the default (memory,
        where ``/dev/shm`` exists), ``off`` (or ``0``, ``none``) means none."""
        raw = env_str(LOCAL_DIR_ENV)
        if raw is not None and raw.strip().lower() in ("off", "0", "none", "false"):
            return None
        directory = raw or DEFAULT_LOCAL_DIR
        if raw is None and not Path(directory).parent.is_dir():
            return None  # no /dev/shm (macOS): no default copy
        return cls(directory, run_url)

    # -- writing -----------------------------------------------------------------------------

    def begin(self, step: int, expected_bytes: int | None = None) -> bool:
        """Start the copy of ``step``; False (and no copy) when there is no room for
        ``expected_bytes`` (the previous checkpoint's size, when known)."""
        self.drop()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            meta = self.root / "run.json"
            if not meta.exists():
                meta.write_text(json.dumps({"run_url": self.run_url}) + "\n")
            if expected_bytes:
                free = shutil.disk_usage(self.root).free
                # The copy being replaced is freed only after the new one is sealed.
                if free < expected_bytes * _HEADROOM:
                    log.warning("no local copy of step %d: %s has %d MiB free, the copy needs "
                                "about %d MiB (the run URL still gets every byte)", step,
                                self.directory, free >> 20, int(expected_bytes * _HEADROOM) >> 20)
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
        try:
            yield writer
        finally:
            with contextlib.suppress(OSError):
                local.close()

    def seal(self, manifest: Manifest) -> bool:
        """The run URL committed ``manifest``'s step: keep this copy as the newest, remove the
        older ones. False when the copy was dropped or failed."""
        partial, step = self._partial, self._step
        self._partial = self._step = None
        if partial is None or step != manifest.step:
            return False
        if self._failed is not None:
            shutil.rmtree(partial, ignore_errors=True)
            return False
        try:
            (partial / MANIFEST).write_bytes(manifest.to_json())
            final = self.root / checkpoint_dir(step)
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
        except OSError as exc:
            self._fail(exc)
            shutil.rmtree(partial, ignore_errors=True)
            return False
        self._remove_all_but(final.name)
        return True

    def drop(self) -> None:
        """Abandon the copy under way (the save failed, or another begins)."""
        partial, self._partial, self._step = self._partial, None, None
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)

    def _fail(self, exc: BaseException) -> None:
        if self._failed is None:
            self._failed = str(exc)
            log.warning("local copy of step %s dropped: %s (the run URL still gets every byte)",
                        self._step, exc)

    def _remove_all_but(self, keep: str) -> None:
        for child in self.root.iterdir():
            if child.is_dir() and child.name != keep and (child.name.isdigit() or
                                                          child.name.startswith(_PARTIAL)):
                shutil.rmtree(child, ignore_errors=True)

    # -- reading -----------------------------------------------------------------------------

    def find(self, manifest: Manifest) -> Path | None:
        """The local folder holding every file of the committed ``manifest``, byte for byte;
        None (with a log line saying why) when there is none that matches."""
        folder = self.root / checkpoint_dir(manifest.step)
        if not folder.is_dir():
            newer = sorted(c.name for c in self.root.iterdir() if c.name.isdigit()) if self.root.is_dir() else []
            why = f"it holds step {int(newer[-1])}" if newer else "there is none"
            log.info("no local copy of step %d in %s (%s); reading the run URL", manifest.step,
                     self.directory, why)
            return None
        for name, entry in sorted(manifest.files.items()):
            path = folder / name
            try:
                problem = problem_in_file(str(path), entry)
            except FileNotFoundError:
                problem = "missing"
            except OSError as exc:
                problem = str(exc)
            if problem is not None:
                log.warning("local copy of step %d not used: %s: %s; reading the run URL",
                            manifest.step, name, problem)
                return None
        log.info("restoring step %d from the local copy in %s (every file matches the "
                 "committed manifest)", manifest.step, folder)
        return folder


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

    def write(self, data: Any) -> int:
        if self._local is not None:
            try:
                view = memoryview(data).cast("B")
                while view.nbytes:
                    n = self._local.write(view)
                    if n is None or n >= view.nbytes:
                        break
                    view = view[n:]
            except OSError as exc:
                self._local = None
                self._on_error(exc)
        return self._primary.write(data)

    def __getattr__(self, name: str) -> Any:
        # flush, tell, entry, writable, ...: the run URL's writer answers.
        return getattr(self._primary, name)
