"""``--recovery replace`` on EC2, against moto (issue 22 item 3): a node lost from an N-node
attempt is replaced alone; the survivors keep running, billed as one segment each.

In-process like tests/test_launch_ec2_cluster.py (whose moto cloud and helpers these reuse):
the injected ``sleep`` acts on the world between polls, an injected clock makes times exact.
Every EC2 call that starts or ends instances is counted through botocore's event hooks.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
import test_launch_ec2_cluster
from helpers import FakePlacementGroups
from test_launch_ec2 import Lines, ScarceCapacity
from test_launch_ec2_cluster import FAST, HOME, T0, Cloud, cluster_file, controller, launcher_records, options

from spotrun.cost import report_for_run
from spotrun.launch.controller import Ec2Controller, Timing
from spotrun.launch.node import node_argv, read_cluster
from spotrun.launch.status import format_status, run_status
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

# The EC2 cluster tests' fixtures, defined there once (not in conftest.py: other files have a
# storage fixture of their own).
cloud = test_launch_ec2_cluster.cloud
storage = test_launch_ec2_cluster.storage


class Calls:
    """Every RunInstances / CreateFleet request, every id TerminateInstances was given, and
    the user data of every launch template."""

    def __init__(self, client: Any) -> None:
        self.run_instances = 0
        self.fleets: list[int] = []  # TotalTargetCapacity of each CreateFleet
        self.terminated: list[str] = []
        self.user_data: list[str] = []
        ev = client.meta.events
        ev.register("provide-client-params.ec2.CreateLaunchTemplate", lambda params, **_: self.user_data.append(
            base64.b64decode(params["LaunchTemplateData"]["UserData"]).decode()))
        ev.register("provide-client-params.ec2.RunInstances", lambda **_: self._run())
        ev.register("provide-client-params.ec2.CreateFleet", lambda params, **_: self.fleets.append(
            params["TargetCapacitySpecification"]["TotalTargetCapacity"]))
        ev.register("provide-client-params.ec2.TerminateInstances",
                    lambda params, **_: self.terminated.extend(params["InstanceIds"]))

    def _run(self) -> None:
        self.run_instances += 1


def _spot_notice_and_loss(cloud: Cloud, storage: Storage, iid: str, at: float) -> None:
    """The node's wrapper heard the notice at ``at``; then spot takes the instance."""
    Ledger(storage).notice_received(segment_id=iid, source="ec2", action="terminate", detected_at=at,
                                    notice_time=at - 1, deadline=at + 119)
    cloud.spot_interrupt(iid)


def test_one_node_lost_of_three_starts_exactly_one_and_keeps_two(cloud: Cloud, storage: Storage) -> None:
    calls = Calls(cloud.clients[HOME])
    FakePlacementGroups(cloud.clients[HOME])
    now = [T0]
    attempts: list[list[str]] = []
    specs: list[dict] = []
    status: list[str] = []

    def act(ctl: Ec2Controller) -> None:
        ids = [s.instance_id for s in ctl.state.running]
        spec = cluster_file(storage, ids[0])
        if specs and specs[-1]["segment"] == spec["segment"]:
            return
        attempts.append(ids)
        specs.append(spec)
        now[0] += 1000
        if len(attempts) == 1:
            assert calls.terminated == []
            _spot_notice_and_loss(cloud, storage, ids[1], at=now[0] - 100)
        else:
            # Every node of the new attempt has the same file, the survivors included.
            assert all(cluster_file(storage, i) == spec for i in ids)
            assert cloud.running(ctl.state.run_id) == sorted(ids)
            # status names the running attempt: the new one, of three nodes (two kept).
            status.append(format_status(run_status(storage, live=False)))
            storage.write_bytes("done.json", b"{}")
            for i in ids:
                cloud.shut_down(i)

    out = Lines()
    ctl = controller(cloud, storage, options(cloud, storage, nodes=3, placement_group=True), act, clock=now,
                     on_event=out)
    outcome = ctl.run()
    assert outcome.status == "finished" and ctl.state.interruptions == 1, out.getvalue()
    first, second = attempts
    lost, kept = first[1], [first[0], first[2]]
    (new,) = set(second) - set(first)
    assert second == [first[0], new, first[2]]  # the replacement in the lost node's slot

    # Exactly one instance asked for after the loss, none of the survivors terminated.
    assert calls.fleets == [3, 1] and calls.run_instances == 0
    assert not set(calls.terminated) & set(kept)
    req = cloud.fleets[HOME][1]
    (ov,) = req["LaunchTemplateConfigs"][0]["Overrides"]  # one type: g5.xlarge, the survivors' subnet
    assert ov["SubnetId"] == cloud.subnet and ov["Placement"] == {"GroupName": f"spotrun-{ctl.state.run_id}"}
    assert "MinTargetCapacity" not in req.get("SpotOptions", {})
    assert "keeping" in out.getvalue() and "asking for 1 replacement(s)" in out.getvalue()
    # The survivors stayed because their agents wait to rejoin, as user data tells them.
    (script,) = calls.user_data
    assert "-m spotrun.launch.node --rejoin-timeout 900 -- python train.py" in script

    # The next attempt's cluster file: new segment and rendezvous id, a later attempt
    # number, a survivor hosting the store; what the nodes make of it.
    a1, a2 = specs
    assert f"nodes      3 of 3 in attempt {a2['segment']}" in status[0], status[0]
    assert a2["segment"] != a1["segment"] and a2["rdzv_id"] != a1["rdzv_id"]
    assert a2["attempt"] == a1["attempt"] + 1 == 2 and a2["host"] == 0
    assert [n["instance_id"] for n in a2["nodes"]] == second
    argv = node_argv(read_cluster(storage, new), new, ["python", "train.py"])
    assert argv[argv.index("--rdzv-endpoint") + 1] == f"{cloud.instance(first[0]).private_ip}:29400"
    assert f"is_host=0,spotrun_slot={second.index(new)}" in argv  # the lost node's slot

    # The books: the survivors are one segment each (one start, one end), the lost node's
    # segment ended at the loss, the replacement is a segment of the new attempt.
    recs = launcher_records(storage)
    starts = [(r["segment_id"], r["group"], r["node"]) for r in recs if r["event"] == "segment_started"]
    assert sorted(starts) == sorted([(i, a1["segment"], n) for n, i in enumerate(first)] + [(new, a2["segment"], 1)])
    ends = {r["segment_id"]: r["reason"] for r in recs if r["event"] == "segment_ended"}
    assert ends == {lost: "interrupted", first[0]: "finished", first[2]: "finished", new: "finished"}
    (rec,) = [r for r in recs if r["event"] == "recovery_started"]
    assert (rec["segment_id"], rec["mode"], rec["lost"], rec["kept"], rec["instances_started"]) == (
        a2["segment"], "replace", [lost], kept, 1)
    assert rec["lost_at"] == T0 + 900 and rec["capacity_at"] == T0 + 1000  # the notice; the replacement up

    # The cost report prices each machine once, the survivors from their start to the end
    # of the attempt that finished (its last proof of life, as for the replacement).
    report = report_for_run(storage, offline=True)
    by_id = {s.segment_id: s for s in report.segments}
    assert by_id[new].start == T0 + 1000 and by_id[lost].end <= T0 + 1000
    for iid in kept:
        assert by_id[iid].start == T0 and by_id[iid].end == by_id[new].end >= T0 + 1000
    assert sum(1 for s in report.segments if s.segment_id in (*first, new)) == 4


def test_relaunch_mode_terminates_the_survivors_and_records_it(cloud: Cloud, storage: Storage) -> None:
    calls = Calls(cloud.clients[HOME])
    attempts: list[list[str]] = []

    def act(ctl: Ec2Controller) -> None:
        ids = [s.instance_id for s in ctl.state.running]
        if attempts and attempts[-1] == ids:
            return
        attempts.append(ids)
        if len(attempts) == 1:
            cloud.spot_interrupt(ids[1])
        else:
            storage.write_bytes("done.json", b"{}")
            for i in ids:
                cloud.shut_down(i)

    ctl = controller(cloud, storage, options(cloud, storage, nodes=3, recovery="relaunch"), act)
    assert ctl.run().status == "finished"
    first, second = attempts
    assert calls.fleets == [3, 3] and not set(first) & set(second)
    assert sorted(calls.terminated) == sorted([first[0], first[2]])
    (rec,) = [r for r in launcher_records(storage) if r["event"] == "recovery_started"]
    assert (rec["mode"], rec["lost"], rec["kept"], rec["instances_started"]) == ("relaunch", [first[1]], [], 3)
    (script,) = calls.user_data
    assert "-m spotrun.launch.node -- python train.py" in script and "--rejoin-timeout" not in script


@pytest.mark.parametrize("min_nodes", [2, None])
def test_no_replacement_capacity_goes_on_with_min_nodes_or_relaunches(
        cloud: Cloud, storage: Storage, min_nodes: int | None) -> None:
    """No capacity for the replacement within replace_wait_s: with --min-nodes 2 the two
    survivors go on alone (a cluster file of two, no instance started); without it they are
    terminated and every node is asked for again."""
    calls = Calls(cloud.clients[HOME])
    scarce = ScarceCapacity(cloud.clients[HOME], {})
    seen: list[dict] = []

    def act(ctl: Ec2Controller) -> None:
        running = ctl.state.running
        if not running:
            return
        spec = cluster_file(storage, running[0].instance_id)
        if seen and seen[-1]["segment"] == spec["segment"]:
            return
        seen.append(spec)
        if len(seen) == 1:
            scarce.scarce[("spot", "g5.xlarge")] = "InsufficientInstanceCapacity"
            scarce.scarce[("on-demand", "g5.xlarge")] = "InsufficientInstanceCapacity"
            cloud.spot_interrupt(running[2].instance_id)
        else:
            storage.write_bytes("done.json", b"{}")
            for s in running:
                cloud.shut_down(s.instance_id)

    timing = Timing(**{**FAST.__dict__, "replace_wait_s": 0.0, "capacity_timeout_s": 0.0})
    opts = options(cloud, storage, nodes=3, min_nodes=min_nodes, nproc_per_node=None)
    out = Lines()
    ctl = controller(cloud, storage, opts, act, timing=timing, on_event=out)
    if min_nodes is None:
        with pytest.raises(Exception, match="no spot capacity|no on-demand capacity"):
            ctl.run()
        first = [n["instance_id"] for n in seen[0]["nodes"]]
        # The survivors were terminated (not left waiting), then a whole attempt asked for.
        assert sorted(calls.terminated) == sorted(first[:2]) and calls.fleets[0] == 3 and 3 in calls.fleets[2:]
        assert "relaunching every node" in out.getvalue()
        assert [s.end_reason for s in ctl.state.segments] == ["interrupted"] * 3
        return
    assert ctl.run().status == "finished", out.getvalue()
    first, shrunk = seen
    assert [n["instance_id"] for n in shrunk["nodes"]] == [n["instance_id"] for n in first["nodes"][:2]]
    assert shrunk["segment"].endswith("-m") and shrunk["attempt"] == 2 and shrunk["min_nodes"] is None
    assert calls.terminated == [] and calls.fleets[0] == 3 and set(calls.fleets[1:]) == {1}
    (rec,) = [r for r in launcher_records(storage) if r["event"] == "recovery_started"]
    assert rec["instances_started"] == 0 and rec["kept"] == [n["instance_id"] for n in first["nodes"][:2]]
    assert "going on with the 2 survivor(s) (--min-nodes 2)" in out.getvalue()
