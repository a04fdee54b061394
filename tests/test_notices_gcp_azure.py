"""The GCP and Azure watchers against the fake metadata server, over real loopback HTTP."""

from __future__ import annotations

import socket
import time

import pytest
from helpers import Inbox, wait_until

from spotrun.notices import AzureWatcher, GcpWatcher
from spotrun.notices.fake_server import AZURE_VM_NAME, FakeMetadataServer
from spotrun.notices.gcp import PREEMPTION_WINDOW_S
from spotrun.records.instance import InstanceInfo

POLL = 0.05


def count(server: FakeMetadataServer, fragment: str) -> int:
    return sum(1 for _, p, _ in server.requests if fragment in p)


# -- GCP -------------------------------------------------------------------------------


def test_gcp_preemption_delivered_once():
    with FakeMetadataServer("gcp") as gcp:
        inbox = Inbox()
        w = GcpWatcher(gcp.url, poll_interval=POLL)
        w.start(inbox)
        try:
            assert wait_until(lambda: count(gcp, "preempted") >= 3)
            assert inbox.items == []
            gcp.post_interruption()
            assert inbox.arrived.wait(3)
            seen = count(gcp, "preempted")
            assert wait_until(lambda: count(gcp, "preempted") >= seen + 5)
        finally:
            w.stop()
        assert all(s == 200 for _, _, s in gcp.requests)  # header sent every time
    (n,) = inbox.items
    assert (n.source, n.action, n.stop) == ("gcp", "preempt", True)
    assert n.deadline == pytest.approx(n.detected_at + PREEMPTION_WINDOW_S)
    assert n.detail == {"preempted": "TRUE"}


def test_gcp_instance_info_spot_and_standard():
    spot = InstanceInfo(cloud="gcp", instance_id="77", instance_type="a2-highgpu-1g",
                        region="europe-west4", availability_zone="europe-west4-b", market="spot")
    with FakeMetadataServer("gcp", instance=spot) as gcp:
        assert GcpWatcher(gcp.url).instance_info() == spot
    std = InstanceInfo(cloud="gcp", instance_id="78", instance_type="n2-standard-4",
                       region="us-central1", availability_zone="us-central1-f",
                       market="on-demand")
    with FakeMetadataServer("gcp", instance=std) as gcp:
        assert GcpWatcher(gcp.url).instance_info() == std


def test_gcp_probe_rejects_a_server_that_is_not_gcp():
    # An EC2-flavored server answers 401 without the Google header: not GCP.
    with FakeMetadataServer("ec2") as other:
        w = GcpWatcher(other.url, poll_interval=POLL)
        w.start(Inbox())
        assert wait_until(lambda: w.state == "unavailable")
        assert count(other, "/computeMetadata/") >= 1


def test_gcp_transient_error_keeps_polling():
    with FakeMetadataServer("gcp") as gcp:
        inbox = Inbox()
        w = GcpWatcher(gcp.url, poll_interval=POLL)
        w.start(inbox)
        try:
            assert wait_until(lambda: w.state == "polling")
            gcp.fail_next(3, status=503)
            assert wait_until(lambda: sum(1 for r in gcp.requests if r[2] == 503) == 3)
            gcp.post_interruption()
            assert inbox.arrived.wait(3)
        finally:
            w.stop()
    assert len(inbox.items) == 1


# -- Azure -----------------------------------------------------------------------------


def test_azure_preempt_event_delivered_once_with_deadline():
    with FakeMetadataServer("azure") as az:
        inbox = Inbox()
        w = AzureWatcher(az.url, poll_interval=POLL)
        w.start(inbox)
        try:
            assert wait_until(lambda: count(az, "scheduledevents") >= 3)
            assert inbox.items == []
            deadline = az.post_interruption(in_seconds=30)
            assert inbox.arrived.wait(3)
            seen = count(az, "scheduledevents")
            assert wait_until(lambda: count(az, "scheduledevents") >= seen + 5)
        finally:
            w.stop()
        assert all(s == 200 for _, _, s in az.requests)
    (n,) = inbox.items
    assert (n.source, n.action, n.stop) == ("azure", "preempt", True)
    assert n.deadline == deadline
    assert 25 < n.seconds_left() <= 31
    assert n.detail["EventType"] == "Preempt" and n.detail["Resources"] == [AZURE_VM_NAME]


def test_azure_second_event_is_a_second_notice_and_others_vms_are_ignored():
    with FakeMetadataServer("azure") as az:
        inbox = Inbox()
        w = AzureWatcher(az.url, poll_interval=POLL)
        w.start(inbox)
        try:
            assert wait_until(lambda: w.state == "polling")
            az.post_interruption(in_seconds=60)
            assert wait_until(lambda: len(inbox.items) == 1)
            # An eviction of another VM in the same scale set is not ours.
            with az._lock:
                az._events.append({"EventId": "OTHER", "EventType": "Preempt",
                                   "Resources": ["someone-else"], "NotBefore": ""})
                az._events.append({"EventId": "REBOOT", "EventType": "Reboot",
                                   "Resources": [AZURE_VM_NAME], "NotBefore": ""})
            az.post_interruption(in_seconds=40)
            assert wait_until(lambda: len(inbox.items) == 2)
            time.sleep(10 * POLL)
        finally:
            w.stop()
    assert len(inbox.items) == 2
    assert inbox.items[0].detail["EventId"] != inbox.items[1].detail["EventId"]


def test_azure_instance_info():
    info = InstanceInfo(cloud="azure", instance_id="abc-123", instance_type="Standard_NC6s_v3",
                        region="westeurope", availability_zone="westeurope-2", market="spot")
    with FakeMetadataServer("azure", instance=info) as az:
        assert AzureWatcher(az.url).instance_info() == info
    regular = InstanceInfo(cloud="azure", instance_id="r-1", instance_type="Standard_D2s_v3",
                           region="eastus", availability_zone=None, market="on-demand")
    with FakeMetadataServer("azure", instance=regular) as az:
        assert AzureWatcher(az.url).instance_info() == regular


@pytest.mark.parametrize("cls", [GcpWatcher, AzureWatcher])
def test_unreachable_gives_up_within_about_a_second(cls):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        w = cls(f"http://127.0.0.1:{silent.getsockname()[1]}", poll_interval=POLL)
        t0 = time.monotonic()
        w.start(Inbox())
        assert time.monotonic() - t0 < 0.05
        assert wait_until(lambda: not w.running, timeout=3)
        assert time.monotonic() - t0 < 1.8
        assert w.state == "unavailable"
        t0 = time.monotonic()
        assert w.instance_info(timeout=0.3) is None
        assert time.monotonic() - t0 < 0.8
    finally:
        silent.close()
