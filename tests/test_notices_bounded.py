"""Issue 20: a metadata answer far larger than any real one (a 10 MB IMDSv2 token) is refused
after a bounded read, not read whole (which slowed the notice loop by seconds) and then
sent back as a 10 MB header.

A real HTTP server on 127.0.0.1 serves the oversized answers. The "endless" variant sends
just over the cap and then never finishes the body: a client that reads the whole body waits
for its timeout (a ReadTimeout), one that reads a bounded amount refuses at once, so the test
tells them apart without timing anything.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from helpers import Inbox, wait_until

from spotrun.errors import NoticeError
from spotrun.notices import Ec2Watcher
from spotrun.notices._http import MAX_BODY_BYTES, http_request, new_session

BIG = 10 * 1024 * 1024


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    mode = "length"  # "length": a Content-Length of 10 MB; "endless": chunked, never ends
    release = threading.Event()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _big(self) -> None:
        srv: _Server = self.server  # type: ignore[assignment]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        try:
            if srv.mode == "length":
                self.send_header("Content-Length", str(BIG))
                self.end_headers()
                block = b"A" * 65536
                for _ in range(BIG // len(block)):
                    self.wfile.write(block)
            else:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                block = b"A" * 16384
                for _ in range(MAX_BODY_BYTES // len(block) + 2):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                self.wfile.flush()
                srv.release.wait(30)  # ... and the rest never comes
        except OSError:
            pass  # the client hung up after its bounded read

    do_PUT = _big
    do_GET = _big

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(params=["length", "endless"])
def big_server(request) -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.mode = request.param
    srv.release = threading.Event()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()


def _url(srv: _Server) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


def test_http_request_refuses_an_oversized_body_without_reading_it(big_server: _Server) -> None:
    session = new_session()
    with pytest.raises(NoticeError, match="KiB"):
        # 20 s: far longer than a bounded read needs, so an unbounded one would time out here
        # (requests' ReadTimeout, not a NoticeError) in the endless mode.
        http_request(session, "PUT", _url(big_server) + "/latest/api/token", timeout=20.0)


def test_small_answers_are_unchanged() -> None:
    from spotrun.notices.fake_server import FakeMetadataServer

    with FakeMetadataServer("ec2") as imds:
        r = http_request(new_session(), "PUT", imds.url + "/latest/api/token",
                         headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}, timeout=5.0)
    assert r.status == 200 and len(r.text) > 20


def test_watcher_treats_a_10mb_token_as_not_imds(big_server: _Server, caplog) -> None:
    w = Ec2Watcher(_url(big_server), poll_interval=0.05, startup_timeout=5.0, request_timeout=20.0)
    with caplog.at_level(logging.INFO, logger="spotrun"):
        w.start(Inbox())
        assert wait_until(lambda: not w.running, timeout=15)
    assert w.state == "unavailable"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "KiB" in text and "HTTP 431" not in text, text


def test_a_dripping_answer_is_bounded_by_the_timeout() -> None:
    """A body that keeps coming slowly (each read inside the socket timeout) still ends at the
    request's timeout, as a ReadTimeout the watcher retries."""
    import socket

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    stop = threading.Event()

    def drip() -> None:
        conn, _ = lsock.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while not stop.wait(0.05):
                conn.sendall(b"1\r\nA\r\n")
        except OSError:
            pass
        conn.close()

    threading.Thread(target=drip, daemon=True).start()
    try:
        with pytest.raises(requests.exceptions.ReadTimeout):
            http_request(new_session(), "GET", f"http://127.0.0.1:{lsock.getsockname()[1]}/x", timeout=0.5)
    finally:
        stop.set()
        lsock.close()
