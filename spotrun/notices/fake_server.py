"""A fake cloud metadata service on loopback, for tests and the local spot simulator.

It speaks one flavor, close enough to the real service that the real watchers run against
it unchanged:

- ``ec2``: IMDSv2. ``PUT /latest/api/token`` needs ``X-aws-ec2-metadata-token-ttl-seconds``
  in 1..``max_token_ttl`` (else 400) and no ``X-Forwarded-For`` (else 403); every GET needs a
  live token (else 401); ``spot/instance-action`` and ``events/recommendations/rebalance``
  are 404 until posted.
- ``gcp``: ``/computeMetadata/v1/instance/...``; a request without ``Metadata-Flavor:
  Google`` gets 403; answers carry ``Metadata-Flavor: Google``.
- ``azure``: ``/metadata/instance`` and ``/metadata/scheduledevents``; a request without
  ``Metadata: true`` or without ``api-version`` gets 400.

In-process::

    with FakeMetadataServer("ec2") as imds:
        os.environ["SPOTRUN_IMDS_ENDPOINT"] = imds.url
        imds.post_interruption("terminate", in_seconds=120)

As a process (for ``spotrun launch --local``)::

    python -m spotrun.notices.fake_server --flavor ec2 --instance-type m5.large --port-file P

prints its URL, writes it to ``P`` (atomically), and serves until SIGTERM/SIGINT. Another
process drives it with :func:`control` (``POST /_spotrun/<op>``; these control paths exist
only here, never on a real metadata service).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from datetime import datetime, timezone
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..errors import ConfigError
from ..records.instance import InstanceInfo

__all__ = ["FLAVORS", "FakeMetadataServer", "control", "main"]

FLAVORS = ("ec2", "gcp", "azure")
CONTROL_PREFIX = "/_spotrun/"

_DEFAULT_INSTANCES = {
    "ec2": InstanceInfo(
        cloud="aws", instance_id="i-0fa4e5c0ffee12345", instance_type="m5.large",
        region="us-east-1", availability_zone="us-east-1a", market="spot",
    ),
    "gcp": InstanceInfo(
        cloud="gcp", instance_id="4520389562813745123", instance_type="n1-standard-8",
        region="us-central1", availability_zone="us-central1-a", market="spot",
    ),
    "azure": InstanceInfo(
        cloud="azure", instance_id="13f56399-bd52-4150-9748-7190aae1ff21",
        instance_type="Standard_D4s_v3", region="eastus", availability_zone="eastus-1",
        market="spot",
    ),
}
AZURE_VM_NAME = "spotrun-fake-vm"
GCP_PROJECT_NUMBER = "123456789012"


def _iso_z(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeMetadataServer:
    """A loopback HTTP server that answers like one cloud's metadata service.

    Thread-safe: tests post notices from the main thread while watchers poll. ``requests``
    is a snapshot of every request answered so far, as ``(method, path, status)`` with
    ``path`` including its query string (control requests are not logged).
    """

    def __init__(
        self,
        flavor: str = "ec2",
        *,
        instance: InstanceInfo | None = None,
        max_token_ttl: int = 21600,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if flavor not in FLAVORS:
            raise ConfigError(f"flavor={flavor!r} is not one of {', '.join(FLAVORS)}")
        self.flavor = flavor
        self.instance = instance or _DEFAULT_INSTANCES[flavor]
        self.max_token_ttl = int(max_token_ttl)
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._log: list[tuple[str, str, int]] = []
        self._tokens: dict[str, float] = {}  # token -> expiry, time.monotonic()
        self._action: dict | None = None  # EC2 instance-action document
        self._rebalance: dict | None = None  # EC2 rebalance document
        self._preempted = False  # GCP
        self._events: list[dict] = []  # Azure
        self._incarnation = 1
        self._fail: list[int] = []  # statuses to answer the next requests with
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234`` (set by :meth:`start`)."""
        if self._httpd is None:
            raise RuntimeError("FakeMetadataServer is not started; call start() first")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeMetadataServer:
        if self._httpd is not None:
            return self
        handler = type("Handler", (_Handler,), {"fake": self})
        httpd = ThreadingHTTPServer((self._host, self._port), handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"spotrun-fake-{self.flavor}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None

    def __enter__(self) -> FakeMetadataServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- scenario -----------------------------------------------------------------------

    def post_interruption(self, action: str = "terminate", in_seconds: float = 120.0) -> float:
        """Post the flavor's interruption notice; returns its deadline (epoch seconds).

        EC2: ``spot/instance-action`` with ``action`` (terminate|stop|hibernate) and a time
        ``in_seconds`` ahead, whole seconds like the real one. GCP: ``preempted`` becomes
        ``TRUE`` (``action`` ignored). Azure: a ``Preempt`` scheduled event for this VM.
        """
        deadline = float(int(time.time() + in_seconds))
        with self._lock:
            if self.flavor == "ec2":
                if action not in ("terminate", "stop", "hibernate"):
                    raise ConfigError(f"action={action!r} is not terminate, stop or hibernate")
                self._action = {"action": action, "time": _iso_z(deadline)}
            elif self.flavor == "gcp":
                self._preempted = True
            else:
                self._events.append({
                    "EventId": str(uuid.uuid4()).upper(),
                    "EventStatus": "Scheduled",
                    "EventType": "Preempt",
                    "ResourceType": "VirtualMachine",
                    "Resources": [AZURE_VM_NAME],
                    "NotBefore": formatdate(deadline, usegmt=True),
                    "Description": "",
                    "EventSource": "Platform",
                    "DurationInSeconds": -1,
                })
                self._incarnation += 1
        return deadline

    def post_action_document(self, doc: Any) -> None:
        """EC2 only: serve exactly ``doc`` (any JSON value, or raw bytes) as ``spot/instance-action``, to
        test odd documents (a numeric ``time``, a missing one, garbage)."""
        if self.flavor != "ec2":
            raise ConfigError(f"instance-action documents exist only on EC2, not {self.flavor}")
        with self._lock:
            self._action = doc

    def post_rebalance(self) -> float:
        """EC2 only: post a rebalance recommendation noticed now; returns its notice time."""
        if self.flavor != "ec2":
            raise ConfigError(f"rebalance recommendations exist only on EC2, not {self.flavor}")
        notice_time = float(int(time.time()))
        with self._lock:
            self._rebalance = {"noticeTime": _iso_z(notice_time)}
        return notice_time

    def clear(self) -> None:
        """Withdraw every posted notice and forget any queued failures."""
        with self._lock:
            self._action = self._rebalance = None
            self._preempted = False
            if self._events:
                self._events = []
                self._incarnation += 1
            self._fail = []

    def expire_tokens(self) -> None:
        """Invalidate every EC2 token issued so far: their next use gets 401."""
        with self._lock:
            self._tokens.clear()

    def fail_next(self, count: int = 1, status: int = 500) -> None:
        """Answer the next ``count`` requests (any path) with ``status`` and no body."""
        with self._lock:
            self._fail.extend([int(status)] * int(count))

    @property
    def requests(self) -> list[tuple[str, str, int]]:
        with self._lock:
            return list(self._log)

    # -- answers (called by the handler) ------------------------------------------------

    def _answer(self, method: str, path: str, headers: Any) -> tuple[int, dict, bytes]:
        with self._lock:
            if self._fail:
                return self._fail.pop(0), {}, b""
            if self.flavor == "ec2":
                return self._answer_ec2(method, path, headers)
            if self.flavor == "gcp":
                return self._answer_gcp(method, path, headers)
            return self._answer_azure(method, path, headers)

    def _answer_ec2(self, method: str, path: str, headers: Any) -> tuple[int, dict, bytes]:
        plain = {"Content-Type": "text/plain"}
        route = urllib.parse.urlsplit(path).path
        if route == "/latest/api/token":
            if method != "PUT":
                return 405, plain, b""
            if headers.get("X-Forwarded-For") is not None:
                return 403, plain, b""
            raw = headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            try:
                ttl = int(raw)
            except (TypeError, ValueError):
                return 400, plain, b""
            if not 1 <= ttl <= self.max_token_ttl:
                return 400, plain, b""
            token = secrets.token_urlsafe(32)
            self._tokens[token] = time.monotonic() + ttl
            return 200, {**plain, "X-aws-ec2-metadata-token-ttl-seconds": str(ttl)}, token.encode()
        if method != "GET":
            return 405, plain, b""
        token = headers.get("X-aws-ec2-metadata-token")
        expiry = self._tokens.get(token or "")
        if expiry is None or time.monotonic() >= expiry:
            self._tokens.pop(token or "", None)
            return 401, plain, b""
        if not route.startswith("/latest/meta-data/"):
            return 404, plain, b""
        leaf = route[len("/latest/meta-data/"):]
        info = self.instance
        if leaf == "spot/instance-action":
            doc = self._action
        elif leaf == "events/recommendations/rebalance":
            doc = self._rebalance
        else:
            value = {
                "instance-id": info.instance_id,
                "instance-type": info.instance_type,
                "placement/availability-zone": info.availability_zone,
                "placement/region": info.region,
                "instance-life-cycle": "spot" if info.market == "spot" else "on-demand",
            }.get(leaf)
            if value is None:
                return 404, plain, b""
            return 200, plain, value.encode()
        if doc is None:
            return 404, plain, b""
        return 200, plain, (doc if isinstance(doc, bytes) else json.dumps(doc).encode())

    def _answer_gcp(self, method: str, path: str, headers: Any) -> tuple[int, dict, bytes]:
        base = {"Content-Type": "application/text", "Metadata-Flavor": "Google"}
        if headers.get("Metadata-Flavor") != "Google":
            return 403, base, b""
        if method != "GET":
            return 405, base, b""
        route = urllib.parse.urlsplit(path).path
        prefix = "/computeMetadata/v1/instance/"
        if not route.startswith(prefix):
            return 404, base, b""
        info = self.instance
        value = {
            "preempted": "TRUE" if self._preempted else "FALSE",
            "id": info.instance_id,
            "name": "spotrun-fake-vm",
            "machine-type": f"projects/{GCP_PROJECT_NUMBER}/machineTypes/{info.instance_type}",
            "zone": f"projects/{GCP_PROJECT_NUMBER}/zones/{info.availability_zone}",
            "scheduling/preemptible": "TRUE" if info.market == "spot" else "FALSE",
            "scheduling/provisioning-model": "SPOT" if info.market == "spot" else "STANDARD",
        }.get(route[len(prefix):])
        if value is None:
            return 404, base, b""
        return 200, base, value.encode()

    def _answer_azure(self, method: str, path: str, headers: Any) -> tuple[int, dict, bytes]:
        js = {"Content-Type": "application/json; charset=utf-8"}
        split = urllib.parse.urlsplit(path)
        query = urllib.parse.parse_qs(split.query)
        if (headers.get("Metadata") or "").lower() != "true":
            return 400, js, _error("Bad request. Required metadata header not specified")
        if "api-version" not in query:
            return 400, js, _error("Bad request. api-version was not specified")
        if method != "GET":
            return 405, js, b""
        info = self.instance
        if split.path == "/metadata/scheduledevents":
            doc: dict = {"DocumentIncarnation": self._incarnation, "Events": list(self._events)}
        elif split.path == "/metadata/instance":
            az = info.availability_zone or ""
            region = info.region or ""
            zone = az[len(region) + 1:] if region and az.startswith(region + "-") else az
            doc = {
                "compute": {
                    "vmId": info.instance_id,
                    "name": AZURE_VM_NAME,
                    "vmSize": info.instance_type or "",
                    "location": region,
                    "zone": zone,
                    "priority": "Spot" if info.market == "spot" else "Regular",
                },
                "network": {"interface": []},
            }
        else:
            return 404, js, b""
        return 200, js, json.dumps(doc).encode()

    def _control(self, op: str, query: dict[str, list[str]]) -> tuple[int, bytes]:
        one = {k: v[-1] for k, v in query.items()}
        try:
            if op == "interrupt":
                result: Any = self.post_interruption(
                    one.get("action", "terminate"), float(one.get("in_seconds", 120.0))
                )
            elif op == "rebalance":
                result = self.post_rebalance()
            elif op == "clear":
                result = self.clear()
            elif op == "expire-tokens":
                result = self.expire_tokens()
            elif op == "fail-next":
                result = self.fail_next(int(one.get("count", 1)), int(one.get("status", 500)))
            else:
                return 404, json.dumps({"error": f"unknown control op {op!r}"}).encode()
        except (ConfigError, ValueError) as exc:
            return 400, json.dumps({"error": str(exc)}).encode()
        return 200, json.dumps({"ok": True, "result": result}).encode()


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeMetadataServer
    server_version = "spotrun-fake-metadata"
    sys_version = ""

    def _handle(self) -> None:
        if self.path.startswith(CONTROL_PREFIX):
            split = urllib.parse.urlsplit(self.path)
            if self.command != "POST":
                status, body = 405, b""
            else:
                status, body = self.fake._control(
                    split.path[len(CONTROL_PREFIX):], urllib.parse.parse_qs(split.query)
                )
            self._send(status, {"Content-Type": "application/json"}, body)
            return
        status, headers, body = self.fake._answer(self.command, self.path, self.headers)
        with self.fake._lock:
            self.fake._log.append((self.command, self.path, status))
        self._send(status, headers, body)

    def _send(self, status: int, headers: dict, body: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is kept in fake.requests; stderr stays clean for tests


def control(url: str, op: str, *, timeout: float = 2.0, **params: Any) -> Any:
    """Drive a fake server in another process: ``control(url, "interrupt", action="stop",
    in_seconds=30)``; ops: interrupt, rebalance, clear, expire-tokens, fail-next.
    Returns the server's result (a deadline or notice time for interrupt/rebalance)."""
    query = urllib.parse.urlencode(params)
    req = urllib.request.Request(
        f"{url.rstrip('/')}{CONTROL_PREFIX}{op}" + (f"?{query}" if query else ""), method="POST"
    )
    # No proxy: the fake listens on loopback and a proxy variable must not reroute it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())["result"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spotrun.notices.fake_server",
        description="Serve a fake cloud metadata service on loopback until SIGTERM/SIGINT.",
    )
    parser.add_argument("--flavor", choices=FLAVORS, default="ec2")
    parser.add_argument("--instance-type", help="instance type it reports")
    parser.add_argument("--instance-id")
    parser.add_argument("--region")
    parser.add_argument("--availability-zone")
    parser.add_argument("--market", choices=("spot", "on-demand"), default="spot")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--port-file", help="write the base URL here once serving")
    args = parser.parse_args(argv)

    base = _DEFAULT_INSTANCES[args.flavor]
    instance = InstanceInfo(
        cloud=base.cloud,
        instance_id=args.instance_id or base.instance_id,
        instance_type=args.instance_type or base.instance_type,
        region=args.region or base.region,
        availability_zone=args.availability_zone or base.availability_zone,
        market=args.market,
    )
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    with FakeMetadataServer(args.flavor, instance=instance, host=args.host, port=args.port) as fake:
        if args.port_file:
            tmp = f"{args.port_file}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(fake.url + "\n")
            os.replace(tmp, args.port_file)  # readers never see half a URL
        print(fake.url, flush=True)
        while not done.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
