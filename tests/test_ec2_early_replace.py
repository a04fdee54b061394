"""``--recovery replace`` on EC2 asks for a noticed node's replacement at its notice, against moto
(issue 22): the new instance boots while the noticed one writes its stop checkpoint.

The notice reaches the controller the way a real one does: the noticed node's wrapper writes
a ``notice_received`` record (segment id = its instance id) into the run's ledger. In-process
like tests/test_launch_ec2_replace.py, whose cloud, clock and call counting these reuse.
"""

from __future__ import annotations

from typing import Any

import test_launch_ec2_cluster
from test_launch_ec2 import Lines
from test_launch_ec2_cluster import HOME, T0, cluster_file, controller, launcher_records, options
from test_launch_ec2_replace import Calls

from spotrun.cost import report_for_run
from spotrun.launch.controller import Ec2Controller
from spotrun.launch.ec2_early import NoticeScan
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

# The EC2 cluster tests' fixtures, defined there once (not in conftest.py: other files have a
# storage fixture of their own).
cloud = test_launch_ec2_cluster.cloud
storage = test_launch_ec2_cluster.storage


def _notice(storage: Storage, iid: str, at: float, *, source: str = "ec2", action: str = "terminate") -> None:
    """What the noticed node's wrapper writes when its ranks see the notice."""
    Ledger(storage).notice_received(segment_id=iid, source=source, action=action, detected_at=at,
                                    notice_time=at - 1, deadline=at + 119)


class Play:
    """Drives a 3-node run: notice on node 1 at +900 (seen at the +1000 poll), then ``then``."""

    def __init__(self, cloud: Any, storage: Storage, calls: Calls, then: str) -> None:
        self.cloud, self.storage, self.calls, self.then = cloud, storage, calls, then
        self.now = [T0]
        self.first: list[str] = []
        self.second: list[str] = []
        self.early: str | None = None
        self.seen_before_loss: list[str] = []

    def __call__(self, ctl: Ec2Controller) -> None:
        ids = [s.instance_id for s in ctl.state.running]
        if not self.first:
            self.first = ids
            self.now[0] += 1000
            _notice(self.storage, ids[1], at=self.now[0] - 100)
            return
        if self.early is None and ids == self.first:
            # One poll after the notice: its replacement is asked for, the noticed node still runs.
            (self.early,) = set(self.cloud.running(ctl.state.run_id)) - set(self.first)
            self.seen_before_loss = self.cloud.running(ctl.state.run_id)
            self.now[0] += 60
            if self.then == "loss":
                self.cloud.spot_interrupt(self.first[1])
            elif self.then == "all lost":
                for i in self.first:
                    self.cloud.spot_interrupt(i)
            else:  # the run finishes before spot takes the noticed node
                self.storage.write_bytes("done.json", b"{}")
                for i in self.first:
                    self.cloud.shut_down(i)
            return
        if len(ids) == 3 and ids != self.first and not self.second:
            self.second = ids
            self.now[0] += 500
            self.storage.write_bytes("done.json", b"{}")
            for i in ids:
                self.cloud.shut_down(i)


def test_notice_on_one_of_three_asks_for_one_before_the_node_is_gone(cloud, storage) -> None:
    calls = Calls(cloud.clients[HOME])
    play = Play(cloud, storage, calls, "loss")
    out = Lines()
    ctl = controller(cloud, storage, options(cloud, storage, nodes=3), play, clock=play.now, on_event=out)
    assert ctl.run().status == "finished", out.getvalue()
    first, early = play.first, play.early
    assert early is not None
    # Asked for at the notice, while all three nodes still ran; none asked for at the loss.
    assert play.seen_before_loss == sorted([*first, early])
    assert calls.fleets == [3, 1] and calls.run_instances == 0, out.getvalue()
    assert not set(calls.terminated) & {first[0], first[2], early}
    assert "asked for its replacement now" in out.getvalue()
    # The early instance joined the next attempt in the noticed node's slot.
    assert play.second == [first[0], early, first[2]]
    spec = cluster_file(storage, early)
    assert [n["instance_id"] for n in spec["nodes"]] == play.second and spec["attempt"] == 2
    # Books: one instance started for the interruption; capacity came at the notice's poll
    # (+1000), before the loss was seen (+1060); the early segment is billed from its launch.
    recs = launcher_records(storage)
    (rec,) = [r for r in recs if r["event"] == "recovery_started"]
    assert (rec["mode"], rec["lost"], rec["kept"], rec["instances_started"]) == (
        "replace", [first[1]], [first[0], first[2]], 1)
    assert rec["lost_at"] == T0 + 900 and rec["capacity_at"] == T0 + 1000
    starts = {r["segment_id"]: (r["started_at"], r["group"], r["node"]) for r in recs
              if r["event"] == "segment_started"}
    assert starts[early] == (T0 + 1000, spec["segment"], 1)
    ends = {r["segment_id"]: r["reason"] for r in recs if r["event"] == "segment_ended"}
    assert ends == {first[1]: "interrupted", first[0]: "finished", first[2]: "finished", early: "finished"}
    assert ctl.state.interruptions == 1
    report = report_for_run(storage, offline=True)
    assert {s.segment_id: s.start for s in report.segments}[early] == T0 + 1000


def test_run_finishing_after_a_notice_terminates_the_early_instance_and_bills_it(cloud, storage) -> None:
    calls = Calls(cloud.clients[HOME])
    play = Play(cloud, storage, calls, "finish")
    out = Lines()
    ctl = controller(cloud, storage, options(cloud, storage, nodes=3), play, clock=play.now, on_event=out)
    assert ctl.run().status == "finished", out.getvalue()
    early = play.early
    assert early is not None and calls.fleets == [3, 1]
    assert early in calls.terminated and cloud.running(ctl.state.run_id) == []
    recs = launcher_records(storage)
    starts = {r["segment_id"]: r["started_at"] for r in recs if r["event"] == "segment_started"}
    ends = {r["segment_id"]: (r["reason"], r["ended_at"]) for r in recs if r["event"] == "segment_ended"}
    assert starts[early] == T0 + 1000 and ends[early] == ("stopped", T0 + 1060)  # launched, terminated
    # The cost report bills its minute (as restart time: it never trained), in its zone.
    (seg,) = [s for s in report_for_run(storage, offline=True).segments if s.segment_id == early]
    assert (seg.start, seg.end) == (T0 + 1000, T0 + 1060)
    assert seg.instance.availability_zone == "us-east-1b" and seg.to_dict()["cost_usd"] > 0
    assert [r for r in recs if r["event"] == "recovery_started"] == []
    assert ctl.state.interruptions == 0


def test_every_node_lost_after_a_notice_relaunches_and_ends_the_early_instance(cloud, storage) -> None:
    calls = Calls(cloud.clients[HOME])
    play = Play(cloud, storage, calls, "all lost")
    out = Lines()
    ctl = controller(cloud, storage, options(cloud, storage, nodes=3), play, clock=play.now, on_event=out)
    assert ctl.run().status == "finished", out.getvalue()
    early = play.early
    assert early is not None
    assert calls.fleets == [3, 1, 3], out.getvalue()  # the notice's one, then a whole relaunch
    assert early in calls.terminated and early not in play.second and len(play.second) == 3
    recs = launcher_records(storage)
    ends = {r["segment_id"]: r["reason"] for r in recs if r["event"] == "segment_ended"}
    assert ends[early] == "stopped"
    (rec,) = [r for r in recs if r["event"] == "recovery_started"]
    assert rec["mode"] == "relaunch" and rec["instances_started"] == 3


def test_only_ec2_terminations_count_as_notices(storage) -> None:
    scan = NoticeScan(storage)
    _notice(storage, "i-a", at=T0 + 10, source="signal", action="SIGTERM")  # spotrun's own shutdown?
    _notice(storage, "i-b", at=T0 + 10, action="rebalance")  # a hint, not a notice
    _notice(storage, "i-old", at=T0 - 3600)  # before the attempt (and the clock slack)
    assert scan.scan(T0) == {}
    _notice(storage, "i-c", at=T0 + 20)
    _notice(storage, "i-c", at=T0 + 15)
    assert scan.scan(T0) == {"i-c": T0 + 15}
    assert scan.scan(T0) == {"i-c": T0 + 15}  # nothing new read
