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

Speed (``s3://``): a write smaller than one part is a single PUT; a larger one is a multipart
upload with up to ``concurrency`` parts in flight while the caller keeps producing bytes,
completed only when every part is in and aborted on any failure, so an object never appears
half-written and no multipart upload is left behind. A large read is ``concurrency`` ranged
GETs into one preallocated buffer. Memory: a write holds at most ``(concurrency + 1) x part_size`` bytes of buffers
(9 x 16 MiB = 144 MiB by default) whatever the object's size; a read holds the object itself
and nothing more than small socket reads besides. Knobs: the constructor's ``part_size`` and
``concurrency``, else ``SPOTRUN_S3_PART_MIB``, ``SPOTRUN_S3_CONCURRENCY``,
``SPOTRUN_S3_RETRIES`` (see :mod:`spotrun.config`).

Nothing waits forever (``s3://``), and the retry layers do not multiply:

* every request has a connect and a read timeout (``SPOTRUN_S3_CONNECT_TIMEOUT``, 10 s;
  ``SPOTRUN_S3_READ_TIMEOUT``, 60 s of silence on the socket);
* botocore retries each request (standard mode: throttling, 5xx, timeouts, dropped
  connections) up to ``SPOTRUN_S3_ATTEMPTS`` attempts in all (3), with its exponential
  backoff (at most 1 + 2 s between them);
* s3fs's own retry loop (5 more rounds of all of the above, which made a throttled read
  retry for minutes) is turned off;
* parts and ranges, which a long transfer cannot afford to lose, get ``SPOTRUN_S3_RETRIES``
  more rounds (3) with exponential backoff, and none starts, and a running one is cut,
  once ``SPOTRUN_S3_RETRY_SECONDS`` (120 s) have passed since the first try.

So a throttled or failing request gives up after about 15 s (at most
``SPOTRUN_S3_RETRY_SECONDS`` plus one attempt), and a silent endpoint after at most
attempts x (connect + read timeout), with :class:`~spotrun.errors.StorageUnavailableError`
naming the URL, what was retried and for how long. Timeouts and retry settings the caller
passes in ``storage_options["config_kwargs"]`` win over these defaults.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import mmap
import os
import posixpath
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import IO, Any, TypeVar

import fsspec
from fsspec.asyn import sync
from fsspec.core import split_protocol

from .config import env_float, env_int
from .errors import (
    ConfigError,
    CredentialsError,
    StorageError,
    StorageNotFoundError,
    StorageUnavailableError,
    StorageURLError,
)

__all__ = ["HashingWriter", "Storage", "open_storage"]

log = logging.getLogger("spotrun")

URL_ENV = "SPOTRUN_URL"

# Backends whose objects appear only once the upload completes.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})

MiB = 1 << 20
DEFAULT_PART_MIB = 16
DEFAULT_CONCURRENCY = 8
DEFAULT_RETRIES = 3
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0
DEFAULT_ATTEMPTS = 3
DEFAULT_RETRY_SECONDS = 120.0
# S3's limits: every part but the last at least 5 MiB, at most 5 GiB, at most 10,000 parts.
_MIN_PART = 5 * MiB
_MAX_PART = 5 << 30
_MAX_PARTS = 10_000
# Part sizes double every this many parts, so a stream of unknown length still fits in
# 10,000 parts: 2000 x (1+2+4+8+16) x 16 MiB is about 970 GiB per object by default.
_PARTS_PER_SIZE = 2000
# Below this a write hashes inline; above it hashing (which releases the GIL) runs on a
# helper thread while the bytes are written, so sha256 does not slow the disk down.
_OVERLAP_HASH_MIN = 4 * MiB
_BACKOFF_BASE_S = 0.25
_BACKOFF_MAX_S = 10.0
# Error codes S3 uses for "slow down / try again", whatever the HTTP status.
_RETRY_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "TooManyRequests", "RequestTimeout", "InternalError", "ServiceUnavailable",
    "RequestThrottled", "BandwidthLimitExceeded",
})

_hash_pool: concurrent.futures.ThreadPoolExecutor | None = None
T = TypeVar("T")


def _hasher() -> concurrent.futures.ThreadPoolExecutor:
    global _hash_pool
    if _hash_pool is None:
        _hash_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="spotrun-hash"
        )
    return _hash_pool


def _forget_hasher() -> None:
    # A forked child inherits the pool object but not its threads: work sent to it would
    # never run. Start a new pool there on first use.
    global _hash_pool
    _hash_pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_hasher)


def _is_credentials_error(exc: BaseException) -> bool:
    # botocore is optional at import time (a local-only user may not have it configured).
    name = type(exc).__name__
    return name in {"NoCredentialsError", "PartialCredentialsError", "InvalidAccessKeyId"} or (
        "credentials" in str(exc).lower() and "unable to locate" in str(exc).lower()
    )


def _transient_remote(exc: BaseException) -> bool:
    """Whether ``exc`` is a remote store that stayed busy, failing or silent (not a local
    disk error, not a refusal): throttling, 5xx, timeouts, dropped connections."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = str(response.get("Error", {}).get("Code", ""))
            return status >= 500 or status == 429 or code in _RETRY_CODES
        module = type(seen).__module__.split(".")[0]
        if module in ("botocore", "aiobotocore", "aiohttp") and any(
            word in type(seen).__name__ for word in ("Timeout", "Connection", "Endpoint")
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _describe(exc: BaseException) -> str:
    """``SlowDown (HTTP 503): Please reduce your request rate`` or the exception's first line."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            error = response.get("Error", {})
            return f"{error.get('Code', '?')} (HTTP {status}): {error.get('Message', '')}".rstrip(": ")
        seen = seen.__cause__ or seen.__context__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _requests_made(exc: BaseException) -> int:
    """How many HTTP requests botocore made for the call that raised ``exc`` (1 if unknown)."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return int(response.get("ResponseMetadata", {}).get("RetryAttempts") or 0) + 1
        seen = seen.__cause__ or seen.__context__
    return 1


_UNAVAILABLE_FIX = ("the store is throttling, failing or not answering: try again later, check "
                    "the endpoint and network, or raise SPOTRUN_S3_RETRIES / "
                    "SPOTRUN_S3_RETRY_SECONDS / SPOTRUN_S3_ATTEMPTS")


@contextlib.contextmanager
def translate_errors(url: str, what: str) -> Iterator[None]:
    """Turn backend exceptions into spotrun's one-line errors, naming the URL."""
    started = time.monotonic()
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
        if _transient_remote(exc):
            raise StorageUnavailableError(
                f"{what}: {url} still failing after {_requests_made(exc)} request(s) over "
                f"{time.monotonic() - started:.1f}s of retries ({_describe(exc)}); "
                f"{_UNAVAILABLE_FIX}"
            ) from exc
        if isinstance(exc, OSError):
            raise StorageError(f"{what}: {url}: {exc}") from exc
        raise


class HashingWriter:
    """A write-only file wrapper that counts bytes and computes sha256 as data passes.

    Hashing on the way out means a commit never re-reads what it just wrote.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        """Pass ``data`` through without copying it; returns its length.

        Large writes hash on a helper thread while the bytes go out, and this returns only
        when both are done, so the caller may reuse or free ``data`` afterwards.
        """
        view = memoryview(data).cast("B")
        n = view.nbytes
        if n >= _OVERLAP_HASH_MIN:
            hashed = _hasher().submit(self._hash.update, view)
            try:
                self._write_all(view)
            finally:
                hashed.result()
        else:
            self._hash.update(view)
            self._write_all(view)
        self.size += n
        return n

    def _write_all(self, view: memoryview) -> None:
        # An unbuffered file may write less than asked (Linux caps one write at ~2 GiB).
        while view.nbytes:
            written = self._raw.write(view)
            if written is None or written >= view.nbytes:
                return
            view = view[written:]

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
        part_size: S3 multipart part size and ranged-read size in bytes (at least 5 MiB).
            Default: ``$SPOTRUN_S3_PART_MIB`` MiB, else 16 MiB.
        concurrency: S3 parts or ranges in flight at once. Default:
            ``$SPOTRUN_S3_CONCURRENCY``, else 8.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        part_size: int | None = None,
        concurrency: int | None = None,
    ) -> None:
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
        options = dict(storage_options or {})
        if protocol in ("s3", "s3a"):
            options = _s3_client_options(options)
        try:
            self.fs: fsspec.AbstractFileSystem = fsspec.filesystem(protocol, **options)
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
        self._part_size_arg, self._concurrency_arg = part_size, concurrency
        self.part_size = part_size if part_size is not None else env_int(
            "SPOTRUN_S3_PART_MIB", DEFAULT_PART_MIB) * MiB
        self.concurrency = concurrency if concurrency is not None else env_int(
            "SPOTRUN_S3_CONCURRENCY", DEFAULT_CONCURRENCY)
        self.retries = env_int("SPOTRUN_S3_RETRIES", DEFAULT_RETRIES)
        if not _MIN_PART <= self.part_size <= _MAX_PART:
            raise ConfigError(
                f"S3 part size {self.part_size} bytes is outside S3's 5 MiB..5 GiB; "
                "set SPOTRUN_S3_PART_MIB (or part_size=) between 5 and 5120 MiB"
            )
        if self.concurrency < 1:
            raise ConfigError(
                f"S3 concurrency {self.concurrency} must be at least 1; "
                "set SPOTRUN_S3_CONCURRENCY (or concurrency=) to e.g. 8"
            )
        if self.retries < 0:
            raise ConfigError(f"SPOTRUN_S3_RETRIES={self.retries} must be 0 or more")
        self.retry_seconds = env_float("SPOTRUN_S3_RETRY_SECONDS", DEFAULT_RETRY_SECONDS)
        if self.retry_seconds < 0:
            raise ConfigError(
                f"SPOTRUN_S3_RETRY_SECONDS={self.retry_seconds} must be 0 or more, e.g. 120")
        # The parallel paths drive s3fs's own aiobotocore client on fsspec's event loop
        # rather than a separate boto3 client: same credentials, endpoint, region, SSE and
        # requester-pays options as every other call here, one connection pool, and no
        # thread per part (one loop thread overlaps all requests).
        self._s3 = self.protocol in ("s3", "s3a") and hasattr(self.fs, "_call_s3")
        if self._s3:
            # s3fs repeats every failed call up to 5 times on top of botocore's attempts and
            # spotrun's rounds; multiplied, a throttled read kept retrying for minutes. One
            # try here: botocore and _with_retries are the (bounded) retry layers.
            self.fs.retries = 1

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Filesystem instances hold event loops and sockets; rebuild them in the new process.
        return {"url": self.url, "storage_options": self.storage_options,
                "part_size": self._part_size_arg, "concurrency": self._concurrency_arg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["url"], state["storage_options"],
            part_size=state.get("part_size"), concurrency=state.get("concurrency"),
        )

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
                except PermissionError:
                    # S3 answers 404 for a missing bucket; 403 means it exists but this
                    # role may not HEAD it, as under the least-privilege policy in
                    # docs/launch.md (ListBucket only for the run's prefix). Carry on: the
                    # first real read or write names any permission it lacks.
                    log.debug("HEAD of bucket %r denied; assuming it exists", bucket)
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

    def read_bytes(self, rel: str) -> bytes | bytearray:
        """The whole content of ``rel``.

        On S3 an object larger than one part comes as parallel ranged GETs into one
        preallocated ``bytearray`` (returned as is: converting it to ``bytes`` would copy
        it); each range is pinned to the object's ETag, so an object replaced mid-read
        fails the read instead of mixing two versions.
        """
        with translate_errors(self.display(rel), "reading"):
            if self._s3:
                return _s3_read(self.fs, self.full(rel), self.part_size, self.concurrency,
                                self.retries, retry_seconds=self.retry_seconds)
            return bytes(self.fs.cat_file(self.full(rel)))

    def sha256(self, rel: str) -> tuple[int, str]:
        """(size, sha256) of ``rel``: a memory-mapped pass locally (no Python-level chunk
        copies), parallel ranged GETs on S3."""
        if self.is_local:
            with translate_errors(self.display(rel), "reading"), open(self.full(rel), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    return 0, hashlib.sha256().hexdigest()
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    return size, hashlib.sha256(m).hexdigest()
        data = self.read_bytes(rel)
        return len(data), hashlib.sha256(data).hexdigest()

    def open_read(self, rel: str) -> IO[bytes]:
        with translate_errors(self.display(rel), "opening"):
            return self.fs.open(self.full(rel), "rb")  # type: ignore[no-any-return]

    # -- writing -----------------------------------------------------------------------

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[HashingWriter]:
        """Write ``rel`` all-or-nothing; the file appears only if the block succeeds.

        Yields a :class:`HashingWriter`, so the caller learns size and sha256 for free.
        On S3 the upload runs while the caller writes (see the module docstring for the
        memory it holds); on local disk the bytes go straight to the file, no copy.
        """
        path = self.full(rel)
        with translate_errors(self.display(rel), "writing"):
            if self.is_local:
                yield from self._write_local(path)
            elif self._s3:
                upload = _S3Upload(self.fs, path, part_size=self.part_size,
                                   concurrency=self.concurrency, retries=self.retries,
                                   retry_seconds=self.retry_seconds)
                try:
                    yield HashingWriter(upload)
                    upload.complete()
                except BaseException:
                    upload.abort()
                    raise
                finally:
                    self.fs.invalidate_cache(path)
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

    # -- conditional writes (the run's single-writer lease, see spotrun.lease) -----------
    #
    # A "tagged" object changes only through whoever read its current version (its tag), so
    # of two writers that read the same version exactly one can replace it. On S3 it is one
    # object, its tag the ETag: IfNoneMatch="*" creates, IfMatch=<etag> replaces, and S3
    # answers 412 (or 409 for a concurrent conditional write) to the loser. Elsewhere
    # ``rel`` is a folder of numbered versions ``v<generation>.json`` and the tag is the
    # generation: replacing version g means creating g + 1 with an atomic create-if-absent
    # (``os.link`` on local disk), which only one writer can do. fsspec offers no
    # conditional write for other backends, so there it is best effort (check, then write).

    def read_tagged(self, rel: str) -> tuple[bytes, str] | None:
        """The current version of tagged object ``rel`` and its tag; None when there is none."""
        if self._s3:
            bucket, key, _ = self.fs.split_path(self.full(rel))

            async def get() -> tuple[bytes, str]:
                response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
                try:
                    return await response["Body"].read(), str(response["ETag"])
                finally:
                    response["Body"].close()

            with translate_errors(self.display(rel), "reading"):
                try:
                    return sync(self.fs.loop, get)  # type: ignore[no-any-return]
                except FileNotFoundError:
                    return None
        for _ in range(10):
            generations = self._tagged_versions(rel)
            if not generations:
                return None
            newest = generations[-1]
            try:
                return bytes(self.read_bytes(_tagged_name(rel, newest))), str(newest)
            except StorageNotFoundError:
                continue  # replaced and pruned between the listing and the read: look again
        raise StorageError(f"{self.display(rel)} keeps changing while being read; try again")

    def create_tagged(self, rel: str, data: bytes) -> str | None:
        """Create tagged object ``rel`` if it does not exist; its tag, or None when it does."""
        if self._s3:
            return self._put_conditional(rel, data, IfNoneMatch="*")
        if self._tagged_versions(rel):
            return None
        return "1" if self.write_if_absent(_tagged_name(rel, 1), data) else None

    def replace_tagged(self, rel: str, data: bytes, tag: str) -> str | None:
        """Replace ``rel`` only if its current version is still ``tag``; the new tag, or None
        when another writer changed it first (or it is gone)."""
        if self._s3:
            return self._put_conditional(rel, data, IfMatch=tag)
        try:
            generation = int(tag)
        except ValueError:
            return None
        mine = _tagged_name(rel, generation + 1)
        if not self.write_if_absent(mine, data):
            return None
        generations = self._tagged_versions(rel)
        if generations[-1] != generation + 1:
            # ``tag`` was stale and its successor had already been pruned: not ours to make.
            self.remove(mine)
            return None
        for old in generations[:-2]:  # keep the previous version for readers mid-listing
            self.remove(_tagged_name(rel, old))
        return str(generation + 1)

    def _tagged_versions(self, rel: str) -> list[int]:
        found = []
        for name in self.list_dir(rel):
            if name.startswith("v") and name.endswith(".json") and name[1:-5].isdigit():
                found.append(int(name[1:-5]))
        return sorted(found)

    def _put_conditional(self, rel: str, data: bytes, **condition: str) -> str | None:
        path = self.full(rel)
        bucket, key, _ = self.fs.split_path(path)
        with translate_errors(self.display(rel), "writing"):
            try:
                response = sync(self.fs.loop, self.fs._call_s3, "put_object", Bucket=bucket,
                                Key=key, Body=data, **condition)
            except OSError as exc:
                # 412: the condition failed; 409: a concurrent conditional write won; 404:
                # IfMatch on an object that is gone. All mean "another writer got there".
                if _http_status(exc) in (404, 409, 412):
                    return None
                raise
            finally:
                self.fs.invalidate_cache(posixpath.dirname(path))
        return str(response["ETag"])


def _tagged_name(rel: str, generation: int) -> str:
    return f"{rel}/v{generation:012d}.json"


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


def _s3_client_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with spotrun's timeouts and botocore retry settings where the caller
    gave none (s3fs's own defaults would retry a throttled call for minutes)."""
    config = dict(options.get("config_kwargs") or {})
    connect = env_float("SPOTRUN_S3_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_S)
    read = env_float("SPOTRUN_S3_READ_TIMEOUT", DEFAULT_READ_TIMEOUT_S)
    attempts = env_int("SPOTRUN_S3_ATTEMPTS", DEFAULT_ATTEMPTS)
    for name, value, example in (("SPOTRUN_S3_CONNECT_TIMEOUT", connect, 10),
                                 ("SPOTRUN_S3_READ_TIMEOUT", read, 60),
                                 ("SPOTRUN_S3_ATTEMPTS", attempts, 3)):
        if not value > 0:
            raise ConfigError(f"{name}={value} must be positive; set it to e.g. {example}")
    config.setdefault("connect_timeout", connect)
    config.setdefault("read_timeout", read)
    # Standard mode: retries throttling, 5xx, timeouts and dropped connections with
    # exponential backoff, and its retry quota stops a storm of retries on a dead endpoint.
    config.setdefault("retries", {"mode": "standard", "total_max_attempts": attempts})
    return {**options, "config_kwargs": config}


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


# -- parallel S3 transfers ---------------------------------------------------------------


class _ShortReadError(OSError):
    """A ranged GET returned fewer bytes than asked (a dropped connection): retried."""


def _retryable(exc: BaseException) -> bool:
    """Whether a failed S3 request is worth repeating: throttling, 5xx, lost connections."""
    if isinstance(exc, (FileNotFoundError, PermissionError)) or _is_credentials_error(exc):
        return False
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = str(response.get("Error", {}).get("Code", ""))
            return status >= 500 or status == 429 or code in _RETRY_CODES
        seen = seen.__cause__ or seen.__context__
    # No HTTP answer at all: a reset, a timeout, a truncated body.
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        return True
    return type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp")


async def _with_retries(what: str, attempt: Callable[[], Awaitable[T]], retries: int,
                        stop: Callable[[], bool] = lambda: False, *,
                        retry_seconds: float | None = None) -> T:
    """Run ``attempt()``; repeat it up to ``retries`` times on a transient failure.

    On top of botocore's own per-request retries: a part lost after a long upload would
    cost the whole save, so it gets a second, slower layer (exponential backoff, jitter).
    Bounded in time too: no retry starts, and a retry still running is cut, once
    ``retry_seconds`` (default ``$SPOTRUN_S3_RETRY_SECONDS``, else 120) have passed since
    the first try; the first try itself is never cut (a large healthy part may be slow).
    Gives up with :class:`StorageUnavailableError`.
    """
    if retry_seconds is None:
        retry_seconds = env_float("SPOTRUN_S3_RETRY_SECONDS", DEFAULT_RETRY_SECONDS)
    started = time.monotonic()
    deadline = started + retry_seconds
    for n in range(retries + 1):
        try:
            if n == 0:
                return await attempt()
            return await asyncio.wait_for(attempt(), max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if stop() or not _retryable(exc):
                raise
            reason = _describe(exc)
            elapsed = time.monotonic() - started
            delay = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2**n) * random.uniform(0.5, 1.0)
            if n >= retries or time.monotonic() + delay >= deadline:
                limit = (f"{retries} retries" if n >= retries
                         else f"the {retry_seconds:g}s retry time limit")
                raise StorageUnavailableError(
                    f"S3 {what} still failing after {n + 1} attempts over {elapsed:.1f}s "
                    f"(last: {reason}; each attempt is up to SPOTRUN_S3_ATTEMPTS requests "
                    f"with backoff; stopped at {limit}); {_UNAVAILABLE_FIX}"
                ) from exc
            log.info("S3 %s failed (%s); retry %d of %d in %.2fs", what, reason, n + 1,
                     retries, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _http_status(exc: BaseException) -> int:
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        seen = seen.__cause__ or seen.__context__
    return 0


def _total_size(content_range: str | None, received: int) -> int:
    """The object size from ``bytes 0-N/TOTAL``; without one the answer was the whole."""
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    return received


class _S3Upload:
    """The raw sink behind :meth:`Storage.open_write` on S3: parallel multipart upload.

    Call order: ``write()`` any number of times, then exactly one of ``complete()`` (the
    object appears) or ``abort()`` (nothing appears, no upload is left open). Writes fill
    a ``part_size`` buffer; a full buffer goes out as an UploadPart on s3fs's event loop
    as soon as more bytes arrive, and ``write`` blocks only while ``concurrency`` parts are
    already in flight. So at most ``concurrency + 1`` part buffers exist at once. An object
    that never fills one part is one PUT at ``complete()``.
    """

    def __init__(self, fs: Any, path: str, *, part_size: int, concurrency: int,
                 retries: int, retry_seconds: float | None = None) -> None:
        self._fs = fs
        self._loop = fs.loop
        self._bucket, self._key, _ = fs.split_path(path)
        self._where = f"s3://{self._bucket}/{self._key}"
        self._part_size = part_size
        self._concurrency = concurrency
        self._retries = retries
        self._retry_seconds = retry_seconds
        self._upload_id: str | None = None
        self._next_part = 1
        self._buf = bytearray(part_size)
        self._fill = 0
        self._free: list[bytearray] = []
        self._inflight: dict[concurrent.futures.Future[dict[str, Any]], bytearray] = {}
        self._parts: list[dict[str, Any]] = []
        self._aborting = False
        self.closed = False

    # -- file-like ---------------------------------------------------------------------

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        pos, n = 0, view.nbytes
        while pos < n:
            if self._fill == len(self._buf):
                self._send(self._buf)
                self._buf = self._new_buffer()
                self._fill = 0
            take = min(len(self._buf) - self._fill, n - pos)
            self._buf[self._fill : self._fill + take] = view[pos : pos + take]
            self._fill += take
            pos += take
        return n

    def flush(self) -> None:
        pass

    # -- outcome -----------------------------------------------------------------------

    def complete(self) -> None:
        """Make the object visible: one PUT, or the last part and CompleteMultipartUpload."""
        if self._upload_id is None:
            body = bytes(memoryview(self._buf)[: self._fill])
            self._buf = bytearray()
            self._call("put", "put_object", Body=body)
        else:
            last = self._buf if self._fill == len(self._buf) else self._buf[: self._fill]
            self._buf = bytearray()
            self._send(last)
            while self._inflight:
                self._reap(concurrent.futures.FIRST_EXCEPTION)
            parts = sorted(self._parts, key=lambda p: p["PartNumber"])
            self._call("complete", "complete_multipart_upload", UploadId=self._upload_id,
                       MultipartUpload={"Parts": parts})
            log.debug("uploaded %s in %d parts", self._where, len(parts))
        self.closed = True

    def abort(self) -> None:
        """Drop everything: stop retrying, let parts in flight end, abort the upload."""
        if self.closed:
            return
        self.closed = True
        self._aborting = True
        self._buf = bytearray()
        self._free.clear()
        if self._inflight:
            # Waiting (briefly) rather than cancelling: a part S3 accepts after the abort
            # would keep the upload's storage alive.
            concurrent.futures.wait(list(self._inflight), timeout=60)
            for fut in self._inflight:
                fut.cancel()
            self._inflight.clear()
        if self._upload_id is not None:
            try:
                self._call("abort", "abort_multipart_upload", UploadId=self._upload_id)
            except Exception as exc:  # noqa: BLE001 - the original failure matters more
                log.warning(
                    "could not abort the multipart upload of %s (%s); no object was written, "
                    "but its parts may be billed until an AbortIncompleteMultipartUpload "
                    "lifecycle rule removes them", self._where, exc)

    # -- internals ---------------------------------------------------------------------

    def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        return sync(self._loop, _with_retries, f"{what} {self._where}",
                    lambda: self._fs._call_s3(method, Bucket=self._bucket, Key=self._key,
                                              **kwargs),
                    self._retries, lambda: self._aborting, retry_seconds=self._retry_seconds)

    def _target_size(self) -> int:
        return min(_MAX_PART, self._part_size * 2 ** ((self._next_part - 1) // _PARTS_PER_SIZE))

    def _new_buffer(self) -> bytearray:
        size = self._target_size()
        while self._free:
            buf = self._free.pop()
            if len(buf) == size:
                return buf
        return bytearray(size)

    def _send(self, body: bytearray) -> None:
        if self._upload_id is None:
            self._upload_id = self._call("start", "create_multipart_upload")["UploadId"]
        if self._next_part > _MAX_PARTS:
            raise StorageError(
                f"{self._where}: more than {_MAX_PARTS} parts; raise SPOTRUN_S3_PART_MIB"
            )
        while len(self._inflight) >= self._concurrency:
            self._reap(concurrent.futures.FIRST_COMPLETED)
        number = self._next_part
        self._next_part += 1
        fut = asyncio.run_coroutine_threadsafe(self._upload_part(number, body), self._loop)
        self._inflight[fut] = body

    async def _upload_part(self, number: int, body: bytearray) -> dict[str, Any]:
        response = await _with_retries(
            f"part {number} of {self._where}",
            lambda: self._fs._call_s3("upload_part", Bucket=self._bucket, Key=self._key,
                                      UploadId=self._upload_id, PartNumber=number, Body=body),
            self._retries, lambda: self._aborting, retry_seconds=self._retry_seconds,
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    def _reap(self, when: str) -> None:
        done, _ = concurrent.futures.wait(list(self._inflight), return_when=when)
        for fut in done:
            body = self._inflight.pop(fut)
            self._parts.append(fut.result())  # raises the part's error: the caller aborts
            self._free.append(body)


def _s3_read(fs: Any, path: str, part_size: int, concurrency: int,
             retries: int, *, retry_seconds: float | None = None) -> bytes | bytearray:
    return sync(fs.loop, _s3_read_async, fs, path, part_size, concurrency, retries,
                retry_seconds=retry_seconds)


async def _s3_read_async(fs: Any, path: str, part_size: int, concurrency: int,
                         retries: int, *, retry_seconds: float | None = None
                         ) -> bytes | bytearray:
    bucket, key, version = fs.split_path(path)
    where = f"s3://{bucket}/{key}"
    pin: dict[str, str] = {"VersionId": version} if version else {}

    async def get_first() -> tuple[bytes, int, str | None]:
        # One request answers a small object whole and tells a large one's size: no HEAD,
        # so small reads (manifests, ledger records) cost what a plain GET costs.
        try:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key,
                                         Range=f"bytes=0-{part_size - 1}", **pin)
        except OSError as exc:
            if _http_status(exc) != 416:
                raise
            # An empty object has no byte 0 to ask for.
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key, **pin)
        try:
            data: bytes = await response["Body"].read()
        finally:
            response["Body"].close()
        total = _total_size(response.get("ContentRange"), len(data))
        if len(data) != min(total, part_size) and len(data) != total:
            raise _ShortReadError(f"{where}: got {len(data)} bytes of the first part")
        return data, total, response.get("ETag")

    first, size, etag = await _with_retries(f"get {where}", get_first, retries,
                                            retry_seconds=retry_seconds)
    if len(first) == size:
        return first
    if etag:
        pin["IfMatch"] = etag

    buf = bytearray(size)
    view = memoryview(buf)
    view[: len(first)] = first
    done = len(first)
    del first
    gate = asyncio.Semaphore(concurrency)

    async def get_range(start: int, end: int) -> None:
        async def attempt() -> None:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key,
                                         Range=f"bytes={start}-{end - 1}", **pin)
            body = response["Body"]
            try:
                pos = start
                # Straight into the final buffer: no per-range copy held in memory.
                while pos < end:
                    got = await body.readinto(view[pos:end])
                    if not got:
                        raise _ShortReadError(
                            f"{where}: range {start}-{end - 1} ended at byte {pos}")
                    pos += got
            finally:
                body.close()

        async with gate:
            await _with_retries(f"range {start}-{end - 1} of {where}", attempt, retries,
                                retry_seconds=retry_seconds)

    tasks = [asyncio.ensure_future(get_range(lo, min(lo + part_size, size)))
             for lo in range(done, size, part_size)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return buf
