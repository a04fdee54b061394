"""Issue 13 items 2 and 4: the cost so far of a running launch, and one dated price snapshot."""

from __future__ import annotations

import json
import time

import pytest

from spotrun.cli import main
from spotrun.cost import (
    PriceBook,
    estimate_job,
    report_for_run,
    report_html,
    report_text,
)
from spotrun.cost.prices import load_snapshot
from spotrun.launch.status import format_status, run_status
from spotrun.records.instance import InstanceInfo
from spotrun.records.launch_state import LaunchState, Segment, save_state
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTRUN_CACHE_DIR", str(tmp_path / "cache"))


def _running_launch(url: str, started: float) -> Storage:
    """A local launch whose one segment started ``started`` and is running now."""
    storage = Storage(url)
    info = InstanceInfo(cloud="simulated", instance_id="seg-1", instance_type="g5.xlarge",
                        region="us-east-1", availability_zone="us-east-1a", market="spot")
    ledger = Ledger(storage)
    ledger.segment_started(segment_id="seg-1", instance=info, started_at=started, source="launcher")
    ledger.segment_started(segment_id="seg-1", instance=info, started_at=started + 5, source="wrapper")
    ledger.training_resumed(segment_id="seg-1", step=0, process_started_at=started + 5,
                            first_step_at=started + 10)
    ledger.checkpoint_committed(segment_id="seg-1", step=10, committed_at=started + 60, stall_s=1.0,
                                save_s=2.0, nbytes=1)
    state = LaunchState(mode="local", run_id="r1", created_at=started, status="running")
    state.segments.append(Segment(segment_id="seg-1", instance_id="seg-1", instance_type="g5.xlarge",
                                  market="spot", started_at=started, availability_zone="us-east-1a"))
    save_state(storage, state)
    return storage


def test_status_prices_the_running_segment_to_now(tmp_path):
    started = time.time() - 3600.0
    storage = _running_launch(str(tmp_path / "run"), started)
    st = run_status(storage, live=False)
    cost = st["cost"]
    seg = cost["segments"][0]
    assert seg["end_reason"] == "running" and not seg["interrupted"]
    assert seg["end"] >= started + 3600.0 - 1  # to now, not to its last record (started + 60)
    assert seg["lost_work_s"] == 0.0
    assert cost["totals"]["interruptions"] == 0
    assert not [w for w in cost["warnings"] if "no end record" in w]
    spot = load_snapshot()["on_demand"]["g5.xlarge"] * 0.3
    assert cost["totals"]["cost_usd"] == pytest.approx(spot * seg["duration_s"] / 3600.0)

    text = format_status(st)
    cost_lines = [line for line in text.splitlines() if line.startswith(("cost", "    "))]
    assert "so far" in text and "running segment priced to now" in text
    assert "complete 1" not in text and "useful_s" not in text
    assert "saved $" in text and "market snapshot 2025-07 (ESTIMATED" in text
    assert cost_lines  # the cost is in words, on a few lines

    # Once the launch is over, the same segment with no end record is an interruption again.
    state = json.loads(storage.read_bytes("launch/state.json"))
    state["status"] = "failed"
    storage.write_bytes("launch/state.json", json.dumps(state).encode())
    again = report_for_run(storage, offline=True)
    assert again.segments[0].end_reason == "unknown" and again.segments[0].interrupted


def test_one_dated_snapshot_vintage_in_every_report(tmp_path, capsys):
    snap = load_snapshot()
    assert snap["vintage"] == "2025-07"
    # One vintage: plain prices, no per-entry sources of different dates.
    assert all(isinstance(v, float) for v in snap["on_demand"].values())
    assert "sources" not in snap

    storage = _running_launch(str(tmp_path / "run"), time.time() - 600)
    report = report_for_run(storage, offline=True)
    assert report.to_dict()["snapshot_vintage"] == "2025-07"
    assert "snapshot 2025-07" in report_text(report)
    assert "2025-07" in report_html(report)
    seg = report.to_dict()["segments"][0]
    assert seg["price"]["estimate"] and not seg["on_demand_price"]["estimate"]

    est = estimate_job(instance_type="g5.xlarge", hours_per_run=1, prices=PriceBook(offline=True))
    assert "snapshot 2025-07 ESTIMATE" in est.to_text()
    assert main(["estimate", "--portfolio", "examples/portfolio.toml", "--offline"]) == 0
    assert "2025-07" in capsys.readouterr().out
    # An override is no snapshot: no vintage to state.
    over = report_for_run(storage, spot_price=0.1, on_demand_price=0.5)
    assert over.to_dict()["snapshot_vintage"] is None


def test_status_survives_damaged_launcher_records(tmp_path):
    storage = _running_launch(str(tmp_path / "run"), time.time() - 600)
    storage.write_bytes("ledger/00000000000000000001-bad.json", json.dumps(
        {"event": "segment_started", "time": 1.0, "source": "launcher", "started_at": "yesterday",
         "instance": {}}).encode())
    st = run_status(storage, live=False)
    assert [s["segment_id"] for s in st["segments"]] == ["seg-1"]
    assert any("skipped ledger record" in w for w in st["cost"]["warnings"])
    assert "so far" in format_status(st)
