"""EC2 spot interruption notices and rebalance recommendations, through IMDSv2.

IMDSv2 wants a session token: ``PUT /latest/api/token`` with the TTL header, then the
token on every GET. The watcher keeps one token, renews it shortly before it expires and at
once on a 401 (the service restarted, or the token was revoked).

Two documents matter (both 404 until AWS posts them):

- ``/latest/meta-data/spot/instance-action``: ``{"action": "terminate"|"stop"|"hibernate",
  "time": "2026-11-27T10:00:00Z"}``, about two minutes before the action. ``time`` is the
  deadline.
- ``/latest/meta-data/events/recommendations/rebalance``: ``{"noticeTime": "..."}``, an
  early warning that the instance is at elevated risk; it may come long before, or without,
  an interruption.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import Any

import requests

from ..errors import ConfigError, MetadataBusyError, NoticeError
from ..records.instance import InstanceInfo
from ._http import http_request, new_session, parse_time, remaining
from .base import REBALANCE_MODES, Notice, PollingWatcher

__all__ = ["DEFAULT_IMDS_ENDPOINT", "MAX_TOKEN_TTL", "Ec2Watcher", "region_from_az"]

DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"
#: The longest token lifetime IMDS accepts (six hours).
MAX_TOKEN_TTL = 21600

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
# EC2 posts instance-action this long before its ``time``. The document carries no posting
# time of its own, so the notice time is estimated from the deadline, within what this
# watcher saw: never later than the poll that found it, never earlier than the last poll
# that found none (a simulator's or another provider's shorter lead, e.g. a 5 s grace, would
# otherwise read as "posted" two minutes before it was). That keeps "posted -> detected" in
# the logs a real latency figure.
NOTICE_LEAD_S = 120.0

log = logging.getLogger(__name__)

# Answers (besides any 5xx) that mean "the service is there but cannot answer right now".
_BUSY_STATUSES = frozenset({408, 429})

_AZ_REGION = re.compile(r"^([a-z]{2}(?:-[a-z]+)+-\d+)")


def region_from_az(az: str | None) -> str | None:
    """``us-east-1a`` -> ``us-east-1``; also Local/Wavelength zones (``us-west-2-lax-1a``)."""
    if not az:
        return None
    match = _AZ_REGION.match(az)
    return match.group(1) if match else None


class Ec2Watcher(PollingWatcher):
    """Polls EC2's instance metadata service (IMDSv2) for spot notices.

    ``rebalance``: ``"checkpoint"`` delivers a rebalance recommendation with ``stop=False``,
    ``"stop"`` with ``stop=True``, ``"ignore"`` never polls for it. A rebalance is delivered
    at most once, and not at all after an interruption notice.
    """

    name = "ec2"

    def __init__(
        self,
        endpoint: str = DEFAULT_IMDS_ENDPOINT,
        *,
        poll_interval: float = 5.0,
        rebalance: str = "checkpoint",
        token_ttl: int = MAX_TOKEN_TTL,
        startup_timeout: float = 1.0,
        request_timeout: float = 2.0,
    ) -> None:
        super().__init__(poll_interval=poll_interval, startup_timeout=startup_timeout)
        if rebalance not in REBALANCE_MODES:
            raise ConfigError(f"rebalance={rebalance!r} is not one of {', '.join(REBALANCE_MODES)}")
        if not (isinstance(token_ttl, int) and 1 <= token_ttl <= MAX_TOKEN_TTL):
            raise ConfigError(f"token_ttl={token_ttl!r} must be an integer in 1..{MAX_TOKEN_TTL}")
        self.endpoint = endpoint.rstrip("/")
        self.rebalance = rebalance
        self.token_ttl = token_ttl
        self.request_timeout = float(request_timeout)
        self._session = new_session()  # the polling thread's own; instance_info makes its own
        self._token: str | None = None
        self._token_renew_at = 0.0  # time.monotonic()
        self._token_lock = threading.Lock()
        self._clear_at = 0.0  # time.time() of the last poll that found no instance-action

    def _unavailable_hint(self) -> str:
        return (
            f" (asked {self.endpoint}; in a container on EC2? the IMDSv2 token answer needs "
            "HttpPutResponseHopLimit=2 on the instance)"
        )

    # -- token --------------------------------------------------------------------------

    def _token_for(self, session: requests.Session, deadline: float | None, *, renew: bool) -> str:
        with self._token_lock:
            if not renew and self._token is not None and time.monotonic() < self._token_renew_at:
                return self._token
            asked = time.monotonic()
            resp = http_request(
                session,
                "PUT",
                self.endpoint + TOKEN_PATH,
                headers={TTL_HEADER: str(self.token_ttl)},
                timeout=remaining(deadline, self.request_timeout),
            )
            busy = resp.status >= 500 or resp.status in _BUSY_STATUSES
            if busy or (resp.status == 200 and not resp.text.strip()):
                # IMDS is there, just struggling (throttled, restarting): retry, never give up.
                raise MetadataBusyError(
                    f"HTTP {resp.status} to the IMDSv2 token request", resp.status
                )
            if resp.status != 200:
                raise NoticeError(f"IMDSv2 token request answered HTTP {resp.status}")
            # Renew well before expiry (a minute, or a quarter of a short TTL), counted from
            # when we asked, so clock drift on the request cannot outlive the token.
            self._token = resp.text.strip()
            self._token_renew_at = asked + self.token_ttl - min(60.0, self.token_ttl / 4)
            return self._token

    def _get(self, session: requests.Session, path: str, deadline: float | None = None):
        token = self._token_for(session, deadline, renew=False)
        url = self.endpoint + path
        resp = http_request(
            session, "GET", url, headers={TOKEN_HEADER: token},
            timeout=remaining(deadline, self.request_timeout),
        )
        if resp.status == 401:
            token = self._token_for(session, deadline, renew=True)
            resp = http_request(
                session, "GET", url, headers={TOKEN_HEADER: token},
                timeout=remaining(deadline, self.request_timeout),
            )
        return resp

    # -- hooks --------------------------------------------------------------------------

    def _probe(self, deadline: float) -> bool:
        token = self._retry_until(deadline, lambda: self._token_for(self._session, deadline, renew=True))
        # A busy answer (5xx, 429) means IMDS is there: watch, and let polling get the token.
        # Other 4xx stay final: GCP's and Azure's metadata servers live at the same address
        # and answer EC2's token request with 4xx.
        return token is not None or self._busy_answer is not None

    def _poll(self) -> list[tuple[Any, Notice]]:
        found: list[tuple[Any, Notice]] = []
        asked = time.time()
        resp = self._get(self._session, ACTION_PATH)
        now = time.time()
        if resp.status == 404:
            self._clear_at = asked  # no notice was posted before this moment
        if resp.status == 200:
            doc = _json_or_raw(resp.text)
            action = str(doc.get("action") or "terminate").lower()
            raw_time = doc.get("time")
            # The key must be hashable whatever the document holds (a list, a dict...).
            key = ("action", action, json.dumps(raw_time, sort_keys=True, default=str))
            deadline = parse_time(raw_time)
            posted = None if deadline is None else min(max(deadline - NOTICE_LEAD_S, self._clear_at), now)
            if deadline is None:
                # An unreadable time must not drop the notice: the machine still goes, so
                # stop with EC2's usual two minutes. Said once per notice, not every poll.
                deadline = now + NOTICE_LEAD_S
                if key not in self._delivered:
                    log.warning(
                        "ec2 instance-action has an unreadable time %.80r; assuming "
                        "the machine goes in %.0f s (EC2's usual notice)", raw_time,
                        NOTICE_LEAD_S,
                    )
            found.append((key, Notice(
                source="ec2", action=action, stop=True, detected_at=now,
                notice_time=posted, deadline=deadline, detail=doc,
            )))
        elif resp.status != 404:
            raise NoticeError(f"HTTP {resp.status} from {ACTION_PATH}")

        stop_seen = found or any(k[0] == "action" for k in self._delivered)
        if self.rebalance != "ignore" and "rebalance" not in self._delivered and not stop_seen:
            resp = self._get(self._session, REBALANCE_PATH)
            if resp.status == 200:
                doc = _json_or_raw(resp.text)
                found.append(("rebalance", Notice(
                    source="ec2", action="rebalance", stop=self.rebalance == "stop",
                    detected_at=time.time(), notice_time=parse_time(doc.get("noticeTime")),
                    detail=doc,
                )))
            elif resp.status != 404:
                raise NoticeError(f"HTTP {resp.status} from {REBALANCE_PATH}")
        return found

    def _fetch_instance_info(self, deadline: float) -> InstanceInfo | None:
        session = new_session()
        try:
            def text(leaf: str) -> str | None:
                resp = self._get(session, "/latest/meta-data/" + leaf, deadline)
                if resp.status == 200 and resp.text.strip():
                    return resp.text.strip()
                if resp.status == 404:
                    return None
                raise NoticeError(f"HTTP {resp.status} from /latest/meta-data/{leaf}")

            instance_id = text("instance-id")
            if instance_id is None:
                return None
            az = text("placement/availability-zone")
            region = text("placement/region") or region_from_az(az)
            lifecycle = (text("instance-life-cycle") or "on-demand").lower()
            return InstanceInfo(
                cloud="aws",
                instance_id=instance_id,
                instance_type=text("instance-type"),
                region=region,
                availability_zone=az,
                market="spot" if lifecycle == "spot" else "on-demand",
            )
        finally:
            session.close()


def _json_or_raw(text: str) -> dict:
    """The provider's JSON, or ``{"raw": text}``: a 200 on a notice path is a notice even
    when its body is odd, so it must not be dropped as a parse error."""
    try:
        doc = json.loads(text)
    except ValueError:
        return {"raw": text}
    return doc if isinstance(doc, dict) else {"raw": doc}
