"""Before a run: the expected cost of a job on spot, with re-work and restarts, vs on-demand.

The model (first order, the one behind Young's and Daly's checkpoint intervals):

* ``W`` seconds of work per run (the ``hours per run`` an uninterrupted run takes, without
  checkpoints), a checkpoint every ``tau`` seconds of work that stalls training ``C``
  seconds, a restart (boot, restore, warm-up) of ``R`` seconds, and interruptions arriving
  as a Poisson process of ``lam`` per second (mean time between interruptions ``M = 1/lam``);
* each interruption costs the restart plus, on average, half an interval of re-work
  (``(tau + C) / 2``);
* so the expected wall time ``T`` solves ``T = W (1 + C/tau) + lam T (R + (tau + C)/2)``::

      T = W (1 + C/tau) / (1 - lam (R + (tau + C) / 2))

  (when the denominator is <= 0 the job is expected never to finish);
* minimising ``C/tau + lam tau / 2`` gives Young's interval ``tau* = sqrt(2 C M)``;
* on-demand cost = ``W`` x the on-demand price (no interruptions, so no need to checkpoint);
  spot cost = ``T`` x the spot price.

A Spot Instance Advisor bucket is a *monthly* frequency: the share of instances of that
type AWS interrupted over the last month. spotrun takes the bucket's middle (``>20%``:
25%) as the probability ``f`` that an instance running a whole month (730 hours) is
interrupted, and converts it to a Poisson rate ``lam = -ln(1 - f) / 730`` per hour
(e.g. ``5-10%`` -> f = 0.075 -> 1.07e-4 per hour, one interruption per ~9,300 hours).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError, CostError
from ..validate import duration, number
from .prices import Price, PriceBook

__all__ = [
    "ADVISOR_BUCKETS",
    "HOURS_PER_MONTH",
    "JobEstimate",
    "estimate_job",
    "expected_wall_time",
    "interval_curve",
    "parse_duration",
    "rate_per_hour",
    "young_interval",
]

HOURS_PER_MONTH = 730.0
#: Spot Instance Advisor buckets -> the monthly interruption frequency spotrun assumes.
ADVISOR_BUCKETS = {"<5%": 0.025, "5-10%": 0.075, "10-15%": 0.125, "15-20%": 0.175, ">20%": 0.25}


def rate_per_hour(rate: str | float) -> float:
    """Interruptions per hour from a number (already per hour) or an Advisor bucket.

    ``0%`` (and ``0``) is accepted: a type that is never interrupted, with no re-work and no
    restarts, is a legitimate band to compare against."""
    if isinstance(rate, str):
        text = rate.strip().replace(" ", "")
        if text in ADVISOR_BUCKETS:
            return -math.log(1.0 - ADVISOR_BUCKETS[text]) / HOURS_PER_MONTH
        if re.fullmatch(r"0+(?:\.0*)?%", text):
            return 0.0
        if text.endswith("%"):
            raise ConfigError(
                f"--interruption-rate {rate!r}: a percentage must be 0% or one of the Spot Instance "
                f"Advisor bands {', '.join(ADVISOR_BUCKETS)}; or give interruptions per hour, e.g. 0.001"
            )
        try:
            rate = float(text)
        except ValueError:
            raise ConfigError(
                f"--interruption-rate {rate!r} is neither a number per hour nor one of 0%, "
                f"{', '.join(ADVISOR_BUCKETS)}"
            ) from None
    return number(rate, "--interruption-rate", minimum=0, example="0.001 (per hour) or '<5%'")


#: The largest --hours or --runs an estimate takes (a century of hours; beyond is a typo).
MAX_COUNT = 1e6
_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d+$")


def check_region(region: str) -> None:
    """Refuse a name that cannot be an AWS region (``mars-1``). Only the shape is checked:
    botocore's region list costs ~0.6-2.4 s to load, and may be older than the region."""
    if not isinstance(region, str) or not _REGION.match(region):
        raise ConfigError(f"--region {region!r} is not an AWS region name like us-east-1 or eu-west-2")


def parse_duration(text: str | float, name: str = "duration") -> float:
    """Seconds >= 0 from ``90``, ``"90s"``, ``"15m"``, ``"2h"``, ``"1d"`` or ``"1h30m"``
    (:func:`spotrun.validate.duration`, which every duration flag shares)."""
    return duration(text, name, minimum=0, example="90s")


def young_interval(save_s: float, mtbi_s: float) -> float:
    """Young's checkpoint interval ``sqrt(2 x save time x mean time between interruptions)``."""
    if save_s < 0 or mtbi_s <= 0:
        raise ValueError("save time must be >= 0 and MTBI > 0")
    return math.sqrt(2.0 * save_s * mtbi_s)


def expected_wall_time(
    work_s: float, interval_s: float | None, save_s: float, restart_s: float, rate_per_s: float
) -> dict[str, float]:
    """Expected wall seconds and their parts (see the module docstring).

    An interval longer than the work counts as the work (one checkpoint per run). ``interval_s``
    None is allowed only with no save cost and no interruptions. Raises CostError when the
    job is expected never to finish.
    """
    if interval_s is None or interval_s <= 0:
        if save_s > 0 or rate_per_s > 0:
            raise CostError("a checkpoint interval > 0 is needed when saves take time or interruptions happen")
        ckpt_frac, half_interval = 0.0, 0.0
    else:
        # An interval longer than the run means one checkpoint (at the end), and an
        # interruption loses on average half the run, not half the interval.
        tau = min(interval_s, work_s) if work_s > 0 else interval_s
        ckpt_frac, half_interval = save_s / tau, (tau + save_s) / 2.0
    per_interruption = restart_s + half_interval
    denom = 1.0 - rate_per_s * per_interruption
    if denom <= 0:
        raise CostError(
            f"at {rate_per_s * 3600:.4g} interruptions/hour, each costing {per_interruption:.0f}s, "
            "the job is expected never to finish: checkpoint more often or restart faster"
        )
    total = work_s * (1.0 + ckpt_frac) / denom
    n = rate_per_s * total
    return {
        "wall_s": total,
        "checkpoint_s": work_s * ckpt_frac,
        "rework_s": n * half_interval,
        "restart_s": n * restart_s,
        "interruptions": n,
    }


@dataclass
class JobEstimate:
    instance_type: str
    region: str
    hours_per_run: float
    runs_per_month: float
    rate_per_hour: float
    mtbi_hours: float | None
    checkpoint_save_s: float
    restart_s: float
    checkpoint_interval_s: float
    interval_was_set: bool
    recommended_interval_s: float | None
    spot_price: Price
    on_demand_price: Price
    at_interval: dict[str, float]
    at_recommended: dict[str, float] | None
    spot_cost_per_run: float
    on_demand_cost_per_run: float

    @property
    def spot_cost_per_month(self) -> float:
        return self.spot_cost_per_run * self.runs_per_month

    @property
    def on_demand_cost_per_month(self) -> float:
        return self.on_demand_cost_per_run * self.runs_per_month

    @property
    def savings_per_month(self) -> float:
        return self.on_demand_cost_per_month - self.spot_cost_per_month

    @property
    def savings_pct(self) -> float | None:
        od = self.on_demand_cost_per_month
        return None if od == 0 else 100.0 * self.savings_per_month / od

    @property
    def overhead_pct(self) -> float:
        work = self.hours_per_run * 3600.0
        return 0.0 if work == 0 else 100.0 * (self.at_interval["wall_s"] - work) / work

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spot_price"] = self.spot_price.to_dict()
        d["on_demand_price"] = self.on_demand_price.to_dict()
        d.update(
            spot_cost_per_month=self.spot_cost_per_month,
            on_demand_cost_per_month=self.on_demand_cost_per_month,
            savings_per_month=self.savings_per_month,
            savings_pct=self.savings_pct,
            overhead_pct=self.overhead_pct,
        )
        return d

    def to_text(self) -> str:
        from .render import fmt_duration, fmt_pct, fmt_usd

        a = self.at_interval
        lines = [
            f"spotrun estimate: {self.instance_type} in {self.region}, {self.hours_per_run:g} h/run x "
            f"{self.runs_per_month:g} runs/month",
            "",
            f"  interruption rate           {self.rate_per_hour:.4g}/hour"
            + (f" (mean {self.mtbi_hours:,.0f} h between interruptions)" if self.mtbi_hours
               else " (never interrupted: no re-work, no restarts)"),
            f"  spot price                  ${self.spot_price.usd_per_hour:.4f}/h  [{self.spot_price.label()}]",
            f"  on-demand price             ${self.on_demand_price.usd_per_hour:.4f}/h  "
            f"[{self.on_demand_price.label()}]",
            "",
            f"  checkpoint interval         {fmt_duration(self.checkpoint_interval_s)}"
            + ("" if self.interval_was_set else " (not set: the recommended one)" if self.rate_per_hour
               else " (not set: one per run, since nothing interrupts it)"),
            f"  expected time per run       {fmt_duration(a['wall_s'])} (+{self.overhead_pct:.2f}% over "
            f"{fmt_duration(self.hours_per_run * 3600)})",
            f"    checkpoint stalls         {fmt_duration(a['checkpoint_s'])}",
            f"    re-work                   {fmt_duration(a['rework_s'])} ({a['interruptions']:.3f} interruptions)",
            f"    restarts                  {fmt_duration(a['restart_s'])}",
        ]
        if self.recommended_interval_s is not None and self.at_recommended is not None:
            over = (100.0 * (self.at_recommended["wall_s"] / (self.hours_per_run * 3600.0) - 1.0)
                    if self.hours_per_run else 0.0)
            lines.append(
                f"  recommended interval        {fmt_duration(self.recommended_interval_s)} "
                f"(Young: sqrt(2 x {self.checkpoint_save_s:g}s x MTBI); overhead there +{over:.2f}%)"
            )
            if self.recommended_interval_s >= self.hours_per_run * 3600.0:
                lines.append("    (longer than the run: one checkpoint per run, plus one on each notice, is enough)")
        lines += [
            "",
            f"  spot, expected              {fmt_usd(self.spot_cost_per_run)}/run  "
            f"{fmt_usd(self.spot_cost_per_month)}/month",
            f"  on-demand                   {fmt_usd(self.on_demand_cost_per_run)}/run  "
            f"{fmt_usd(self.on_demand_cost_per_month)}/month",
            f"  savings                     {fmt_usd(self.savings_per_month)}/month ({fmt_pct(self.savings_pct)})",
        ]
        return "\n".join(lines) + "\n"


def estimate_job(
    *,
    instance_type: str,
    hours_per_run: float,
    runs_per_month: float = 1.0,
    region: str = "us-east-1",
    interruption_rate: str | float = "<5%",
    checkpoint_save_s: float = 0.0,
    restart_s: float = 0.0,
    checkpoint_interval_s: float | None = None,
    prices: PriceBook | None = None,
) -> JobEstimate:
    """Expected monthly cost of a job on spot (with re-work and restarts) and on on-demand."""
    # 0 hours or 0 runs is a report of nothing; NaN and inf overflow every figure.
    hours_per_run = number(hours_per_run, "--hours", minimum=0, allow_minimum=False,
                           maximum=MAX_COUNT, example="12")
    runs_per_month = number(runs_per_month, "--runs", minimum=0, allow_minimum=False,
                            maximum=MAX_COUNT, example="4")
    checkpoint_save_s = duration(checkpoint_save_s, "--checkpoint-save")
    restart_s = duration(restart_s, "--restart")
    if checkpoint_interval_s is not None:
        checkpoint_interval_s = duration(checkpoint_interval_s, "--checkpoint-interval",
                                         allow_minimum=False, example="30m")
    check_region(region)
    prices = prices or PriceBook()
    lam_h = rate_per_hour(interruption_rate)
    lam_s = lam_h / 3600.0
    mtbi_s = None if lam_s == 0 else 1.0 / lam_s
    recommended = None
    if mtbi_s is not None and checkpoint_save_s > 0:
        recommended = young_interval(checkpoint_save_s, mtbi_s)
    interval_set = checkpoint_interval_s is not None
    if checkpoint_interval_s is None:
        work_s = hours_per_run * 3600.0
        if recommended:
            checkpoint_interval_s = recommended
        elif lam_s == 0:
            # Never interrupted: one checkpoint per run (at its end) loses nothing.
            checkpoint_interval_s = work_s
        else:
            # Without a save cost, checkpoint "often": a finite default keeps the model finite.
            checkpoint_interval_s = 600.0
    work_s = hours_per_run * 3600.0
    at = expected_wall_time(work_s, checkpoint_interval_s, checkpoint_save_s, restart_s, lam_s)
    at_rec = None
    if recommended is not None:
        try:
            at_rec = expected_wall_time(work_s, recommended, checkpoint_save_s, restart_s, lam_s)
        except CostError:
            at_rec = None
    spot = prices.current_spot(instance_type, region)
    od = prices.on_demand(instance_type, region)
    return JobEstimate(
        instance_type=instance_type,
        region=region,
        hours_per_run=hours_per_run,
        runs_per_month=runs_per_month,
        rate_per_hour=lam_h,
        mtbi_hours=None if mtbi_s is None else mtbi_s / 3600.0,
        checkpoint_save_s=checkpoint_save_s,
        restart_s=restart_s,
        checkpoint_interval_s=checkpoint_interval_s,
        interval_was_set=interval_set,
        recommended_interval_s=recommended,
        spot_price=spot,
        on_demand_price=od,
        at_interval=at,
        at_recommended=at_rec,
        spot_cost_per_run=at["wall_s"] / 3600.0 * spot.usd_per_hour,
        on_demand_cost_per_run=hours_per_run * od.usd_per_hour,
    )


def interval_curve(est: JobEstimate, points: int = 64) -> list[dict[str, float]]:
    """The estimate across checkpoint intervals (log-spaced, the chosen and recommended ones
    included): ``interval_s``, ``wall_s`` and ``spot_cost`` per run at each. Intervals at
    which the job is expected never to finish are left out."""
    work = est.hours_per_run * 3600.0
    marks = [v for v in (est.checkpoint_interval_s, est.recommended_interval_s) if v]
    hi = max([work, *marks]) if work > 0 else max(marks) * 20
    lo = max(1.0, min([hi / 200.0, *[m / 20.0 for m in marks]]))
    if lo >= hi:
        lo = hi / 100.0
    ratio = (hi / lo) ** (1.0 / (points - 1))
    intervals = sorted({lo * ratio**k for k in range(points)} | set(marks))
    lam_s = est.rate_per_hour / 3600.0
    out = []
    for tau in intervals:
        try:
            at = expected_wall_time(work, tau, est.checkpoint_save_s, est.restart_s, lam_s)
        except CostError:
            continue
        out.append({"interval_s": tau, "wall_s": at["wall_s"],
                    "spot_cost": at["wall_s"] / 3600.0 * est.spot_price.usd_per_hour})
    return out
