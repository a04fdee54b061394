"""Azure Spot eviction notices through Scheduled Events.

``GET /metadata/scheduledevents?api-version=2020-07-01`` with ``Metadata: true`` lists the
events planned for the VM's scope; one with ``EventType: "Preempt"`` is the eviction notice
(at least 30 s ahead), and its ``NotBefore`` (RFC 1123) is the deadline. Events can name
other VMs of the same availability set or scale set, so an event whose ``Resources`` do not
list this VM's name is ignored (when the name is known).

The first Scheduled Events call on a VM switches the feature on and can take far longer
than later ones, so start-up probes ``/metadata/instance`` (fast) and the polls get a longer
read timeout.
"""

from __future__ import annotations

import json
import time
from typing import Any

import requests

from ..errors import NoticeError
from ..records.instance import InstanceInfo
from ._http import http_request, new_session, parse_rfc1123, remaining
from .base import Notice, PollingWatcher

__all__ = ["DEFAULT_AZURE_METADATA_ENDPOINT", "AzureWatcher"]

DEFAULT_AZURE_METADATA_ENDPOINT = "http://169.254.169.254"

EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
INSTANCE_PATH = "/metadata/instance?api-version=2021-02-01"
_HEADERS = {"Metadata": "true"}


class AzureWatcher(PollingWatcher):
    """Polls Azure Scheduled Events for ``Preempt`` events aimed at this VM."""

    name = "azure"

    def __init__(
        self,
        endpoint: str = DEFAULT_AZURE_METADATA_ENDPOINT,
        *,
        poll_interval: float = 5.0,
        startup_timeout: float = 1.0,
        request_timeout: float = 2.0,
        events_timeout: float = 10.0,
    ) -> None:
        super().__init__(poll_interval=poll_interval, startup_timeout=startup_timeout)
        self.endpoint = endpoint.rstrip("/")
        self.request_timeout = float(request_timeout)
        self.events_timeout = float(events_timeout)
        self._session = new_session()
        self._vm_name: str | None = None

    def _get_json(
        self, session: requests.Session, path: str, deadline: float | None, cap: float
    ) -> dict:
        resp = http_request(
            session, "GET", self.endpoint + path, headers=_HEADERS,
            timeout=remaining(deadline, cap),
        )
        if resp.status != 200:
            raise NoticeError(f"HTTP {resp.status} from {path.split('?')[0]}")
        try:
            doc = json.loads(resp.text)
        except ValueError:
            raise NoticeError(f"{path.split('?')[0]} answered non-JSON") from None
        if not isinstance(doc, dict):
            raise NoticeError(f"{path.split('?')[0]} answered {type(doc).__name__}, not an object")
        return doc

    def _probe(self, deadline: float) -> bool:
        doc = self._retry_until(
            deadline, lambda: self._get_json(self._session, INSTANCE_PATH, deadline, self.request_timeout)
        )
        if doc is None:
            return False
        self._vm_name = (doc.get("compute") or {}).get("name") or None
        return True

    def _poll(self) -> list[tuple[Any, Notice]]:
        doc = self._get_json(self._session, EVENTS_PATH, None, self.events_timeout)
        found: list[tuple[Any, Notice]] = []
        for event in doc.get("Events") or []:
            if not isinstance(event, dict) or event.get("EventType") != "Preempt":
                continue
            resources = event.get("Resources") or []
            if self._vm_name and resources and self._vm_name not in resources:
                continue
            key = ("preempt", event.get("EventId"))
            found.append((key, Notice(
                source="azure", action="preempt", stop=True, detected_at=time.time(),
                deadline=parse_rfc1123(event.get("NotBefore")), detail=event,
            )))
        return found

    def _fetch_instance_info(self, deadline: float) -> InstanceInfo | None:
        session = new_session()
        try:
            compute = self._get_json(session, INSTANCE_PATH, deadline, self.request_timeout).get(
                "compute"
            ) or {}
        finally:
            session.close()
        vm_id = compute.get("vmId")
        if not vm_id:
            return None
        region = compute.get("location") or None
        zone = compute.get("zone") or None
        return InstanceInfo(
            cloud="azure",
            instance_id=vm_id,
            instance_type=compute.get("vmSize") or None,
            region=region,
            # Azure zones are "1".."3" within a region; qualify them so they stand alone.
            availability_zone=f"{region}-{zone}" if region and zone else zone,
            market="spot" if str(compute.get("priority", "")).lower() == "spot" else "on-demand",
        )
