"""Issue 13 item 3: the HTML report shows the market, flags estimated prices, scales to the
window, draws the cumulative cost against on-demand, and gives SageMaker's figure beside ours."""

from __future__ import annotations

import itertools
from html.parser import HTMLParser

import pytest

from spotrun.cost import report_for_run, report_html, report_text
from spotrun.cost.html import cumulative_points
from spotrun.records.instance import InstanceInfo
from spotrun.records.ledger import Ledger
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


def _css_number(css: str, pattern: str) -> float:
    import re

    m = re.search(pattern, css)
    assert m, pattern
    return float(m.group(1))


def test_legend_colours_y_ticks_swatches_and_text_size_at_400_and_1280_px(tmp_path):
    """Issue 23 item 1, checked on the page's own SVG and CSS: the cumulative chart's key
    labels are drawn in their lines' colours (an inline style, which a stylesheet rule cannot
    override; a ``fill`` attribute under ``svg text{fill:...}`` renders grey), the y axis has
    ticks between $0 and the top, chart text stays readable at 400 px and 1280 px, and the
    timeline legend has a colour swatch for every way a segment can end."""
    import re

    from spotrun.cost.html import _COLORS, y_ticks

    report = report_for_run(_spot_then_on_demand(str(tmp_path / "run")), offline=True)
    page = report_html(report)
    parser = _Page()
    parser.feed(page)
    css = page[page.index("<style>") + 7:page.index("</style>")]
    assert "!important" not in css

    # No chart text relies on a fill attribute (the stylesheet's svg text rule wins over it).
    texts = [a for tag, a in parser.tags if tag == "text"]
    assert texts and not [a for a in texts if "fill" in a]
    keys = [a for a in texts if "key" in (a.get("class") or "").split()]
    lines = {a["class"].split()[0].removeprefix("cum-"): a["stroke"]
             for tag, a in parser.tags if tag == "polyline"}
    assert len(keys) == 2
    for a in keys:
        which = a["class"].split()[1].removeprefix("key-")
        assert re.fullmatch(r"fill:(#[0-9a-f]{6})", a["style"]).group(1) == lines[which]
    assert lines["spot"] != lines["on-demand"]

    # Y axis: $0, at least two ticks between, each a round step.
    ticks = re.findall(r'<text class="y-tick"[^>]*>([^<]*)</text>', page)
    assert ticks[0] == "$0" and len(ticks) >= 4, ticks
    assert y_ticks(0.73) == [0, 0.2, 0.4, 0.6] and y_ticks(1234) == [0, 250, 500, 750, 1000]

    # Text size in CSS px: a chart is its container's width, never below the minimum (it
    # scrolls inside .chart instead); text scales with it.
    font = _css_number(css, r"svg text\{font-size:(\d+)px")
    min_w = _css_number(css, r"\.chart svg\{min-width:(\d+)px")
    assert ".chart{" in css.replace(".scroll,.chart{", ".chart{") and "overflow-x:auto" in css
    for svg in re.findall(r'<div class="chart"><svg [^>]*viewBox="0 0 (\d+) \d+"', page):
        view_w = float(svg)
        at_400 = font * max(min_w, 400 - 2 * 0.8 * 16) / view_w  # body margin .8em below 600 px
        at_1280 = font * max(min_w, min(1280 - 2 * 2 * 16, 80 * 16)) / view_w
        assert 11 <= at_400 <= 16 and 11 <= at_1280 <= 20, (at_400, at_1280)
    assert page.count('<div class="chart"><svg') == 2

    # Timeline legend: a swatch per end reason, in the bars' colours.
    legend = page[page.index('<p class="legend">'):]
    legend = legend[:legend.index("</p>")]
    for color in _COLORS.values():
        assert f'class="sw" style="background:{color}' in legend
    assert legend.count('class="sw"') >= len(_COLORS) + 4
