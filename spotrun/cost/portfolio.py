"""A whole ML portfolio's monthly bill, and a savings plan that never counts a dollar twice.

The TOML file (see ``examples/portfolio.toml``) lists ``[[training]]`` jobs, ``[[inference]]``
endpoints and ``[[other]]`` monthly items (storage, network, managed services). spotrun
prices each item, totals by category, then proposes strategies, applied to each item *in
sequence, each to the cost the previous one left*:

* training:  right-sizing -> spot (only ``interruptible`` jobs running on on-demand; the
  spot cost is the expected one, re-work and restarts included, see ``estimate``);
* inference: right-sizing -> off-hours schedule -> reserved/savings-plan pricing (only for
  ``steady`` endpoints still running 24 hours a day after any schedule: a commitment is
  paid whether the instance runs or not, so it is never stacked on a schedule);
* other:     storage tiering (``cold_fraction`` of it moved to a tier ``cold_price_ratio``
  times the price).

So the savings of all strategies add up to exactly the difference between the current and
the optimised bill. (The course text this grew from sums a reserved instance and a
right-sizing on the same $59.90 endpoint as if each saved on the full amount.)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, CostError
from ..validate import number
from ..validate import price as check_price
from .estimate import estimate_job, rate_per_hour
from .prices import PriceBook

__all__ = ["PortfolioResult", "evaluate_portfolio", "load_toml"]

DEFAULT_RESERVED_DISCOUNT = 0.40  # the course's 1-year RI figure; set [strategies] to change it
OTHER_CATEGORIES = ("storage", "network", "managed_services", "other")
# Above the 5-10% Advisor bucket, spot's interruptions start to matter for a job's schedule.
_SPOT_LOW_RISK_RATE = rate_per_hour("5-10%")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file (``tomllib`` on 3.11+, ``tomli`` on 3.10)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading TOML on Python 3.10 needs tomli: pip install tomli") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"portfolio file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"portfolio file {path} is not valid TOML: {exc}") from None


@dataclass
class Step:
    item: str
    strategy: str
    before: float
    after: float
    risk: str
    how: str

    @property
    def saved(self) -> float:
        return self.before - self.after

    @property
    def pct(self) -> float:
        return 0.0 if self.before == 0 else 100.0 * self.saved / self.before

    def to_dict(self) -> dict[str, Any]:
        return {"item": self.item, "strategy": self.strategy, "before": self.before,
                "after": self.after, "saved": self.saved, "pct": self.pct, "risk": self.risk,
                "how": self.how}


@dataclass
class Item:
    name: str
    category: str
    monthly: float
    detail: str
    optimised: float = 0.0
    price_sources: list[str] = field(default_factory=list)


@dataclass
class PortfolioResult:
    name: str
    items: list[Item]
    steps: list[Step]

    def by_category(self, optimised: bool = False) -> dict[str, float]:
        out: dict[str, float] = {}
        for it in self.items:
            out[it.category] = out.get(it.category, 0.0) + (it.optimised if optimised else it.monthly)
        return out

    @property
    def monthly(self) -> float:
        return sum(it.monthly for it in self.items)

    @property
    def optimised_monthly(self) -> float:
        return sum(it.optimised for it in self.items)

    def to_dict(self) -> dict[str, Any]:
        saved = self.monthly - self.optimised_monthly
        return {
            "name": self.name,
            "items": [
                {"name": i.name, "category": i.category, "monthly": i.monthly, "optimised": i.optimised,
                 "detail": i.detail, "price_sources": i.price_sources}
                for i in self.items
            ],
            "by_category": self.by_category(),
            "by_category_optimised": self.by_category(optimised=True),
            "monthly": self.monthly,
            "annual": self.monthly * 12,
            "plan": [s.to_dict() for s in self.steps],
            "optimised_monthly": self.optimised_monthly,
            "optimised_annual": self.optimised_monthly * 12,
            "saved_monthly": saved,
            "saved_annual": saved * 12,
            "saved_pct": 0.0 if self.monthly == 0 else 100.0 * saved / self.monthly,
        }

    def to_text(self) -> str:
        from .render import table

        d = self.to_dict()
        out = [f"Portfolio: {self.name}", "", "Monthly cost by category"]
        rows = []
        for cat, cost in sorted(d["by_category"].items(), key=lambda kv: -kv[1]):
            pct = 0.0 if d["monthly"] == 0 else 100 * cost / d["monthly"]
            rows.append([cat, f"${cost:,.2f}", f"{pct:.1f}%", f"${d['by_category_optimised'].get(cat, 0):,.2f}"])
        out += ["  " + line for line in table(["category", "now", "share", "after plan"], rows, right={1, 2, 3})]
        out += [
            "",
            f"  total: ${d['monthly']:,.2f}/month, ${d['annual']:,.2f}/year",
            "",
            "Savings plan (each step applies to what the previous step on that item left)",
        ]
        rows = [[s["item"], s["strategy"], f"${s['before']:,.2f}", f"${s['after']:,.2f}",
                 f"${s['saved']:,.2f}", f"{s['pct']:.0f}%", s["risk"]] for s in d["plan"]]
        out += ["  " + line for line in table(
            ["item", "strategy", "before", "after", "saved/month", "%", "risk"], rows, right={2, 3, 4, 5})]
        for s in d["plan"]:
            out.append(f"  - {s['item']} / {s['strategy']}: {s['how']}")
        out += [
            "",
            f"  after plan: ${d['optimised_monthly']:,.2f}/month, ${d['optimised_annual']:,.2f}/year",
            f"  saved:      ${d['saved_monthly']:,.2f}/month ({d['saved_pct']:.1f}%), ${d['saved_annual']:,.2f}/year",
        ]
        sources = sorted({src for i in self.items for src in i.price_sources})
        if sources:
            out += ["", "Price sources"] + [f"  - {s}" for s in sources]
        return "\n".join(out) + "\n"


def _num(entry: dict[str, Any], key: str, default: float | None = None, *, where: str,
         positive: bool = False) -> float:
    """A finite number >= 0 (> 0 with ``positive``) from a portfolio table
    (:func:`spotrun.validate.number`, the check every command shares)."""
    value = entry.get(key, default)
    if value is None:
        raise ConfigError(f"{where}: missing {key!r}")
    if isinstance(value, str):  # TOML strings are not numbers, even "12"
        raise ConfigError(f"{where}: {key}={value!r} is not a number; write it without quotes")
    return number(value, f"{where}: {key}", minimum=0, allow_minimum=not positive)


class _Prices:
    """Hourly prices: the file's [prices] (on-demand) and [spot_prices] tables first, then the book."""

    def __init__(self, book: PriceBook, table: dict[str, Any], spot_table: dict[str, Any], region: str) -> None:
        self.book, self.table, self.spot_table, self.region = book, table, spot_table, region

    def od(self, instance_type: str) -> tuple[float, str]:
        if instance_type in self.table:
            return check_price(self.table[instance_type], f"[prices] {instance_type}"), "portfolio [prices] table"
        p = self.book.on_demand(instance_type, self.region)
        return p.usd_per_hour, p.label()


def evaluate_portfolio(data: dict[str, Any], *, prices: PriceBook | None = None) -> PortfolioResult:
    """Price a parsed portfolio and build its savings plan (see the module docstring)."""
    book = prices or PriceBook()
    region = str(data.get("region", "us-east-1"))
    days = _num(data, "days_per_month", 30, where="portfolio")
    knobs = data.get("strategies", {})
    reserved_discount = _num(knobs, "reserved_discount", DEFAULT_RESERVED_DISCOUNT, where="[strategies]")
    if reserved_discount >= 1:
        raise ConfigError("[strategies] reserved_discount must be < 1 (0.40 = 40% off)")
    px = _Prices(book, dict(data.get("prices", {})), dict(data.get("spot_prices", {})), region)
    items: list[Item] = []
    steps: list[Step] = []

    for i, job in enumerate(data.get("training", [])):
        where = f"[[training]] #{i + 1}"
        name = str(job.get("name", f"training-{i + 1}"))
        itype = job.get("instance_type") or _missing(where, "instance_type")
        hours = _num(job, "hours_per_run", where=where, positive=True)
        runs = _num(job, "runs_per_month", where=where, positive=True)
        market = job.get("market", "on-demand")
        if market not in ("on-demand", "spot"):
            raise ConfigError(f"{where}: market must be 'on-demand' or 'spot', not {market!r}")
        rate = job.get("interruption_rate", "<5%")
        est_kwargs = dict(
            hours_per_run=hours, runs_per_month=runs, region=region, interruption_rate=rate,
            checkpoint_save_s=_num(job, "checkpoint_save_s", 0, where=where),
            restart_s=_num(job, "restart_s", 0, where=where),
            checkpoint_interval_s=job.get("checkpoint_interval_s"), prices=book,
        )
        sources: list[str] = []

        def cost(t: str, on_spot: bool) -> float:
            if on_spot:
                job_book = book
                if t in px.spot_table:
                    job_book = PriceBook(spot_price=check_price(px.spot_table[t], f"[spot_prices] {t}"),
                                         on_demand_price=px.od(t)[0],
                                         offline=True, cache_dir=book.cache.path.parent)
                e = estimate_job(instance_type=t, **{**est_kwargs, "prices": job_book})  # type: ignore[arg-type]
                sources.append("portfolio [spot_prices] table" if t in px.spot_table else e.spot_price.label())
                return e.spot_cost_per_month
            price, src = px.od(t)
            sources.append(src)
            return hours * runs * price

        current = cost(itype, market == "spot")
        item = Item(name, "training", current,
                    f"{itype}, {hours:g} h/run x {runs:g} runs/month, {market}")
        running, on_spot = current, market == "spot"
        if job.get("right_size_to"):
            new_type = str(job["right_size_to"])
            after = cost(new_type, on_spot)
            if after < running:
                steps.append(Step(name, "right-sizing", running, after, "medium",
                                  f"{itype} -> {new_type}; assumes the same hours per run: measure it"))
                running, itype = after, new_type
        if job.get("interruptible", False) and not on_spot:
            after = cost(itype, True)
            if after < running:
                risk = "low" if rate_per_hour(rate) <= _SPOT_LOW_RISK_RATE else "medium"
                steps.append(Step(name, "spot", running, after, risk,
                                  f"run on spot with checkpoints (interruptions {rate}); cost includes "
                                  "expected re-work and restarts"))
                running = after
        item.optimised, item.price_sources = running, sorted(set(sources))
        items.append(item)

    for i, ep in enumerate(data.get("inference", [])):
        where = f"[[inference]] #{i + 1}"
        name = str(ep.get("name", f"inference-{i + 1}"))
        itype = ep.get("instance_type") or _missing(where, "instance_type")
        replicas = _num(ep, "replicas", 1, where=where)
        hpd = _num(ep, "hours_per_day", 24, where=where)
        if hpd > 24:
            raise ConfigError(f"{where}: hours_per_day {hpd:g} is more than 24")
        price, src = px.od(itype)
        sources = [src]
        current = price * replicas * hpd * days
        item = Item(name, "inference", current, f"{replicas:g} x {itype}, {hpd:g} h/day")
        running = current
        if ep.get("right_size_to"):
            new_type = str(ep["right_size_to"])
            new_price, src2 = px.od(new_type)
            sources.append(src2)
            after = running * new_price / price if price else running
            if after < running:
                steps.append(Step(name, "right-sizing", running, after, "medium",
                                  f"{itype} -> {new_type}; load-test latency first"))
                running, price, itype = after, new_price, new_type
        if ep.get("schedule_hours_per_day") is not None:
            new_h = _num(ep, "schedule_hours_per_day", where=where)
            if new_h < hpd:
                after = running * new_h / hpd
                steps.append(Step(name, "off-hours schedule", running, after, "medium",
                                  f"{hpd:g} -> {new_h:g} h/day; check night-time traffic first"))
                running, hpd = after, new_h
        if ep.get("steady", False) and hpd >= 24:
            after = running * (1 - reserved_discount)
            steps.append(Step(name, "reserved / savings plan", running, after, "low",
                              f"1-year commitment at {reserved_discount:.0%} off on-demand; paid even if unused"))
            running = after
        item.optimised, item.price_sources = running, sorted(set(sources))
        items.append(item)

    for i, other in enumerate(data.get("other", [])):
        where = f"[[other]] #{i + 1}"
        name = str(other.get("name", f"other-{i + 1}"))
        category = str(other.get("category", "other"))
        if category not in OTHER_CATEGORIES:
            raise ConfigError(f"{where}: category {category!r} is not one of {', '.join(OTHER_CATEGORIES)}")
        monthly = _num(other, "monthly_cost", where=where)
        item = Item(name, category, monthly, str(other.get("notes", "")))
        running = monthly
        if other.get("cold_fraction") is not None:
            frac = _num(other, "cold_fraction", where=where)
            ratio = _num(other, "cold_price_ratio", where=where)
            if frac > 1 or ratio > 1:
                raise ConfigError(f"{where}: cold_fraction and cold_price_ratio must be between 0 and 1")
            after = running * (1 - frac * (1 - ratio))
            steps.append(Step(name, "storage tiering", running, after, "low",
                              f"move {frac:.0%} to a tier at {ratio:.0%} of the price (lifecycle rule); "
                              "mind retrieval fees"))
            running = after
        item.optimised = running
        items.append(item)

    if not items:
        raise CostError("the portfolio lists no [[training]], [[inference]] or [[other]] items")
    return PortfolioResult(str(data.get("name", "portfolio")), items, steps)


def _missing(where: str, key: str) -> Any:
    raise ConfigError(f"{where}: missing {key!r}")
