"""Small HTTP helpers for metadata services: no proxy, short deadline-bound timeouts."""

from __future__ import annotations

import calendar
import math
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import requests

from ..errors import NoticeError

__all__ = [
    "MAX_BODY_BYTES",
    "Response",
    "http_request",
    "new_session",
    "parse_iso8601",
    "parse_rfc1123",
    "parse_time",
    "remaining",
]


class Response:
    """Status and body text of one answer (the body is tiny for metadata)."""

    __slots__ = ("headers", "status", "text")

    def __init__(self, status: int, text: str, headers: dict[str, str]) -> None:
        self.status = status
        self.text = text
        self.headers = headers


def new_session() -> requests.Session:
    """A session that ignores HTTP(S)_PROXY, .netrc and friends.

    A proxy variable set for pip or the S3 client would otherwise send metadata requests
    (and the IMDSv2 token) off the machine, where they fail or leak.
    """
    session = requests.Session()
    session.trust_env = False
    session.proxies = {}
    return session


def remaining(deadline: float | None, cap: float) -> float:
    """Seconds to use as a timeout: ``cap``, or less if ``deadline`` (monotonic) is nearer.

    Raises TimeoutError when the deadline has already passed.
    """
    if deadline is None:
        return cap
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return min(cap, left)


#: The most of a metadata answer read. Real ones are under a few KiB (a token is 56 bytes,
#: an instance-action document ~50, Azure's scheduled events a few hundred per event); a
#: larger body is not the metadata service (or is hostile), and reading all of it would slow
#: every poll of the notice loop (a 10 MB token took 2 s more before its use was refused).
MAX_BODY_BYTES = 64 * 1024
_READ_CHUNK = 16 * 1024


def http_request(
    session: requests.Session,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    timeout: float,
    max_bytes: int = MAX_BODY_BYTES,
) -> Response:
    """One request, its body read only up to ``max_bytes`` and within ``timeout`` in all.

    Connection and timeout errors propagate as ``requests`` exceptions (a body that drips in
    past ``timeout`` as :class:`requests.exceptions.ReadTimeout`); a larger body (by its
    Content-Length or as it is read) raises :class:`~spotrun.errors.NoticeError` without
    reading the rest.
    """
    started = time.monotonic()
    resp = session.request(
        method, url, headers=headers, timeout=timeout, allow_redirects=False, stream=True
    )
    try:
        what = f"{method} {url.split('?')[0]}"
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise NoticeError(f"{what} answered {int(declared):,} bytes (more than "
                              f"{max_bytes // 1024} KiB): not a metadata service's answer")
        body = bytearray()
        for chunk in resp.iter_content(_READ_CHUNK):
            body += chunk
            if len(body) > max_bytes:
                raise NoticeError(f"{what} answered more than {max_bytes // 1024} KiB: not a "
                                  "metadata service's answer")
            if time.monotonic() - started > timeout:
                raise requests.exceptions.ReadTimeout(f"{what}: the answer took over {timeout:.3g}s")
        try:  # the charset the answer names (requests' rule), else UTF-8
            text = body.decode(resp.encoding or "utf-8", errors="replace")
        except LookupError:  # a charset no codec knows
            text = body.decode("utf-8", errors="replace")
        return Response(resp.status_code, text, dict(resp.headers))
    finally:
        resp.close()


def parse_iso8601(value: object) -> float | None:
    """``2026-11-27T10:00:00Z`` -> epoch seconds; None for empty, unparsable or non-string
    values (a provider document is untrusted input: a number here must not raise)."""
    if not value or not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"  # fromisoformat only learned "Z" in 3.11
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return calendar.timegm(parsed.timetuple()) + parsed.microsecond / 1e6
    return parsed.timestamp()


def parse_rfc1123(value: object) -> float | None:
    """``Mon, 19 Sep 2016 18:29:47 GMT`` -> epoch seconds; None for empty, unparsable or
    non-string values."""
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


# Epoch numbers above this are taken as milliseconds: in seconds it would be year 5138.
_EPOCH_MS_ABOVE = 1e11


def parse_time(value: object) -> float | None:
    """A provider's time field, whatever shape it came in, as epoch seconds; None when it
    cannot be read (the caller picks a default).

    Accepts ISO 8601 strings, RFC 1123 strings, and epoch numbers (seconds, or
    milliseconds when implausibly large for seconds), also as numeric strings. Never raises.
    """
    if isinstance(value, bool):  # bool is an int; True is not a time
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            return parse_iso8601(text) or parse_rfc1123(text)
        return _epoch(number)
    if isinstance(value, (int, float)):
        try:
            return _epoch(float(value))
        except OverflowError:  # an int too big for a float
            return None
    return None


def _epoch(number: float) -> float | None:
    if not math.isfinite(number) or number <= 0:
        return None
    if number > _EPOCH_MS_ABOVE:
        number /= 1000.0
    return number if number <= _EPOCH_MS_ABOVE else None
