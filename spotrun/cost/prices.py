"""Where an hourly price comes from, and which source answered.

Order, for each price asked:

1. a user override (``--spot-price`` / ``--on-demand-price`` or a ``[prices]`` table);
2. the disk cache, when it holds a *fresh* answer the AWS API gave earlier (a spot average
   over a window that has closed never changes; on-demand answers live for a week);
3. the AWS API (spot: ``ec2.describe_spot_price_history``; on-demand: the Price List Query
   API ``pricing.get_products``, which only answers in a few regions, so its client is in
   us-east-1);
4. a stale disk-cache answer, when the API failed;
5. the snapshot shipped with the package (``data/price_snapshot.json``), which states its
   provenance; its spot figures are an estimate (on-demand x 0.30), and it says so.

Segments whose cloud is ``"simulated"`` or ``"local"`` never call an API (callers pass
``use_api=False``). Every :class:`Price` carries its source and, when a better source failed,
why, so a report can always say where each figure came from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import env_str
from ..errors import PriceUnavailableError

__all__ = [
    "CACHE_ENV",
    "Price",
    "PriceBook",
    "load_snapshot",
    "region_of_zone",
    "snapshot_vintage",
    "time_weighted_average",
]

log = logging.getLogger(__name__)

CACHE_ENV = "SPOTRUN_CACHE_DIR"
ON_DEMAND_TTL_S = 7 * 86400
CURRENT_SPOT_TTL_S = 3600
PRICING_REGION = "us-east-1"
PRODUCT_DESCRIPTION = "Linux/UNIX"

ClientFactory = Callable[[str, str], Any]


@dataclass(frozen=True)
class Price:
    """An hourly USD price and where it came from.

    ``source`` is one of ``override``, ``aws-api``, ``cache``, ``snapshot``; ``detail`` says
    more (the API call, the cache date, the snapshot's provenance); ``fallback`` says why a
    better source was not used (e.g. the API error), or is None.
    """

    usd_per_hour: float
    source: str
    detail: str = ""
    fallback: str | None = None
    #: True when the figure is not market data (the snapshot's spot = on-demand x 0.30).
    estimate: bool = False
    #: The snapshot's vintage (e.g. "2025-07") when the figure comes from it.
    vintage: str | None = None

    def label(self) -> str:
        text = self.source
        if self.vintage:
            text += f" {self.vintage}"
        if self.estimate:
            text += " ESTIMATE"
        text += f" ({self.detail})" if self.detail else ""
        if self.fallback:
            text += f"; {self.fallback}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def region_of_zone(zone: str) -> str:
    """``us-east-1a`` -> ``us-east-1``; ``us-west-2-lax-1a`` (a Local Zone) -> ``us-west-2``."""
    m = re.match(r"^([a-z]{2}(?:-gov)?-[a-z]+-\d+)", zone)
    if not m:
        raise PriceUnavailableError(f"cannot tell the region of availability zone {zone!r}")
    return m.group(1)


def time_weighted_average(points: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """The average of a step function over ``[start, end]``.

    ``points`` are ``(epoch_time, price)`` changes; a price holds from its time until the
    next change. The price in effect at ``start`` is the last change at or before it; when
    every change is after ``start``, the earliest one is assumed to hold from ``start`` (the
    API was asked for a window and gave nothing older). ``end <= start`` gives the price in
    effect at ``start``.
    """
    if not points:
        raise ValueError("no price points")
    pts = sorted((float(t), float(p)) for t, p in points)

    def at(t: float) -> float:
        current = pts[0][1]
        for when, price in pts:
            if when <= t:
                current = price
            else:
                break
        return current

    if end <= start:
        return at(start)
    total = 0.0
    cursor, price = start, at(start)
    for when, p in pts:
        if when <= start:
            continue
        if when >= end:
            break
        total += price * (when - cursor)
        cursor, price = when, p
    total += price * (end - cursor)
    return total / (end - start)


def load_snapshot() -> dict[str, Any]:
    """The price snapshot shipped with the package."""
    text = resources.files("spotrun.cost").joinpath("data/price_snapshot.json").read_text()
    return json.loads(text)  # type: ignore[no-any-return]


def snapshot_vintage(snapshot: dict[str, Any] | None = None) -> str:
    """The one date every figure of the shipped snapshot is from (e.g. ``"2025-07"``)."""
    snap = load_snapshot() if snapshot is None else snapshot
    return str(snap.get("vintage") or "undated")


def default_cache_dir() -> Path:
    configured = env_str(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    base = env_str("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spotrun"


def _default_client_factory(service: str, region: str) -> Any:
    import boto3
    from botocore.config import Config

    # A report must not hang on an unreachable endpoint: fail fast and fall back.
    config = Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2})
    return boto3.client(service, region_name=region, config=config)


class _DiskCache:
    """A small JSON file of API answers; writes are atomic, failures only log."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "prices.json"

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable price cache %s: %s", self.path, exc)
            return {}

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._load().get(key)
        return entry if isinstance(entry, dict) and "price" in entry else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = self._load()
            data[key] = entry
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not write price cache %s: %s", self.path, exc)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]


class PriceBook:
    """Answers "what did an hour of X cost" from overrides, AWS, the cache or the snapshot.

    Args:
        spot_price, on_demand_price: user overrides in USD per hour (win over everything).
        offline: never call an AWS API.
        cache_dir: where ``prices.json`` lives (default ``$SPOTRUN_CACHE_DIR`` or
            ``~/.cache/spotrun``).
        client_factory: ``(service, region) -> boto3 client``; tests pass stubbed clients.
        snapshot: a snapshot dict (default: the one shipped with the package).
    """

    def __init__(
        self,
        *,
        spot_price: float | None = None,
        on_demand_price: float | None = None,
        offline: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        client_factory: ClientFactory | None = None,
        snapshot: dict[str, Any] | None = None,
    ) -> None:
        for name, value in (("spot price", spot_price), ("on-demand price", on_demand_price)):
            if value is not None and not (value >= 0):
                raise PriceUnavailableError(f"{name} override {value!r} must be >= 0 USD/hour")
        self.spot_override = spot_price
        self.on_demand_override = on_demand_price
        self.offline = offline
        self.cache = _DiskCache(Path(cache_dir) if cache_dir else default_cache_dir())
        self._client_factory = client_factory or _default_client_factory
        self._clients: dict[tuple[str, str], Any] = {}
        self._snapshot = snapshot
        self._memo: dict[str, Price] = {}

    # -- plumbing ----------------------------------------------------------------------

    @property
    def snapshot(self) -> dict[str, Any]:
        if self._snapshot is None:
            self._snapshot = load_snapshot()
        return self._snapshot

    def _client(self, service: str, region: str) -> Any:
        key = (service, region)
        if key not in self._clients:
            self._clients[key] = self._client_factory(service, region)
        return self._clients[key]

    def _snapshot_on_demand(self, instance_type: str, region: str | None) -> Price | None:
        snap = self.snapshot
        entry = snap.get("on_demand", {}).get(instance_type)
        if entry is None:
            return None
        detail = f"shipped snapshot: {snap.get('vintage_text', '')}"
        snap_region = snap.get("region", "us-east-1")
        if region and region != snap_region:
            detail += f"; the snapshot lists {snap_region} only, used for {region}"
        value = entry["price"] if isinstance(entry, dict) else entry
        return Price(float(value), "snapshot", detail, vintage=snapshot_vintage(snap))

    def _snapshot_spot(self, instance_type: str, region: str | None) -> Price | None:
        od = self._snapshot_on_demand(instance_type, region)
        if od is None:
            return None
        fraction = float(self.snapshot.get("spot_fraction_of_on_demand", 0.30))
        provenance = self.snapshot.get("spot_estimate", "")
        return Price(
            od.usd_per_hour * fraction,
            "snapshot",
            f"shipped snapshot, {provenance}; on-demand from the {od.detail.removeprefix('shipped snapshot: ')}",
            estimate=True,
            vintage=od.vintage,
        )

    # -- on-demand ---------------------------------------------------------------------

    def on_demand(self, instance_type: str | None, region: str | None, *, use_api: bool = True) -> Price:
        """The on-demand Linux price of ``instance_type`` in ``region`` (default us-east-1)."""
        if self.on_demand_override is not None:
            return Price(float(self.on_demand_override), "override", "--on-demand-price")
        if not instance_type:
            raise PriceUnavailableError(
                "no instance type, so no on-demand price; pass --on-demand-price"
            )
        region = region or PRICING_REGION
        key = f"on_demand|{region}|{instance_type}"
        if key in self._memo and use_api:
            return self._memo[key]
        failure: str | None = None
        cached = self.cache.get(key)
        if use_api and not self.offline:
            if cached and time.time() - float(cached.get("fetched_at", 0)) < ON_DEMAND_TTL_S:
                price = Price(float(cached["price"]), "cache",
                              f"pricing.get_products, fetched {_iso(cached['fetched_at'])}")
                self._memo[key] = price
                return price
            try:
                value = self._fetch_on_demand(instance_type, region)
            except Exception as exc:  # noqa: BLE001 - any API failure falls back
                failure = f"AWS Pricing API failed ({_short(exc)})"
                log.warning("on-demand price of %s in %s: %s; falling back", instance_type, region, failure)
            else:
                self.cache.put(key, {"price": value, "fetched_at": time.time()})
                price = Price(value, "aws-api", f"pricing.get_products {region}")
                self._memo[key] = price
                return price
            if cached:
                price = Price(float(cached["price"]), "cache",
                              f"pricing.get_products, fetched {_iso(cached['fetched_at'])}", failure)
                self._memo[key] = price
                return price
        snap = self._snapshot_on_demand(instance_type, region)
        if snap is None:
            raise PriceUnavailableError(
                f"no on-demand price for {instance_type} in {region}"
                + (f" ({failure})" if failure else "")
                + "; pass --on-demand-price"
            )
        price = dataclasses.replace(snap, fallback=failure)
        self._memo[key] = price
        return price

    def _fetch_on_demand(self, instance_type: str, region: str) -> float:
        client = self._client("pricing", PRICING_REGION)
        filters = [
            {"Type": "TERM_MATCH", "Field": field, "Value": value}
            for field, value in (
                ("instanceType", instance_type),
                ("regionCode", region),
                ("operatingSystem", "Linux"),
                ("tenancy", "Shared"),
                ("preInstalledSw", "NA"),
                ("capacitystatus", "Used"),
            )
        ]
        found: list[tuple[bool, float]] = []
        token: str | None = None
        for _ in range(10):
            kwargs: dict[str, Any] = {"ServiceCode": "AmazonEC2", "Filters": filters, "MaxResults": 100}
            if token:
                kwargs["NextToken"] = token
            response = client.get_products(**kwargs)
            for item in response.get("PriceList", []):
                product = json.loads(item) if isinstance(item, str) else item
                found.extend(_on_demand_usd(product))
            token = response.get("NextToken")
            if not token:
                break
        if not found:
            raise PriceUnavailableError(f"the Pricing API lists no on-demand price for {instance_type} in {region}")
        # Prefer plain Linux ("No License required") over license-included variants.
        preferred = [p for plain, p in found if plain] or [p for _, p in found]
        return min(preferred)

    # -- spot --------------------------------------------------------------------------

    def spot(
        self,
        instance_type: str | None,
        availability_zone: str | None,
        start: float,
        end: float,
        *,
        region: str | None = None,
        use_api: bool = True,
    ) -> Price:
        """The time-weighted spot price over ``[start, end]`` in one zone."""
        if self.spot_override is not None:
            return Price(float(self.spot_override), "override", "--spot-price")
        if not instance_type:
            raise PriceUnavailableError("no instance type, so no spot price; pass --spot-price")
        if region is None and availability_zone:
            region = region_of_zone(availability_zone)
        failure: str | None = None
        if use_api and not self.offline and availability_zone:
            key = f"spot|{availability_zone}|{instance_type}|{start:.3f}|{end:.3f}"
            cached = self.cache.get(key)
            if cached:
                return Price(float(cached["price"]), "cache",
                             f"describe_spot_price_history {availability_zone}, fetched "
                             f"{_iso(cached['fetched_at'])}")
            try:
                points = self._fetch_spot_history(instance_type, availability_zone, region or "", start, end)
                value = time_weighted_average(points, start, end)
            except Exception as exc:  # noqa: BLE001
                failure = f"AWS EC2 spot price history failed ({_short(exc)})"
                log.warning("spot price of %s in %s: %s; falling back", instance_type, availability_zone, failure)
            else:
                now = time.time()
                # Only a closed window is final; a window still open may gain price changes.
                if end < now - 60:
                    self.cache.put(key, {"price": value, "fetched_at": now, "points": len(points)})
                return Price(value, "aws-api",
                             f"describe_spot_price_history {availability_zone}, time-weighted over "
                             f"{len(points)} price point(s)")
        elif use_api and not self.offline:
            failure = "no availability zone recorded, so no spot price history"
        snap = self._snapshot_spot(instance_type, region)
        if snap is None:
            raise PriceUnavailableError(
                f"no spot price for {instance_type}" + (f" ({failure})" if failure else "")
                + "; pass --spot-price"
            )
        return dataclasses.replace(snap, fallback=failure)

    def current_spot(self, instance_type: str, region: str, *, use_api: bool = True) -> Price:
        """Today's spot price: the mean over the region's zones of each zone's latest price."""
        if self.spot_override is not None:
            return Price(float(self.spot_override), "override", "--spot-price")
        key = f"spot_now|{region}|{instance_type}"
        failure: str | None = None
        if use_api and not self.offline:
            cached = self.cache.get(key)
            if cached and time.time() - float(cached.get("fetched_at", 0)) < CURRENT_SPOT_TTL_S:
                return Price(float(cached["price"]), "cache",
                             f"describe_spot_price_history {region}, fetched {_iso(cached['fetched_at'])}")
            try:
                now = time.time()
                raw = self._spot_history_raw(instance_type, None, region, now, now)
                latest: dict[str, tuple[float, float]] = {}
                for zone, t, p in raw:
                    if zone not in latest or t > latest[zone][0]:
                        latest[zone] = (t, p)
                if not latest:
                    raise PriceUnavailableError(f"no spot price history for {instance_type} in {region}")
                value = sum(p for _, p in latest.values()) / len(latest)
            except Exception as exc:  # noqa: BLE001
                failure = f"AWS EC2 spot price history failed ({_short(exc)})"
                log.warning("spot price of %s in %s: %s; falling back", instance_type, region, failure)
            else:
                self.cache.put(key, {"price": value, "fetched_at": time.time()})
                return Price(value, "aws-api",
                             f"describe_spot_price_history {region}, mean of {len(latest)} zone(s)")
        snap = self._snapshot_spot(instance_type, region)
        if snap is None:
            raise PriceUnavailableError(
                f"no spot price for {instance_type} in {region}"
                + (f" ({failure})" if failure else "") + "; pass --spot-price"
            )
        return dataclasses.replace(snap, fallback=failure)

    def _spot_history_raw(
        self, instance_type: str, zone: str | None, region: str, start: float, end: float
    ) -> list[tuple[str, float, float]]:
        client = self._client("ec2", region)
        out: list[tuple[str, float, float]] = []
        token: str | None = None
        for _ in range(50):
            kwargs: dict[str, Any] = {
                "InstanceTypes": [instance_type],
                "ProductDescriptions": [PRODUCT_DESCRIPTION],
                "StartTime": datetime.fromtimestamp(start, tz=timezone.utc),
                "EndTime": datetime.fromtimestamp(max(start, end), tz=timezone.utc),
            }
            if zone:
                kwargs["AvailabilityZone"] = zone
            if token:
                kwargs["NextToken"] = token
            response = client.describe_spot_price_history(**kwargs)
            for row in response.get("SpotPriceHistory", []):
                if row.get("ProductDescription", PRODUCT_DESCRIPTION) != PRODUCT_DESCRIPTION:
                    continue
                stamp = row["Timestamp"]
                t = stamp.timestamp() if isinstance(stamp, datetime) else float(stamp)
                out.append((row.get("AvailabilityZone", zone or ""), t, float(row["SpotPrice"])))
            token = response.get("NextToken") or None
            if not token:
                break
        return out

    def _fetch_spot_history(
        self, instance_type: str, zone: str, region: str, start: float, end: float
    ) -> list[tuple[float, float]]:
        raw = self._spot_history_raw(instance_type, zone, region or region_of_zone(zone), start, end)
        points = [(t, p) for z, t, p in raw if z in ("", zone)]
        if not points:
            raise PriceUnavailableError(f"no spot price history for {instance_type} in {zone}")
        return points


def _on_demand_usd(product: dict[str, Any]) -> list[tuple[bool, float]]:
    """(is plain Linux, USD/hour) for each hourly on-demand price dimension of a PriceList item."""
    attrs = product.get("product", {}).get("attributes", {})
    plain = attrs.get("licenseModel", "No License required") == "No License required"
    out = []
    for term in product.get("terms", {}).get("OnDemand", {}).values():
        for dim in term.get("priceDimensions", {}).values():
            usd = dim.get("pricePerUnit", {}).get("USD")
            unit = str(dim.get("unit", "Hrs")).lower()
            with contextlib.suppress(TypeError, ValueError):
                value = float(usd)
                if value > 0 and unit.startswith("hr"):
                    out.append((plain, value))
    return out
