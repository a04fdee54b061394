"""`spotrun cost`: a run written through the Ledger API, priced with stubbed AWS APIs."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from html.parser import HTMLParser

import boto3
import pytest
from botocore.stub import Stubber

from spotrun.cli import main
from spotrun.cost import (
    PriceBook,
    report_for_run,
    report_text,
    time_weighted_average,
)
from spotrun.records.instance import InstanceInfo
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

T0 = 1_700_000_000.0
OD = 1.006


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTRUN_CACHE_DIR", str(tmp_path / "cache"))


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=timezone.utc)


def _spot(zone: str, pairs: list[tuple[float, float]]) -> dict:
    return {"SpotPriceHistory": [
        {"AvailabilityZone": zone, "InstanceType": "g5.xlarge", "ProductDescription": "Linux/UNIX",
         "SpotPrice": f"{p:.6f}", "Timestamp": _dt(t)} for t, p in pairs]}


def _product(usd: float) -> str:
    return json.dumps({
        "product": {"attributes": {"instanceType": "g5.xlarge", "licenseModel": "No License required"}},
        "terms": {"OnDemand": {"SKU.TERM": {"priceDimensions": {"SKU.TERM.DIM": {
            "unit": "Hrs", "pricePerUnit": {"USD": f"{usd:.10f}"}}}}}},
    })


def write_two_segment_run(url: str) -> None:
    """Segment A (us-east-1a) interrupted; segment B (us-east-1b) resumes and finishes."""
    ledger = Ledger(Storage(url))
    a = InstanceInfo(cloud="aws", instance_id="i-a", instance_type="g5.xlarge", region="us-east-1",
                     availability_zone="us-east-1a", market="spot")
    b = InstanceInfo(cloud="aws", instance_id="i-b", instance_type="g5.xlarge", region="us-east-1",
                     availability_zone="us-east-1b", market="spot")
    # The wrapper only knows less (its metadata lookup failed): the launcher's view wins.
    ledger.segment_started(segment_id="A", instance=a, started_at=T0, source="launcher")
    ledger.segment_started(segment_id="A", instance=InstanceInfo(), started_at=T0 + 60, source="wrapper")
    ledger.training_resumed(segment_id="A", step=0, process_started_at=T0 + 60, first_step_at=T0 + 90)
    ledger.checkpoint_committed(segment_id="A", step=50, committed_at=T0 + 600, stall_s=2.0, save_s=6.0, nbytes=10)
    ledger.checkpoint_committed(segment_id="A", step=100, committed_at=T0 + 1200, stall_s=3.0, save_s=6.0, nbytes=10)
    ledger.notice_received(segment_id="A", source="ec2", action="terminate", notice_time=T0 + 1550,
                           detected_at=T0 + 1552, deadline=T0 + 1670)
    ledger.segment_ended(segment_id="A", reason="interrupted", ended_at=T0 + 1650, source="wrapper")
    ledger.segment_ended(segment_id="A", reason="interrupted", ended_at=T0 + 1700, source="launcher")
    ledger.segment_started(segment_id="B", instance=b, started_at=T0 + 2000, source="launcher")
    ledger.segment_started(segment_id="B", instance=InstanceInfo(), started_at=T0 + 2100, source="wrapper")
    ledger.training_resumed(segment_id="B", step=100, process_started_at=T0 + 2100, first_step_at=T0 + 2200)
    ledger.checkpoint_committed(segment_id="B", step=200, committed_at=T0 + 3000, stall_s=4.0, save_s=6.0, nbytes=10)
    ledger.segment_ended(segment_id="B", reason="finished", ended_at=T0 + 3590, source="wrapper")
    ledger.segment_ended(segment_id="B", reason="finished", ended_at=T0 + 3600, source="launcher")


class StubbedAWS:
    """A client factory handing out real botocore clients with Stubber responses queued."""

    def __init__(self) -> None:
        self.ec2 = boto3.client("ec2", region_name="us-east-1")
        self.pricing = boto3.client("pricing", region_name="us-east-1")
        self.stubs = [Stubber(self.ec2), Stubber(self.pricing)]
        self.calls: list[tuple[str, str]] = []

    def __call__(self, service: str, region: str):
        self.calls.append((service, region))
        return {"ec2": self.ec2, "pricing": self.pricing}[service]

    def __enter__(self):
        for s in self.stubs:
            s.activate()
        return self

    def __exit__(self, *exc):
        for s in self.stubs:
            s.deactivate()

    def assert_done(self) -> None:
        for s in self.stubs:
            s.assert_no_pending_responses()


def _spot_params(zone: str, start: float, end: float) -> dict:
    return {"InstanceTypes": ["g5.xlarge"], "ProductDescriptions": ["Linux/UNIX"],
            "StartTime": _dt(start), "EndTime": _dt(end), "AvailabilityZone": zone}


OD_FILTERS = [
    {"Type": "TERM_MATCH", "Field": f, "Value": v}
    for f, v in (("instanceType", "g5.xlarge"), ("regionCode", "us-east-1"), ("operatingSystem", "Linux"),
                 ("tenancy", "Shared"), ("preInstalledSw", "NA"), ("capacitystatus", "Used"))
]


def test_two_segments_one_interruption_hand_checked(tmp_path):
    url = str(tmp_path / "run")
    write_two_segment_run(url)
    aws = StubbedAWS()
    ec2_stub, pricing_stub = aws.stubs
    # Zone a: the price in effect at the start came before it (0.30), then 0.40 from T0+900.
    ec2_stub.add_response("describe_spot_price_history",
                          _spot("us-east-1a", [(T0 + 900, 0.40), (T0 - 1000, 0.30)]),
                          _spot_params("us-east-1a", T0, T0 + 1700))
    pricing_stub.add_response("get_products", {"PriceList": [_product(OD)], "FormatVersion": "aws_v1"},
                              {"ServiceCode": "AmazonEC2", "Filters": OD_FILTERS, "MaxResults": 100})
    ec2_stub.add_response("describe_spot_price_history", _spot("us-east-1b", [(T0 + 1000, 0.35)]),
                          _spot_params("us-east-1b", T0 + 2000, T0 + 3600))
    with aws:
        report = report_for_run(Storage(url), price_book=PriceBook(client_factory=aws))
    aws.assert_done()
    d = report.to_dict()

    # Hand-checked from the inputs above.
    price_a = (0.30 * 900 + 0.40 * 800) / 1700
    price_b = 0.35
    dur_a, dur_b = 1700.0, 1600.0
    lost_a = 1650.0 - 1200.0          # wrapper's end (training over) - last committed checkpoint
    shutdown_a = 1700.0 - 1650.0      # wrapper's end -> launcher's end: teardown
    restart_b = shutdown_a + (2200.0 - 2000.0)  # + launcher start -> first step (first segment's startup is useful)
    stall_a, stall_b = 5.0, 4.0
    useful = (dur_a - lost_a - shutdown_a - stall_a) + (dur_b - (restart_b - shutdown_a) - stall_b)
    cost = dur_a / 3600 * price_a + dur_b / 3600 * price_b
    od_cost = useful / 3600 * OD

    t = d["totals"]
    assert t["segments"] == 2 and t["interruptions"] == 1 and t["checkpoints"] == 3
    assert t["duration_s"] == pytest.approx(dur_a + dur_b)
    assert t["lost_work_s"] == pytest.approx(lost_a)
    assert t["restart_overhead_s"] == pytest.approx(restart_b)
    assert t["stall_s"] == pytest.approx(stall_a + stall_b)
    assert t["useful_s"] == pytest.approx(useful)
    assert t["cost_usd"] == pytest.approx(cost)
    assert t["lost_work_usd"] == pytest.approx(lost_a / 3600 * price_a)
    assert t["restart_overhead_usd"] == pytest.approx(
        shutdown_a / 3600 * price_a + (restart_b - shutdown_a) / 3600 * price_b)
    assert t["stall_usd"] == pytest.approx(stall_a / 3600 * price_a + stall_b / 3600 * price_b)
    assert t["on_demand_usd"] == pytest.approx(od_cost)
    assert t["savings_usd"] == pytest.approx(od_cost - cost)
    assert t["savings_pct"] == pytest.approx(100 * (od_cost - cost) / od_cost)

    seg_a, seg_b = d["segments"]
    assert seg_a["instance"]["instance_id"] == "i-a" and seg_a["instance"]["availability_zone"] == "us-east-1a"
    assert seg_a["end_reason"] == "interrupted" and seg_a["end"] == T0 + 1700  # launcher's end wins
    # One definition of a restart: A's end cost its shutdown plus B's startup, shown on A's
    # row and A's interruption line alike; B finished, so its row has none.
    assert seg_a["startup_s"] == pytest.approx(90) and seg_a["restart_overhead_s"] == pytest.approx(restart_b)
    assert seg_b["restart_overhead_s"] == 0 and seg_a["shutdown_s"] == pytest.approx(shutdown_a)
    assert seg_a["last_checkpoint_step"] == 100 and len(seg_a["notices"]) == 1
    assert seg_b["resumed_step"] == 100 and seg_b["lost_work_s"] == 0
    assert seg_a["price"]["source"] == "aws-api" and seg_a["price"]["usd_per_hour"] == pytest.approx(price_a)
    assert seg_b["on_demand_price"]["source"] == "aws-api"
    (intr,) = d["interruptions"]
    assert intr["segment_id"] == "A" and intr["next_segment_id"] == "B"
    assert intr["lost_work_s"] == pytest.approx(lost_a) and intr["restart_overhead_s"] == pytest.approx(restart_b)
    assert not d["warnings"]

    text = report_text(report)
    assert "interruptions" in text and "aws-api" in text and f"${cost:,.4f}" in text

    # A second report reads the disk cache: no client is even built.
    calls = []
    again = report_for_run(Storage(url), price_book=PriceBook(client_factory=lambda s, r: calls.append(s)))
    assert calls == []
    assert again.to_dict()["totals"]["cost_usd"] == pytest.approx(cost)
    assert again.segments[0].price.source == "cache"


def test_api_failure_falls_back_to_snapshot_and_says_so(tmp_path):
    url = str(tmp_path / "run")
    write_two_segment_run(url)
    aws = StubbedAWS()
    ec2_stub, pricing_stub = aws.stubs
    ec2_stub.add_client_error("describe_spot_price_history", "UnauthorizedOperation", "not allowed")
    pricing_stub.add_client_error("get_products", "AccessDeniedException", "no pricing for you")
    ec2_stub.add_client_error("describe_spot_price_history", "UnauthorizedOperation", "not allowed")
    with aws:
        report = report_for_run(Storage(url), price_book=PriceBook(client_factory=aws))
    aws.assert_done()
    d = report.to_dict()
    snap_od = 1.006  # g5.xlarge in the shipped snapshot
    for seg in d["segments"]:
        assert seg["price"]["source"] == "snapshot"
        assert seg["price"]["usd_per_hour"] == pytest.approx(snap_od * 0.30)
        assert "UnauthorizedOperation" in seg["price"]["fallback"]
        assert seg["on_demand_price"]["source"] == "snapshot"
    assert any("AccessDeniedException" in w for w in d["warnings"])
    text = report_text(report)
    assert "snapshot" in text and "failed" in text and "not a real spot price" in text


def test_overrides_win_and_simulated_never_calls_api(tmp_path):
    url = str(tmp_path / "run")
    ledger = Ledger(Storage(url))
    sim = InstanceInfo(cloud="simulated", instance_type="g4dn.xlarge", region="us-east-1",
                       availability_zone="us-east-1a", market="spot")
    ledger.segment_started(segment_id="s1", instance=sim, started_at=T0, source="launcher")
    ledger.training_resumed(segment_id="s1", step=0, process_started_at=T0, first_step_at=T0 + 10)
    ledger.checkpoint_committed(segment_id="s1", step=5, committed_at=T0 + 100, stall_s=1, save_s=1, nbytes=1)
    ledger.append("heartbeat", time=T0 + 400, segment_id="s1")  # killed: no end record
    calls: list = []
    report = report_for_run(Storage(url), price_book=PriceBook(client_factory=lambda s, r: calls.append(s)))
    assert calls == []
    seg = report.to_dict()["segments"][0]
    assert seg["end_reason"] == "unknown" and seg["end"] == T0 + 400
    assert seg["lost_work_s"] == pytest.approx(300) and report.totals()["interruptions"] == 1
    assert seg["price"]["source"] == "snapshot" and seg["price"]["usd_per_hour"] == pytest.approx(0.526 * 0.3)
    assert any("no end record" in w for w in report.warnings)

    over = report_for_run(Storage(url), spot_price=0.2, on_demand_price=0.9)
    t = over.totals()
    assert t["cost_usd"] == pytest.approx(400 / 3600 * 0.2)
    assert t["on_demand_usd"] == pytest.approx((400 - 300 - 1) / 3600 * 0.9)
    assert over.segments[0].price.source == "override"


def test_local_segment_without_type_is_reported_unpriced(tmp_path):
    url = str(tmp_path / "run")
    ledger = Ledger(Storage(url))
    ledger.segment_started(segment_id="x", instance=InstanceInfo(), started_at=T0, source="wrapper")
    ledger.segment_ended(segment_id="x", reason="finished", ended_at=T0 + 60, source="wrapper")
    report = report_for_run(Storage(url), offline=True)
    t = report.totals()
    assert t["cost_usd"] is None and t["savings_usd"] is None and not t["complete"]
    assert any("--spot-price" in w for w in report.warnings)
    assert "n/a" in report_text(report)


def test_empty_run_reports_a_warning(tmp_path):
    report = report_for_run(Storage(str(tmp_path)), offline=True)
    assert report.segments == [] and "nothing to report" in report_text(report)


def test_time_weighted_average_cases():
    assert time_weighted_average([(0, 1.0)], 10, 20) == 1.0
    assert time_weighted_average([(0, 1.0), (15, 3.0)], 10, 20) == pytest.approx(2.0)
    # Only changes after the start: the earliest holds from the start.
    assert time_weighted_average([(12, 2.0), (18, 4.0)], 10, 20) == pytest.approx((2 * 8 + 4 * 2) / 10)
    assert time_weighted_average([(0, 1.0), (25, 9.0)], 10, 20) == 1.0
    assert time_weighted_average([(0, 1.0), (10, 2.0)], 10, 10) == 2.0


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _count(tags, tag, cls=None):
    return sum(1 for t, a in tags if t == tag and (cls is None or cls in (a.get("class") or "").split()))


def test_html_is_self_contained_with_timeline_and_table(tmp_path, capsys):
    url = str(tmp_path / "run")
    write_two_segment_run(url)
    out = tmp_path / "report.html"
    rc = main(["cost", url, "--offline", "--spot-price", "0.3", "--on-demand-price", "1.0", "--html", str(out)])
    assert rc == 0 and "HTML report" in capsys.readouterr().out
    page = out.read_text()
    parser = _Collector()
    parser.feed(page)
    parser.close()
    tags = parser.tags
    assert any(t == "svg" and a.get("id") == "timeline" for t, a in tags)
    assert _count(tags, "rect", "segment") == 2
    assert _count(tags, "line", "checkpoint") == 3
    assert _count(tags, "g", "interruption") == 1
    assert _count(tags, "polygon", "notice") == 1
    assert any(t == "table" and a.get("id") == "cost-table" for t, a in tags)
    assert _count(tags, "tr") >= 2 + 1
    assert _count(tags, "script") == 0 and _count(tags, "link") == 0 and _count(tags, "img") == 0
    for _, attrs in tags:
        for key in ("src", "href", "xlink:href"):
            assert not (attrs.get(key) or "").lower().startswith(("http://", "https://", "//"))
    assert "http://" not in page and "https://" not in page


def test_cli_cost_json_in_a_real_process(tmp_path, child_env):
    url = str(tmp_path / "run")
    write_two_segment_run(url)
    child_env["SPOTRUN_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-m", "spotrun.cli", "cost", url, "--json", "--spot-price", "0.25",
         "--on-demand-price", "1.5"],
        env=child_env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    useful = (1700 - 500 - 5) + (1600 - 200 - 4)
    assert d["totals"]["cost_usd"] == pytest.approx(3300 / 3600 * 0.25)
    assert d["totals"]["on_demand_usd"] == pytest.approx(useful / 3600 * 1.5)
    assert d["price_sources"] == ["override (--spot-price)", "override (--on-demand-price)"]

    bad = subprocess.run([sys.executable, "-m", "spotrun.cli", "cost", url, "--spot-price", "cheap"],
                         env=child_env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "price" in bad.stderr


def test_cli_cost_config_prices_table(tmp_path, capsys):
    url = str(tmp_path / "run")
    write_two_segment_run(url)
    cfg = tmp_path / "spotrun.toml"
    cfg.write_text("[prices]\nspot = 0.5\non_demand = 2.0\n")
    assert main(["cost", url, "--json", "--config", str(cfg), "--spot-price", "0.4"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["totals"]["cost_usd"] == pytest.approx(3300 / 3600 * 0.4)  # the flag beats the file
    assert d["segments"][0]["on_demand_price"]["usd_per_hour"] == 2.0
    cfg.write_text("[prices]\nspotty = 1\n")
    assert main(["cost", url, "--config", str(cfg)]) == 2
    assert "spotty" in capsys.readouterr().err


def test_checkpoint_on_notice_loses_no_work(tmp_path):
    """A stop checkpoint captures the last completed step: nothing is redone, and the time
    from the wrapper's end to the launcher's is teardown, counted with restarts."""
    ledger = Ledger(Storage(str(tmp_path / "run")))
    inst = InstanceInfo(cloud="simulated", instance_type="g5.xlarge", region="us-east-1",
                        availability_zone="us-east-1a", market="spot")
    ledger.segment_started(segment_id="A", instance=inst, started_at=T0, source="launcher")
    ledger.training_resumed(segment_id="A", step=0, process_started_at=T0 + 1, first_step_at=T0 + 3)
    ledger.checkpoint_committed(segment_id="A", step=40, committed_at=T0 + 50.5, stall_s=0.01,
                                save_s=0.5, nbytes=10, captured_at=T0 + 50)
    ledger.segment_ended(segment_id="A", reason="interrupted", ended_at=T0 + 51, source="wrapper",
                         steps_done=40, last_step_at=T0 + 50)
    ledger.segment_ended(segment_id="A", reason="interrupted", ended_at=T0 + 52.5, source="launcher")
    (seg,) = report_for_run(Storage(str(tmp_path / "run")), offline=True).to_dict()["segments"]
    assert seg["lost_work_s"] == 0
    assert seg["restart_overhead_s"] == pytest.approx(52.5 - 51)


def test_one_restart_figure_in_the_table_the_interruptions_the_totals_html_and_json(tmp_path):
    """Issue 23 item 5: the first segment (interrupted, 1.5 s teardown) and a second one whose
    own startup is 4.8 s and which is interrupted in turn (1.2 s teardown), then a third that
    starts up in 3.0 s and finishes. Each restart reads the same in its row, its interruption line, the HTML and the
    JSON, and the totals are their sum; the first segment's startup is never a restart."""
    from spotrun.cost import report_html

    url = str(tmp_path / "run")
    ledger = Ledger(Storage(url))
    inst = InstanceInfo(cloud="simulated", instance_type="g5.xlarge", region="us-east-1",
                        availability_zone="us-east-1a", market="spot")
    starts = {"A": T0, "B": T0 + 200, "C": T0 + 400}
    for sid, t in starts.items():
        ledger.segment_started(segment_id=sid, instance=inst, started_at=t, source="launcher")
    ledger.training_resumed(segment_id="A", step=0, process_started_at=T0 + 1, first_step_at=T0 + 9)
    ledger.training_resumed(segment_id="B", step=10, process_started_at=T0 + 201, first_step_at=T0 + 204.8)
    ledger.training_resumed(segment_id="C", step=20, process_started_at=T0 + 401, first_step_at=T0 + 403)
    for sid, step in (("A", 10), ("B", 20)):
        t = starts[sid]
        ledger.checkpoint_committed(segment_id=sid, step=step, committed_at=t + 100, stall_s=0.0,
                                    save_s=0.1, nbytes=10, captured_at=t + 100)
        ledger.segment_ended(segment_id=sid, reason="interrupted", ended_at=t + 100, source="wrapper",
                             steps_done=step, last_step_at=t + 100)
    ledger.segment_ended(segment_id="A", reason="interrupted", ended_at=T0 + 101.5, source="launcher")
    ledger.segment_ended(segment_id="B", reason="interrupted", ended_at=T0 + 301.2, source="launcher")
    ledger.segment_ended(segment_id="C", reason="finished", ended_at=T0 + 500, source="launcher")
    report = report_for_run(Storage(url), spot_price=1.0, on_demand_price=3.0)
    d = json.loads(json.dumps(report.to_dict()))
    a, b, c = d["segments"]
    assert a["restart_overhead_s"] == pytest.approx(1.5 + 4.8)  # A's teardown + B's startup
    assert b["restart_overhead_s"] == pytest.approx(1.2 + 3.0)  # B's teardown + C's startup
    assert c["restart_overhead_s"] == 0 and c["restart_overhead_usd"] == 0.0
    first, second = d["interruptions"]
    assert first["restart_overhead_s"] == a["restart_overhead_s"]
    assert second["restart_overhead_s"] == b["restart_overhead_s"]
    assert d["totals"]["restart_overhead_s"] == pytest.approx(1.5 + 4.8 + 1.2 + 3.0)
    assert d["totals"]["restart_overhead_usd"] == pytest.approx((1.5 + 4.8 + 1.2 + 3.0) / 3600)
    # Useful time leaves out A's first startup from the restarts (on-demand pays it too).
    assert d["totals"]["useful_s"] == pytest.approx(
        (101.5 - 1.5) + (101.2 - 4.8 - 1.2) + (100 - 3.0))

    text = report_text(report)
    rows = {line.split()[0]: line for line in text.splitlines() if line.split()[:1] in (["A"], ["B"], ["C"])}
    assert " 6.3s " in rows["A"] and " 4.2s " in rows["B"] and " 0.0s " in rows["C"]
    assert "restart took 6.3s" in text and "restart took 4.2s" in text
    assert "(10.5s)" in text  # the total
    html = report_html(report)
    assert "6.3s / " in html and "4.2s / " in html and "(10.5s)" in html
