"""Issue 14 items 2 and 4 in the cost report: N-node attempts (one segment per node, only rank 0
writes training records) and runs over several regions."""

from __future__ import annotations

import json

import pytest

from spotrun.cost import build_segments, report_for_run, report_html, report_text
from spotrun.errors import ConfigError
from spotrun.records.events import SegmentStarted, Source, parse_records
from spotrun.records.instance import InstanceInfo
from spotrun.records.ledger import Ledger, ledger_sink
from spotrun.storage import Storage

T0 = 1_700_000_000.0
SPOT, OD = 0.5, 1.0


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTRUN_CACHE_DIR", str(tmp_path / "cache"))


def _inst(iid: str, region: str = "us-east-1") -> InstanceInfo:
    return InstanceInfo(cloud="aws", instance_id=iid, instance_type="g5.xlarge", region=region,
                        availability_zone=f"{region}a", market="spot")


def write_two_node_run(url: str) -> None:
    """Attempt g1 (nodes i-0, i-1) interrupted at T0+1000; attempt g2 (i-2, i-3) resumes from
    step 50 and finishes. Only node 0 (rank 0) writes the wrapper's records."""
    led = Ledger(Storage(url))
    led.segment_started(segment_id="i-0", instance=_inst("i-0"), started_at=T0, source="launcher",
                        group="g1", node=0)
    led.segment_started(segment_id="i-1", instance=_inst("i-1"), started_at=T0 + 5, source="launcher",
                        group="g1", node=1)
    led.segment_started(segment_id="i-0", instance=InstanceInfo(), started_at=T0 + 60, source="wrapper")
    led.training_resumed(segment_id="i-0", step=0, process_started_at=T0 + 60, first_step_at=T0 + 100)
    led.checkpoint_committed(segment_id="i-0", step=50, committed_at=T0 + 600, stall_s=4.0, save_s=9.0,
                             nbytes=10, captured_at=T0 + 596)
    led.notice_received(segment_id="i-0", source="ec2", action="terminate", notice_time=None,
                        detected_at=T0 + 985, deadline=None)
    led.segment_ended(segment_id="i-0", reason="interrupted", ended_at=T0 + 1000, source="wrapper",
                      steps_done=80, last_step_at=T0 + 990)
    # Node 1 vanished (interrupted); the launcher ended both.
    led.segment_ended(segment_id="i-1", reason="interrupted", ended_at=T0 + 1040, source="launcher")
    # A wrapper start on node 1 alone (no resume, no checkpoint) is no training record.
    led.segment_started(segment_id="i-1", instance=InstanceInfo(), started_at=T0 + 62, source="wrapper")
    led.segment_ended(segment_id="i-0", reason="interrupted", ended_at=T0 + 1050, source="launcher")
    led.segment_started(segment_id="i-2", instance=_inst("i-2"), started_at=T0 + 1200, source="launcher",
                        group="g2", node=0)
    led.segment_started(segment_id="i-3", instance=_inst("i-3"), started_at=T0 + 1200, source="launcher",
                        group="g2", node=1)
    led.training_resumed(segment_id="i-2", step=50, process_started_at=T0 + 1250, first_step_at=T0 + 1300)
    led.checkpoint_committed(segment_id="i-2", step=100, committed_at=T0 + 1700, stall_s=2.0, save_s=9.0,
                             nbytes=10)
    led.segment_ended(segment_id="i-2", reason="finished", ended_at=T0 + 1990, source="wrapper")
    for sid in ("i-2", "i-3"):
        led.segment_ended(segment_id=sid, reason="finished", ended_at=T0 + 2000, source="launcher")


def test_two_node_attempt_lost_work_counts_both_nodes(tmp_path):
    url = str(tmp_path / "run")
    write_two_node_run(url)
    report = report_for_run(Storage(url), spot_price=SPOT, on_demand_price=OD)
    segs = {s.segment_id: s for s in report.segments}
    n0, n1, m0, m1 = segs["i-0"], segs["i-1"], segs["i-2"], segs["i-3"]
    assert (n1.group, n1.node, n1.training_from) == ("g1", 1, "i-0")
    assert n0.training_from is None and m1.training_from == "i-2"

    # Node 1 loses the same training time as the head: from the checkpoint's capture to the
    # last step, not nothing (it wrote no records of its own).
    assert n0.lost_work_s == pytest.approx(990 - 596)
    assert n1.lost_work_s == pytest.approx(n0.lost_work_s)
    # It paused for the same checkpoint, and its shutdown runs from the job's end.
    assert n1.stall_s == n0.stall_s == 4.0
    assert n1.shutdown_s == pytest.approx(40.0) and n0.shutdown_s == pytest.approx(50.0)
    # Both nodes of the first attempt start up once (useful time); the next attempt's do not.
    assert n0.is_first and n1.is_first and not m0.is_first
    assert n0.restart_time_in_segment_s == pytest.approx(50.0) and n1.restart_time_in_segment_s == pytest.approx(40.0)
    assert m0.restart_time_in_segment_s == m1.restart_time_in_segment_s == pytest.approx(100.0)
    # The attempt's restart (both shutdowns, both next startups) is carried by one row: the
    # first interrupted node's, which its interruption line repeats.
    assert n0.restart_overhead_s == pytest.approx(50 + 40 + 100 + 100)
    assert n1.restart_overhead_s == m0.restart_overhead_s == m1.restart_overhead_s == 0

    t = report.totals()
    assert t["segments"] == 4 and t["attempts"] == 2
    assert t["interruptions"] == 1  # one attempt interrupted, however many nodes it had
    assert t["checkpoints"] == 2  # each commit once, not once per node
    assert t["lost_work_s"] == pytest.approx(2 * (990 - 596))
    assert t["stall_s"] == pytest.approx(2 * 4.0 + 2 * 2.0)
    durations = 1050 + 1035 + 800 + 800
    assert t["duration_s"] == pytest.approx(durations)
    assert t["cost_usd"] == pytest.approx(durations / 3600 * SPOT)
    assert t["lost_work_usd"] == pytest.approx(2 * (990 - 596) / 3600 * SPOT)

    (intr,) = report.interruptions()
    assert intr["group"] == "g1" and intr["nodes"] == 2 and intr["interrupted_nodes"] == [0, 1]
    assert intr["lost_work_s"] == pytest.approx(t["lost_work_s"])
    assert intr["last_checkpoint_step"] == 50 and intr["next_segment_id"] == "i-2"
    assert intr["restart_overhead_s"] == pytest.approx(50 + 40 + 100 + 100)

    d = report.to_dict()
    assert d["segments"][1]["group"] == "g1" and d["segments"][1]["node"] == 1
    json.dumps(d)
    text = report_text(report)
    assert "attempt/node" in text and "g1/0" in text and "g1/1" in text and "g2/1" in text
    assert "4 (2 attempts)" in text and "attempt g1 (2 nodes; segment i-0 interrupted): every node lost" in text
    # SageMaker's billable time is wall clock: each attempt once, not once per node.
    sm = report.sagemaker_figure()
    assert sm["billable_s"] == pytest.approx(1050 + 800) and sm["training_s"] == pytest.approx(2000)
    html = report_html(report)
    assert "Attempt/node" in html and "g1/1" in html and "2 attempts, 4 segments" in html
    assert " n1</text>" in html  # the timeline labels each node

    # Without the group fields (what an older report made of it), node 1 lost nothing.
    plain = []
    for r in Ledger(Storage(url)).records():
        plain.append({k: v for k, v in r.items() if k not in ("group", "node")})
    old = {s.segment_id: s for s in build_segments(plain)}
    assert old["i-1"].lost_work_s == 0.0 and old["i-1"].group is None


def test_group_head_is_the_node_with_records(tmp_path):
    """Rank 0 may run on any node of the group: the node that wrote records leads."""
    url = str(tmp_path / "run")
    led = Ledger(Storage(url))
    for n, sid in enumerate(("a", "b", "c")):
        led.segment_started(segment_id=sid, instance=_inst(sid), started_at=T0, source="launcher",
                            group="g", node=n)
    led.training_resumed(segment_id="b", step=0, process_started_at=T0 + 10, first_step_at=T0 + 20)
    for sid in ("a", "b", "c"):
        led.segment_ended(segment_id=sid, reason="failed", ended_at=T0 + 320, source="launcher")
    report = report_for_run(Storage(url), spot_price=SPOT, on_demand_price=OD)
    lost = {s.segment_id: (s.training_from, s.lost_work_s) for s in report.segments}
    # No checkpoint: everything since the first step is lost, on each of the three nodes.
    assert lost == {"a": ("b", 300.0), "b": (None, 300.0), "c": ("b", 300.0)}


def test_old_records_and_single_node_reports_unchanged(tmp_path):
    url = str(tmp_path / "run")
    led = Ledger(Storage(url))
    led.segment_started(segment_id="A", instance=_inst("i-a"), started_at=T0, source="launcher")
    led.training_resumed(segment_id="A", step=0, process_started_at=T0, first_step_at=T0 + 10)
    led.segment_ended(segment_id="A", reason="finished", ended_at=T0 + 100, source="launcher")
    (rec,) = [r for r in Ledger(Storage(url)).records() if r["event"] == "segment_started"]
    assert "group" not in rec and "node" not in rec  # nothing new is written for one node
    report = report_for_run(Storage(url), spot_price=SPOT, on_demand_price=OD)
    d = report.to_dict()
    assert "group" not in d["segments"][0] and d["totals"]["attempts"] == 1
    assert d["regions"] == ["us-east-1"] and d["notes"] == []
    text, html = report_text(report), report_html(report)
    for page in (text, html):
        assert "ttempt" not in page and "egion" not in page and "cross-region" not in page
    assert "Notes" not in text


def test_group_fields_are_checked(tmp_path):
    base = {"event": "segment_started", "time": T0, "segment_id": "x", "started_at": T0,
            "source": "launcher", "instance": {}}
    good, bad = parse_records([
        {**base, "group": "g", "node": 2},
        {**base, "id": "n1", "group": "g", "node": -1},
        {**base, "id": "n2", "group": "g", "node": "0"},
        {**base, "id": "n3", "node": 1},
        {**base, "id": "n4", "group": 7},
    ])
    assert [(r["group"], r["node"]) for r in good] == [("g", 2)]
    assert len(bad) == 4 and all("skipped ledger record" in w for w in bad)
    led = Ledger(Storage(str(tmp_path / "run")))
    with pytest.raises(ConfigError, match="needs a group"):
        led.segment_started(segment_id="x", instance=InstanceInfo(), started_at=T0, source="launcher", node=1)
    # The typed event carries them to the ledger.
    ledger_sink(led)(SegmentStarted(segment_id="x", instance=InstanceInfo(), started_at=T0,
                                    source=Source.LAUNCHER, group="g", node=1))
    (rec,) = led.records()
    assert (rec["group"], rec["node"]) == ("g", 1)


def test_multi_region_run_shows_regions_and_the_transfer_note(tmp_path):
    url = str(tmp_path / "run")
    led = Ledger(Storage(url))
    led.segment_started(segment_id="A", instance=_inst("i-a"), started_at=T0, source="launcher")
    led.segment_ended(segment_id="A", reason="interrupted", ended_at=T0 + 600, source="launcher")
    led.segment_started(segment_id="B", instance=_inst("i-b", "eu-west-1"), started_at=T0 + 700,
                        source="launcher")
    led.segment_ended(segment_id="B", reason="finished", ended_at=T0 + 1300, source="launcher")
    report = report_for_run(Storage(url), spot_price=SPOT, on_demand_price=OD)
    d = report.to_dict()
    assert d["regions"] == ["us-east-1", "eu-west-1"]
    (note,) = d["notes"]
    assert "cross-region data transfer" in note and "not include" in note
    text = report_text(report)
    header = next(line for line in text.splitlines() if line.startswith("segment"))
    assert header.split()[:4] == ["segment", "instance", "region", "zone"]
    rows = [line for line in text.splitlines() if line.startswith(("A ", "B "))]
    assert "us-east-1 " in rows[0] and "eu-west-1 " in rows[1]
    assert "Notes" in text and note in text
    html = report_html(report)
    assert "<th>Region</th>" in html and "<td>eu-west-1</td>" in html and "cross-region data transfer" in html


def write_run_with_spares(url: str) -> None:
    """Attempt g1 (i-0, i-1) gets a notice at T0+500: a replacement i-5 is started at once for
    attempt g2 and waits. The run is then relaunched whole (g2 = i-2, i-3), so i-5 is stopped,
    not needed (local launcher: it carries group g2 and node 0). An EC2 early replacement i-6
    (no group) is started at T0+1400 and goes (interrupted) while it waits, before g2 finishes.
    Only node 0 of each attempt writes training records."""
    led = Ledger(Storage(url))
    for sid, node in (("i-0", 0), ("i-1", 1)):
        led.segment_started(segment_id=sid, instance=_inst(sid), started_at=T0, source="launcher",
                            group="g1", node=node)
    led.training_resumed(segment_id="i-0", step=0, process_started_at=T0 + 50, first_step_at=T0 + 100)
    led.checkpoint_committed(segment_id="i-0", step=50, committed_at=T0 + 990, stall_s=1.0, save_s=2.0,
                             nbytes=10, captured_at=T0 + 985)
    led.segment_ended(segment_id="i-0", reason="interrupted", ended_at=T0 + 995, source="wrapper",
                      steps_done=50, last_step_at=T0 + 985)
    led.segment_started(segment_id="i-5", instance=_inst("i-5"), started_at=T0 + 500, source="launcher",
                        group="g2", node=0)
    for sid in ("i-0", "i-1"):
        led.segment_ended(segment_id=sid, reason="interrupted", ended_at=T0 + 1000, source="launcher")
    led.segment_ended(segment_id="i-5", reason="stopped", ended_at=T0 + 1100, source="launcher", unused=True)
    for sid, node in (("i-2", 0), ("i-3", 1)):
        led.segment_started(segment_id=sid, instance=_inst(sid), started_at=T0 + 1100, source="launcher",
                            group="g2", node=node)
    led.training_resumed(segment_id="i-2", step=50, process_started_at=T0 + 1150, first_step_at=T0 + 1200)
    led.segment_started(segment_id="i-6", instance=_inst("i-6"), started_at=T0 + 1400, source="launcher")
    led.segment_ended(segment_id="i-6", reason="interrupted", ended_at=T0 + 1600, source="launcher", unused=True)
    for sid in ("i-2", "i-3"):
        led.segment_ended(segment_id=sid, reason="finished", ended_at=T0 + 2000, source="launcher")


def test_a_spare_no_attempt_used_is_the_restart_it_was_paid_for_not_an_attempt(tmp_path):
    url = str(tmp_path / "run")
    write_run_with_spares(url)
    report = report_for_run(Storage(url), spot_price=SPOT, on_demand_price=OD)
    segs = {s.segment_id: s for s in report.segments}
    spare, ec2_spare = segs["i-5"], segs["i-6"]
    assert spare.unused and ec2_spare.unused and not segs["i-2"].unused
    # Two attempts ran (g1, g2); the spares are neither attempts nor interruptions of training.
    totals = report.to_dict()["totals"]
    assert totals["attempts"] == 2 and totals["segments"] == 6
    assert [i.get("group") for i in report.interruptions()] == ["g1"]
    # A spare never trained: it takes none of its group's records and has no useful time.
    assert spare.training_from is None and spare.useful_s == 0 and spare.lost_work_s == 0
    assert ec2_spare.useful_s == 0 and ec2_spare.lost_work_s == 0 and not ec2_spare.interrupted
    # g2's node 1 still takes node 0's records (the spare with node 0 is not its head).
    assert segs["i-3"].training_from == "i-2"
    # Its whole time is the restart of the attempt it started in: i-5 (600 s) g1's, i-6
    # (200 s) g2's, on top of g1's shutdowns and g2's startups.
    g1_restart = segs["i-0"].restart_overhead_s
    assert dict((s.segment_id, sec) for s, sec in segs["i-0"].restart_parts)["i-5"] == pytest.approx(600)
    assert g1_restart == pytest.approx(2 * (1000 - 995) + 600 + 2 * 100)  # both nodes shut down
    assert segs["i-2"].restart_overhead_s == pytest.approx(200)
    # Every second paid is useful, lost, stalled or restart: the books balance.
    paid = sum(s.duration_s for s in report.segments)
    parts = sum(s.useful_s + s.lost_work_s + s.stall_s + s.restart_time_in_segment_s for s in report.segments)
    assert parts == pytest.approx(paid)
    # SageMaker's wall-clock billable counts time when several machines ran once: 2000 s.
    assert report.sagemaker_figure()["billable_s"] == pytest.approx(2000)
    # The table calls it a spare.
    text = report_text(report)
    assert "spare" in next(line for line in text.splitlines() if line.startswith("i-5"))
    assert "(2 attempts)" in text
