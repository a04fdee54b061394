"""`spotrun cost` (what a run cost) and `spotrun estimate` (what a job or portfolio will cost).

Exit codes: 0 success; 2 bad usage or configuration (one line on stderr says which).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import validate
from ..errors import ConfigError


def _add_price_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spot-price", type=validate.argparse_type(validate.price, "--spot-price"), metavar="USD",
                   help="spot price per hour (overrides every source)")
    p.add_argument("--on-demand-price", type=validate.argparse_type(validate.price, "--on-demand-price"),
                   metavar="USD",
                   help="on-demand price per hour (overrides every source)")
    p.add_argument("--offline", action="store_true",
                   help="never call an AWS API or read its disk cache: prices come from --spot-price, "
                   "--on-demand-price and --config, else from the snapshot shipped with spotrun")
    p.add_argument("--config", metavar="FILE",
                   help="a TOML file whose [prices] table sets spot = USD and/or on_demand = USD")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cost",
        help="what a run cost on spot, what on-demand would have cost, what interruptions ate",
        description="Price a run from its ledger: per segment and in total, cost, lost work, "
        "restarts, checkpoint stalls, on-demand cost of the useful work, savings. "
        "Price sources, in order: --spot-price/--on-demand-price, AWS APIs (cached on disk), "
        "the shipped snapshot; the report names the source of every price.",
    )
    p.add_argument("url", metavar="RUN_URL", help="the run URL (a path or s3://bucket/prefix)")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report to FILE")
    _add_price_options(p)
    p.set_defaults(func=_cost)

    e = sub.add_parser(
        "estimate",
        help="expected cost of a job on spot vs on-demand, or of a whole portfolio (--portfolio)",
        description="Expected spot cost of a job including re-work and restarts, its on-demand "
        "cost, the savings, and the checkpoint interval that minimises the expected cost "
        "(Young: sqrt(2 x save time x mean time between interruptions)). With --portfolio "
        "FILE.toml: monthly and annual totals by category and a savings plan.",
    )
    e.add_argument("instance_type", nargs="?", metavar="INSTANCE_TYPE", help="e.g. g5.xlarge")
    e.add_argument("--portfolio", metavar="FILE", help="a portfolio TOML file (see examples/portfolio.toml)")
    e.add_argument("--hours", type=float, metavar="H", help="hours one run takes uninterrupted")
    e.add_argument("--runs", type=float, default=1.0, metavar="N", help="runs per month (default 1)")
    e.add_argument("--region", default="us-east-1", help="AWS region (default us-east-1)")
    e.add_argument("--interruption-rate", default="<5%", metavar="RATE",
                   help="interruptions per hour, or a Spot Instance Advisor bucket: "
                   "'<5%%', '5-10%%', '10-15%%', '15-20%%', '>20%%' (default '<5%%')")
    e.add_argument("--checkpoint-save", default="0", metavar="DURATION",
                   help="seconds training stalls per checkpoint (90, 90s, 2m)")
    e.add_argument("--restart", default="0", metavar="DURATION",
                   help="seconds from a new instance's start to the first training step")
    e.add_argument("--checkpoint-interval", metavar="DURATION",
                   help="the interval you set (default: the recommended one)")
    e.add_argument("--html", metavar="FILE",
                   help="also write a page charting expected cost and time against the interval to FILE")
    _add_price_options(e)
    e.set_defaults(func=_estimate)


def _price_book(args: argparse.Namespace) -> Any:
    from ..cost.portfolio import load_toml
    from ..cost.prices import PriceBook

    spot, od = args.spot_price, args.on_demand_price
    if args.config:
        table = load_toml(args.config).get("prices", {})
        unknown = set(table) - {"spot", "on_demand"}
        if unknown:
            raise ConfigError(f"{args.config}: [prices] knows spot and on_demand, not {', '.join(sorted(unknown))}")
        if spot is None and "spot" in table:
            spot = validate.price(table["spot"], f"{args.config} [prices] spot")
        if od is None and "on_demand" in table:
            od = validate.price(table["on_demand"], f"{args.config} [prices] on_demand")
    return PriceBook(spot_price=spot, on_demand_price=od, offline=args.offline)


def _cost(args: argparse.Namespace) -> int:
    from ..cost.html import report_html
    from ..cost.render import report_text
    from ..cost.report import report_for_run
    from ..storage import open_storage
    from .runs import require_run

    storage = open_storage(args.url)
    require_run(storage)
    report = report_for_run(storage, price_book=_price_book(args))
    if args.html:
        try:
            with open(args.html, "w", encoding="utf-8") as f:
                f.write(report_html(report))
        except OSError as exc:
            raise ConfigError(f"cannot write the HTML report to {args.html}: {exc.strerror}") from None
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(report_text(report))
        if args.html:
            sys.stdout.write(f"\nHTML report: {args.html}\n")
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from ..cost.estimate import estimate_job, parse_duration
    from ..cost.portfolio import evaluate_portfolio, load_toml

    book = _price_book(args)
    if args.portfolio:
        if args.instance_type:
            raise ConfigError("pass either INSTANCE_TYPE or --portfolio FILE, not both")
        result: Any = evaluate_portfolio(load_toml(args.portfolio), prices=book)
    else:
        if not args.instance_type or args.hours is None:
            raise ConfigError("estimate needs INSTANCE_TYPE and --hours (or --portfolio FILE)")
        result = estimate_job(
            instance_type=args.instance_type,
            hours_per_run=args.hours,
            runs_per_month=args.runs,
            region=args.region,
            interruption_rate=args.interruption_rate,
            checkpoint_save_s=parse_duration(args.checkpoint_save, "--checkpoint-save"),
            restart_s=parse_duration(args.restart, "--restart"),
            checkpoint_interval_s=(None if args.checkpoint_interval is None
                                   else parse_duration(args.checkpoint_interval, "--checkpoint-interval")),
            prices=book,
        )
    if args.html:
        if args.portfolio:
            raise ConfigError("--html charts one job's estimate; drop it with --portfolio")
        from ..cost.estimate_html import estimate_html

        try:
            with open(args.html, "w", encoding="utf-8") as f:
                f.write(estimate_html(result))
        except OSError as exc:
            raise ConfigError(f"cannot write the HTML page to {args.html}: {exc.strerror}") from None
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(result.to_text())
        if args.html:
            sys.stdout.write(f"\nHTML page: {args.html}\n")
    return 0
