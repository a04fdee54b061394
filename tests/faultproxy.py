"""A fault-injecting HTTP proxy in front of the moto server, for S3 failure tests.

Point a client at :attr:`FaultProxy.url` instead of moto (``AWS_ENDPOINT_URL`` or
``storage_options={"client_kwargs": {"endpoint_url": proxy.url}}``). Every request is
forwarded to moto unless a rule matches it; rules can be added and cleared while the proxy
runs, so a test can let a first save through and then make S3 misbehave::

    proxy.add("hang", method="PUT|POST", path=r"/\\d{12}/")      # every later checkpoint write
    proxy.add("error", status=503, method="GET", times=3)        # the next 3 GETs: SlowDown
    proxy.add("reset", path=r"manifest\\.json")                  # drop the connection (RST)
    proxy.add("stall", method="GET")                             # half the body, then silence

Actions:

* ``hang``: read the request, never answer (the connection stays open until the rule's
  hangs are released by :meth:`release`, :meth:`clear` or :meth:`close`);
* ``stall``: forward to moto, send the status line, headers and half the body, then go
  silent (released like ``hang``);
* ``reset``: close the connection with a TCP reset, no answer at all;
* ``error``: answer ``status`` with an S3-style XML error body (403 AccessDenied,
  500 InternalError, 503 SlowDown; ``code=`` overrides).

``method`` is a regex matched against the whole HTTP method; ``path`` a regex searched in
the request target (path and query, as sent: ``/bucket/key?uploadId=...``). ``times`` limits
a rule to the next N matching requests (None: every one). The first matching live rule wins.

Every request is logged (:attr:`log`) with what the proxy did to it, so a test can assert
on what reached S3. Thread-based (``ThreadingHTTPServer``), standard library only.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

__all__ = ["FaultProxy", "LoggedRequest", "Rule"]

_S3_CODES = {400: "BadRequest", 403: "AccessDenied", 404: "NoSuchKey", 500: "InternalError",
             503: "SlowDown"}
_ACTIONS = ("hang", "stall", "reset", "error")
# Hop-by-hop headers, and those the proxy recomputes, are not passed along.
_DROP_REQUEST = {"connection", "keep-alive", "expect", "transfer-encoding", "content-length"}
_DROP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length", "date",
                  "server"}


@dataclass
class Rule:
    """One fault: what to do to requests whose method and target match."""

    action: str
    method: str | None = None
    path: str | None = None
    times: int | None = None
    status: int = 500
    code: str | None = None
    hits: int = 0

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ValueError(f"action {self.action!r} is not one of {_ACTIONS}")
        self._method = re.compile(self.method) if self.method else None
        self._path = re.compile(self.path) if self.path else None

    def matches(self, method: str, target: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self._method is not None and not self._method.fullmatch(method):
            return False
        return self._path is None or bool(self._path.search(target))


@dataclass
class LoggedRequest:
    """One request as the proxy saw it, and what it did (``forward``/``hang``/...)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    action: str
    status: int | None = None  # the status sent (None: no answer, or not yet)
    at: float = field(default_factory=time.monotonic)

    @property
    def target(self) -> str:
        query = urllib.parse.urlencode(self.query, doseq=True)
        return f"{self.path}?{query}" if query else self.path


class FaultProxy:
    """A threaded HTTP proxy to ``upstream`` (the moto server) that injects faults by rule."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.rules: list[Rule] = []
        self.log: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._held: set[socket.socket] = set()
        self._closed = False
        proxy = self

        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except (ConnectionError, TimeoutError, OSError):
                    self.close_connection = True

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a reset or held connection ends in errors on purpose

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="faultproxy")
        self._thread.start()

    # -- rules ----------------------------------------------------------------------------

    def add(self, action: str, *, method: str | None = None, path: str | None = None,
            times: int | None = None, status: int = 500, code: str | None = None) -> Rule:
        """Add a rule (checked after the ones already there); returns it (see ``hits``)."""
        rule = Rule(action, method=method, path=path, times=times, status=status, code=code)
        with self._lock:
            self.rules.append(rule)
            if action in ("hang", "stall"):
                self._release.clear()
        return rule

    def clear(self) -> None:
        """Drop every rule and release every held connection: S3 behaves again."""
        with self._lock:
            self.rules.clear()
        self.release()

    def release(self) -> None:
        """End every hung or stalled connection now (the client sees it close)."""
        self._release.set()
        with self._lock:
            held = list(self._held)
        for sock in held:
            _reset(sock)

    # -- the request log -------------------------------------------------------------------

    def requests(self, method: str | None = None, path: str | None = None,
                 action: str | None = None) -> list[LoggedRequest]:
        """Logged requests, filtered like rules (method fullmatch, path search) and by action."""
        m = re.compile(method) if method else None
        p = re.compile(path) if path else None
        with self._lock:
            seen = list(self.log)
        return [r for r in seen
                if (m is None or m.fullmatch(r.method))
                and (p is None or p.search(r.target))
                and (action is None or r.action == action)]

    def count(self, method: str | None = None, path: str | None = None,
              action: str | None = None) -> int:
        return len(self.requests(method, path, action))

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        self.clear()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- serving ---------------------------------------------------------------------------

    def _serve(self, h) -> None:  # h: BaseHTTPRequestHandler
        parts = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        headers = {k.lower(): v for k, v in h.headers.items()}
        body = _read_body(h, headers)
        with self._lock:
            rule = next((r for r in self.rules if r.matches(h.command, h.path)), None)
            if rule is not None:
                rule.hits += 1
            entry = LoggedRequest(h.command, parts.path, query, headers,
                                  rule.action if rule else "forward")
            self.log.append(entry)
        if rule is None:
            self._forward(h, body, entry)
        elif rule.action == "error":
            code = rule.code or _S3_CODES.get(rule.status, "InternalError")
            payload = (
                "<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>"
                f"{code}</Code><Message>injected by the test proxy</Message>"
                f"<Resource>{parts.path}</Resource><RequestId>faultproxy</RequestId></Error>"
            ).encode()
            entry.status = rule.status
            h.send_response(rule.status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload) if h.command != "HEAD" else 0))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
        elif rule.action == "reset":
            h.close_connection = True
            _reset(h.connection)
        elif rule.action == "hang":
            self._hold(h)
        else:  # stall
            self._forward(h, body, entry, stall=True)

    def _hold(self, h) -> None:
        """Keep the connection open and silent until released (or the proxy closes)."""
        h.close_connection = True
        with self._lock:
            self._held.add(h.connection)
        try:
            while not self._release.wait(0.5) and not self._closed:
                pass
        finally:
            with self._lock:
                self._held.discard(h.connection)
            _reset(h.connection)

    def _forward(self, h, body: bytes, entry: LoggedRequest, *, stall: bool = False) -> None:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            fwd = {k: v for k, v in h.headers.items() if k.lower() not in _DROP_REQUEST}
            if body or h.command in ("PUT", "POST"):
                fwd["Content-Length"] = str(len(body))
            conn.request(h.command, h.path, body=body, headers=fwd)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in _DROP_RESPONSE:
                h.send_header(k, v)
        # A HEAD answer keeps the object's length; others carry their body.
        length = resp.getheader("Content-Length") if h.command == "HEAD" else str(len(data))
        h.send_header("Content-Length", length or "0")
        h.end_headers()
        if stall:
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            self._hold(h)
            return
        entry.status = resp.status
        if h.command != "HEAD":
            h.wfile.write(data)


def _read_body(h, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = bytearray()
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(out)
            out += h.rfile.read(size)
            h.rfile.readline()
    return h.rfile.read(int(headers.get("content-length", 0) or 0))


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN: the peer sees 'connection reset', as on a real drop."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
