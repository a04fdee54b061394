"""Budget limits on a launch: ``--max-cost USD`` and ``--max-wait DURATION``.

Both launchers (the local simulator and the EC2 controller) use the same pieces:

* :class:`Limits`: the two values, validated, persisted in the launch state's options
  (``options["limits"]``, :meth:`Limits.to_dict`) so ``--resume`` and ``spotrun status``
  see them;
* :class:`CostGuard`: called from the launcher's poll loop, says when the run's spend (the
  ledger priced exactly as ``spotrun status`` prices it: running segments to now) reached
  ``--max-cost``. It prices the ledger at most every ``min_interval_s`` and, between two
  pricings, schedules the next one for when the running segments' hourly rate says the
  limit would be crossed, so the stop lands on time without reading the ledger every poll.
  Machines started but not in the ledger yet (:class:`Booting`: a replacement asked for at a
  loss, the nodes of a grow back, while they boot) are billed from their launch, so they
  count too;
* :class:`WaitClock`: how long no pool (and no region) has had capacity; past
  ``--max-wait`` the launcher gives up, keeping the checkpoint;
* :func:`limits_status`: what ``spotrun status`` shows about them.

The launcher decides what "stop" means (a graceful stop that keeps the last checkpoint);
this module only says when and why, in one line.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, PriceUnavailableError
from ..storage import Storage

__all__ = [
    "DEFAULT_COST_CHECK_S",
    "LIMITS_KEY",
    "Booting",
    "CostGuard",
    "Limits",
    "WaitClock",
    "duration_seconds",
    "fmt_wait",
    "limits_status",
    "parse_duration",
    "spend_so_far",
]

log = logging.getLogger(__name__)

#: Where :class:`Limits` lives in the launch state's ``options``.
LIMITS_KEY = "limits"
#: How often :class:`CostGuard` prices the ledger at most (a launcher's poll may be faster).
DEFAULT_COST_CHECK_S = 30.0

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# One or more NUMBER UNIT parts: 90s, 45m, 6h, 2d, 1h30m, 1.5h.
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_DURATION = re.compile(r"\s*(?:\d+(?:\.\d+)?\s*[smhd]\s*)+")
_PLAIN = re.compile(r"\s*\d+(?:\.\d+)?\s*")


def duration_seconds(text: str) -> float | None:
    """``text`` as seconds when it is a duration with units (``90s``, ``45m``, ``6h``, ``2d``,
    ``1h30m``), else None. The grammar ``--deadline`` and ``--max-wait`` share."""
    if not isinstance(text, str) or not _DURATION.fullmatch(text):
        return None
    return sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))


def parse_duration(text: str, *, flag: str = "--max-wait") -> float:
    """``text`` (``90s``, ``45m``, ``6h``, ``2d``, ``1h30m`` or plain seconds) as seconds > 0;
    a one-line :class:`~spotrun.errors.ConfigError` naming ``flag`` otherwise."""
    seconds = duration_seconds(text)
    if seconds is None and isinstance(text, str) and _PLAIN.fullmatch(text):
        seconds = float(text)
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        shown = repr(text) if len(repr(text)) <= 40 else repr(text)[:37] + "..."
        raise ConfigError(f"{flag} {shown}: use a duration greater than 0 like 90s, 45m, 6h, 2d "
                          "or plain seconds")
    return seconds


def fmt_wait(seconds: float) -> str:
    """A duration in its two largest units: ``45s``, ``1m 30s``, ``1h``, ``1h 02m``, ``2d 03h``."""
    s = max(0, round(seconds))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for i, (unit, size) in enumerate(units):
        if s >= size or size == 1:
            text = f"{s // size}{unit}"
            if size > 1:
                small, small_size = units[i + 1]
                rest = s % size // small_size
                if rest:
                    text += f" {rest:02d}{small}"
            return text
    return "0s"  # pragma: no cover - the loop always returns


def _positive(value: Any, flag: str, example: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{flag} {value!r}: use a number greater than 0, e.g. {flag} {example}")
    return float(value)


@dataclass(frozen=True)
class Limits:
    """``--max-cost`` (USD, what the ledger says the run spent) and ``--max-wait`` (seconds
    with no capacity anywhere). None: no limit."""

    max_cost_usd: float | None = None
    max_wait_s: float | None = None

    def validate(self) -> Limits:
        """Self, when both limits are None or finite numbers > 0; ConfigError otherwise."""
        _positive(self.max_cost_usd, "--max-cost", "25")
        _positive(self.max_wait_s, "--max-wait", "6h")
        return self

    @property
    def any(self) -> bool:
        return self.max_cost_usd is not None or self.max_wait_s is not None

    def to_dict(self) -> dict[str, float | None]:
        return {"max_cost_usd": self.max_cost_usd, "max_wait_s": self.max_wait_s}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Limits:
        """The limits :meth:`to_dict` wrote (missing keys: no limit), validated."""
        data = data or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"launch limits {data!r} are not an object; fix or delete launch/state.json's options")
        return cls(max_cost_usd=data.get("max_cost_usd"), max_wait_s=data.get("max_wait_s")).validate()

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> Limits:
        """The limits stored in a launch state's ``options``: under ``options["limits"]``
        (:data:`LIMITS_KEY`), or as top-level ``max_cost_usd``/``max_wait_s`` fields (an
        options dataclass that holds them flat). No limits when neither is there."""
        options = options or {}
        nested = options.get(LIMITS_KEY)
        if nested is not None:
            return cls.from_dict(nested)
        return cls.from_dict({k: options.get(k) for k in ("max_cost_usd", "max_wait_s")})


# -- spend -------------------------------------------------------------------------------

_warned: set[str] = set()


def _warn_once(message: str, seen: set[str] | None = None) -> None:
    seen = _warned if seen is None else seen
    if message not in seen:
        seen.add(message)
        log.warning("%s", message)


@dataclass(frozen=True)
class Booting:
    """A machine the launcher started that is not in the ledger yet (it becomes a segment
    once it joins an attempt, billed from ``launched_at``; until then only the launcher knows
    it runs). ``market``: ``spot`` or ``on-demand``."""

    instance_type: str
    market: str
    region: str | None
    availability_zone: str | None
    launched_at: float


@dataclass(frozen=True)
class _Spend:
    usd: float | None
    usd_per_hour: float  # what the running segments add per hour (0 when none run)
    at: float


def _priced(storage: Storage, *, offline: bool, now: float | None, running: Collection[str] | None,
            seen: set[str] | None, booting: Sequence[Booting] = ()) -> _Spend:
    from ..cost.prices import PriceBook
    from ..cost.report import RUNNING, report_for_run

    when = time.time() if now is None else now
    where = storage.display()
    prices = PriceBook(offline=offline)
    try:
        report = report_for_run(storage, offline=offline, running=running, now=when, price_book=prices)
    except Exception as exc:  # noqa: BLE001 - a limit check must never end the launcher
        _warn_once(f"cannot price the run at {where} for --max-cost ({exc}); the limit is not "
                   "enforced until it can", seen)
        return _Spend(None, 0.0, when)
    extra_usd, extra_rate = _booting_spend(booting, prices, when, seen)
    if not report.segments:
        return _Spend(extra_usd, extra_rate, when)
    priced = [s for s in report.segments if s.price is not None]
    unpriced = [s.segment_id for s in report.segments if s.price is None]
    if not priced:
        why = report.segments[0].price_error or "no price found"
        _warn_once(f"cannot price the run at {where} for --max-cost: {why}", seen)
        return _Spend(None, 0.0, when)
    if unpriced:
        # The priced part is a lower bound: a limit it reaches is truly reached.
        _warn_once(f"segment(s) {', '.join(unpriced[:3])} of {where} have no price; --max-cost "
                   "counts only the priced ones", seen)
    usd = float(sum(s.duration_s / 3600.0 * s.price.usd_per_hour for s in priced if s.price is not None))
    rate = float(sum(s.price.usd_per_hour for s in priced if s.end_reason == RUNNING and s.price is not None))
    return _Spend(usd + extra_usd, rate + extra_rate, when)


def _booting_spend(booting: Sequence[Booting], prices: Any, now: float,
                   seen: set[str] | None) -> tuple[float, float]:
    """(USD so far, USD per hour) of the machines started but not booked yet, priced as the
    report will price their segments once they join (spot: the zone's price over the time
    since launch; on-demand: the list price). One that cannot be priced counts nothing (a
    lower bound, as for the ledger's unpriced segments), with one warning."""
    usd = rate = 0.0
    for b in booting:
        start = min(b.launched_at, now)
        try:
            if b.market == "on-demand":
                price = prices.on_demand(b.instance_type, b.region)
            else:
                price = prices.spot(b.instance_type, b.availability_zone, start, now, region=b.region)
        except PriceUnavailableError as exc:
            _warn_once(f"a booting {b.instance_type} has no price ({exc}); --max-cost counts it "
                       "once it joins", seen)
            continue
        usd += (now - start) / 3600.0 * price.usd_per_hour
        rate += price.usd_per_hour
    return usd, rate


def spend_so_far(storage: Storage, *, offline: bool = True, now: float | None = None,
                 running: Collection[str] | None = None) -> float | None:
    """USD the run's ledger says was spent so far: every segment priced as ``spotrun status``
    prices it (:func:`spotrun.cost.report.report_for_run`), the running segment(s) to
    ``now``. ``running`` names the running segments (default: the open segments of the
    launch state). None, with a warning logged once, when no segment can be priced; when
    some can, their sum (a lower bound; a warning names the others)."""
    return _priced(storage, offline=offline, now=now, running=running, seen=None).usd


class CostGuard:
    """Says when a run's spend reached ``limits.max_cost_usd``; cheap enough for a poll loop.

    :meth:`check` prices the ledger at most every ``min_interval_s`` seconds (of the ``now``
    it is given); between pricings it adds the running segments' hourly rate to the last
    figure and prices again early when that estimate reaches the limit, so the stop is not
    up to ``min_interval_s`` late. Once reached, every later call returns the same reason.
    """

    def __init__(self, limits: Limits, storage: Storage, *, min_interval_s: float = DEFAULT_COST_CHECK_S,
                 offline: bool = True) -> None:
        self.limits = limits
        self.storage = storage
        self.min_interval_s = max(0.0, float(min_interval_s))
        self.offline = offline
        self.last: _Spend | None = None
        self.pricings = 0  # how often the ledger was priced (tests, logs)
        self._reason: str | None = None
        self._next_at = -math.inf
        self._warned: set[str] = set()

    @property
    def spent_usd(self) -> float | None:
        """The last priced spend (None before the first, or when it could not be priced)."""
        return None if self.last is None else self.last.usd

    def check(self, now: float | None = None, *, running: Collection[str] | None = None,
              booting: Sequence[Booting] = ()) -> str | None:
        """The reason to stop (``spent $12.34 of --max-cost 12.00``) once the spend reached
        the limit, else None. ``running``: the segments running now (default: the launch
        state's open segments); ``booting``: machines started but not in the ledger yet."""
        limit = self.limits.max_cost_usd
        if limit is None or self._reason is not None:
            return self._reason
        now = time.time() if now is None else now
        if now < self._next_at:
            return None
        spend = _priced(self.storage, offline=self.offline, now=now, running=running, seen=self._warned,
                        booting=booting)
        self.pricings += 1
        self.last = spend
        if spend.usd is not None and spend.usd >= limit:
            self._reason = f"spent ${spend.usd:,.2f} of --max-cost {limit:,.2f}"
            return self._reason
        next_at = now + self.min_interval_s
        if spend.usd is not None and spend.usd_per_hour > 0:
            crossing = now + (limit - spend.usd) / spend.usd_per_hour * 3600.0
            # Never re-price more than once a second, however close the limit is.
            next_at = min(next_at, max(crossing, now + min(1.0, self.min_interval_s)))
        self._next_at = next_at
        return None


# -- waiting for capacity ------------------------------------------------------------------


class WaitClock:
    """How long no pool (and no region) has had capacity. ``no_capacity`` starts it (when not
    running), ``got_capacity`` resets it, ``expired`` says when it ran past ``max_wait_s``."""

    def __init__(self, max_wait_s: float | None, *, since: float | None = None) -> None:
        self.max_wait_s = max_wait_s
        self.since = since

    def no_capacity(self, now: float | None = None) -> None:
        if self.since is None:
            self.since = time.time() if now is None else now

    def got_capacity(self) -> None:
        self.since = None

    def waited(self, now: float | None = None) -> float:
        """Seconds without capacity so far (0 when capacity came last)."""
        if self.since is None:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - self.since)

    def expired(self, now: float | None = None) -> str | None:
        """``no capacity for 1h 02m (--max-wait 1h)`` once the wait reached ``max_wait_s``."""
        if self.max_wait_s is None or self.since is None:
            return None
        waited = self.waited(now)
        if waited < self.max_wait_s:
            return None
        return f"no capacity for {fmt_wait(waited)} (--max-wait {fmt_wait(self.max_wait_s)})"

    def to_dict(self) -> dict[str, float | None]:
        """For the launch state, so a resumed controller keeps counting (``waiting_since``)."""
        return {"waiting_since": self.since}

    @classmethod
    def from_dict(cls, max_wait_s: float | None, data: Mapping[str, Any] | None) -> WaitClock:
        since = (data or {}).get("waiting_since")
        ok = isinstance(since, (int, float)) and not isinstance(since, bool) and math.isfinite(since)
        return cls(max_wait_s, since=float(since) if ok else None)


# -- status ----------------------------------------------------------------------------------


def limits_status(state_options: Mapping[str, Any] | None, storage: Storage, *, offline: bool = True,
                  now: float | None = None, waiting_since: float | None = None,
                  spent_usd: float | None = None) -> dict[str, Any]:
    """What ``spotrun status`` shows about the limits, as a JSON-able dict::

        {"max_cost_usd": 25.0 | None, "max_wait_s": 21600.0 | None,
         "spent_usd": 3.21 | None, "cost_fraction": 0.128 | None,
         "waiting_s": 0.0, "text": ["max cost   $3.21 spent of $25.00 (13%)", ...]}

    ``spent_usd``: the spend when the caller already priced the run (status has its cost
    report), else it is priced here (only when a --max-cost is set). ``waiting_since``: when
    the launcher last found no capacity (its :meth:`WaitClock.to_dict`, or the options'
    ``waiting_since``). ``text`` is empty when no limit is set.
    """
    now = time.time() if now is None else now
    try:
        limits = Limits.from_options(state_options)
    except ConfigError as exc:
        return {"max_cost_usd": None, "max_wait_s": None, "spent_usd": None, "cost_fraction": None,
                "waiting_s": 0.0, "text": [f"limits     unreadable ({exc})"]}
    if waiting_since is None:
        waiting_since = WaitClock.from_dict(None, state_options or {}).since
    clock = WaitClock(limits.max_wait_s, since=waiting_since)
    out: dict[str, Any] = {**limits.to_dict(), "spent_usd": None, "cost_fraction": None,
                           "waiting_s": round(clock.waited(now), 1), "text": []}
    if limits.max_cost_usd is not None:
        spent = spent_usd if spent_usd is not None else spend_so_far(storage, offline=offline, now=now)
        out["spent_usd"] = spent
        if spent is None:
            out["text"].append(f"max cost   ${limits.max_cost_usd:,.2f}; spent so far unknown (no price)")
        else:
            out["cost_fraction"] = spent / limits.max_cost_usd
            out["text"].append(f"max cost   ${spent:,.2f} spent of ${limits.max_cost_usd:,.2f} "
                               f"({100.0 * out['cost_fraction']:.0f}%)")
    if limits.max_wait_s is not None:
        wait = (f"waiting for capacity {fmt_wait(clock.waited(now))}" if clock.since is not None
                else "not waiting for capacity")
        out["text"].append(f"max wait   {fmt_wait(limits.max_wait_s)}; {wait}")
    return out
