"""The EC2 IMDSv2 watcher against the fake metadata server, over real loopback HTTP."""

from __future__ import annotations

import logging
import socket
import statistics
import time
from collections.abc import Iterator

import pytest
from helpers import Inbox, wait_until

from spotrun.errors import ConfigError
from spotrun.notices import Ec2Watcher, Notice, watchers_from_env
from spotrun.notices.ec2 import ACTION_PATH, REBALANCE_PATH, region_from_az
from spotrun.notices.fake_server import FakeMetadataServer
from spotrun.records.instance import InstanceInfo

POLL = 0.05


def polls_of(imds: FakeMetadataServer, path: str) -> int:
    return sum(1 for m, p, _ in imds.requests if p == path)


@pytest.fixture()
def imds() -> Iterator[FakeMetadataServer]:
    with FakeMetadataServer("ec2") as server:
        yield server


@pytest.fixture()
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel's backlog) but never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture()
def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.mark.parametrize("action", ["terminate", "stop", "hibernate"])
def test_exactly_one_notice_with_action_and_deadline(imds, action):
    inbox = Inbox()
    w = Ec2Watcher(imds.url, poll_interval=POLL)
    w.start(inbox)
    try:
        assert wait_until(lambda: polls_of(imds, ACTION_PATH) >= 3)
        assert inbox.items == []  # 404s deliver nothing
        deadline = imds.post_interruption(action, in_seconds=120)
        assert inbox.arrived.wait(3)
        seen = polls_of(imds, ACTION_PATH)
        assert wait_until(lambda: polls_of(imds, ACTION_PATH) >= seen + 5)  # still posted
    finally:
        w.stop()
    (n,) = inbox.items
    assert (n.source, n.action, n.stop) == ("ec2", action, True)
    assert n.deadline == deadline
    assert 115 < n.seconds_left() <= 121
    assert n.detail["action"] == action
    assert abs(n.detected_at - time.time()) < 5


def test_token_is_sent_and_renewed_after_expire_tokens(imds):
    inbox = Inbox()
    w = Ec2Watcher(imds.url, poll_interval=POLL)
    w.start(inbox)
    try:
        assert wait_until(lambda: polls_of(imds, ACTION_PATH) >= 2)
        assert all(s != 401 for _, _, s in imds.requests)  # token sent from the first GET
        imds.expire_tokens()
        puts_before = polls_of(imds, "/latest/api/token")
        assert wait_until(lambda: polls_of(imds, "/latest/api/token") > puts_before)
        imds.post_interruption("terminate")
        assert inbox.arrived.wait(3)
    finally:
        w.stop()
    log = imds.requests
    first_401 = next(i for i, r in enumerate(log) if r[2] == 401)
    # The 401 is followed by a fresh token and a successful retry of the same path.
    assert log[first_401 + 1] == ("PUT", "/latest/api/token", 200)
    # (404, or 200 when the retry lands after the notice the test posts right away.)
    method, path, status = log[first_401 + 2]
    assert (method, path) == ("GET", log[first_401][1]) and status in (200, 404)
    assert sum(1 for r in log if r[2] == 401) == 1
    assert len(inbox.items) == 1


def test_short_ttl_token_is_renewed_before_expiry():
    with FakeMetadataServer("ec2") as imds:
        w = Ec2Watcher(imds.url, poll_interval=POLL, token_ttl=2)
        w.start(Inbox())
        time.sleep(3.2)
        w.stop()
        statuses = [s for _, _, s in imds.requests]
        puts = polls_of(imds, "/latest/api/token")
    assert 401 not in statuses  # renewed ahead of expiry, never after
    assert puts >= 2


def test_token_ttl_validation():
    with pytest.raises(ConfigError):
        Ec2Watcher("http://127.0.0.1:9", token_ttl=0)
    with pytest.raises(ConfigError):
        Ec2Watcher("http://127.0.0.1:9", token_ttl=21601)
    with pytest.raises(ConfigError):
        Ec2Watcher("http://127.0.0.1:9", rebalance="sometimes")
    with pytest.raises(ConfigError):
        Ec2Watcher("http://127.0.0.1:9", poll_interval=0)


def test_token_ttl_header_carries_the_configured_ttl():
    # A server capped at 300 s refuses the default 21600: the watcher must send what it was
    # given, so a TTL the server accepts works and the default is refused.
    with FakeMetadataServer("ec2", max_token_ttl=300) as imds:
        ok = Ec2Watcher(imds.url, poll_interval=POLL, token_ttl=300)
        ok.start(Inbox())
        assert wait_until(lambda: ok.state == "polling")
        ok.stop()
        refused = Ec2Watcher(imds.url, poll_interval=POLL)
        refused.start(Inbox())
        assert wait_until(lambda: refused.state == "unavailable")
        assert ("PUT", "/latest/api/token", 400) in imds.requests


@pytest.mark.parametrize("mode, stop", [("checkpoint", False), ("stop", True)])
def test_rebalance_delivered_once(imds, mode, stop):
    inbox = Inbox()
    w = Ec2Watcher(imds.url, poll_interval=POLL, rebalance=mode)
    w.start(inbox)
    try:
        assert wait_until(lambda: polls_of(imds, REBALANCE_PATH) >= 2)
        notice_time = imds.post_rebalance()
        assert inbox.arrived.wait(3)
        time.sleep(10 * POLL)
    finally:
        w.stop()
    (n,) = inbox.items
    assert (n.source, n.action, n.stop) == ("ec2", "rebalance", stop)
    assert n.notice_time == notice_time and n.deadline is None and n.seconds_left() is None


def test_rebalance_then_interruption_both_delivered_in_order(imds):
    inbox = Inbox()
    w = Ec2Watcher(imds.url, poll_interval=POLL)
    w.start(inbox)
    try:
        imds.post_rebalance()
        assert wait_until(lambda: len(inbox.items) == 1)
        imds.post_interruption("terminate")
        assert wait_until(lambda: len(inbox.items) == 2)
        time.sleep(5 * POLL)
    finally:
        w.stop()
    assert [(n.action, n.stop) for n in inbox.items] == [("rebalance", False), ("terminate", True)]


def test_rebalance_ignore_never_asks(imds):
    inbox = Inbox()
    w = Ec2Watcher(imds.url, poll_interval=POLL, rebalance="ignore")
    w.start(inbox)
    try:
        imds.post_rebalance()
        assert wait_until(lambda: polls_of(imds, ACTION_PATH) >= 5)
    finally:
        w.stop()
    assert inbox.items == []
    assert polls_of(imds, REBALANCE_PATH) == 0


def test_rebalance_mode_from_env(imds, monkeypatch):
    monkeypatch.setenv("SPOTRUN_NOTICE_SOURCE", "ec2")
    monkeypatch.setenv("SPOTRUN_IMDS_ENDPOINT", imds.url)
    monkeypatch.setenv("SPOTRUN_REBALANCE", "stop")
    monkeypatch.setenv("SPOTRUN_POLL_INTERVAL", str(POLL))
    (w,) = watchers_from_env()
    assert isinstance(w, Ec2Watcher) and w.poll_interval == POLL and w.rebalance == "stop"
    inbox = Inbox()
    w.start(inbox)
    try:
        imds.post_rebalance()
        assert inbox.arrived.wait(3)
    finally:
        w.stop()
    assert [(n.action, n.stop) for n in inbox.items] == [("rebalance", True)]
    # Arguments win over the environment.
    (w2,) = watchers_from_env(rebalance="ignore", poll_interval=7.5)
    assert (w2.rebalance, w2.poll_interval) == ("ignore", 7.5)


def test_transient_500_and_timeout_do_not_kill_the_watcher(imds, caplog):
    inbox = Inbox()
    w = Ec2Watcher(imds.url, poll_interval=POLL)
    with caplog.at_level(logging.WARNING, logger="spotrun"):
        w.start(inbox)
        try:
            assert wait_until(lambda: w.state == "polling")
            imds.fail_next(6, status=500)
            assert wait_until(lambda: sum(1 for r in imds.requests if r[2] == 500) == 6)
            imds.post_interruption("terminate")
            assert inbox.arrived.wait(3)
            assert w.running and w.state == "polling"
        finally:
            w.stop()
    assert [n.action for n in inbox.items] == ["terminate"]
    failures = [r for r in caplog.records if "polling ec2 notices failed" in r.getMessage()]
    assert len(failures) == 1  # six failures, one line: at most once a minute


def test_notice_handler_that_raises_does_not_stop_watching(imds):
    calls: list[Notice] = []

    def handler(n: Notice) -> None:
        calls.append(n)
        raise RuntimeError("bug in the handler")

    w = Ec2Watcher(imds.url, poll_interval=POLL)
    w.start(handler)
    try:
        imds.post_rebalance()
        assert wait_until(lambda: len(calls) == 1)
        imds.post_interruption("stop")
        assert wait_until(lambda: len(calls) == 2)
        assert w.running
    finally:
        w.stop()
    assert [n.action for n in calls] == ["rebalance", "stop"]


def test_stop_is_prompt_even_with_a_long_poll_interval(imds):
    w = Ec2Watcher(imds.url, poll_interval=60)
    w.start(Inbox())
    assert wait_until(lambda: polls_of(imds, ACTION_PATH) >= 1)
    t0 = time.monotonic()
    w.stop()
    assert time.monotonic() - t0 < 0.5
    assert not w.running and w.state == "stopped"


def test_start_twice_is_an_error(imds):
    w = Ec2Watcher(imds.url, poll_interval=POLL)
    w.start(Inbox())
    try:
        with pytest.raises(RuntimeError):
            w.start(Inbox())
    finally:
        w.stop()


def test_proxy_env_vars_are_ignored(imds, monkeypatch, silent_port):
    # If the watcher honoured HTTP_PROXY it would talk to the silent port and never reach
    # the fake server.
    proxy = f"http://127.0.0.1:{silent_port}"
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    inbox = Inbox()
    w = Ec2Watcher(imds.url, poll_interval=POLL)
    w.start(inbox)
    try:
        imds.post_interruption()
        assert inbox.arrived.wait(3)
    finally:
        w.stop()
    assert w.instance_info() == imds.instance


@pytest.mark.parametrize("kind", ["closed", "silent"])
def test_unreachable_endpoint_gives_up_within_about_a_second(kind, closed_port, silent_port, caplog):
    port = closed_port if kind == "closed" else silent_port
    inbox = Inbox()
    w = Ec2Watcher(f"http://127.0.0.1:{port}", poll_interval=POLL)
    with caplog.at_level(logging.DEBUG, logger="spotrun"):
        t0 = time.monotonic()
        w.start(inbox)
        assert time.monotonic() - t0 < 0.05  # start() does not block
        assert wait_until(lambda: not w.running, timeout=3)
        took = time.monotonic() - t0
    assert took < 1.8, took  # a 1 s budget, plus slack for a busy CI box
    assert w.state == "unavailable" and inbox.items == []
    lines = [r for r in caplog.records if r.name.startswith("spotrun")]
    assert len(lines) == 1 and lines[0].levelno <= logging.INFO
    assert "HttpPutResponseHopLimit=2" in lines[0].getMessage()
    w.stop()  # harmless after giving up


@pytest.mark.parametrize("kind", ["closed", "silent"])
def test_instance_info_unreachable_is_none_within_timeout(kind, closed_port, silent_port):
    port = closed_port if kind == "closed" else silent_port
    w = Ec2Watcher(f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    assert w.instance_info(timeout=0.5) is None
    assert time.monotonic() - t0 < 1.0


def test_instance_info_spot():
    info = InstanceInfo(cloud="aws", instance_id="i-0123", instance_type="g5.2xlarge",
                        region="us-west-2", availability_zone="us-west-2c", market="spot")
    with FakeMetadataServer("ec2", instance=info) as imds:
        w = Ec2Watcher(imds.url)
        assert w.instance_info() == info
        n = len(imds.requests)
        assert w.instance_info() == info  # cached: it never changes
        assert len(imds.requests) == n


def test_instance_info_on_demand_and_region_from_az():
    info = InstanceInfo(cloud="aws", instance_id="i-9", instance_type="m5.large",
                        region=None, availability_zone="ap-southeast-2b", market="on-demand")
    with FakeMetadataServer("ec2", instance=info) as imds:
        got = Ec2Watcher(imds.url).instance_info()
    assert got == InstanceInfo(cloud="aws", instance_id="i-9", instance_type="m5.large",
                               region="ap-southeast-2", availability_zone="ap-southeast-2b",
                               market="on-demand")


def test_region_from_az():
    assert region_from_az("us-east-1a") == "us-east-1"
    assert region_from_az("us-west-2-lax-1a") == "us-west-2"
    assert region_from_az("us-gov-west-1a") == "us-gov-west-1"
    assert region_from_az(None) is None and region_from_az("weird") is None


def test_detection_latency_is_within_one_poll_interval(capsys):
    interval = 0.2
    latencies = []
    with FakeMetadataServer("ec2") as imds:
        for _ in range(5):
            imds.clear()
            inbox = Inbox()
            w = Ec2Watcher(imds.url, poll_interval=interval)
            w.start(inbox)
            try:
                assert wait_until(lambda w=w: w.state == "polling")
                # Post at a random phase of the poll cycle.
                time.sleep(interval * (0.1 + 0.8 * (len(latencies) / 5)))
                posted = time.monotonic()
                imds.post_interruption()
                assert inbox.arrived.wait(interval + 2)
                latencies.append(inbox.arrival_times[0] - posted)
            finally:
                w.stop()
    median = statistics.median(latencies)
    with capsys.disabled():
        print(f"\nEC2 detection latency at poll_interval={interval}s: median {median * 1000:.0f} ms,"
              f" max {max(latencies) * 1000:.0f} ms over {len(latencies)} runs")
    assert median < interval + 0.3
    assert max(latencies) < interval + 1.0
