"""Issue 23 item 12: ``spotrun estimate ... --html FILE``: expected cost and time against the
checkpoint interval, the chosen interval marked, spot against on-demand, legible at 400 px
and 1280 px (checked on the page's own SVG and CSS, as tests/test_cost_html.py does)."""

from __future__ import annotations

import re

import pytest

from spotrun.cli import main
from spotrun.cost.estimate import estimate_job, interval_curve
from spotrun.cost.prices import PriceBook
from spotrun.cost.render import fmt_duration

ARGS = ["estimate", "p3.2xlarge", "--hours", "8", "--interruption-rate", "0.05",
        "--checkpoint-save", "1m", "--restart", "5m", "--checkpoint-interval", "30m",
        "--spot-price", "0.9", "--on-demand-price", "3.06"]


def test_estimate_html_charts_cost_and_time_against_the_interval(tmp_path, capsys):
    out = tmp_path / "est.html"
    assert main([*ARGS, "--html", str(out)]) == 0
    assert f"HTML page: {out}" in capsys.readouterr().out
    page = out.read_text()
    est = estimate_job(instance_type="p3.2xlarge", hours_per_run=8, interruption_rate=0.05,
                       checkpoint_save_s=60, restart_s=300, checkpoint_interval_s=1800,
                       prices=PriceBook(spot_price=0.9, on_demand_price=3.06))

    assert page.count('<div class="chart"><svg') == 2
    assert 'id="cost-vs-interval"' in page and 'id="time-vs-interval"' in page
    # The chosen interval and Young's, each marked with its figure, in its own colour.
    labels = re.findall(r'<text class="mark-label"[^>]*style="fill:(#[0-9a-f]{6})">([^<]*)</text>', page)
    texts = [t for _, t in labels]
    assert f"chosen 30m00.0s: ${est.spot_cost_per_run:.2f}" in texts
    assert any(t.startswith(f"recommended {fmt_duration(est.recommended_interval_s)}: $") for t in texts), texts
    assert any(t.startswith("chosen 30m00.0s: ") and t.endswith(" h") for t in texts)
    assert len({c for c, _ in labels}) == 2
    # Spot's curve and on-demand's line; the on-demand figure is on the page.
    assert page.count('<polyline class="spot"') == 2 and page.count('<line class="flat"') == 2
    assert "$24.48/run" in page  # 8 h x $3.06
    # Legible: no text depends on a fill attribute; the charts keep a minimum width.
    assert not re.search(r"<text [^>]*\bfill=", page)
    css = page[page.index("<style>") + 7:page.index("</style>")]
    font = float(re.search(r"svg text\{font-size:(\d+)px", css).group(1))
    min_w = float(re.search(r"\.chart svg\{min-width:(\d+)px", css).group(1))
    for view_w in re.findall(r'<div class="chart"><svg [^>]*viewBox="0 0 (\d+) \d+"', page):
        assert font * max(min_w, 400 - 2 * 0.8 * 16) / float(view_w) >= 11
        assert 11 <= font * min(1280 - 4 * 16, 80 * 16) / float(view_w) <= 20
    # Y axes with round ticks; x ticks in durations.
    assert len(re.findall(r'class="y-tick"', page)) >= 6 and "1h00m" in page


def test_curve_has_its_minimum_near_youngs_interval():
    est = estimate_job(instance_type="p3.2xlarge", hours_per_run=100, interruption_rate=0.05,
                       checkpoint_save_s=60, restart_s=300,
                       prices=PriceBook(spot_price=0.9, on_demand_price=3.06))
    curve = interval_curve(est)
    best = min(curve, key=lambda p: p["spot_cost"])
    assert best["interval_s"] == pytest.approx(est.recommended_interval_s, rel=0.15)
    assert [p["interval_s"] for p in curve] == sorted(p["interval_s"] for p in curve)


def test_estimate_html_refuses_a_portfolio_and_an_unwritable_path(tmp_path, capsys):
    assert main(["estimate", "--portfolio", "examples/portfolio.toml", "--offline",
                 "--html", str(tmp_path / "x.html")]) == 2
    assert "--html" in capsys.readouterr().err
    assert main([*ARGS, "--html", str(tmp_path / "missing" / "x.html")]) == 2
    assert "cannot write the HTML page" in capsys.readouterr().err
