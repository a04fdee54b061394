"""GCP preemption (Spot VM) notices through the Compute Engine metadata server.

``GET /computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor: Google`` answers
``TRUE`` once the VM is being preempted. GCP then gives the guest about 30 seconds before it
is stopped, so the notice's deadline is estimated as detection + 30 s (GCP does not post a
time). Plain polling; the ``?wait_for_change=true`` long poll would detect sooner but holds a
connection per process, and the 30 s window makes a short ``poll_interval`` the simpler fix.
"""

from __future__ import annotations

import time
from typing import Any

import requests

from ..errors import NoticeError
from ..records.instance import InstanceInfo
from ._http import http_request, new_session, remaining
from .base import Notice, PollingWatcher

__all__ = ["DEFAULT_GCP_METADATA_ENDPOINT", "PREEMPTION_WINDOW_S", "GcpWatcher"]

DEFAULT_GCP_METADATA_ENDPOINT = "http://metadata.google.internal"
#: How long GCP lets a preempted VM run after the notice (its documented ~30 s).
PREEMPTION_WINDOW_S = 30.0

_BASE = "/computeMetadata/v1/instance/"
_HEADERS = {"Metadata-Flavor": "Google"}


class GcpWatcher(PollingWatcher):
    """Polls the GCP metadata server's ``instance/preempted`` flag."""

    name = "gcp"

    def __init__(
        self,
        endpoint: str = DEFAULT_GCP_METADATA_ENDPOINT,
        *,
        poll_interval: float = 5.0,
        startup_timeout: float = 1.0,
        request_timeout: float = 2.0,
    ) -> None:
        super().__init__(poll_interval=poll_interval, startup_timeout=startup_timeout)
        self.endpoint = endpoint.rstrip("/")
        self.request_timeout = float(request_timeout)
        self._session = new_session()

    def _get(self, session: requests.Session, leaf: str, deadline: float | None = None):
        return http_request(
            session, "GET", self.endpoint + _BASE + leaf, headers=_HEADERS,
            timeout=remaining(deadline, self.request_timeout),
        )

    def _probe(self, deadline: float) -> bool:
        resp = self._retry_until(deadline, lambda: self._get(self._session, "preempted", deadline))
        # The real server tags every answer; anything else at this address is not it.
        return resp is not None and resp.status == 200 and resp.headers.get("Metadata-Flavor") == "Google"

    def _poll(self) -> list[tuple[Any, Notice]]:
        resp = self._get(self._session, "preempted")
        if resp.status != 200:
            raise NoticeError(f"HTTP {resp.status} from {_BASE}preempted")
        if resp.text.strip().upper() != "TRUE":
            return []
        now = time.time()
        return [("preempted", Notice(
            source="gcp", action="preempt", stop=True, detected_at=now,
            deadline=now + PREEMPTION_WINDOW_S, detail={"preempted": resp.text.strip()},
        ))]

    def _fetch_instance_info(self, deadline: float) -> InstanceInfo | None:
        session = new_session()
        try:
            def text(leaf: str) -> str | None:
                resp = self._get(session, leaf, deadline)
                if resp.status == 200:
                    return resp.text.strip() or None
                if resp.status == 404:
                    return None
                raise NoticeError(f"HTTP {resp.status} from {_BASE}{leaf}")

            instance_id = text("id")
            if instance_id is None:
                return None
            # Both come as resource paths: projects/123/zones/us-central1-a
            zone = _last(text("zone"))
            machine_type = _last(text("machine-type"))
            preemptible = (text("scheduling/preemptible") or "FALSE").upper() == "TRUE"
            return InstanceInfo(
                cloud="gcp",
                instance_id=instance_id,
                instance_type=machine_type,
                region=zone.rsplit("-", 1)[0] if zone and "-" in zone else None,
                availability_zone=zone,
                market="spot" if preemptible else "on-demand",
            )
        finally:
            session.close()


def _last(path: str | None) -> str | None:
    return path.rsplit("/", 1)[-1] if path else None
