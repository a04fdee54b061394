"""Notices that must not be missed (issue 9, items 9 and 10): a metadata service that answers
with an error is there, and an odd instance-action document is still a notice.

Real loopback HTTP against the fake metadata server; the watcher code is the real one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator

import pytest
from helpers import Inbox, wait_until

from spotrun.notices import Ec2Watcher, watchers_from_env
from spotrun.notices import detect as detect_mod
from spotrun.notices._http import parse_time
from spotrun.notices.ec2 import ACTION_PATH, NOTICE_LEAD_S, TOKEN_PATH
from spotrun.notices.fake_server import FakeMetadataServer

POLL = 0.05


@pytest.fixture()
def imds() -> Iterator[FakeMetadataServer]:
    with FakeMetadataServer("ec2") as server:
        yield server


def _token_answers(imds: FakeMetadataServer) -> list[int]:
    return [s for m, p, s in imds.requests if p == TOKEN_PATH]


# -- item 9: an HTTP error answer means the service is there ---------------------------------


@pytest.mark.parametrize("failures, status", [(1, 503), (3, 503), (2, 500), (2, 429)])
def test_busy_token_answers_at_start_do_not_disable_watching(imds, caplog, failures, status):
    imds.fail_next(failures, status=status)  # the first token requests get the error
    inbox = Inbox()
    w = Ec2Watcher(imds.url, poll_interval=POLL)
    with caplog.at_level(logging.INFO, logger="spotrun"):
        w.start(inbox)
        try:
            assert wait_until(lambda: 200 in _token_answers(imds), timeout=5)
            assert wait_until(lambda: w.state == "polling", timeout=5)
            deadline = imds.post_interruption("terminate")  # posted later: still seen
            assert inbox.arrived.wait(5)
        finally:
            w.stop()
    assert _token_answers(imds)[:failures] == [status] * failures
    (n,) = inbox.items
    assert (n.action, n.stop, n.deadline) == ("terminate", True, deadline)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("spotrun"))
    assert "no ec2 metadata service answered" not in text


def test_busy_for_longer_than_the_start_budget_keeps_watching(imds, caplog):
    # Every request fails for ~1.5 s (longer than the 1 s start-up budget): the watcher
    # must still be polling afterwards, with retries spaced out (backoff), and see the notice.
    imds.fail_next(10_000, status=503)
    inbox = Inbox()
    w = Ec2Watcher(imds.url, poll_interval=1.0, startup_timeout=0.5)
    with caplog.at_level(logging.INFO, logger="spotrun"):
        w.start(inbox)
        try:
            time.sleep(1.5)
            assert w.running and w.state == "polling"
            tries = len(_token_answers(imds))
            assert 3 <= tries <= 40, tries  # retried, but not hammered
            imds.clear()  # the service recovers (clear() also drops the queued failures)
            imds.post_interruption("stop")
            assert inbox.arrived.wait(5)
        finally:
            w.stop()
    assert [n.action for n in inbox.items] == ["stop"]
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("spotrun")]
    assert not any("no ec2 metadata service answered" in m for m in messages)
    assert any("is there but answered HTTP 503" in m for m in messages), messages


def test_refusal_is_final_and_logged_truthfully(imds, caplog):
    # A 4xx other than 408/429 says "something is here, but not IMDS as we know it" (GCP's
    # and Azure's servers share the address): give up, without claiming nobody answered.
    imds.fail_next(50, status=405)
    w = Ec2Watcher(imds.url, poll_interval=POLL)
    with caplog.at_level(logging.INFO, logger="spotrun"):
        w.start(Inbox())
        assert wait_until(lambda: not w.running, timeout=3)
    assert w.state == "unavailable"
    (line,) = [r.getMessage() for r in caplog.records if r.name.startswith("spotrun")]
    assert "answered, but not as the ec2 service does" in line and "HTTP 405" in line


def test_auto_probe_counts_a_busy_imds_as_ec2(monkeypatch, tmp_path, imds):
    monkeypatch.setattr(detect_mod, "DMI_DIR", str(tmp_path / "missing"))
    monkeypatch.setattr(detect_mod, "HYPERVISOR_UUID", str(tmp_path / "missing-uuid"))
    monkeypatch.setenv("SPOTRUN_NOTICE_SOURCE", "auto")
    monkeypatch.setenv("SPOTRUN_IMDS_ENDPOINT", imds.url)
    closed = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("SPOTRUN_GCP_METADATA_ENDPOINT", closed)
    monkeypatch.setenv("SPOTRUN_AZURE_METADATA_ENDPOINT", closed)
    imds.fail_next(2, status=503)
    found = watchers_from_env(poll_interval=POLL)
    assert [type(w) for w in found] == [Ec2Watcher]


def _closed_port() -> int:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


# -- item 10: odd instance-action documents --------------------------------------------------


def test_numeric_time_is_a_notice_with_that_deadline(imds, caplog):
    when = int(time.time()) + 90
    inbox = Inbox()
    w = Ec2Watcher(imds.url, poll_interval=POLL)
    with caplog.at_level(logging.WARNING, logger="spotrun"):
        w.start(inbox)
        try:
            assert wait_until(lambda: w.state == "polling")
            imds.post_action_document({"action": "terminate", "time": when})
            assert inbox.arrived.wait(3)
            seen = sum(1 for _, p, _ in imds.requests if p == ACTION_PATH)
            assert wait_until(
                lambda: sum(1 for _, p, _ in imds.requests if p == ACTION_PATH) >= seen + 5
            )
        finally:
            w.stop()
    (n,) = inbox.items
    assert (n.action, n.stop, n.deadline) == ("terminate", True, float(when))
    assert not [r for r in caplog.records if "polling ec2 notices failed" in r.getMessage()]


@pytest.mark.parametrize("raw_time", ["soon", None, [1, 2], {"at": 3}, True, -5, "nan"])
def test_unreadable_time_still_stops_with_two_minutes_logged_once(imds, caplog, raw_time):
    inbox = Inbox()
    w = Ec2Watcher(imds.url, poll_interval=POLL)
    doc = {"action": "stop"} if raw_time is None else {"action": "stop", "time": raw_time}
    with caplog.at_level(logging.WARNING, logger="spotrun"):
        w.start(inbox)
        try:
            assert wait_until(lambda: w.state == "polling")
            posted_at = time.time()
            imds.post_action_document(doc)
            assert inbox.arrived.wait(3)
            seen = sum(1 for _, p, _ in imds.requests if p == ACTION_PATH)
            assert wait_until(  # the document stays posted for many more polls
                lambda: sum(1 for _, p, _ in imds.requests if p == ACTION_PATH) >= seen + 5
            )
        finally:
            w.stop()
    (n,) = inbox.items
    assert (n.action, n.stop) == ("stop", True)
    assert posted_at + NOTICE_LEAD_S - 1 <= n.deadline <= time.time() + NOTICE_LEAD_S
    assert n.notice_time is None
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("spotrun")]
    assert len([m for m in warnings if "unreadable time" in m]) == 1, warnings
    assert not [m for m in warnings if "polling ec2 notices failed" in m]


def test_non_json_document_is_still_a_stop_notice(imds):
    inbox = Inbox()
    w = Ec2Watcher(imds.url, poll_interval=POLL)
    w.start(inbox)
    try:
        assert wait_until(lambda: w.state == "polling")
        imds.post_action_document(b"\x00garbage{")
        assert inbox.arrived.wait(3)
    finally:
        w.stop()
    (n,) = inbox.items
    assert n.stop and n.deadline is not None and n.seconds_left() > 100


@pytest.mark.parametrize("value, expected", [
    ("2026-11-27T10:00:00Z", 1795773600.0),
    ("2026-11-27T10:00:00+00:00", 1795773600.0),
    (1795773600, 1795773600.0),
    (1795773600.5, 1795773600.5),
    ("1795773600", 1795773600.0),
    (1795773600000, 1795773600.0),  # milliseconds
    ("Fri, 27 Nov 2026 10:00:00 GMT", 1795773600.0),
    ("garbage", None), ("", None), (None, None), (True, None), (0, None), (-1, None),
    (float("inf"), None), (float("nan"), None), (10**400, None), ([1], None), ({}, None),
    (1e30, None),
])
def test_parse_time(value, expected):
    got = parse_time(value)
    assert got == expected or (expected is not None and math.isclose(got, expected))
