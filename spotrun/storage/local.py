"""Local disk: a crash leaves either the old file or the new one, never a torn one.

A write goes to a temporary name in the same directory, is ``fsync``-ed, ``os.replace``-d
over the target, then the directory is ``fsync``-ed so the rename survives power loss.
Create-if-absent is ``os.link`` of a finished temporary file (fails if the name exists),
which is also what makes the numbered versions of a tagged object (the lease) exclusive.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence

from ..errors import StorageNotFoundError
from ..format import checksum
from ..format.manifest import FileEntry
from .base import Backend, HashingWriter, translate_errors


def fsync_dir(directory: str) -> None:
    """fsync a directory so a rename inside it survives power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalBackend(Backend):
    """``file://`` and plain paths."""

    def ensure_root(self, *, create: bool) -> None:
        root = self.storage.root
        if create:
            os.makedirs(root, exist_ok=True)
        elif not os.path.isdir(root):
            raise StorageNotFoundError(f"run directory {root} does not exist; check the path")

    def verify(self, rel: str, entry: FileEntry) -> str | None:
        # One memory map, its chunks checked on several cores: no copy in Python.
        return checksum.problem_in_file(self.storage.full(rel), entry)

    def write(self, path: str) -> Iterator[HashingWriter]:
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
        raw = open(tmp, "wb", buffering=0)  # noqa: SIM115 - closed below on every path
        try:
            writer = HashingWriter(raw)
            yield writer
            os.fsync(raw.fileno())
            raw.close()
            os.replace(tmp, path)
        except BaseException:
            raw.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(directory)

    def move_folder(self, src: str, dst: str, remove_first: Sequence[str]) -> None:
        # One rename: atomic, so ``remove_first`` needs no order of its own.
        target = self.storage.full(dst)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(self.storage.full(src), target)

    def write_if_absent(self, rel: str, data: bytes) -> bool:
        st = self.storage
        path = st.full(rel)
        with translate_errors(st.display(rel), "writing"):
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, path)  # fails if path exists: atomic create-if-absent
            except FileExistsError:
                return False
            finally:
                # Also after a failed write (a full disk): no 0-byte temporaries left behind.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            fsync_dir(directory)
            return True
