"""The backend-independent part of :mod:`spotrun.storage`: the :class:`Storage` front, the
:class:`Backend` contract every protocol implements, path handling, :class:`HashingWriter`,
and error translation.

:class:`Storage` owns the URL, the fsspec filesystem and the settings, and does what every
fsspec filesystem does the same way (listing, sizes, deleting, plain reads). What differs
per protocol (atomic writes, create-if-absent, conditional writes, fast reads, checking the
root) it hands to its backend, chosen by protocol from a registry (:func:`register_backend`,
:func:`available_backends`), with the generic fsspec backend for any other protocol.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import logging
import os
import posixpath
import time
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import IO, Any

import fsspec
from fsspec.core import split_protocol

from ..errors import (
    ConfigError,
    CredentialsError,
    StorageError,
    StorageNotFoundError,
    StorageUnavailableError,
    StorageURLError,
)
from ..format import checksum
from ..format.checksum import ChunkedCRC
from ..format.manifest import FileEntry

log = logging.getLogger(__name__)

URL_ENV = "SPOTRUN_URL"

MiB = 1 << 20
# Error codes S3 uses for "slow down / try again", whatever the HTTP status.
_RETRY_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "TooManyRequests", "RequestTimeout", "InternalError", "ServiceUnavailable",
    "RequestThrottled", "BandwidthLimitExceeded",
})

# Protocols fsspec reads but that cannot hold a run (no listing, no writes): refused up
# front rather than failing later with the HTTP client's own exceptions.
_NOT_A_RUN_STORE = frozenset({"http", "https"})


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


def _http_status(exc: BaseException) -> int:
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        seen = seen.__cause__ or seen.__context__
    return 0


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


def write_all(raw: Any, view: memoryview) -> None:
    """Write every byte of ``view`` to ``raw``: an unbuffered file may write less than asked
    (Linux caps one write at ~2 GiB)."""
    while view.nbytes:
        written = raw.write(view)
        if written is None or written >= view.nbytes:
            return
        view = view[written:]


class HashingWriter:
    """A write-only file wrapper that counts bytes and checksums them as they pass
    (CRC32C per chunk, see :mod:`spotrun.format.checksum`).

    Checksumming on the way out means a commit never re-reads what it just wrote.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._crc = ChunkedCRC()
        self.size = 0

    def write(self, data: Any) -> int:
        """Pass ``data`` through without copying it; returns its length.

        A large write is checksummed in chunks on the checksum threads while the bytes go
        out, and this returns only when both are done, so the caller may reuse or free
        ``data`` afterwards.
        """
        view = memoryview(data).cast("B")
        n = view.nbytes
        pending = self._crc.start(view)
        try:
            self._write_all(view)
        finally:
            self._crc.finish(pending)
        self.size += n
        return n

    def _write_all(self, view: memoryview) -> None:
        write_all(self._raw, view)

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
    def entry(self) -> FileEntry:
        """The manifest entry of what was written: size and chunk checksums."""
        return self._crc.entry()




class Backend:
    """What one protocol does its own way; one instance per :class:`Storage`.

    The defaults here are those of a generic fsspec filesystem; a backend overrides what
    its store does better or differently (see ``local.py``, ``fsspec.py``, ``s3.py``).
    Paths passed in are backend paths (``storage.full(rel)``) for the byte-level methods
    and run-relative for the record-level ones (``write_if_absent`` and the tagged
    objects), which build on the :class:`Storage` front.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.fs = storage.fs

    @classmethod
    def client_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The fsspec options to build this protocol's filesystem with (defaults added)."""
        return options

    @classmethod
    def select(cls, fs: Any) -> type[Backend]:
        """The backend class to use with ``fs``: this one, unless ``fs`` lacks what it
        needs (another fsspec implementation registered for the same protocol)."""
        return cls

    # -- checks and reads ----------------------------------------------------------------

    def ensure_root(self, *, create: bool) -> None:
        """Check the run root is usable; create it when ``create`` (see Storage.ensure_root)."""
        if create:
            self.fs.makedirs(self.storage.root, exist_ok=True)

    def read_bytes(self, path: str) -> bytes | bytearray:
        return bytes(self.fs.cat_file(path))

    def verify(self, rel: str, entry: FileEntry) -> str | None:
        return checksum.problem(self.storage.read_bytes(rel), entry)

    # -- writes --------------------------------------------------------------------------

    def write(self, path: str) -> Iterator[HashingWriter]:
        """A generator yielding one :class:`HashingWriter`: the file at ``path`` appears
        only if the generator is resumed normally, never when an exception is thrown in."""
        raise NotImplementedError

    def write_if_absent(self, rel: str, data: bytes) -> bool:
        # fsspec has no portable create-if-absent: best effort (check, then write).
        if self.storage.exists(rel):
            return False
        self.storage.write_bytes(rel, data)
        return True

    def move_folder(self, src: str, dst: str, remove_first: Sequence[str]) -> None:
        """Move the folder ``src`` (run-relative) to ``dst``: here a copy of each file
        (server-side where the store can), then the originals deleted, the names in
        ``remove_first`` before the rest (see :meth:`Storage.move_folder`)."""
        st = self.storage
        src_root = st.full(src).rstrip("/")
        self.fs.invalidate_cache(src_root)
        # Some filesystems list with a leading "/" (memory://) that full() leaves out:
        # names relative to the folder are computed without it.
        base = src_root.lstrip("/")
        for path in sorted(str(p) for p in self.fs.find(src_root)):
            target = st.full(f"{dst}/{posixpath.relpath(path.lstrip('/'), base)}")
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)  # no-op on object stores
            self.fs.copy(path, target)
        for name in remove_first:
            st.remove(f"{src}/{name}")
        st.remove(src)

    # -- tagged objects: numbered versions ``rel/v<generation>.json`` ---------------------
    # Replacing version g means creating g + 1 with write_if_absent, which only one writer
    # can do where write_if_absent is atomic (local disk); best effort elsewhere.

    def read_tagged(self, rel: str) -> tuple[bytes, str] | None:
        st = self.storage
        for _ in range(10):
            generations = self._tagged_versions(rel)
            if not generations:
                return None
            newest = generations[-1]
            try:
                return bytes(st.read_bytes(_tagged_name(rel, newest))), str(newest)
            except StorageNotFoundError:
                continue  # replaced and pruned between the listing and the read: look again
        raise StorageError(f"{st.display(rel)} keeps changing while being read; try again")

    def create_tagged(self, rel: str, data: bytes) -> str | None:
        if self._tagged_versions(rel):
            return None
        return "1" if self.storage.write_if_absent(_tagged_name(rel, 1), data) else None

    def replace_tagged(self, rel: str, data: bytes, tag: str) -> str | None:
        st = self.storage
        try:
            generation = int(tag)
        except ValueError:
            return None
        mine = _tagged_name(rel, generation + 1)
        if not st.write_if_absent(mine, data):
            return None
        generations = self._tagged_versions(rel)
        if generations[-1] != generation + 1:
            # ``tag`` was stale and its successor had already been pruned: not ours to make.
            st.remove(mine)
            return None
        for old in generations[:-2]:  # keep the previous version for readers mid-listing
            st.remove(_tagged_name(rel, old))
        return str(generation + 1)

    def _tagged_versions(self, rel: str) -> list[int]:
        found = []
        for name in self.storage.list_dir(rel):
            if name.startswith("v") and name.endswith(".json") and name[1:-5].isdigit():
                found.append(int(name[1:-5]))
        return sorted(found)


def _tagged_name(rel: str, generation: int) -> str:
    return f"{rel}/v{generation:012d}.json"


class Storage:
    """The files under one run URL.

    Args:
        url: a local path, ``file://...``, ``s3://bucket/prefix``, ``memory://...`` or any
            fsspec URL.
        storage_options: passed to the fsspec filesystem (e.g. ``{"client_kwargs":
            {"endpoint_url": ...}}`` for S3-compatible stores).
        part_size: S3 multipart part size and ranged-read size in bytes (at least 5 MiB).
            Default: ``$SPOTRUN_S3_PART_MIB`` MiB, else 16 MiB. Checked, like every S3
            knob, by the S3 backend only: other backends ignore it.
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
        if "\0" in url:
            # No filesystem accepts it (the OS raises "embedded null byte").
            raise StorageURLError(
                f"run URL {url!r} contains a NUL byte; pass the path or URL without it"
            )
        protocol, path = split_protocol(url)
        if protocol in _NOT_A_RUN_STORE:
            raise StorageURLError(
                f"run URL {url!r}: {protocol}:// is read-only and cannot hold a run; use "
                "s3://bucket/prefix (for an S3-compatible server at an http:// address, set "
                "AWS_ENDPOINT_URL or storage_options={'client_kwargs': {'endpoint_url': ...}}), "
                "gs://, az:// or a path"
            )
        if protocol in (None, "file", "local"):
            protocol = "file"
            path = os.path.abspath(os.path.expanduser(path))
            url = path
        elif not path or path.strip("/") == "":
            raise StorageURLError(
                f"run URL {url!r} has no bucket or path; use e.g. {protocol}://bucket/run-name"
            )
        backend = backend_class(protocol)
        options = backend.client_options(dict(storage_options or {}))
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
        # Transfer knobs of the backends that have them (S3's part size and concurrency),
        # read and checked by those backends; kept here so a pickled Storage rebuilds alike.
        self._part_size_arg, self._concurrency_arg = part_size, concurrency
        self._backend: Backend = backend.select(self.fs)(self)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    @property
    def backend(self) -> Backend:
        """The object doing this URL's protocol-specific work (see :func:`backend_class`)."""
        return self._backend

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
            self._backend.ensure_root(create=create)

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

    def modified(self, rel: str) -> float | None:
        """When ``rel`` was last written (epoch seconds) by the store's own clock: S3's
        LastModified, a local file's mtime; None when the backend does not say. Raises
        StorageNotFoundError when ``rel`` is absent."""
        path = self.full(rel)
        with translate_errors(self.display(rel), "reading the time of"):
            self.fs.invalidate_cache(posixpath.dirname(path))  # another machine rewrites it
            info = self.fs.info(path)
        for key in ("LastModified", "mtime", "last_modified", "updated", "created"):
            value = info.get(key)
            if isinstance(value, datetime.datetime):
                return value.timestamp()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        return None

    def read_bytes(self, rel: str) -> bytes | bytearray:
        """The whole content of ``rel``.

        On S3 an object larger than one part comes as parallel ranged GETs into one
        preallocated ``bytearray`` (returned as is: converting it to ``bytes`` would copy
        it); each range is pinned to the object's ETag, so an object replaced mid-read
        fails the read instead of mixing two versions.
        """
        with translate_errors(self.display(rel), "reading"):
            return self._backend.read_bytes(self.full(rel))

    def verify(self, rel: str, entry: FileEntry) -> str | None:
        """Why ``rel`` does not match its manifest ``entry`` (size or checksum), or None.

        A memory-mapped pass locally (no copy), parallel ranged GETs on S3; the chunks are
        checked on several cores.
        """
        with translate_errors(self.display(rel), "verifying"):
            return self._backend.verify(rel, entry)

    def open_read(self, rel: str) -> IO[bytes]:
        with translate_errors(self.display(rel), "opening"):
            return self.fs.open(self.full(rel), "rb")  # type: ignore[no-any-return]

    # -- writing -----------------------------------------------------------------------

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[HashingWriter]:
        """Write ``rel`` all-or-nothing; the file appears only if the block succeeds.

        Yields a :class:`HashingWriter`, so the caller learns size and checksum for free.
        On S3 the upload runs while the caller writes (see the module docstring for the
        memory it holds); on local disk the bytes go straight to the file, no copy.
        """
        with translate_errors(self.display(rel), "writing"):
            yield from self._backend.write(self.full(rel))

    def write_bytes(self, rel: str, data: bytes) -> FileEntry:
        """Write ``data`` to ``rel`` atomically; returns its manifest entry."""
        with self.open_write(rel) as f:
            f.write(data)
        return f.entry

    def write_if_absent(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` only if nothing is there; True when this call created it.

        Local disk uses O_EXCL-style linking, so concurrent writers never overwrite each
        other. Object stores have no portable conditional PUT through fsspec, so records
        written with this should carry unique names (this is a best-effort check there).
        """
        return self._backend.write_if_absent(rel, data)

    def move_folder(self, src: str, dst: str, *, remove_first: Sequence[str] = ()) -> None:
        """Move the folder ``src`` to ``dst`` (both relative to the run URL).

        Local disk renames it (atomic). Elsewhere each file is copied (server-side on S3)
        and the originals are then deleted, the names in ``remove_first`` before the rest,
        so an interrupted move leaves ``src`` without them (e.g. without its manifest: never
        a committed checkpoint with files missing).
        """
        with translate_errors(self.display(src), "moving"):
            self._backend.move_folder(src, dst, tuple(remove_first))

    def remove(self, rel: str) -> None:
        """Delete ``rel`` (a file or a whole folder); missing is not an error."""
        path = self.full(rel)
        with translate_errors(self.display(rel), "deleting"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path, recursive=True)
            self.fs.invalidate_cache(posixpath.dirname(path))

    # -- conditional writes (the run's single-writer lease, see spotrun.records.lease) -----------
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
        return self._backend.read_tagged(rel)

    def create_tagged(self, rel: str, data: bytes) -> str | None:
        """Create tagged object ``rel`` if it does not exist; its tag, or None when it does."""
        return self._backend.create_tagged(rel, data)

    def replace_tagged(self, rel: str, data: bytes, tag: str) -> str | None:
        """Replace ``rel`` only if its current version is still ``tag``; the new tag, or None
        when another writer changed it first (or it is gone)."""
        return self._backend.replace_tagged(rel, data, tag)


# protocol -> backend, in the style of fsspec's ``known_implementations``: the built-in
# backends are named by "module:Class" strings and imported on first use (a run on local disk
# never imports the S3 code); register_backend adds classes or such strings, and a protocol
# missing from it gets the generic FsspecBackend.
_BACKENDS: dict[str, type[Backend] | str] = {
    "file": "spotrun.storage.local:LocalBackend",
    "s3": "spotrun.storage.s3:S3Backend",
    "s3a": "spotrun.storage.s3:S3Backend",
    **{p: "spotrun.storage.fsspec:ObjectStoreBackend" for p in ("gs", "gcs", "az", "abfs", "abfss")},
}


#: What a protocol missing from the registry gets (temporary name, then move).
_GENERIC_BACKEND = "spotrun.storage.fsspec:FsspecBackend"


def _load(protocol: str, target: str) -> type[Backend]:
    """The class ``"package.module:Class"`` names, imported now."""
    module_name, _, attr = target.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"backend {target!r} registered for {protocol}:// cannot be imported ({exc}); "
            "check the name (package.module:Class) or install its package"
        ) from exc
    if not (isinstance(found, type) and issubclass(found, Backend)):
        raise ConfigError(
            f"backend {target!r} registered for {protocol}:// is not a Backend subclass; "
            "subclass spotrun.storage.Backend (or FsspecBackend)"
        )
    return found


def register_backend(protocol: str, cls: type[Backend] | str, *, replace: bool = False) -> None:
    """Make every :class:`Storage` for ``protocol://`` URLs use backend ``cls``.

    ``cls`` subclasses :class:`Backend` (or one of the built-ins, e.g.
    ``spotrun.storage.FsspecBackend``) and overrides what its store does differently; it may
    also be given as ``"package.module:Class"``, imported when a URL first needs it. The
    fsspec filesystem itself still comes from fsspec's own registry. Registering another
    class for a protocol that already has one needs ``replace=True``.
    """
    if not isinstance(protocol, str) or not protocol or "://" in protocol:
        raise ConfigError(
            f"backend protocol {protocol!r} is not a URL scheme; pass e.g. 'gs' (no '://')"
        )
    if isinstance(cls, str):
        if ":" not in cls:
            raise ConfigError(
                f"backend {cls!r} for {protocol!r} must name its class as package.module:Class"
            )
    elif not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(
            f"backend for {protocol!r} must be a Backend subclass, not {cls!r}; subclass "
            "spotrun.storage.Backend (or FsspecBackend)"
        )
    current = _BACKENDS.get(protocol)
    if isinstance(current, str) and not isinstance(cls, str):
        current_is_cls = current == f"{cls.__module__}:{cls.__qualname__}"
    else:
        current_is_cls = current == cls
    if current is not None and not current_is_cls and not replace:
        name = current if isinstance(current, str) else current.__qualname__
        raise ConfigError(
            f"protocol {protocol!r} already uses {name}; pass replace=True "
            "to register_backend to swap it"
        )
    _BACKENDS[protocol] = cls


def available_backends() -> Mapping[str, type[Backend]]:
    """The registered protocols and their backend classes (a read-only live view; every
    entry is imported first); any other protocol fsspec knows uses ``FsspecBackend``."""
    for protocol in list(_BACKENDS):
        backend_class(protocol)
    return MappingProxyType(_BACKENDS)  # type: ignore[arg-type]


def backend_class(protocol: str) -> type[Backend]:
    """The backend class for ``protocol``: the registered one (imported on first use), else
    the generic fsspec backend (temporary name, then move)."""
    found = _BACKENDS.get(protocol)
    if isinstance(found, str):
        found = _BACKENDS[protocol] = _load(protocol, found)
    if found is not None:
        return found
    # Named, not imported: the backend modules build on this one.
    return _load(protocol, _GENERIC_BACKEND)


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
