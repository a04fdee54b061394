"""Cost: the run ledger priced (``spotrun cost``) and estimates before a run (``spotrun estimate``).

::

    from spotrun.cost import report_for_run, report_html, report_text
    report = report_for_run(storage, spot_price=None, on_demand_price=None, offline=False)
    print(report_text(report)); report.to_dict(); report_html(report)

The report is data (:class:`CostReport`); the renderers are plain functions of it, so the
report module never imports them.

See ``docs/cost.md`` for every figure and how it is computed.
"""

from __future__ import annotations

from .estimate import JobEstimate, estimate_job, rate_per_hour, young_interval
from .html import report_html
from .portfolio import PortfolioResult, evaluate_portfolio, load_toml
from .prices import Price, PriceBook, time_weighted_average
from .render import report_text
from .report import CostReport, SegmentCost, build_segments, report_for_run

__all__ = [
    "CostReport",
    "JobEstimate",
    "PortfolioResult",
    "Price",
    "PriceBook",
    "SegmentCost",
    "build_segments",
    "estimate_job",
    "evaluate_portfolio",
    "load_toml",
    "rate_per_hour",
    "report_for_run",
    "report_html",
    "report_text",
    "time_weighted_average",
    "young_interval",
]
