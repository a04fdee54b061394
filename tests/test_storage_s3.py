"""Parallel S3 transfers in spotrun.storage, against the moto server.

Multipart uploads and ranged downloads are observed on the wire through a small HTTP
proxy on 127.0.0.1 that sits in front of moto, counts requests and can answer chosen ones
with an error, so retries and aborts are tested against real HTTP failures.
"""

from __future__ import annotations

import http.client
import io
import os
import signal
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import boto3
import pytest
import torch

import spotrun
from spotrun.errors import ConfigError, StorageError
from spotrun.format.checksum import entry_for
from spotrun.storage import HashingWriter, Storage

MiB = 1 << 20
PART = 5 * MiB  # S3's minimum part size: keeps multi-part payloads small and fast


def _is_upload_part(method: str, query: dict[str, list[str]], headers: dict[str, str]) -> bool:
    return method == "PUT" and "partNumber" in query and "uploadId" in query


def _is_ranged_get(method: str, query: dict[str, list[str]], headers: dict[str, str]) -> bool:
    return method == "GET" and "range" in headers


class FaultProxy:
    """A threaded HTTP proxy to moto that fails the first ``failures`` matching requests.

    ``status`` is the injected answer (500 InternalError, 503 SlowDown, 403 AccessDenied);
    ``seen`` records (method, path, query, status sent) for every request.
    """

    _CODES: ClassVar[dict[int, str]] = {500: "InternalError", 503: "SlowDown", 403: "AccessDenied"}

    def __init__(self, upstream: str) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.match: Callable[..., bool] = lambda *a: False
        self.failures = 0
        self.status = 500
        self.fail_when: Callable[[dict[str, list[str]]], bool] = lambda q: True
        self.seen: list[tuple[str, str, dict[str, list[str]], dict[str, str], int]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
                headers = {k.lower(): v for k, v in self.headers.items()}
                assert "chunked" not in headers.get("transfer-encoding", ""), "chunked body"
                body = self.rfile.read(int(headers.get("content-length", 0) or 0))
                with proxy._lock:
                    inject = (
                        proxy.failures > 0
                        and proxy.match(self.command, query, headers)
                        and proxy.fail_when(query)
                    )
                    if inject:
                        proxy.failures -= 1
                if inject:
                    code = proxy._CODES[proxy.status]
                    payload = (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        f"<Message>injected by the test proxy</Message></Error>"
                    ).encode()
                    proxy._record(self.command, parts.path, query, headers, proxy.status)
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                else:
                    conn = http.client.HTTPConnection(
                        proxy.upstream.hostname, proxy.upstream.port, timeout=60
                    )
                    try:
                        fwd = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("connection", "keep-alive")}
                        conn.request(self.command, self.path, body=body, headers=fwd)
                        resp = conn.getresponse()
                        data = resp.read()
                        # Recorded before answering, so a client that has its answer
                        # always finds the request in ``seen``.
                        proxy._record(self.command, parts.path, query, headers, resp.status)
                        self.send_response(resp.status)
                        for k, v in resp.getheaders():
                            if k.lower() not in ("transfer-encoding", "connection",
                                                 "content-length", "keep-alive", "date",
                                                 "server"):
                                self.send_header(k, v)
                        # A HEAD answer keeps the object's length; others carry their body.
                        length = resp.getheader("Content-Length") if self.command == "HEAD" \
                            else str(len(data))
                        self.send_header("Content-Length", length or "0")
                        self.end_headers()
                        if self.command != "HEAD":
                            self.wfile.write(data)
                    finally:
                        conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _record(self, method: str, path: str, query: dict, headers: dict, status: int) -> None:
        with self._lock:
            self.seen.append((method, path, query, headers, status))

    def count(self, pred: Callable[..., bool], status: int | None = None) -> int:
        with self._lock:
            return sum(
                1 for m, _, q, h, s in self.seen
                if pred(m, q, h) and (status is None or s == status)
            )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def proxy(moto_server: str) -> Iterator[FaultProxy]:
    p = FaultProxy(moto_server)
    yield p
    p.close()


def _options(endpoint: str, *, botocore_attempts: int | None = None) -> dict:
    opts: dict = {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True}
    if botocore_attempts is not None:
        # Leave only spotrun's own retry layer (or none) to deal with injected failures.
        opts["config_kwargs"] = {"retries": {"total_max_attempts": botocore_attempts,
                                             "mode": "standard"}}
    return opts


def _client(moto_server: str):
    return boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")


def _no_uploads_left(moto_server: str, bucket: str) -> bool:
    return not _client(moto_server).list_multipart_uploads(Bucket=bucket).get("Uploads")


def _write_in_pieces(st: Storage, rel: str, data: bytes, piece: int) -> HashingWriter:
    with st.open_write(rel) as f:
        for i in range(0, len(data), piece):
            f.write(data[i : i + piece])
    return f


def test_large_write_is_a_parallel_multipart_upload(s3_bucket, moto_server, proxy):
    st = Storage(f"s3://{s3_bucket}/run", _options(proxy.url), part_size=PART, concurrency=3)
    data = os.urandom(3 * PART + 12345)
    f = _write_in_pieces(st, "000000000001/rank-00000.pt", data, piece=3 * MiB + 7)
    assert f.size == len(data)
    assert f.entry == entry_for(data)
    assert proxy.count(_is_upload_part) == 4  # 3 full parts and a short last one
    key = "run/000000000001/rank-00000.pt"
    s3 = _client(moto_server)
    assert s3.head_object(Bucket=s3_bucket, Key=key)["ETag"].strip('"').endswith("-4")
    assert s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == data
    assert _no_uploads_left(moto_server, s3_bucket)


@pytest.mark.parametrize("size", [0, 100, PART])
def test_write_of_at_most_one_part_is_one_put(s3_bucket, moto_server, proxy, size):
    st = Storage(f"s3://{s3_bucket}/run", _options(proxy.url), part_size=PART)
    data = os.urandom(size)
    assert st.write_bytes("one.bin", data) == entry_for(data)
    assert proxy.count(_is_upload_part) == 0
    assert proxy.count(lambda m, q, h: m == "POST" and "uploads" in q) == 0
    assert _client(moto_server).get_object(Bucket=s3_bucket, Key="run/one.bin")["Body"].read() == data


def test_large_read_is_parallel_ranged_gets(s3_bucket, moto_server, proxy):
    data = os.urandom(2 * PART + 999)
    _client(moto_server).put_object(Bucket=s3_bucket, Key="run/blob", Body=data)
    st = Storage(f"s3://{s3_bucket}/run", _options(proxy.url), part_size=PART, concurrency=4)
    back = st.read_bytes("blob")
    assert bytes(back) == data
    ranges = sorted(h["range"] for m, _, q, h, s in proxy.seen if _is_ranged_get(m, q, h))
    assert ranges == sorted([f"bytes=0-{PART - 1}", f"bytes={PART}-{2 * PART - 1}",
                             f"bytes={2 * PART}-{len(data) - 1}"])
    # The first range also told the size: no HEAD. A small object costs one request.
    assert proxy.count(lambda m, q, h: m == "HEAD") == 0
    _client(moto_server).put_object(Bucket=s3_bucket, Key="run/small", Body=b"abc")
    before = len(proxy.seen)
    assert st.read_bytes("small") == b"abc"
    assert len(proxy.seen) == before + 1
    _client(moto_server).put_object(Bucket=s3_bucket, Key="run/empty", Body=b"")
    assert st.read_bytes("empty") == b""
    # Exactly one part: one request too.
    _client(moto_server).put_object(Bucket=s3_bucket, Key="run/one-part", Body=data[:PART])
    before = len(proxy.seen)
    assert bytes(st.read_bytes("one-part")) == data[:PART]
    assert len(proxy.seen) == before + 1


def test_aborted_write_leaves_no_object_and_no_upload(s3_bucket, moto_server, proxy):
    st = Storage(f"s3://{s3_bucket}/run", _options(proxy.url), part_size=PART, concurrency=2)
    with pytest.raises(RuntimeError, match="boom"):
        with st.open_write("half.bin") as f:
            f.write(os.urandom(3 * PART))  # two parts sent, a third filling
            raise RuntimeError("boom")
    assert proxy.count(_is_upload_part) >= 2  # the upload really had started
    assert proxy.count(lambda m, q, h: m == "DELETE" and "uploadId" in q) == 1
    assert not st.exists("half.bin")
    assert _no_uploads_left(moto_server, s3_bucket)


@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("layer", ["spotrun", "botocore"])
def test_upload_part_5xx_is_retried(s3_bucket, moto_server, proxy, monkeypatch, status, layer):
    if layer == "spotrun":
        opts = _options(proxy.url, botocore_attempts=1)
    else:
        monkeypatch.setenv("SPOTRUN_S3_RETRIES", "0")
        opts = _options(proxy.url)
    proxy.match, proxy.failures, proxy.status = _is_upload_part, 2, status
    st = Storage(f"s3://{s3_bucket}/run", opts, part_size=PART, concurrency=2)
    data = os.urandom(2 * PART + 1)
    f = _write_in_pieces(st, "retried.bin", data, piece=MiB)
    assert proxy.count(_is_upload_part, status=status) == 2
    assert proxy.count(_is_upload_part, status=200) == 3
    assert f.entry == entry_for(data)
    got = _client(moto_server).get_object(Bucket=s3_bucket, Key="run/retried.bin")["Body"].read()
    assert got == data
    assert _no_uploads_left(moto_server, s3_bucket)


def test_ranged_get_5xx_is_retried(s3_bucket, moto_server, proxy):
    data = os.urandom(2 * PART + 5)
    _client(moto_server).put_object(Bucket=s3_bucket, Key="run/blob", Body=data)
    proxy.match, proxy.failures, proxy.status = _is_ranged_get, 2, 503
    st = Storage(f"s3://{s3_bucket}/run", _options(proxy.url, botocore_attempts=1),
                 part_size=PART)
    assert bytes(st.read_bytes("blob")) == data
    assert proxy.count(_is_ranged_get, status=503) == 2


def test_part_that_keeps_failing_aborts_the_upload(s3_bucket, moto_server, proxy, monkeypatch):
    monkeypatch.setenv("SPOTRUN_S3_RETRIES", "1")
    proxy.match, proxy.failures, proxy.status = _is_upload_part, 10**6, 500
    proxy.fail_when = lambda q: q["partNumber"] == ["2"]
    st = Storage(f"s3://{s3_bucket}/run", _options(proxy.url, botocore_attempts=1),
                 part_size=PART, concurrency=2)
    with pytest.raises(StorageError, match="part 2 of s3://.*still failing after 2 attempts"):
        _write_in_pieces(st, "never.bin", os.urandom(3 * PART), piece=MiB)
    assert proxy.count(_is_upload_part, status=500) == 2  # first try + one spotrun retry
    assert not st.exists("never.bin")
    assert _no_uploads_left(moto_server, s3_bucket)


def test_client_error_is_not_retried(s3_bucket, moto_server, proxy):
    proxy.match, proxy.failures, proxy.status = _is_upload_part, 10**6, 403
    st = Storage(f"s3://{s3_bucket}/run", _options(proxy.url), part_size=PART)
    with pytest.raises(StorageError, match="permission denied"):
        _write_in_pieces(st, "denied.bin", os.urandom(2 * PART + 1), piece=MiB)
    # Each part is tried once: a 403 will not turn into a 200 by asking again.
    assert proxy.count(_is_upload_part) == 3
    assert not st.exists("denied.bin")
    assert _no_uploads_left(moto_server, s3_bucket)


def test_missing_object_read_is_not_found(s3_bucket):
    st = Storage(f"s3://{s3_bucket}/run")
    with pytest.raises(spotrun.errors.StorageNotFoundError):
        st.read_bytes("nope.bin")


def test_checkpoint_roundtrip_through_multipart(s3_bucket, monkeypatch):
    """The Checkpointer picks the knobs up from the environment, end to end."""
    monkeypatch.setenv("SPOTRUN_S3_PART_MIB", "5")
    monkeypatch.setenv("SPOTRUN_S3_CONCURRENCY", "3")
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1536)  # about 6 MiB of weights: two parts
    url = f"s3://{s3_bucket}/runs/{uuid.uuid4().hex[:8]}"
    with spotrun.Checkpointer(url, model=model, handle_signals=False, watchers=[]) as ck:
        ck.restore()
        ck.steps_done = 3
        ck.save()
    key = f"{url.split('/', 3)[3]}/000000000003/rank-00000.pt"
    etag = boto3.client("s3").head_object(Bucket=s3_bucket, Key=key)["ETag"].strip('"')
    assert etag.endswith("-2")
    model2 = torch.nn.Linear(1024, 1536)
    with spotrun.Checkpointer(url, model=model2, handle_signals=False, watchers=[]) as ck2:
        assert ck2.restore() == 3
    assert torch.equal(model.weight, model2.weight) and torch.equal(model.bias, model2.bias)


def test_knobs_are_validated(monkeypatch):
    opts = {"skip_instance_cache": True}
    with pytest.raises(ConfigError, match="part_size=1048576 is out of range.*5 MiB"):
        Storage("s3://x/y", opts, part_size=MiB)
    with pytest.raises(ConfigError, match="concurrency=0"):
        Storage("s3://x/y", opts, concurrency=0)
    for name, bad in (("SPOTRUN_S3_PART_MIB", "lots"), ("SPOTRUN_S3_PART_MIB", "4"),
                      ("SPOTRUN_S3_CONCURRENCY", "0"), ("SPOTRUN_S3_RETRIES", "-1"),
                      ("SPOTRUN_S3_RETRY_SECONDS", "nan"), ("SPOTRUN_S3_READ_TIMEOUT", "0")):
        with monkeypatch.context() as env:
            env.setenv(name, bad)
            with pytest.raises(ConfigError, match=f"^{name}="):
                Storage("s3://x/y", opts)
            # S3's knobs are the S3 backend's: no other backend reads or refuses them.
            for url in ("memory://x/y", "file:///tmp/spotrun-knobs"):
                Storage(url, part_size=MiB, concurrency=0)


class _Trickle(io.RawIOBase):
    """A raw file that accepts at most 1000 bytes per write, like a short OS write."""

    def __init__(self) -> None:
        self.out = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        chunk = bytes(memoryview(b)[:1000])
        self.out += chunk
        return len(chunk)


@pytest.mark.parametrize("size", [10, 5 * MiB])  # inline hashing, and the hashing thread
def test_hashing_writer_finishes_short_writes(size):
    raw = _Trickle()
    w = HashingWriter(raw)
    data = os.urandom(size)
    assert w.write(data) == size
    assert bytes(raw.out) == data
    assert w.size == size and w.entry == entry_for(data)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_hashing_works_in_a_forked_child(tmp_path):
    data = os.urandom(5 * MiB)  # large enough for the hashing thread
    HashingWriter(io.BytesIO()).write(data)  # the parent's pool now has a thread
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            st = Storage(str(tmp_path))
            ok = st.write_bytes("child.bin", data) == entry_for(data)
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung hashing (the inherited pool has no threads)")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / "child.bin").read_bytes() == data
