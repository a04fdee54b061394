"""Choosing watchers: environment, DMI hints, and a bounded probe that stays on loopback."""

from __future__ import annotations

import ipaddress
import socket
import time
from pathlib import Path

import pytest

from spotrun.errors import ConfigError
from spotrun.notices import (
    AzureWatcher,
    Ec2Watcher,
    GcpWatcher,
    Notice,
    detect_cloud,
    watchers_from_env,
)
from spotrun.notices import detect as detect_mod
from spotrun.notices.fake_server import FakeMetadataServer


def dmi(tmp_path: Path, **fields: str) -> Path:
    d = tmp_path / "dmi"
    d.mkdir()
    for name, value in fields.items():
        (d / name).write_text(value + "\n")
    return d


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"sys_vendor": "Amazon EC2", "product_name": "m5.large"}, "ec2"),
        ({"sys_vendor": "Xen", "bios_version": "4.11.amazon"}, "ec2"),
        ({"sys_vendor": "Google", "product_name": "Google Compute Engine"}, "gcp"),
        ({"sys_vendor": "Microsoft Corporation",
          "chassis_asset_tag": "7783-7084-3265-9085-8269-3286-77"}, "azure"),
        ({"sys_vendor": "Microsoft Corporation", "chassis_asset_tag": "None"}, "unknown"),
        ({"sys_vendor": "LENOVO", "product_name": "20XW"}, "none"),
        ({"sys_vendor": "QEMU", "product_name": "Standard PC (Q35 + ICH9, 2009)"}, "none"),
        ({}, "unknown"),
    ],
)
def test_detect_cloud_from_dmi(tmp_path, fields, expected):
    assert detect_cloud(dmi_dir=dmi(tmp_path, **fields),
                        hypervisor_uuid=tmp_path / "none") == expected


def test_detect_cloud_from_xen_hypervisor_uuid(tmp_path):
    uuid = tmp_path / "uuid"
    uuid.write_text("ec2e1916-9099-7caf-fd21-012345abcdef\n")
    assert detect_cloud(dmi_dir=tmp_path / "missing", hypervisor_uuid=uuid) == "ec2"


@pytest.fixture()
def loopback_only(monkeypatch):
    """Record every TCP connect in this process; fail any that leaves loopback."""
    seen: list[str] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def check(addr) -> None:
        host = addr[0] if isinstance(addr, tuple) else str(addr)
        seen.append(host)
        if not ipaddress.ip_address(host).is_loopback:
            raise AssertionError(f"connection to non-loopback {host}")

    def connect(self, addr):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            check(addr)
        return real_connect(self, addr)

    def connect_ex(self, addr):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            check(addr)
        return real_connect_ex(self, addr)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return seen


@pytest.fixture()
def silent_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


def test_auto_on_this_machine_is_fast_and_stays_on_loopback(monkeypatch, loopback_only):
    monkeypatch.setenv("SPOTRUN_NOTICE_SOURCE", "auto")
    # conftest points every endpoint at a closed loopback port.
    t0 = time.monotonic()
    found = watchers_from_env(poll_interval=0.05)
    took = time.monotonic() - t0
    assert took < 1.5, took
    hint = detect_cloud()
    if hint in ("none", "unknown"):
        assert found == []  # nothing answers on the closed port
    else:  # this box is a cloud VM: DMI picked the watcher without any probe
        assert [w.name for w in found] == [hint]
    assert all(host == "127.0.0.1" for host in loopback_only)


def test_auto_probe_with_silent_endpoints_respects_budget(monkeypatch, tmp_path, silent_port,
                                                          loopback_only, caplog):
    monkeypatch.setattr(detect_mod, "DMI_DIR", str(tmp_path / "missing"))
    monkeypatch.setattr(detect_mod, "HYPERVISOR_UUID", str(tmp_path / "missing-uuid"))
    url = f"http://127.0.0.1:{silent_port}"
    for var in ("SPOTRUN_IMDS_ENDPOINT", "SPOTRUN_GCP_METADATA_ENDPOINT",
                "SPOTRUN_AZURE_METADATA_ENDPOINT"):
        monkeypatch.setenv(var, url)
    monkeypatch.setenv("SPOTRUN_NOTICE_SOURCE", "auto")
    with caplog.at_level("DEBUG", logger="spotrun"):
        t0 = time.monotonic()
        assert watchers_from_env() == []
        took = time.monotonic() - t0
    assert took < 1.5, took
    assert len(loopback_only) >= 3  # all three were asked, in parallel
    assert len([r for r in caplog.records if r.name.startswith("spotrun")]) == 1


def test_auto_with_non_cloud_dmi_sends_no_packet(monkeypatch, tmp_path, loopback_only):
    monkeypatch.setattr(detect_mod, "DMI_DIR", str(dmi(tmp_path, sys_vendor="Dell Inc.")))
    monkeypatch.setenv("SPOTRUN_NOTICE_SOURCE", "auto")
    t0 = time.monotonic()
    assert watchers_from_env() == []
    assert time.monotonic() - t0 < 0.5
    assert loopback_only == []


@pytest.mark.parametrize("flavor, cls", [("ec2", Ec2Watcher), ("gcp", GcpWatcher),
                                         ("azure", AzureWatcher)])
def test_auto_probe_finds_the_service_that_answers(monkeypatch, tmp_path, flavor, cls):
    monkeypatch.setattr(detect_mod, "DMI_DIR", str(tmp_path / "missing"))
    monkeypatch.setattr(detect_mod, "HYPERVISOR_UUID", str(tmp_path / "missing-uuid"))
    monkeypatch.setenv("SPOTRUN_NOTICE_SOURCE", "auto")
    with FakeMetadataServer(flavor) as fake:
        var = {"ec2": "SPOTRUN_IMDS_ENDPOINT", "gcp": "SPOTRUN_GCP_METADATA_ENDPOINT",
               "azure": "SPOTRUN_AZURE_METADATA_ENDPOINT"}[flavor]
        monkeypatch.setenv(var, fake.url)
        (w,) = watchers_from_env(poll_interval=0.05)
        assert isinstance(w, cls)
        got: list[Notice] = []
        w.start(got.append)
        try:
            fake.post_interruption()
            deadline = time.monotonic() + 3
            while not got and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            w.stop()
    assert [n.source for n in got] == [flavor]


@pytest.mark.parametrize("flavor, cls", [("ec2", Ec2Watcher), ("gcp", GcpWatcher),
                                         ("azure", AzureWatcher)])
def test_auto_trusts_dmi_and_reads_its_endpoint(monkeypatch, tmp_path, flavor, cls):
    fields = {"ec2": {"sys_vendor": "Amazon EC2"}, "gcp": {"sys_vendor": "Google"},
              "azure": {"sys_vendor": "Microsoft Corporation",
                        "chassis_asset_tag": detect_mod.AZURE_ASSET_TAG}}[flavor]
    monkeypatch.setattr(detect_mod, "DMI_DIR", str(dmi(tmp_path, **fields)))
    monkeypatch.setenv("SPOTRUN_NOTICE_SOURCE", "auto")
    monkeypatch.setenv("SPOTRUN_GCP_METADATA_ENDPOINT", "http://127.0.0.1:1234/")
    (w,) = watchers_from_env()
    assert isinstance(w, cls) and w.poll_interval == 5.0  # AWS's advice by default
    if flavor == "gcp":
        assert w.endpoint == "http://127.0.0.1:1234"


@pytest.mark.parametrize("source, cls", [("ec2", Ec2Watcher), ("gcp", GcpWatcher),
                                         ("azure", AzureWatcher)])
def test_explicit_source_returns_that_watcher_without_probing(monkeypatch, loopback_only,
                                                               source, cls):
    monkeypatch.setenv("SPOTRUN_NOTICE_SOURCE", source.upper())
    (w,) = watchers_from_env()
    assert isinstance(w, cls)
    assert loopback_only == []  # probing happens in start(), on the watcher's thread


def test_none_and_bad_values(monkeypatch):
    monkeypatch.setenv("SPOTRUN_NOTICE_SOURCE", "none")
    assert watchers_from_env() == []
    monkeypatch.setenv("SPOTRUN_NOTICE_SOURCE", "aws")
    with pytest.raises(ConfigError, match="SPOTRUN_NOTICE_SOURCE"):
        watchers_from_env()
    monkeypatch.setenv("SPOTRUN_NOTICE_SOURCE", "ec2")
    monkeypatch.setenv("SPOTRUN_POLL_INTERVAL", "soon")
    with pytest.raises(ConfigError, match="SPOTRUN_POLL_INTERVAL"):
        watchers_from_env()
    monkeypatch.setenv("SPOTRUN_POLL_INTERVAL", "-1")
    with pytest.raises(ConfigError, match="poll_interval"):
        watchers_from_env()
    monkeypatch.setenv("SPOTRUN_POLL_INTERVAL", "2")
    monkeypatch.setenv("SPOTRUN_REBALANCE", "maybe")
    with pytest.raises(ConfigError, match="SPOTRUN_REBALANCE"):
        watchers_from_env()


def test_notice_seconds_left():
    n = Notice(source="ec2", action="terminate", stop=True, detected_at=100.0, deadline=220.0)
    assert n.seconds_left(now=100.0) == 120.0
    assert n.seconds_left(now=300.0) == 0.0
    assert Notice(source="signal", action="SIGTERM", stop=True,
                  detected_at=1.0).seconds_left() is None
    with pytest.raises(AttributeError):
        n.stop = False  # frozen
