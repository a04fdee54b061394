"""S3 (``s3://``, ``s3a://``) through s3fs, plus a thread pool for multipart uploads.

Client settings: connect/read timeouts and botocore's standard retry mode are added to the
caller's options (:func:`_s3_client_options`), and s3fs's own retry loop is turned off.
Writes of more than one part are multipart uploads sent from threads (:class:`_S3Upload`,
through a botocore client that mirrors s3fs's, :mod:`.s3client`), each part with its
CRC32C; large reads are parallel ranged GETs on s3fs's event loop (:func:`_s3_read`);
parts and ranges get bounded extra rounds (:func:`_with_retries`,
:func:`_with_retries_sync`), and the lease's tagged object is one object changed by
conditional PUTs (IfNoneMatch / IfMatch). See :mod:`spotrun.storage` for the limits and
knobs.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import os
import posixpath
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import crc32c as _crc32c
from fsspec.asyn import sync

from ..config import env_float
from ..errors import StorageError, StorageUnavailableError
from ..validate import count, number
from . import inflight
from .base import (
    _RETRY_CODES,
    _UNAVAILABLE_FIX,
    Backend,
    HashingWriter,
    MiB,
    _describe,
    _http_status,
    _is_credentials_error,
    translate_errors,
)
from .fsspec import ObjectStoreBackend

log = logging.getLogger(__name__)

DEFAULT_PART_MIB = 16
DEFAULT_CONCURRENCY = 8
DEFAULT_RETRIES = 3
DEFAULT_RETRY_SECONDS = 120.0
# S3's limits: every part but the last at least 5 MiB, at most 5 GiB.
_MIN_PART = 5 * MiB
_MAX_PART = 5 << 30
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0
DEFAULT_ATTEMPTS = 3
# S3 allows at most 10,000 parts per upload.
_MAX_PARTS = 10_000
# Part sizes double every this many parts, so a stream of unknown length still fits in
# 10,000 parts: 2000 x (1+2+4+8+16) x 16 MiB is about 970 GiB per object by default.
_PARTS_PER_SIZE = 2000
_BACKOFF_BASE_S = 0.25
_BACKOFF_MAX_S = 10.0

T = TypeVar("T")


class S3Backend(ObjectStoreBackend):
    """s3fs, driven directly for parallel transfers and conditional writes.

    Reads, small writes and conditional writes use s3fs's own aiobotocore client on
    fsspec's event loop. Multipart uploads send their parts from threads through a
    botocore client built from that client (same credentials, endpoint, region, timeouts,
    retries, SSE and requester-pays options): one loop thread signing and sending every
    part was the limit of an upload on a few cores (see :mod:`.s3client`). Reads stay on
    the loop: there the bytes go straight into one buffer and the loop was not the limit.
    """

    def __init__(self, storage: Any) -> None:
        super().__init__(storage)
        # s3fs repeats every failed call up to 5 times on top of botocore's attempts and
        # spotrun's rounds; multiplied, a throttled read kept retrying for minutes. One
        # try here: botocore and _with_retries are the (bounded) retry layers.
        self.fs.retries = 1
        self.part_size, self.concurrency, self.retries, self.retry_seconds = _transfer_knobs(
            storage._part_size_arg, storage._concurrency_arg)
        self._clients: dict[tuple[str, int], Any] = {}
        self._clients_lock = threading.Lock()

    @classmethod
    def client_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        return _s3_client_options(options)

    @classmethod
    def select(cls, fs: Any) -> type[Backend]:
        # Another implementation registered with fsspec for s3:// gets the generic path.
        return cls if hasattr(fs, "_call_s3") else ObjectStoreBackend

    def read_bytes(self, path: str) -> bytes | bytearray:
        return _s3_read(self.fs, path, self.part_size, self.concurrency, self.retries,
                        retry_seconds=self.retry_seconds)

    def write(self, path: str) -> Iterator[HashingWriter]:
        upload = _S3Upload(self.fs, path, part_size=self.part_size,
                           concurrency=self.concurrency, retries=self.retries,
                           retry_seconds=self.retry_seconds, client=self._threaded_client)
        try:
            yield HashingWriter(upload)
            upload.complete()
        except BaseException:
            upload.abort()
            raise
        finally:
            self.fs.invalidate_cache(path)

    def _threaded_client(self, bucket: str) -> Any:
        """The botocore client the upload threads share for ``bucket``: built once per
        process (a forked child must not reuse its parent's connections)."""
        from .s3client import threaded_client

        key = (bucket, os.getpid())
        with self._clients_lock:
            found = self._clients.get(key)
            if found is None:
                found = self._clients[key] = threaded_client(self.fs, bucket,
                                                             self.concurrency)
            return found

    # -- tagged objects: one object, its tag the ETag --------------------------------------

    def read_tagged(self, rel: str) -> tuple[bytes, str] | None:
        st, fs = self.storage, self.fs
        bucket, key, _ = fs.split_path(st.full(rel))

        async def get() -> tuple[bytes, str]:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await response["Body"].read(), str(response["ETag"])
            finally:
                response["Body"].close()

        with translate_errors(st.display(rel), "reading"):
            try:
                return sync(fs.loop, get)  # type: ignore[no-any-return]
            except FileNotFoundError:
                return None

    def create_tagged(self, rel: str, data: bytes) -> str | None:
        return self._put_conditional(rel, data, IfNoneMatch="*")

    def replace_tagged(self, rel: str, data: bytes, tag: str) -> str | None:
        return self._put_conditional(rel, data, IfMatch=tag)

    def _put_conditional(self, rel: str, data: bytes, **condition: str) -> str | None:
        st, fs = self.storage, self.fs
        path = st.full(rel)
        bucket, key, _ = fs.split_path(path)
        with translate_errors(st.display(rel), "writing"):
            try:
                response = sync(fs.loop, fs._call_s3, "put_object", Bucket=bucket,
                                Key=key, Body=data, **condition)
            except OSError as exc:
                # 412: the condition failed; 409: a concurrent conditional write won; 404:
                # IfMatch on an object that is gone. All mean "another writer got there".
                if _http_status(exc) in (404, 409, 412):
                    return None
                raise
            finally:
                fs.invalidate_cache(posixpath.dirname(path))
        return str(response["ETag"])


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _transfer_knobs(part_size: int | None,
                    concurrency: int | None) -> tuple[int, int, int, float]:
    """Part size (bytes), concurrency, retry rounds and retry time limit (seconds): the
    arguments, else ``SPOTRUN_S3_*``, else the defaults; ConfigError naming the bad one."""
    example = f"{DEFAULT_PART_MIB * MiB} ({DEFAULT_PART_MIB} MiB; S3 allows 5 MiB..5 GiB)"
    if part_size is not None:
        part = count(part_size, "part_size", minimum=_MIN_PART, maximum=_MAX_PART,
                     example=example)
    else:
        part = count(_env("SPOTRUN_S3_PART_MIB") or DEFAULT_PART_MIB, "SPOTRUN_S3_PART_MIB",
                     minimum=_MIN_PART // MiB, maximum=_MAX_PART // MiB,
                     example=f"{DEFAULT_PART_MIB} (S3 allows 5..5120 MiB)") * MiB
    conc = count(concurrency if concurrency is not None
                 else _env("SPOTRUN_S3_CONCURRENCY") or DEFAULT_CONCURRENCY,
                 "concurrency" if concurrency is not None else "SPOTRUN_S3_CONCURRENCY",
                 minimum=1, example=str(DEFAULT_CONCURRENCY))
    retries = count(_env("SPOTRUN_S3_RETRIES") or DEFAULT_RETRIES, "SPOTRUN_S3_RETRIES",
                    minimum=0, example=str(DEFAULT_RETRIES))
    seconds = number(_env("SPOTRUN_S3_RETRY_SECONDS") or DEFAULT_RETRY_SECONDS,
                     "SPOTRUN_S3_RETRY_SECONDS", minimum=0,
                     example=f"{DEFAULT_RETRY_SECONDS:g}")
    return part, conc, retries, seconds


def _s3_client_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with spotrun's timeouts and botocore retry settings where the caller
    gave none (s3fs's own defaults would retry a throttled call for minutes)."""
    config = dict(options.get("config_kwargs") or {})
    connect = number(_env("SPOTRUN_S3_CONNECT_TIMEOUT") or DEFAULT_CONNECT_TIMEOUT_S,
                     "SPOTRUN_S3_CONNECT_TIMEOUT", minimum=0, allow_minimum=False,
                     example="10")
    read = number(_env("SPOTRUN_S3_READ_TIMEOUT") or DEFAULT_READ_TIMEOUT_S,
                  "SPOTRUN_S3_READ_TIMEOUT", minimum=0, allow_minimum=False, example="60")
    attempts = count(_env("SPOTRUN_S3_ATTEMPTS") or DEFAULT_ATTEMPTS, "SPOTRUN_S3_ATTEMPTS",
                     minimum=1, example="3")
    config.setdefault("connect_timeout", connect)
    config.setdefault("read_timeout", read)
    # Standard mode: retries throttling, 5xx, timeouts and dropped connections with
    # exponential backoff, and its retry quota stops a storm of retries on a dead endpoint.
    config.setdefault("retries", {"mode": "standard", "total_max_attempts": attempts})
    return {**options, "config_kwargs": config}


# -- parallel S3 transfers --------------------------------------------------------------


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


def _retry_delay(what: str, exc: Exception, n: int, retries: int, started: float,
                 deadline: float, retry_seconds: float, stop: Callable[[], bool]) -> float | None:
    """The backoff before retrying attempt ``n`` that failed with ``exc``; None when the
    failure is not worth repeating (the caller re-raises it). Raises
    :class:`StorageUnavailableError` once the retries or the time limit are spent."""
    if stop() or not _retryable(exc):
        return None
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
    log.info("S3 %s failed (%s); retry %d of %d in %.2fs", what, reason, n + 1, retries, delay)
    return delay


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
            delay = _retry_delay(what, exc, n, retries, started, deadline, retry_seconds, stop)
            if delay is None:
                raise
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _with_retries_sync(what: str, attempt: Callable[[], T], retries: int,
                       stop: Callable[[], bool] = lambda: False, *,
                       retry_seconds: float | None = None) -> T:
    """:func:`_with_retries` for a blocking ``attempt`` (the upload threads). The same
    rounds, backoff, limits and messages, except that a retry already running is not cut
    at the time limit: a blocking request cannot be interrupted, and botocore's connect and
    read timeouts bound it instead."""
    if retry_seconds is None:
        retry_seconds = env_float("SPOTRUN_S3_RETRY_SECONDS", DEFAULT_RETRY_SECONDS)
    started = time.monotonic()
    deadline = started + retry_seconds
    for n in range(retries + 1):
        try:
            return attempt()
        except Exception as exc:
            delay = _retry_delay(what, exc, n, retries, started, deadline, retry_seconds, stop)
            if delay is None:
                raise
            # Sleep in slices so an abort does not wait out a long backoff.
            until = time.monotonic() + delay
            while not stop() and time.monotonic() < until:
                time.sleep(min(0.1, until - time.monotonic()))
            if stop():
                raise
    raise AssertionError("unreachable")  # pragma: no cover


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
    a ``part_size`` buffer; a full buffer goes out as an UploadPart from a pool of
    ``concurrency`` threads (a botocore client mirroring s3fs's, see
    :mod:`spotrun.storage.s3client`) as soon as more bytes arrive, and ``write`` blocks
    only while ``concurrency`` parts are already in flight. So at most ``concurrency + 1``
    part buffers exist at once. Every part carries its CRC32C (``ChecksumCRC32C``; the
    upload is created with ``ChecksumAlgorithm="CRC32C"``), so S3 rejects a part damaged on
    the way and stores the object's composite checksum. An object that never fills one
    part is one PUT at ``complete()``, through s3fs.

    Each part gets a daemon thread of its own, started by the thread that writes: it
    inherits that thread's niceness (the background writer's nice 10, as the checksum
    pools do), and a part hung on a silent endpoint never holds up the process's exit (a
    ``ThreadPoolExecutor`` joins its threads at exit; fsspec's loop thread, which sent the
    parts before, is a daemon too). At most ``concurrency`` exist at once.
    """

    def __init__(self, fs: Any, path: str, *, part_size: int, concurrency: int,
                 retries: int, retry_seconds: float | None = None,
                 client: Callable[[str], Any] | None = None) -> None:
        self._fs = fs
        self._loop = fs.loop
        self._bucket, self._key, _ = fs.split_path(path)
        self._where = f"s3://{self._bucket}/{self._key}"
        self._part_size = part_size
        self._concurrency = concurrency
        self._retries = retries
        self._retry_seconds = retry_seconds
        self._client_factory = client or self._own_client
        self._client: Any = None
        self._extra: dict[str, dict[str, Any]] = {}
        self._upload_id: str | None = None
        self._next_part = 1
        self._buf = bytearray(part_size)
        self._fill = 0
        self._free: list[bytearray] = []
        self._inflight: dict[concurrent.futures.Future[dict[str, Any]], bytearray] = {}
        self._parts: list[dict[str, Any]] = []
        self._aborting = False
        # The token of this upload's entry in spotrun.storage.inflight while it is open.
        self._inflight_token: int | None = None
        self._aborted_remotely = False
        self._completing: list[dict[str, Any]] | None = None
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
            sync(self._loop, _with_retries, f"put {self._where}",
                 lambda: self._fs._call_s3("put_object", Bucket=self._bucket, Key=self._key,
                                           Body=body),
                 self._retries, lambda: self._aborting, retry_seconds=self._retry_seconds)
        else:
            last = self._buf if self._fill == len(self._buf) else self._buf[: self._fill]
            self._buf = bytearray()
            self._send(last)
            while self._inflight:
                self._reap(concurrent.futures.FIRST_EXCEPTION)
            parts = sorted(self._parts, key=lambda p: p["PartNumber"])
            # From here a failure may come after S3 made the object (its answer lost):
            # abort() then removes the object if it is this upload's.
            self._completing = parts
            self._call("complete", "complete_multipart_upload", UploadId=self._upload_id,
                       MultipartUpload={"Parts": parts})
            self._forget()
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
            # Waiting (briefly) rather than abandoning them: a part S3 accepts after the
            # abort would keep the upload's storage alive.
            concurrent.futures.wait(list(self._inflight), timeout=60)
            self._inflight.clear()
        if self._completing is not None and self._remove_if_mine(self._completing):
            self._forget()
            return
        if self._upload_id is not None and not self._aborted_remotely:
            try:
                self._call("abort", "abort_multipart_upload", UploadId=self._upload_id)
            except Exception as exc:  # noqa: BLE001 - the original failure matters more
                log.warning(
                    "could not abort the multipart upload of %s (%s); no object was written, "
                    "but its parts may be billed until an AbortIncompleteMultipartUpload "
                    "lifecycle rule removes them", self._where, exc)
        self._forget()

    def abort_now(self) -> None:
        """Abort the upload from another thread, without waiting for the writer or its
        parts: what :func:`spotrun.storage.inflight.abort_all` calls when a stop save is
        abandoned (the process is about to exit, a part may hang forever). Parts still in
        flight then fail (S3 answers NoSuchUpload) instead of being retried."""
        self._aborting = True
        upload_id = self._upload_id
        if upload_id is None or self._aborted_remotely:
            return
        # One request (botocore's own attempts and timeouts bound it; abort_all bounds the
        # wait for it): no spotrun retry rounds on the way out.
        self._request("abort_multipart_upload", UploadId=upload_id)
        self._aborted_remotely = True
        log.info("aborted the abandoned multipart upload of %s", self._where)

    def _remove_if_mine(self, parts: list[dict[str, Any]]) -> bool:
        """After a CompleteMultipartUpload whose answer was lost: delete the object if S3
        made it from this upload's parts; True when it did (nothing is left to abort).

        Only an object whose composite CRC32C is that of these parts is this upload's; one
        another writer put at the same key (or none at all) is left alone. One HEAD and one
        DELETE, bounded by botocore's timeouts and attempts; best effort (logged).
        """
        crcs = b"".join(base64.b64decode(p["ChecksumCRC32C"]) for p in parts)
        mine = base64.b64encode(_crc32c.crc32c(crcs).to_bytes(4, "big")).decode()
        try:
            head = self._request("head_object", ChecksumMode="ENABLED")
        except FileNotFoundError:
            return False  # never made: the upload is still open, abort it
        except Exception as exc:  # noqa: BLE001 - the save's own failure matters more
            log.warning("could not check whether %s was written by the failed save (%s); "
                        "it has no manifest, and the next save replaces it", self._where, exc)
            return False
        found = str(head.get("ChecksumCRC32C") or "").split("-")[0]
        if found != mine:
            return False
        try:
            self._request("delete_object")
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("could not remove %s, written by a save whose completion was not "
                        "confirmed (%s); it has no manifest, and the next save replaces it",
                        self._where, exc)
        else:
            log.info("removed %s: its upload completed, but the answer was lost and the "
                     "save failed", self._where)
        return True

    def _forget(self) -> None:
        token, self._inflight_token = self._inflight_token, None
        if token is not None:
            inflight.unregister(token)

    # -- internals ---------------------------------------------------------------------

    def _own_client(self, bucket: str) -> Any:
        from .s3client import threaded_client

        return threaded_client(self._fs, bucket, self._concurrency)

    def _request(self, method: str, **kwargs: Any) -> Any:
        """One botocore call with s3fs's per-call options (SSE, requester pays), its
        ClientErrors turned into the OSErrors s3fs raises (so 403 is PermissionError)."""
        from botocore.exceptions import ClientError
        from s3fs.errors import translate_boto_error

        try:
            return getattr(self._client, method)(Bucket=self._bucket, Key=self._key,
                                                 **self._extra.get(method, {}), **kwargs)
        except ClientError as exc:
            raise translate_boto_error(exc) from exc

    def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        return _with_retries_sync(f"{what} {self._where}",
                                  lambda: self._request(method, **kwargs), self._retries,
                                  lambda: self._aborting, retry_seconds=self._retry_seconds)

    def _start(self) -> None:
        self._client = self._client_factory(self._bucket)
        aio = sync(self._loop, self._fs.get_s3, self._bucket)
        for method in ("create_multipart_upload", "upload_part", "complete_multipart_upload",
                       "abort_multipart_upload", "head_object", "delete_object"):
            # s3fs's own filter: its s3_additional_kwargs / requester-pays options that
            # this operation takes, as every s3fs call gets them.
            extra = self._fs._get_s3_method_kwargs(getattr(aio, method))
            self._extra[method] = {k: v for k, v in extra.items() if k not in ("Bucket", "Key")}
        self._upload_id = self._call("start", "create_multipart_upload",
                                     ChecksumAlgorithm="CRC32C")["UploadId"]
        # Open until completed or aborted: its parts are billed while it is. A process that
        # abandons this save (a stop deadline missed) aborts it through this entry.
        self._inflight_token = inflight.register(f"the multipart upload of {self._where}",
                                                 self.abort_now)

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
            self._start()
        if self._next_part > _MAX_PARTS:
            raise StorageError(
                f"{self._where}: more than {_MAX_PARTS} parts; raise SPOTRUN_S3_PART_MIB"
            )
        while len(self._inflight) >= self._concurrency:
            self._reap(concurrent.futures.FIRST_COMPLETED)
        number = self._next_part
        self._next_part += 1
        fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(self._upload_part(number, body))
            except BaseException as exc:  # noqa: BLE001 - handed to the writer by _reap
                fut.set_exception(exc)

        fut.set_running_or_notify_cancel()
        threading.Thread(target=run, daemon=True, name=f"spotrun-s3-part-{number}").start()
        self._inflight[fut] = body

    def _upload_part(self, number: int, body: bytearray) -> dict[str, Any]:
        # S3 checks the part against this and keeps it for the object's composite checksum.
        crc = base64.b64encode(_crc32c.crc32c(body).to_bytes(4, "big")).decode()
        response = _with_retries_sync(
            f"part {number} of {self._where}",
            lambda: self._request("upload_part", UploadId=self._upload_id, PartNumber=number,
                                  Body=body, ChecksumCRC32C=crc),
            self._retries, lambda: self._aborting, retry_seconds=self._retry_seconds,
        )
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32C": crc}

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
