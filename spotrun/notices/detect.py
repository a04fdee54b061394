"""Which watchers to run, from the environment and cheap local hints.

``SPOTRUN_NOTICE_SOURCE=auto`` (the default) first reads the DMI strings the kernel exposes
under ``/sys/class/dmi/id`` (no network, microseconds): "Amazon EC2", "Google", and Azure's
fixed chassis asset tag name the cloud outright, and any other readable vendor means "not a
cloud we know", so an off-cloud laptop or CI box returns ``[]`` without a single packet.
Only when those files are missing or unreadable (some sandboxes, non-Linux) does it probe the
three metadata services at once, with a hard budget of about 0.8 s in all.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from ..config import env_choice, env_float, env_str
from .azure import DEFAULT_AZURE_METADATA_ENDPOINT, AzureWatcher
from .base import REBALANCE_MODES, PollingWatcher, Watcher
from .ec2 import DEFAULT_IMDS_ENDPOINT, Ec2Watcher
from .gcp import DEFAULT_GCP_METADATA_ENDPOINT, GcpWatcher

__all__ = ["NOTICE_SOURCES", "detect_cloud", "watchers_from_env"]

log = logging.getLogger(__name__)

NOTICE_SOURCES = ("auto", "ec2", "gcp", "azure", "none")

DMI_DIR = "/sys/class/dmi/id"
HYPERVISOR_UUID = "/sys/hypervisor/uuid"
# Every Azure VM carries this chassis asset tag; plain Hyper-V boxes say "Microsoft" too.
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
PROBE_BUDGET_S = 0.8


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def detect_cloud(
    *, dmi_dir: str | Path | None = None, hypervisor_uuid: str | Path | None = None
) -> str:
    """Name the cloud from local hints only: ``"ec2"``, ``"gcp"``, ``"azure"``, ``"none"``
    (hints readable, no known cloud) or ``"unknown"`` (no hints to go on).

    The paths default to the kernel's (``/sys/class/dmi/id``, ``/sys/hypervisor/uuid``).
    """
    dmi = Path(dmi_dir if dmi_dir is not None else DMI_DIR)
    hypervisor_uuid = hypervisor_uuid if hypervisor_uuid is not None else HYPERVISOR_UUID
    fields = {
        name: _read(dmi / name).lower()
        for name in ("sys_vendor", "product_name", "product_version", "bios_vendor",
                     "bios_version", "board_vendor", "chassis_asset_tag")
    }
    xen_uuid = _read(Path(hypervisor_uuid)).lower()
    if (
        "amazon" in fields["sys_vendor"]
        or "amazon" in fields["bios_vendor"]
        or "amazon" in fields["bios_version"]  # older Xen instances: "4.11.amazon"
        or "amazon" in fields["product_version"]
        or xen_uuid.startswith("ec2")
    ):
        return "ec2"
    if "google" in fields["sys_vendor"] or "google" in fields["product_name"] or (
        "google" in fields["bios_vendor"]
    ):
        return "gcp"
    if fields["chassis_asset_tag"] == AZURE_ASSET_TAG:
        return "azure"
    if "microsoft" in fields["sys_vendor"]:
        return "unknown"  # Hyper-V: Azure, or a local VM; only a probe can tell
    if any(fields.values()):
        return "none"
    return "unknown"


def watchers_from_env(
    *, poll_interval: float | None = None, rebalance: str | None = None
) -> list[Watcher]:
    """The watchers this machine should run, configured from the environment.

    Reads ``SPOTRUN_NOTICE_SOURCE``, ``SPOTRUN_IMDS_ENDPOINT``,
    ``SPOTRUN_GCP_METADATA_ENDPOINT``, ``SPOTRUN_AZURE_METADATA_ENDPOINT``,
    ``SPOTRUN_POLL_INTERVAL`` and ``SPOTRUN_REBALANCE`` (see :mod:`spotrun.config`);
    arguments win over the environment. The watchers are returned unstarted. Returns within
    about 1 s in every case, and at once when local hints settle the question.
    """
    source = env_choice("SPOTRUN_NOTICE_SOURCE", NOTICE_SOURCES, "auto")
    interval = poll_interval if poll_interval is not None else env_float(
        "SPOTRUN_POLL_INTERVAL", 5.0
    )
    mode = rebalance if rebalance is not None else env_choice(
        "SPOTRUN_REBALANCE", REBALANCE_MODES, "checkpoint"
    )
    endpoints = {
        "ec2": env_str("SPOTRUN_IMDS_ENDPOINT", DEFAULT_IMDS_ENDPOINT),
        "gcp": env_str("SPOTRUN_GCP_METADATA_ENDPOINT", DEFAULT_GCP_METADATA_ENDPOINT),
        "azure": env_str("SPOTRUN_AZURE_METADATA_ENDPOINT", DEFAULT_AZURE_METADATA_ENDPOINT),
    }

    def make(cloud: str) -> PollingWatcher:
        if cloud == "ec2":
            return Ec2Watcher(endpoints["ec2"], poll_interval=interval, rebalance=mode)
        if cloud == "gcp":
            return GcpWatcher(endpoints["gcp"], poll_interval=interval)
        return AzureWatcher(endpoints["azure"], poll_interval=interval)

    if source == "none":
        return []
    if source != "auto":
        return [make(source)]

    hint = detect_cloud()
    if hint in ("ec2", "gcp", "azure"):
        log.debug("DMI says %s; watching its notices", hint)
        return [make(hint)]
    if hint == "none":
        log.debug("not on EC2, GCP or Azure (DMI); no metadata notices to watch")
        return []
    found = _probe_all([make(c) for c in ("ec2", "gcp", "azure")], PROBE_BUDGET_S)
    if found:
        log.debug("metadata probe found %s", ", ".join(w.name for w in found))
    else:
        log.info("no cloud metadata service answered; watching signals only")
    return found


def _probe_all(candidates: list[PollingWatcher], budget: float) -> list[Watcher]:
    """Probe all candidates at once; keep those that answered within ``budget`` seconds."""
    deadline = time.monotonic() + budget
    answered: list[bool] = [False] * len(candidates)

    def probe(i: int) -> None:
        try:
            answered[i] = candidates[i]._probe(deadline)
        except Exception:  # noqa: BLE001 - a probe that breaks means "not here"
            answered[i] = False

    threads = [
        threading.Thread(target=probe, args=(i,), name="spotrun-probe", daemon=True)
        for i in range(len(candidates))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    # A probe still running past the budget counts as "no"; its own timeouts end it soon.
    return [w for w, ok, t in zip(candidates, answered, threads, strict=True) if ok and not t.is_alive()]
