"""Issue 22 item 4: recovery in the books. From each loss to the first training step of the
attempt after it, split (capacity, boot/setup, process start + rendezvous, restore, restore ->
first step), bytes by source and instances per interruption: from the launcher's
recovery_started records (replace and relaunch), and from the segments alone in older ledgers."""

from __future__ import annotations

import json
import math

import pytest

from spotrun.cli import main
from spotrun.cost import report_for_run, report_html, report_text
from spotrun.cost.recovery import PARTS, Recovery
from spotrun.launch.status import format_status, run_status
from spotrun.records.instance import InstanceInfo
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

T0 = 1_700_000_000.0
GIB, MIB = 1 << 30, 1 << 20


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTRUN_CACHE_DIR", str(tmp_path / "cache"))


def _inst(iid: str) -> InstanceInfo:
    return InstanceInfo(cloud="aws", instance_id=iid, instance_type="g5.xlarge", region="us-east-1",
                        availability_zone="us-east-1a", market="spot")


def _first_attempt(led: Ledger, group: str = "a") -> None:
    """Three nodes from T0; node 1 is lost at T0+990 (a notice), the launcher ends them all."""
    for n in range(3):
        led.segment_started(segment_id=f"{group}-n{n}", instance=_inst(f"i-{n}"), started_at=T0,
                            source="launcher", group=group, node=n)
    led.training_resumed(segment_id=f"{group}-n0", step=0, process_started_at=T0 + 20, first_step_at=T0 + 30)
    led.checkpoint_committed(segment_id=f"{group}-n0", step=50, committed_at=T0 + 995, stall_s=1.0,
                             save_s=2.0, nbytes=10, captured_at=T0 + 993)
    led.segment_ended(segment_id=f"{group}-n0", reason="interrupted", ended_at=T0 + 1000, source="wrapper",
                      steps_done=50, last_step_at=T0 + 993)
    for n in range(3):
        led.segment_ended(segment_id=f"{group}-n{n}", reason="interrupted", ended_at=T0 + 1005 + n,
                          source="launcher")


def _second_attempt(led: Ledger, ids: list[str], *, restore: bool = True, group: str = "b") -> None:
    for n, iid in enumerate(ids):
        led.segment_started(segment_id=f"{group}-n{n}", instance=_inst(iid), started_at=T0 + 1010,
                            source="launcher", group=group, node=n)
    extra = dict(restore_started_at=T0 + 1080, restore_s=12.5, bytes_local=GIB, bytes_peer=256 * MIB,
                 bytes_url=0) if restore else {}
    led.training_resumed(segment_id=f"{group}-n0", step=50, process_started_at=T0 + 1070,
                         first_step_at=T0 + 1100, **extra)
    for n in range(len(ids)):
        led.segment_ended(segment_id=f"{group}-n{n}", reason="finished", ended_at=T0 + 2000, source="launcher")


def _report(url: str):
    return report_for_run(Storage(url), spot_price=0.5, on_demand_price=1.0)


def test_replace_mode_splits_the_recovery_and_counts_bytes_and_instances(tmp_path):
    url = str(tmp_path / "run")
    led = Ledger(Storage(url))
    _first_attempt(led)
    led.recovery_started(segment_id="b", lost_at=T0 + 990, mode="replace", lost=["a-n1"],
                         kept=["a-n0", "a-n2"], instances_started=1, capacity_at=T0 + 1060)
    _second_attempt(led, ["i-0", "i-9", "i-2"])
    report = _report(url)
    (rec,) = report.recoveries()
    assert (rec.attempt, rec.previous, rec.source, rec.mode) == ("b", "a", "launcher", "replace")
    assert rec.total_s == pytest.approx(110.0)  # loss at 990 -> first step at 1100
    assert rec.split() == pytest.approx({"waiting_s": 70.0, "boot_s": 10.0, "start_s": 10.0,
                                         "restore_s": 12.5, "first_step_s": 7.5})
    assert math.fsum(rec.split().values()) == pytest.approx(rec.total_s)
    assert rec.bytes == {"local": GIB, "peer": 256 * MIB, "url": 0}
    assert (rec.instances_started, rec.instances_kept) == (1, 2)
    d = report.to_dict()
    assert d["recovery_totals"]["recoveries"] == 1 and d["recovery_totals"]["bytes_local"] == GIB
    # The recovery record is no segment of its own (it would be a phantom interruption).
    assert sorted(s.segment_id for s in report.segments) == ["a-n0", "a-n1", "a-n2", "b-n0", "b-n1", "b-n2"]
    assert d["totals"]["interruptions"] == 1 and d["totals"]["attempts"] == 2


def test_the_recovery_record_leaves_every_other_figure_as_it_was(tmp_path):
    with_rec, without = str(tmp_path / "with"), str(tmp_path / "without")
    for url, record in ((with_rec, True), (without, False)):
        led = Ledger(Storage(url))
        _first_attempt(led)
        if record:
            led.recovery_started(segment_id="b", lost_at=T0 + 990, mode="relaunch",
                                 lost=["a-n1"], instances_started=3, capacity_at=T0 + 1060)
        _second_attempt(led, ["i-3", "i-4", "i-5"])
    a, b = _report(with_rec).to_dict(), _report(without).to_dict()
    for d in (a, b):
        d.pop("generated_at"), d.pop("run_url"), d.pop("recoveries"), d.pop("recovery_totals")
    assert a == b


def test_relaunch_mode_starts_every_instance(tmp_path):
    url = str(tmp_path / "run")
    led = Ledger(Storage(url))
    _first_attempt(led)
    led.recovery_started(segment_id="b", lost_at=T0 + 990, mode="relaunch", lost=["a-n1"],
                         instances_started=3, capacity_at=T0 + 1060)
    _second_attempt(led, ["i-3", "i-4", "i-5"])
    (rec,) = _report(url).recoveries()
    assert (rec.mode, rec.instances_started, rec.instances_kept, rec.kept) == ("relaunch", 3, 0, [])


def test_an_older_ledger_takes_the_loss_and_capacity_from_the_segments(tmp_path):
    # No recovery_started and no restore figures (records written before issue 22).
    url = str(tmp_path / "run")
    led = Ledger(Storage(url))
    _first_attempt(led)
    _second_attempt(led, ["i-0", "i-9", "i-2"], restore=False)
    (rec,) = _report(url).recoveries()
    assert (rec.source, rec.mode) == ("segments", None)
    # Loss: the first interrupted segment's end (1005); capacity: the attempt's start (1010).
    assert rec.lost_at == T0 + 1005 and rec.total_s == pytest.approx(95.0)
    # No restore times: process start -> first step is one part, restore unknown.
    split = rec.split()
    assert (split["restore_s"], split["first_step_s"]) == (None, None)
    assert {k: split[k] for k in ("waiting_s", "boot_s", "start_s")} == pytest.approx(
        {"waiting_s": 5.0, "boot_s": 60.0, "start_s": 30.0})
    assert rec.bytes == {"local": None, "peer": None, "url": None}
    # Instances from the ids: i-0 and i-2 ran the attempt before, i-9 is new.
    assert (rec.instances_started, rec.instances_kept) == (1, 2)
    text = report_text(_report(url))
    assert "Recovery (from each loss" in text and "1 started, 2 kept" in text


def test_a_bare_checkpointer_run_restarted_by_hand(tmp_path):
    # Wrapper records only: no launcher, no group, no instance id.
    url = str(tmp_path / "run")
    led = Ledger(Storage(url))
    local = InstanceInfo(cloud="local", market="local")
    led.segment_started(segment_id="s1", instance=local, started_at=T0)
    led.training_resumed(segment_id="s1", step=0, process_started_at=T0, first_step_at=T0 + 3)
    led.segment_ended(segment_id="s1", reason="interrupted", ended_at=T0 + 100, steps_done=40,
                      last_step_at=T0 + 99)
    led.segment_started(segment_id="s2", instance=local, started_at=T0 + 130)
    led.training_resumed(segment_id="s2", step=40, process_started_at=T0 + 130, first_step_at=T0 + 136,
                         restore_started_at=T0 + 133, restore_s=2.0, bytes_url=5000)
    led.segment_ended(segment_id="s2", reason="finished", ended_at=T0 + 200, steps_done=60)
    (rec,) = _report(url).recoveries()
    assert (rec.attempt, rec.previous, rec.lost_at) == ("s2", "s1", T0 + 100)
    assert rec.split() == pytest.approx({"waiting_s": 30.0, "boot_s": 0.0, "start_s": 3.0,
                                         "restore_s": 2.0, "first_step_s": 1.0})
    assert rec.bytes == {"local": None, "peer": None, "url": 5000}
    assert (rec.instances_started, rec.instances_kept) == (None, None)  # no ids: unknown


def test_a_single_node_attempt_named_by_its_segment(tmp_path):
    # The local simulator without --nodes: an attempt is one segment, and the launcher's
    # record carries that segment's id (it shares the id, never its figures).
    url = str(tmp_path / "run")
    led = Ledger(Storage(url))
    led.segment_started(segment_id="sim-1", instance=_inst("sim-1"), started_at=T0, source="launcher")
    led.training_resumed(segment_id="sim-1", step=0, process_started_at=T0 + 1, first_step_at=T0 + 2)
    led.segment_ended(segment_id="sim-1", reason="interrupted", ended_at=T0 + 50, source="launcher")
    led.recovery_started(segment_id="sim-2", lost_at=T0 + 40, mode="relaunch", lost=["sim-1"],
                         instances_started=1, capacity_at=T0 + 52)
    led.segment_started(segment_id="sim-2", instance=_inst("sim-2"), started_at=T0 + 51, source="launcher")
    led.training_resumed(segment_id="sim-2", step=10, process_started_at=T0 + 53, first_step_at=T0 + 60,
                         restore_started_at=T0 + 55, restore_s=1.0, bytes_url=100)
    report = _report(url)
    seg2 = next(s for s in report.segments if s.segment_id == "sim-2")
    assert seg2.start == T0 + 51 and seg2.end_reason == "unknown"  # its own records only
    (rec,) = report.recoveries()
    assert rec.total_s == pytest.approx(20.0) and rec.capacity_at == T0 + 52


def test_an_attempt_with_no_step_yet_has_no_total(tmp_path):
    url = str(tmp_path / "run")
    led = Ledger(Storage(url))
    _first_attempt(led)
    led.recovery_started(segment_id="b", lost_at=T0 + 990, mode="replace", lost=["a-n1"],
                         kept=["a-n0", "a-n2"], instances_started=1)
    for n in range(3):
        led.segment_started(segment_id=f"b-n{n}", instance=_inst(f"i-{n}"), started_at=T0 + 1010,
                            source="launcher", group="b", node=n)
    report = report_for_run(Storage(url), spot_price=0.5, on_demand_price=1.0,
                            running={"b-n0", "b-n1", "b-n2"}, now=T0 + 1030)
    (rec,) = report.recoveries()
    # No capacity_at yet: the attempt's start stands in for it.
    assert rec.total_s is None and rec.split()["waiting_s"] == pytest.approx(20.0)
    assert "no step yet" in report_text(report)


def test_times_out_of_order_are_clamped_so_the_parts_add_up():
    rec = Recovery(attempt="b", previous="a", source="launcher", mode="replace", lost_at=100.0,
                   capacity_at=90.0, process_started_at=130.0, restore_started_at=120.0,
                   restore_ended_at=500.0, first_step_at=150.0)
    split = rec.split()
    assert all(v is not None and v >= 0 for v in split.values()), split
    assert math.fsum(split.values()) == pytest.approx(rec.total_s) == pytest.approx(50.0)


def test_hostile_and_damaged_recovery_records_are_skipped(tmp_path):
    url = str(tmp_path / "run")
    storage = Storage(url)
    led = Ledger(storage)
    _first_attempt(led)
    good = led.recovery_started(segment_id="b", lost_at=T0 + 990, mode="replace", lost=["a-n1"],
                                kept=["a-n0", "a-n2"], instances_started=1, capacity_at=T0 + 1060)
    base = {k: v for k, v in good.items() if k not in ("id",)}
    bad = [
        {**base, "lost_at": float("nan")},
        {**base, "lost_at": 1e300},
        {**base, "mode": "<script>alert(1)</script>"},
        {**base, "lost": "a-n1"},
        {**base, "instances_started": -1},
        {**base, "instances_started": True},
        {**base, "capacity_at": "soon"},
        {**base, "segment_id": ""},
        {**base, "segment_id": "nowhere"},  # names no attempt: ignored
        {**base, "lost_at": T0 + 5000, "time": T0 + 5000},  # after the first step: ignored, warned
    ]
    for i, rec in enumerate(bad):
        # Straight to storage, as a damaged or malicious writer would (NaN and all).
        storage.write_bytes(f"ledger/zz-bad-{i}.json", json.dumps({**rec, "id": f"bad-{i}"}).encode())
    # A damaged training_resumed (negative bytes) is skipped like any damaged record.
    storage.write_bytes("ledger/zz-bad-resume.json", json.dumps({
        "event": "training_resumed", "id": "bad-resume", "time": T0 + 1100, "segment_id": "b-n0", "step": 50,
        "process_started_at": T0 + 1070, "first_step_at": T0 + 1100, "bytes_url": -5}).encode())
    _second_attempt(led, ["i-0", "i-9", "i-2"])
    report = _report(url)
    (rec,) = report.recoveries()
    assert (rec.lost_at, rec.mode, rec.instances_started) == (T0 + 990, "replace", 1)
    assert rec.bytes["local"] == GIB  # the good training_resumed
    skipped = [w for w in report.warnings if w.startswith("skipped ledger record")]
    assert len(skipped) >= 9, report.warnings
    assert any("after its first training step" in w for w in report.warnings), report.warnings
    assert "<script>" not in report_html(report)


def test_cost_json_text_html_and_status_show_it(tmp_path, capsys):
    url = str(tmp_path / "run")
    led = Ledger(Storage(url))
    _first_attempt(led)
    led.recovery_started(segment_id="b", lost_at=T0 + 990, mode="replace", lost=["a-n1"],
                         kept=["a-n0", "a-n2"], instances_started=1, capacity_at=T0 + 1060)
    _second_attempt(led, ["i-0", "i-9", "i-2"])
    html_path = tmp_path / "r.html"
    assert main(["cost", url, "--offline", "--spot-price", "0.5", "--on-demand-price", "1",
                 "--json", "--html", str(html_path)]) == 0
    d = json.loads(capsys.readouterr().out)
    (rec,) = d["recoveries"]
    assert rec["total_s"] == pytest.approx(110.0) and rec["restore_s"] == pytest.approx(12.5)
    assert (rec["bytes_local"], rec["bytes_peer"], rec["bytes_url"]) == (GIB, 256 * MIB, 0)
    assert (rec["instances_started"], rec["instances_kept"], rec["mode"]) == (1, 2, "replace")
    html = html_path.read_text()
    assert 'id="recovery-table"' in html and "1.00 GiB" in html and "1 started, 2 kept" in html
    assert main(["cost", url, "--offline", "--spot-price", "0.5", "--on-demand-price", "1"]) == 0
    text = capsys.readouterr().out
    assert "recovery (loss -> first step)" in text and "1m50.0s" in text
    assert all(label in text for _, label in PARTS)
    # What each byte column means, said where the figures are shown (issue 22: bytes held on
    # the restoring machine for another node are local, not peer: nothing crossed the network).
    flat = " ".join(text.split())
    assert "local = already on the restoring machine, its own copy or files it held for other nodes" in flat, text
    assert "peer = fetched from another node over the peer channel during the restore" in flat, text
    assert "Local (on the machine)" in html and "fetched from another node over the peer channel" in html
    status = format_status(run_status(Storage(url), live=False))
    assert "recovery   1 recovery, loss -> first step 1m50.0s" in status, status
    assert "restore 12.5s" in status and "1.00 GiB local, 256 MiB peer, 0 B run URL" in status, status
    assert "1 started, 2 kept" in status
