"""Access to a run URL through fsspec: local disk, ``s3://``, ``memory://`` or any backend.

Everything above this module speaks in paths *relative to the run URL*
(``"000000000100/manifest.json"``) and never touches fsspec directly, so a backend's
quirks (listing caches, non-atomic local writes, S3's lack of rename) are handled once, here.

Atomicity, per backend:

* local disk: write to a temporary name in the same directory, ``fsync``, ``os.replace``,
  then ``fsync`` the directory, so a crash leaves either the old file or the new one;
* object stores: an object only becomes visible when its PUT (or multipart completion)
  succeeds, so a plain write is already all-or-nothing (and a rename would be a full copy);
* ``memory://`` and every other backend: written under a temporary name, then moved, since
  their files may be visible from the moment they are opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.core import split_protocol

from .errors import CredentialsError, StorageError, StorageNotFoundError, StorageURLError

__all__ = ["HashingWriter", "Storage", "open_storage"]

log = logging.getLogger("spotrun")

URL_ENV = "SPOTRUN_URL"

# Backends whose objects appear only once the upload completes.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def _is_credentials_error(exc: BaseException) -> bool:
    # botocore is optional at import time (a local-only user may not have it configured).
    name = type(exc).__name__
    return name in {"NoCredentialsError", "PartialCredentialsError", "InvalidAccessKeyId"} or (
        "credentials" in str(exc).lower() and "unable to locate" in str(exc).lower()
    )


@contextlib.contextmanager
def translate_errors(url: str, what: str) -> Iterator[None]:
    """Turn backend exceptions into spotrun's one-line errors, naming the URL."""
    try:
        yield
    except (StorageError, StorageURLError):
        raise
    except FileNotFoundError as exc:
        raise StorageNotFoundError(
            f"{what}: {url} does not exist ({exc}); check the URL, or create the bucket/directory"
        ) from exc
    except PermissionError as exc:
        raise StorageError(
            f"{what}: permission denied on {url} ({exc}); check the IAM policy or file permissions"
        ) from exc
    except Exception as exc:
        if _is_credentials_error(exc):
            raise CredentialsError(
                f"{what}: no cloud credentials for {url}; configure them (AWS_PROFILE, "
                "an instance profile, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
            ) from exc
        if isinstance(exc, OSError):
            raise StorageError(f"{what}: {url}: {exc}") from exc
        raise


class HashingWriter:
    """A write-only file wrapper that counts bytes and computes sha256 as data passes.

    Hashing on the way out means a commit never re-reads what it just wrote.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.size += view.nbytes
        self._raw.write(view)
        return view.nbytes

    def flush(self) -> None:
        self._raw.flush()

    # torch.save probes these on file-like objects.
    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.size

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


class Storage:
    """The files under one run URL.

    Args:
        url: a local path, ``file://...``, ``s3://bucket/prefix``, ``memory://...`` or any
            fsspec URL.
        storage_options: passed to the fsspec filesystem (e.g. ``{"client_kwargs":
            {"endpoint_url": ...}}`` for S3-compatible stores).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        if not isinstance(url, str) or not url.strip():
            raise StorageURLError(
                f"run URL {url!r} is empty; pass a path or URL, or set {URL_ENV}"
            )
        protocol, path = split_protocol(url)
        if protocol in (None, "file", "local"):
            protocol = "file"
            path = os.path.abspath(os.path.expanduser(path))
            url = path
        elif not path or path.strip("/") == "":
            raise StorageURLError(
                f"run URL {url!r} has no bucket or path; use e.g. {protocol}://bucket/run-name"
            )
        try:
            self.fs: fsspec.AbstractFileSystem = fsspec.filesystem(
                protocol, **(storage_options or {})
            )
        except (ValueError, ImportError) as exc:
            raise StorageURLError(
                f"run URL {url!r}: no fsspec backend for {protocol!r} ({exc}); "
                "check the scheme or install its package (e.g. s3fs for s3://)"
            ) from exc
        self.url = url
        self.protocol = protocol
        self.storage_options = dict(storage_options or {})
        self.root = path.rstrip("/") if protocol != "file" else path
        self.is_local = protocol == "file"

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Filesystem instances hold event loops and sockets; rebuild them in the new process.
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]

    # -- paths -------------------------------------------------------------------------

    def full(self, rel: str = "") -> str:
        """The backend path of ``rel`` (relative to the run URL)."""
        return posixpath.join(self.root, rel) if rel else self.root

    def display(self, rel: str = "") -> str:
        """``rel`` as a URL a user would recognise in a message."""
        if self.is_local:
            return os.path.join(self.url, rel) if rel else self.url
        return f"{self.protocol}://{self.full(rel)}"

    def local_path(self, rel: str) -> str | None:
        """The local file path of ``rel``, or None when the run is not on local disk."""
        return self.full(rel) if self.is_local else None

    # -- checks ------------------------------------------------------------------------

    def ensure_root(self, *, create: bool) -> None:
        """Check the run URL is usable; create a local directory when ``create``.

        Raises StorageNotFoundError for a missing bucket (never created implicitly: a typo
        in a bucket name should not make a new bucket) or, when not ``create``, a missing
        directory.
        """
        with translate_errors(self.display(), "opening run URL"):
            if self.is_local:
                if create:
                    os.makedirs(self.root, exist_ok=True)
                elif not os.path.isdir(self.root):
                    raise StorageNotFoundError(
                        f"run directory {self.root} does not exist; check the path"
                    )
                return
            if self.protocol in _OBJECT_STORES:
                bucket = self.root.split("/", 1)[0]
                self.fs.invalidate_cache(bucket)
                # info(), not exists(): exists() turns a credentials error into False.
                try:
                    self.fs.info(bucket)
                except FileNotFoundError:
                    raise StorageNotFoundError(
                        f"bucket {bucket!r} of {self.display()} does not exist or is not "
                        f"visible with these credentials; create it or fix the URL"
                    ) from None
            elif create:
                self.fs.makedirs(self.root, exist_ok=True)

    # -- reading -----------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        with translate_errors(self.display(rel), "checking"):
            self.fs.invalidate_cache(posixpath.dirname(self.full(rel)))
            return bool(self.fs.exists(self.full(rel)))

    def list_dir(self, rel: str = "") -> list[str]:
        """Names (not paths) of the entries directly under ``rel``; [] when it is absent.

        The listing cache is dropped first: another process (a relaunched run, a second
        rank) may have written since this process last looked.
        """
        path = self.full(rel)
        with translate_errors(self.display(rel), "listing"):
            self.fs.invalidate_cache(path)
            try:
                entries = self.fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
        names = []
        for entry in entries:
            name = posixpath.basename(str(entry).rstrip("/"))
            if name and str(entry).rstrip("/") != path.rstrip("/"):
                names.append(name)
        return sorted(set(names))

    def size(self, rel: str) -> int:
        with translate_errors(self.display(rel), "reading size of"):
            return int(self.fs.size(self.full(rel)))

    def read_bytes(self, rel: str) -> bytes:
        with translate_errors(self.display(rel), "reading"):
            return bytes(self.fs.cat_file(self.full(rel)))

    def open_read(self, rel: str) -> IO[bytes]:
        with translate_errors(self.display(rel), "opening"):
            return self.fs.open(self.full(rel), "rb")  # type: ignore[no-any-return]

    # -- writing -----------------------------------------------------------------------

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[HashingWriter]:
        """Write ``rel`` all-or-nothing; the file appears only if the block succeeds.

        Yields a :class:`HashingWriter`, so the caller learns size and sha256 for free.
        """
        path = self.full(rel)
        with translate_errors(self.display(rel), "writing"):
            if self.is_local:
                yield from self._write_local(path)
            elif self.protocol not in _OBJECT_STORES:
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
                self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
                try:
                    with self.fs.open(tmp, "wb") as raw:
                        yield HashingWriter(raw)
                    self.fs.mv(tmp, path)
                except BaseException:
                    with contextlib.suppress(Exception):
                        self.fs.rm(tmp)
                    raise
            else:
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

    def _write_local(self, path: str) -> Iterator[HashingWriter]:
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

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write ``data`` to ``rel`` atomically; returns its sha256."""
        with self.open_write(rel) as f:
            f.write(data)
        return f.sha256

    def write_if_absent(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` only if nothing is there; True when this call created it.

        Local disk uses O_EXCL-style linking, so concurrent writers never overwrite each
        other. Object stores have no portable conditional PUT through fsspec, so records
        written with this should carry unique names (this is a best-effort check there).
        """
        path = self.full(rel)
        with translate_errors(self.display(rel), "writing"):
            if self.is_local:
                directory = os.path.dirname(path)
                os.makedirs(directory, exist_ok=True)
                tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)  # fails if path exists: atomic create-if-absent
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
                fsync_dir(directory)
                return True
        if self.exists(rel):
            return False
        self.write_bytes(rel, data)
        return True

    def remove(self, rel: str) -> None:
        """Delete ``rel`` (a file or a whole folder); missing is not an error."""
        path = self.full(rel)
        with translate_errors(self.display(rel), "deleting"):
            try:
                self.fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass
            self.fs.invalidate_cache(posixpath.dirname(path))


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


def open_storage(
    url: str | None = None, storage_options: dict[str, Any] | None = None
) -> Storage:
    """A :class:`Storage` for ``url``, or for ``$SPOTRUN_URL`` when ``url`` is None."""
    if url is None:
        url = os.environ.get(URL_ENV)
        if not url:
            raise StorageURLError(
                f"no run URL: pass one (a path or s3://bucket/prefix) or set {URL_ENV}"
            )
    return Storage(url, storage_options)
