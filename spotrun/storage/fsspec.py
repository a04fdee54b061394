"""Every other fsspec backend: ``memory://``, ``gs://``, ``az://``, ...

Two shapes. Object stores (``gs``, ``az``, ...: an object becomes visible only when its
upload completes) are written in place and, on failure, the upload is discarded rather than
closed. Everything else (``memory://`` and unknown protocols, whose files may be visible
from the moment they are opened) is written under a temporary name, then moved.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import uuid
from collections.abc import Iterator

from ..errors import StorageNotFoundError
from .base import Backend, HashingWriter

log = logging.getLogger(__name__)


class FsspecBackend(Backend):
    """Any fsspec filesystem: temporary name, then move."""

    def write(self, path: str) -> Iterator[HashingWriter]:
        fs = self.fs
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        try:
            with fs.open(tmp, "wb") as raw:
                yield HashingWriter(raw)
            fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.rm(tmp)
            raise


class ObjectStoreBackend(Backend):
    """An object store reached through its fsspec filesystem (gcsfs, adlfs, or s3fs when
    spotrun's own S3 transfers cannot drive it): a write is one upload, all-or-nothing."""

    def ensure_root(self, *, create: bool) -> None:
        st = self.storage
        bucket = st.root.split("/", 1)[0]
        self.fs.invalidate_cache(bucket)
        # info(), not exists(): exists() turns a credentials error into False.
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            raise StorageNotFoundError(
                f"bucket {bucket!r} of {st.display()} does not exist or is not "
                f"visible with these credentials; create it or fix the URL"
            ) from None
        except PermissionError:
            # S3 answers 404 for a missing bucket; 403 means it exists but this
            # role may not HEAD it, as under the least-privilege policy in
            # docs/launch.md (ListBucket only for the run's prefix). Carry on: the
            # first real read or write names any permission it lacks.
            log.debug("HEAD of bucket %r denied; assuming it exists", bucket)

    def write(self, path: str) -> Iterator[HashingWriter]:
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        raw = self.fs.open(path, "wb")
        try:
            writer = HashingWriter(raw)
            yield writer
        except BaseException:
            # Closing would commit a half-written object; abort the upload instead.
            discard = getattr(raw, "discard", None)
            with contextlib.suppress(Exception):
                if discard is not None:
                    discard()
                # Mark closed so the file's finaliser does not try to upload.
                raw.closed = True
            raise
        raw.close()
