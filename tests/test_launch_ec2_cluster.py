"""The EC2 controller at cluster scale, against moto: N-node attempts, a node lost -> all N
relaunched, elastic --min-nodes, region failover, --max-cost / --max-wait, --resume of a
multi-node run. In-process and synchronous like tests/test_launch_ec2.py: the injected
``sleep`` acts on the world between polls, an injected clock makes prices and waits exact.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from helpers import FakePlacementGroups
from moto import mock_aws
from moto.backends import get_backend
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models.instances import StateReason
from test_launch_ec2 import Lines, ScarceCapacity

from spotrun.cli import main
from spotrun.cost import report_for_run
from spotrun.errors import CapacityError
from spotrun.launch.controller import Ec2Controller, Ec2Options, Timing
from spotrun.launch.ec2 import RUN_ID_TAG, Ec2Api
from spotrun.launch.node import node_argv, read_cluster
from spotrun.launch.status import format_status, run_status, stop_run
from spotrun.records.instance import InstanceInfo
from spotrun.records.launch_state import load_state
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

HOME, OTHER = "us-east-1", "us-west-2"
AMI = "ami-0123456789abcdef0"  # moto does not check it; listing its images takes seconds
FAST = Timing(poll_s=0.0, capacity_retry_s=0.0, spot_wait_s=0.0, capacity_timeout_s=0.0,
              finish_grace_s=0.0, missing_grace_s=0.0, cleanup_wait_s=0.0)
T0 = 1_800_000_000.0


class Cloud:
    """moto's EC2 in two regions: a VPC with one subnet at home, the default VPC elsewhere."""

    def __init__(self) -> None:
        self.clients = {r: boto3.client("ec2", region_name=r) for r in (HOME, OTHER)}
        c = self.clients[HOME]
        vpc = c.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        self.subnet = c.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24",
                                      AvailabilityZone="us-east-1b")["Subnet"]["SubnetId"]
        self.fleets: dict[str, list[dict]] = {r: [] for r in self.clients}
        for region, client in self.clients.items():
            client.meta.events.register(
                "provide-client-params.ec2.CreateFleet",
                lambda params, _r=region, **_: self.fleets[_r].append(json.loads(json.dumps(params))))
        self.apis = {r: Ec2Api(c) for r, c in self.clients.items()}

    def instance(self, iid: str) -> Any:
        for region in self.clients:
            for inst in get_backend("ec2")[DEFAULT_ACCOUNT_ID][region].all_instances():
                if inst.id == iid:
                    return inst
        raise KeyError(iid)

    def spot_interrupt(self, iid: str) -> None:
        inst = self.instance(iid)
        inst.terminate()
        inst.state_reason = StateReason("Server.SpotInstanceTermination: x", "Server.SpotInstanceTermination")

    def shut_down(self, iid: str) -> None:
        """What a node does after its command: shutdown (which terminates it)."""
        inst = self.instance(iid)
        inst.terminate()
        inst.state_reason = StateReason("Client.InstanceInitiatedShutdown: x", "Client.InstanceInitiatedShutdown")

    def running(self, run_id: str, region: str = HOME) -> list[str]:
        resp = self.clients[region].describe_instances(Filters=[
            {"Name": f"tag:{RUN_ID_TAG}", "Values": [run_id]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]}])
        return sorted(i["InstanceId"] for r in resp["Reservations"] for i in r["Instances"])

    def templates(self, region: str) -> list[str]:
        return [t["LaunchTemplateId"] for t in self.clients[region].describe_launch_templates()["LaunchTemplates"]]


@pytest.fixture()
def cloud(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[Cloud]:
    monkeypatch.setenv("SPOTRUN_CACHE_DIR", str(tmp_path / "cache"))
    with mock_aws():
        yield Cloud()


@pytest.fixture()
def storage(tmp_path: Any) -> Storage:
    return Storage(str(tmp_path / "run"))


def options(cloud: Cloud, storage: Storage, **kw: Any) -> Ec2Options:
    base: dict[str, Any] = {"run_url": storage.url, "command": ["python", "train.py"],
                            "instance_types": ["g5.xlarge"], "region": HOME, "subnets": [cloud.subnet],
                            "ami": AMI, "nodes": 2, "nproc_per_node": 4}
    base.update(kw)
    return Ec2Options(**base)


def controller(cloud: Cloud, storage: Storage, opts: Ec2Options, act: Callable[[Ec2Controller], None],
               clock: list[float] | None = None, **kw: Any) -> Ec2Controller:
    ctl = Ec2Controller.start(storage, cloud.apis[HOME], opts, timing=kw.pop("timing", FAST),
                              api_for=cloud.apis.__getitem__, **kw)
    ctl.sleep = lambda _s: act(ctl)
    if clock is not None:
        ctl.clock = lambda: clock[0]
    return ctl


def gmt(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S GMT", time.gmtime(t))


def launcher_records(storage: Storage) -> list[dict]:
    return [r for r in Ledger(storage).records() if r.get("source") == "launcher"]


def cluster_file(storage: Storage, iid: str) -> dict:
    return json.loads(storage.read_bytes(f"launch/nodes/{iid}.json"))


def test_two_nodes_one_lost_all_relaunched_ledger_and_cost(cloud: Cloud, storage: Storage) -> None:
    pgs = FakePlacementGroups(cloud.clients[HOME])
    now = [T0]
    seen: list[list[str]] = []
    clusters: list[dict] = []
    status_text: list[str] = []

    def act(ctl: Ec2Controller) -> None:
        ids = [s.instance_id for s in ctl.state.running]
        if not seen or seen[-1] != ids:
            seen.append(ids)
            # Exactly the attempt's nodes run; each has its cluster file (same content).
            assert cloud.running(ctl.state.run_id) == sorted(ids)
            files = [cluster_file(storage, i) for i in ids]
            assert all(f == files[0] for f in files)
            clusters.append(files[0])
            if len(seen) == 1:
                # Rank 0's wrapper: it resumed, committed at +600, ran to +990 (node 1 writes nothing).
                led, sid = Ledger(storage), ids[0]
                led.segment_started(segment_id=sid, instance=InstanceInfo(), started_at=now[0] + 60, source="wrapper")
                led.training_resumed(segment_id=sid, step=0, process_started_at=now[0] + 60,
                                     first_step_at=now[0] + 100)
                led.checkpoint_committed(segment_id=sid, step=50, committed_at=now[0] + 600, stall_s=1.0,
                                         save_s=2.0, nbytes=10, captured_at=now[0] + 596)
                led.segment_ended(segment_id=sid, reason="interrupted", ended_at=now[0] + 990, source="wrapper",
                                  steps_done=80, last_step_at=now[0] + 990)
                now[0] += 1000
                cloud.spot_interrupt(ids[1])  # node 1 vanishes at +995; node 0 still runs
                cloud.instance(ids[1])._reason = f"Service initiated ({gmt(now[0] - 5)})"
            else:
                status_text.append(format_status(run_status(storage, live=False)))
                now[0] += 1000
                storage.write_bytes("done.json", b"{}")
                for i in ids:
                    cloud.shut_down(i)

    ctl = controller(cloud, storage, options(cloud, storage, placement_group=True, recovery="relaunch"), act,
                     clock=now)
    outcome = ctl.run()
    assert outcome.status == "finished" and outcome.exit_code == 0
    assert outcome.interruptions == 1 and ctl.state.interruptions == 1
    first, second = seen
    assert len(first) == len(second) == 2 and not set(first) & set(second)

    # One request per attempt: 2 instances of one pool (one subnet), in the placement group.
    reqs = cloud.fleets[HOME]
    assert len(reqs) == 2
    for req in reqs:
        assert req["TargetCapacitySpecification"]["TotalTargetCapacity"] == 2
        (ov,) = req["LaunchTemplateConfigs"][0]["Overrides"]
        assert ov["SubnetId"] == cloud.subnet and ov["Placement"] == {"GroupName": f"spotrun-{ctl.state.run_id}"}
        assert req["SpotOptions"]["MinTargetCapacity"] == 2
    # The group was created once and deleted at the end, as the template.
    assert [op for op, _ in pgs.requests] == ["CreatePlacementGroup", "DeletePlacementGroup"] and pgs.groups == {}
    assert cloud.templates(HOME) == [] and ctl.state.placement_groups == {}

    # Cluster files: nodes sorted by instance id (node 0 = head), private addresses, per attempt.
    for ids, spec in zip(seen, clusters, strict=False):
        assert [n["instance_id"] for n in spec["nodes"]] == sorted(ids)
        addrs = [n["address"] for n in spec["nodes"]]
        assert all(a.startswith("10.0.1.") for a in addrs) and len(set(addrs)) == 2
        assert addrs == [cloud.instance(i).private_ip for i in sorted(ids)]
        assert spec["nproc_per_node"] == 4 and spec["port"] == 29400 and spec["min_nodes"] is None
    assert clusters[0]["segment"] != clusters[1]["segment"]
    # What a node makes of its file: torchrun on 2 nodes, rendezvous at node 0's address.
    head = clusters[1]["nodes"][0]["address"]
    argv = node_argv(read_cluster(storage, second[1]), second[1], ["python", "train.py"])
    assert argv[argv.index("--rdzv-endpoint") + 1] == f"{head}:29400"
    assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--nproc-per-node") + 1] == "4"
    assert clusters[0]["rdzv_id"] != clusters[1]["rdzv_id"]

    # Ledger: every node its own segment, started and ended, with the attempt's group and rank.
    recs = launcher_records(storage)
    starts = sorted((r["group"], r["node"], r["segment_id"], r["instance"]["region"]) for r in recs
                    if r["event"] == "segment_started")
    g1, g2 = clusters[0]["segment"], clusters[1]["segment"]
    assert [(s[2], s[0], s[1], s[3]) for s in starts] == [(first[0], g1, 0, HOME), (first[1], g1, 1, HOME),
                      (second[0], g2, 0, HOME), (second[1], g2, 1, HOME)]
    ends = {r["segment_id"]: (r["reason"], r["ended_at"]) for r in recs if r["event"] == "segment_ended"}
    assert {i: e[0] for i, e in ends.items()} == {first[0]: "interrupted", first[1]: "interrupted",
                                                  second[0]: "finished", second[1]: "finished"}
    # The survivor was terminated by the controller, at the poll that saw its peer gone.
    assert ends[first[0]][1] == T0 + 1000
    assert cloud.instance(first[0]).state == "terminated"
    assert "terminated by spotrun: node 1" in (ctl.state.segments[0].detail or "")

    # The cost report prices 2N segments; the lost work of attempt 1 counts both nodes.
    # (Counted on the machines: the launcher's recovery_started record, under the next
    # attempt's id, is no segment; the books branch teaches the report to skip it.)
    report = report_for_run(storage, offline=True)
    machines = [s for s in report.segments if s.segment_id in {*first, *second}]
    assert len({s.group for s in machines}) == 2 and len(machines) == 4
    assert all(s.price is not None for s in machines)
    by_id = {s.segment_id: s for s in report.segments}
    assert by_id[first[0]].lost_work_s == pytest.approx(990 - 596)
    assert by_id[first[1]].lost_work_s == pytest.approx(by_id[first[0]].lost_work_s)

    # status while attempt 2 ran: both nodes with their EC2 state.
    (text,) = status_text
    assert f"nodes      2 of 2 in attempt {g2}" in text
    assert f"node 0: {second[0]}" in text and f"node 1: {second[1]}" in text
    assert "2 of 2" in text and f"node 1 of {g1}" in text  # the segment list names rank and attempt


def test_three_nodes_elastic_min_two_then_grows_back(cloud: Cloud, storage: Storage) -> None:
    """A pool gives 2 of 3 (>= --min-nodes 2): the attempt runs on 2; after an interruption
    the next attempt asks for 3 again and gets them."""
    short = [True]

    def partial(parsed: dict, **_: Any) -> None:
        if not short[0]:
            return
        short[0] = False
        item = parsed["Instances"][0]
        ids = [i for it in parsed["Instances"] for i in it["InstanceIds"]]
        cloud.instance(ids[2]).terminate()  # AWS never launched it
        parsed["Instances"] = [{**item, "InstanceIds": ids[:2]}]
        parsed["Errors"] = [{"LaunchTemplateAndOverrides": item["LaunchTemplateAndOverrides"], "Lifecycle": "spot",
                             "ErrorCode": "InsufficientInstanceCapacity", "ErrorMessage": "partial (injected)"}]

    cloud.clients[HOME].meta.events.register("after-call.ec2.CreateFleet", partial)
    seen: list[dict] = []

    def act(ctl: Ec2Controller) -> None:
        ids = [s.instance_id for s in ctl.state.running]
        spec = cluster_file(storage, ids[0])
        if seen and seen[-1]["segment"] == spec["segment"]:
            return
        seen.append(spec)
        if len(seen) == 1:
            cloud.spot_interrupt(ids[0])  # the head goes this time
        else:
            storage.write_bytes("done.json", b"{}")

    opts = options(cloud, storage, nodes=3, min_nodes=2, nproc_per_node=None, recovery="relaunch")
    out = Lines()
    ctl = controller(cloud, storage, opts, act, on_event=out)
    assert ctl.run().status == "finished"
    assert [len(s["nodes"]) for s in seen] == [2, 3]
    assert seen[0]["min_nodes"] is None and seen[1]["nproc_per_node"] == 1
    for req in cloud.fleets[HOME]:
        assert req["TargetCapacitySpecification"]["TotalTargetCapacity"] == 3
        assert req["SpotOptions"]["MinTargetCapacity"] == 2
    assert "2 of --nodes 3" in out.getvalue()
    groups = [s.group for s in ctl.state.segments]
    assert len(groups) == 5 and len(set(groups)) == 2
    assert [s.end_reason for s in ctl.state.segments] == ["interrupted"] * 2 + ["finished"] * 3
    assert ctl.state.interruptions == 1


def test_region_failover_before_on_demand_and_back_home(cloud: Cloud, storage: Storage) -> None:
    """No spot in the home region: the next region's spot, not on-demand; the ledger records
    the region; after an interruption capacity is back home. Templates go in both regions."""
    scarce = ScarceCapacity(cloud.clients[HOME], {("spot", "g5.xlarge"): "InsufficientInstanceCapacity",
                                                  ("spot", "g6.xlarge"): "InsufficientInstanceCapacity"})
    seen: list[str] = []

    def act(ctl: Ec2Controller) -> None:
        cur = ctl.state.current
        if seen and seen[-1] == cur.instance_id:
            return
        seen.append(cur.instance_id)
        if len(seen) == 1:
            assert cur.region == OTHER and cloud.running(ctl.state.run_id, OTHER) == [cur.instance_id]
            assert sorted(ctl.state.launch_templates) == [HOME, OTHER]
            scarce.scarce.clear()
            cloud.spot_interrupt(cur.instance_id)
        else:
            storage.write_bytes("done.json", b"{}")

    out = Lines()
    opts = options(cloud, storage, nodes=1, nproc_per_node=None, instance_types=["g5.xlarge", "g6.xlarge"],
                   regions=[HOME, OTHER], ami=None, amis={HOME: AMI, OTHER: AMI})
    ctl = controller(cloud, storage, opts, act, on_event=out)
    assert ctl.run().status == "finished"
    assert [s.region for s in ctl.state.segments] == [OTHER, HOME]
    assert [s.market for s in ctl.state.segments] == ["spot", "spot"]
    assert [m for m, _ in scarce.requests] == ["spot", "spot"]  # home twice, never on-demand
    (west,) = cloud.fleets[OTHER]
    # Outside home: no --subnets (the default VPC), both types in one request.
    assert sorted(o["InstanceType"] for o in west["LaunchTemplateConfigs"][0]["Overrides"]) == [
        "g5.xlarge", "g6.xlarge"]
    assert all("SubnetId" not in o for o in west["LaunchTemplateConfigs"][0]["Overrides"])
    assert f"no spot capacity in any pool of {HOME}; trying {OTHER}" in out.getvalue()
    starts = [r["instance"]["region"] for r in launcher_records(storage) if r["event"] == "segment_started"]
    assert starts == [OTHER, HOME]
    assert "group" not in launcher_records(storage)[0]  # single-node records unchanged
    assert cloud.templates(HOME) == [] and cloud.templates(OTHER) == []
    report = report_for_run(storage, offline=True)
    assert report.regions() == [OTHER, HOME]


def test_max_cost_stops_like_stop_and_resume_raises_it(cloud: Cloud, storage: Storage) -> None:
    now = [T0]

    def act(ctl: Ec2Controller) -> None:
        now[0] += 600.0  # ten minutes per poll

    opts = options(cloud, storage, max_cost_usd=1.0)
    ctl = controller(cloud, storage, opts, act, clock=now)
    outcome = ctl.run()
    assert outcome.status == "stopped" and outcome.exit_code == 1
    assert "--max-cost 1.00" in outcome.message
    assert f"spotrun launch --resume {storage.url} --max-cost" in outcome.message
    state = load_state(storage)
    assert state.status == "stopped" and cloud.running(state.run_id) == []
    assert {s.end_reason for s in state.segments} == {"stopped"} and len(state.segments) == 2
    spent = report_for_run(storage, offline=True).totals()["cost_usd"]
    # Stopped on time: at the first pricing at or past the limit (10-minute polls, 2 nodes).
    per_poll = spent / ((state.segments[0].ended_at - T0) / 600.0)
    assert 1.0 <= spent < 1.0 + per_poll + 1e-9
    lim = run_status(storage, live=False)["limits"]
    assert lim["max_cost_usd"] == 1.0 and lim["spent_usd"] == pytest.approx(spent)
    assert any("max cost" in line for line in lim["text"])

    # Raised on --resume: it launches again (no stray of the old attempt) and finishes.
    fleets_before = len(cloud.fleets[HOME])

    def finish(ctl2: Ec2Controller) -> None:
        assert len(cloud.running(ctl2.state.run_id)) == 2
        storage.write_bytes("done.json", b"{}")

    ctl2 = Ec2Controller.resume(storage, cloud.apis[HOME], max_cost_usd=50.0, timing=FAST,
                                api_for=cloud.apis.__getitem__)
    ctl2.sleep = lambda _s: finish(ctl2)
    ctl2.clock = lambda: now[0]
    assert ctl2.run().status == "finished"
    assert len(cloud.fleets[HOME]) == fleets_before + 1
    assert load_state(storage).options["max_cost_usd"] == 50.0


def test_max_wait_gives_up_and_resume_keeps_counting(cloud: Cloud, storage: Storage) -> None:
    """No capacity anywhere (spot and on-demand, both regions): the wait clock starts at the
    first empty round, survives a dead controller, and ends the run at --max-wait."""
    for client in cloud.clients.values():
        ScarceCapacity(client, {(m, "g5.xlarge"): "InsufficientInstanceCapacity" for m in ("spot", "on-demand")})
    now = [T0]

    class Died(BaseException):
        pass

    def die(_ctl: Ec2Controller) -> None:
        raise Died

    timing = Timing(poll_s=0, capacity_retry_s=1200, spot_wait_s=0, finish_grace_s=0, missing_grace_s=0)
    opts = options(cloud, storage, nodes=1, nproc_per_node=None, regions=[HOME, OTHER], ami=None,
                   amis={HOME: AMI, OTHER: AMI}, max_wait_s=3600.0)
    ctl = controller(cloud, storage, opts, die, clock=now, timing=timing)
    with pytest.raises(Died):
        ctl.run()
    state = load_state(storage)
    assert state.waiting_since == T0 and state.segments == []
    # Spot in both regions, then on-demand in both: one full round.
    assert [len(cloud.fleets[r]) for r in (HOME, OTHER)] == [2, 2]
    now[0] += 1800
    lim = run_status(storage, live=False)["limits"]
    # (status counts to the real now, before the injected T0: the wait shows, at 0s.)
    assert any(line.startswith("max wait   1h; waiting for capacity") for line in lim["text"]), lim

    def later(_ctl: Ec2Controller) -> None:
        now[0] += 1200

    ctl2 = Ec2Controller.resume(storage, cloud.apis[HOME], timing=timing, api_for=cloud.apis.__getitem__)
    ctl2.sleep = lambda _s: later(ctl2)
    ctl2.clock = lambda: now[0]
    outcome = ctl2.run()
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert "--max-wait 1h" in outcome.message and "--resume" in outcome.message
    # Resumed at T0+1800, a round every 1200 s: the first empty round past the hour is at
    # T0+4200, counted from T0 (from the resume it would be T0+5400).
    assert now[0] == T0 + 4200
    state = load_state(storage)
    assert state.status == "failed" and cloud.templates(HOME) == [] and cloud.templates(OTHER) == []


def test_no_max_wait_keeps_the_capacity_error(cloud: Cloud, storage: Storage) -> None:
    ScarceCapacity(cloud.clients[HOME], {("spot", "g5.xlarge"): "InsufficientInstanceCapacity"})
    ctl = controller(cloud, storage, options(cloud, storage, fallback="none"), lambda c: None)
    with pytest.raises(CapacityError, match=r"g5.xlarge@subnet-"):
        ctl.run()


class ControllerDied(BaseException):
    pass


def _die(_ctl: Ec2Controller) -> None:
    raise ControllerDied


def test_resume_multi_node_adopts_or_replaces_without_duplicates(cloud: Cloud, storage: Storage) -> None:
    ctl = controller(cloud, storage, options(cloud, storage, recovery="relaunch"), _die)
    with pytest.raises(ControllerDied):
        ctl.run()
    run_id = ctl.state.run_id
    nodes = cloud.running(run_id)
    assert len(nodes) == 2 and len(cloud.fleets[HOME]) == 1
    storage.remove(f"launch/nodes/{nodes[1]}.json")  # as if it died before writing them all

    # 1. Both nodes alive: adopted, no new request; cluster files back.
    seen: list[list[str]] = []

    def watch(c: Ec2Controller) -> None:
        seen.append(cloud.running(run_id))
        raise ControllerDied

    ctl2 = Ec2Controller.resume(storage, cloud.apis[HOME], timing=FAST, api_for=cloud.apis.__getitem__)
    ctl2.sleep = lambda _s: watch(ctl2)
    with pytest.raises(ControllerDied):
        ctl2.run()
    assert seen == [nodes] and len(cloud.fleets[HOME]) == 1
    assert cluster_file(storage, nodes[1]) == cluster_file(storage, nodes[0])

    # 2. One node gone while nobody watched: the other is terminated, a full new attempt.
    cloud.spot_interrupt(nodes[0])
    later: list[list[str]] = []

    def finish(c: Ec2Controller) -> None:
        later.append(cloud.running(run_id))
        storage.write_bytes("done.json", b"{}")

    ctl3 = Ec2Controller.resume(storage, cloud.apis[HOME], timing=FAST, api_for=cloud.apis.__getitem__)
    ctl3.sleep = lambda _s: finish(ctl3)
    assert ctl3.run().status == "finished"
    assert len(cloud.fleets[HOME]) == 2
    (fresh,) = later
    assert len(fresh) == 2 and not set(fresh) & set(nodes)
    assert cloud.instance(nodes[1]).state == "terminated"
    ends = [(r["segment_id"], r["reason"]) for r in launcher_records(storage) if r["event"] == "segment_ended"]
    assert ends[:2] == [(nodes[0], "interrupted"), (nodes[1], "interrupted")]


def test_resume_adopts_nodes_launched_before_the_state_was_written(cloud: Cloud, storage: Storage) -> None:
    ctl = controller(cloud, storage, options(cloud, storage), lambda c: None)

    def crash(*_a: Any, **_k: Any) -> None:
        raise ControllerDied

    ctl.book.begin_many = crash  # type: ignore[method-assign]
    with pytest.raises(ControllerDied):
        ctl.run()
    orphans = cloud.running(ctl.state.run_id)
    assert len(orphans) == 2 and load_state(storage).running == []

    ctl2 = Ec2Controller.resume(storage, cloud.apis[HOME], timing=FAST, api_for=cloud.apis.__getitem__)
    ctl2.sleep = lambda _s: storage.write_bytes("done.json", b"{}")
    assert ctl2.run().status == "finished"
    assert len(cloud.fleets[HOME]) == 1  # nothing new requested
    assert sorted(s.instance_id for s in ctl2.state.segments) == orphans
    assert [s.node for s in ctl2.state.segments] == [0, 1]
    assert cluster_file(storage, orphans[0])["nodes"][0]["instance_id"] == orphans[0]


@pytest.mark.parametrize(("argv", "needle"), [
    (["--nodes", "2", "--min-nodes", "3"], "--min-nodes 3 is more than --nodes 2"),
    (["--nodes", "2", "--nproc-per-node", "0"], "--nproc-per-node"),
    (["--regions", ","], "--regions is empty"),
    (["--region", "eu-west-1", "--regions", "us-east-1,us-west-2"], "disagree"),
    (["--regions", "us-east-1,us-west-2", "--ami", "ami-0123"], "one per region"),
    (["--regions", "us-east-1,us-west-2", "--ami", "us-east-1=ami-1"], "one AMI for each region"),
    (["--max-cost", "0"], "--max-cost"),
    (["--max-wait", "soon"], "--max-wait"),
])
def test_cli_refuses_nonsense_in_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Ec2Api, "for_region", lambda *_a: pytest.fail("no EC2 client for a refused launch"))
    try:
        code = main(["launch", "--run-url", "s3://b/x", "--instance-types", "g5.xlarge", *argv,
                     "--", "python", "t.py"])
    except SystemExit as exc:  # argparse's own refusal (a bad number): usage line + one error line
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) <= 2


@pytest.mark.slow  # status and stop build boto3 sessions per region (seconds on a loaded machine)
def test_stop_terminates_every_node_in_the_region_used(cloud: Cloud, storage: Storage) -> None:
    """A 2-node attempt that failed over to the second region, its controller gone:
    ``status`` lists both nodes there, ``stop`` terminates both and closes both segments."""
    ScarceCapacity(cloud.clients[HOME], {("spot", "g5.xlarge"): "InsufficientInstanceCapacity"})
    opts = options(cloud, storage, regions=[HOME, OTHER], ami=None, amis={HOME: AMI, OTHER: AMI})
    ctl = controller(cloud, storage, opts, _die)
    with pytest.raises(ControllerDied):
        ctl.run()
    nodes = cloud.running(ctl.state.run_id, OTHER)
    assert len(nodes) == 2 and cloud.running(ctl.state.run_id, HOME) == []

    st = run_status(storage, live=True)
    assert [n["instance_id"] for n in st["attempt"]["nodes"]] == nodes
    assert [n["state"] for n in st["attempt"]["nodes"]] == ["running", "running"]
    assert {n["region"] for n in st["attempt"]["nodes"]} == {OTHER}
    assert {s["region"] for s in st["segments"]} == {OTHER} and {s["node"] for s in st["segments"]} == {0, 1}

    result = stop_run(storage, wait_s=0, sleep=lambda _s: None)
    assert sorted(result["terminated"]) == nodes
    assert cloud.running(ctl.state.run_id, OTHER) == []
    state = load_state(storage)
    assert state.status == "stopped" and state.running == []
    ends = sorted(r["segment_id"] for r in launcher_records(storage)
                  if r["event"] == "segment_ended" and r["reason"] == "stopped")
    assert ends == nodes


def test_a_state_written_before_clusters_still_loads(cloud: Cloud, storage: Storage) -> None:
    """No group/node/region on segments, one launch_template_id: a resumed controller reads it
    as the home region's and relaunches single-node as before."""
    ctl = controller(cloud, storage, options(cloud, storage, nodes=1, nproc_per_node=None), _die)
    with pytest.raises(ControllerDied):
        ctl.run()
    raw = json.loads(storage.read_bytes("launch/state.json"))
    for key in ("launch_templates", "placement_groups", "waiting_since"):
        raw.pop(key)
    for seg in raw["segments"]:
        for key in ("group", "node", "region"):
            seg.pop(key)
    for key in ("nodes", "nproc_per_node", "min_nodes", "placement_group", "regions", "amis",
                "max_cost_usd", "max_wait_s"):
        raw["options"].pop(key)
    storage.write_bytes("launch/state.json", json.dumps(raw).encode())
    (iid,) = cloud.running(ctl.state.run_id)
    cloud.spot_interrupt(iid)

    ctl2 = Ec2Controller.resume(storage, cloud.apis[HOME], timing=FAST)
    assert ctl2.state.launch_templates == {HOME: raw["launch_template_id"]}
    ctl2.sleep = lambda _s: storage.write_bytes("done.json", b"{}")
    assert ctl2.run().status == "finished"
    assert [s.end_reason for s in ctl2.state.segments] == ["interrupted", "finished"]
    assert [s.region for s in ctl2.state.segments] == [None, HOME]
    assert cloud.templates(HOME) == []


def test_a_failed_node_fails_the_attempt_once_then_ctrl_c_terminates_every_node(
        cloud: Cloud, storage: Storage) -> None:
    """Node 1's command exits 1 (its exit record) while node 0 runs: one failure for the
    attempt, both segments failed, node 0 terminated, a new attempt. Ctrl-C then ends both."""
    seen: list[list[str]] = []

    def act(ctl: Ec2Controller) -> None:
        ids = [s.instance_id for s in ctl.state.running]
        if seen and seen[-1] == ids:
            return
        seen.append(ids)
        if len(seen) == 1:
            storage.write_bytes(f"launch/exit-{ids[1]}.json", json.dumps({"exit_code": 1}).encode())
            cloud.shut_down(ids[1])
        else:
            raise KeyboardInterrupt

    out = Lines()
    ctl = controller(cloud, storage, options(cloud, storage, max_failures=1), act, on_event=out,
                     on_ctrl_c="terminate")
    outcome = ctl.run()
    assert outcome.status == "stopped" and outcome.exit_code == 130
    first, second = seen
    assert ctl.state.failures == 1 and ctl.state.interruptions == 0
    assert [(s.instance_id, s.end_reason) for s in ctl.state.segments] == [
        (first[0], "failed"), (first[1], "failed"), (second[0], "stopped"), (second[1], "stopped")]
    assert ctl.state.segments[1].exit_code == 1 and "exited with code 1" in (ctl.state.segments[1].detail or "")
    assert cloud.running(ctl.state.run_id) == []
    assert f"terminated {', '.join(sorted(second))}" in out.getvalue()
