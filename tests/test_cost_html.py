"""Issue 13 item 3: the HTML report shows the market, flags estimated prices, scales to the
window, draws the cumulative cost against on-demand, and gives SageMaker's figure beside ours."""

from __future__ import annotations

import itertools
from html.parser import HTMLParser

import pytest

from spotrun.cost import report_for_run, report_html, report_text
from spotrun.cost.html import cumulative_points
from spotrun.instance import InstanceInfo
from spotrun.ledger import Ledger
from spotrun.storage import Storage

T0 = 1_700_000_000.0


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTRUN_CACHE_DIR", str(tmp_path / "cache"))


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        if tag == "td":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _spot_then_on_demand(url: str) -> Storage:
    """A g5.xlarge spot segment interrupted, then an on-demand fallback that finishes,
    after a 10-minute wait for capacity."""
    storage = Storage(url)
    ledger = Ledger(storage)
    for sid, market, start, end, reason in (("A", "spot", T0, T0 + 1800, "interrupted"),
                                            ("B", "on-demand", T0 + 2400, T0 + 4200, "finished")):
        info = InstanceInfo(cloud="aws", instance_id=f"i-{sid}", instance_type="g5.xlarge", region="us-east-1",
                            availability_zone="us-east-1a", market=market)
        ledger.segment_started(segment_id=sid, instance=info, started_at=start, source="launcher")
        ledger.training_resumed(segment_id=sid, step=0, process_started_at=start + 30, first_step_at=start + 60)
        ledger.checkpoint_committed(segment_id=sid, step=10, committed_at=start + 900, stall_s=2.0,
                                    save_s=3.0, nbytes=1)
        ledger.segment_ended(segment_id=sid, reason=reason, ended_at=end, source="launcher")
    return storage


def test_html_market_estimates_scale_cumulative_and_sagemaker(tmp_path):
    report = report_for_run(_spot_then_on_demand(str(tmp_path / "run")), offline=True)
    page = report_html(report)
    parser = _Page()
    parser.feed(page)
    parser.close()
    tags = parser.tags

    # Scales to the window: a viewBox and width 100%, no fixed pixel width.
    for chart in ("timeline", "cumulative"):
        svg = next(a for t, a in tags if t == "svg" and a.get("id") == chart)
        assert svg.get("viewbox") and svg.get("width") == "100%"  # HTMLParser lower-cases names

    # The market on the timeline.
    bars = [a["class"].split() for t, a in tags if t == "rect" and "segment" in (a.get("class") or "")]
    assert [b[1] for b in bars] == ["market-spot", "market-on-demand"]
    od_bar = next(a for t, a in tags if t == "rect" and "market-on-demand" in (a.get("class") or ""))
    assert od_bar.get("stroke")  # outlined, so it reads without colour

    # Estimates flagged in the table, not only in the sources list.
    table = [r for r in parser.rows if r and r[0] in ("A", "B")]
    rate = {r[0]: r[7] for r in table}
    assert rate["A"].endswith("(estimate)") and "estimate" not in rate["B"]
    assert any(t == "span" and a.get("class") == "estimate" for t, a in tags)
    assert {r[0]: r[2] for r in table} == {"A": "spot", "B": "on-demand"}

    # Cumulative cost: paid vs on-demand for the same work, ending at the report's totals.
    totals = report.to_dict()["totals"]
    lines = cumulative_points(report)
    assert lines["spot"][-1][1] == pytest.approx(totals["cost_usd"])
    assert lines["on_demand"][-1][1] == pytest.approx(totals["on_demand_usd"])
    assert all(b[1] >= a[1] for a, b in itertools.pairwise(lines["spot"]))
    assert {a.get("class") for t, a in tags if t == "polyline"} == {"cum-spot", "cum-on-demand"}

    # SageMaker's figure: billable 1800 + 1800 s of a 4200 s job.
    sm = report.to_dict()["sagemaker"]
    assert (sm["billable_s"], sm["training_s"]) == (3600.0, 4200.0)
    assert sm["savings_pct"] == pytest.approx(100 * (1 - 3600 / 4200))
    assert "SageMaker" in page and "14.3%" in page
    assert "2025-07" in page

    text = report_text(report)
    assert "SageMaker's figure" in text and "14.3%" in text
    assert "* an estimate, not market data" in text
