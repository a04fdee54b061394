"""The EC2 layer for N-node segments, against moto: one fleet request for N nodes of one pool,
partial fills, cluster placement groups, many instances per poll, two regions side by side.

Every request is checked against botocore's EC2 service model (botocore validates before
sending, and :func:`valid` checks the captured parameters again explicitly), so a shape AWS
would refuse fails here even where moto is lenient. moto 5 does not implement placement
groups at all: :class:`FakePlacementGroups` answers those three calls at botocore's
``before-call`` hook, after botocore has validated the request, with AWS's error codes.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.session
import botocore.validate
import pytest
from helpers import FakePlacementGroups
from moto import mock_aws
from moto.backends import get_backend
from moto.core import DEFAULT_ACCOUNT_ID

import spotrun.launch.ec2 as ec2mod
from spotrun.errors import ConfigError, LaunchError
from spotrun.launch.ec2 import (
    PARTIAL_CAPACITY,
    RUN_ID_TAG,
    Ec2Api,
    Pool,
    placement_group_name,
)

REGION = "us-east-1"
_MODEL = botocore.session.get_session().get_service_model("ec2")


def valid(operation: str, params: dict) -> None:
    report = botocore.validate.ParamValidator().validate(params, _MODEL.operation_model(operation).input_shape)
    assert not report.has_errors(), report.generate_report()


class Net:
    """One region's VPC with one subnet, an AMI and a launch template, on one Ec2Api."""

    def __init__(self, region: str, run_id: str = "r1", *, for_region: bool = False) -> None:
        self.region = region
        # for_region builds a fresh boto3 session (seconds to load EC2's model on a busy CI
        # machine); the default session's client shares one loaded model.
        self.api = Ec2Api.for_region(region) if for_region else Ec2Api(boto3.client("ec2", region_name=region))
        self.client = self.api.client
        vpc = self.client.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
        self.cidr = ipaddress.ip_network("10.1.7.0/24")
        self.subnet = self.client.create_subnet(VpcId=vpc, CidrBlock=str(self.cidr),
                                                AvailabilityZone=f"{region}a")["Subnet"]["SubnetId"]
        # Any id does: moto does not check it, and listing moto's images takes seconds.
        self.ami = "ami-0123456789abcdef0"
        self.run_id = run_id
        self.template = self.api.create_launch_template(run_id=run_id, ami=self.ami, user_data="#!/bin/bash\n",
                                                        iam_instance_profile=None)
        self.calls: list[tuple[str, dict]] = []
        for op in ("CreateFleet", "DescribeInstances", "TerminateInstances"):
            self.client.meta.events.register(
                f"provide-client-params.ec2.{op}",
                lambda params, _op=op, **_: self.calls.append((_op, json.loads(json.dumps(params)))))

    @property
    def backend(self) -> Any:
        return get_backend("ec2")[DEFAULT_ACCOUNT_ID][self.region]

    def fleets(self) -> list[dict]:
        return [p for op, p in self.calls if op == "CreateFleet"]

    def alive(self) -> list[str]:
        return [s.instance_id for s in self.api.find_run_instances(self.run_id, states=("pending", "running"))]


@pytest.fixture()
def net() -> Iterator[Net]:
    with mock_aws():
        yield Net(REGION)


@pytest.mark.parametrize(("count", "market", "max_price"), [(2, "spot", 0.5), (3, "on-demand", None)])
def test_one_request_for_n_nodes_of_one_pool(net: Net, count: int, market: str, max_price: float | None) -> None:
    pool = Pool("g5.12xlarge", net.subnet)
    result = net.api.create_fleet(run_id="r1", template_id=net.template, pools=[pool], market=market,
                                  max_price=max_price, client_token="tok-1", count=count,
                                  placement_group="spotrun-r1")
    (req,) = net.fleets()
    valid("CreateFleet", req)
    assert req["TargetCapacitySpecification"] == {"TotalTargetCapacity": count, "DefaultTargetCapacityType": market}
    (cfg,) = req["LaunchTemplateConfigs"]
    assert cfg["LaunchTemplateSpecification"] == {"LaunchTemplateId": net.template, "Version": "$Latest"}
    expected_override: dict[str, Any] = {"InstanceType": "g5.12xlarge", "SubnetId": net.subnet,
                                         "Placement": {"GroupName": "spotrun-r1"}}
    opts_key = "SpotOptions" if market == "spot" else "OnDemandOptions"
    assert (("OnDemandOptions" if market == "spot" else "SpotOptions") not in req)
    opts = req[opts_key]
    # All or nothing at EC2: one type, one zone, and no launch below the minimum.
    assert opts["SingleInstanceType"] is True and opts["SingleAvailabilityZone"] is True
    assert opts["MinTargetCapacity"] == count
    if max_price is not None:
        expected_override["MaxPrice"] = "0.5000"  # per instance
        assert opts["MaxTotalPrice"] == f"{max_price * count:.4f}"  # the whole fleet's hour
    assert cfg["Overrides"] == [expected_override]
    assert req["ClientToken"] == "tok-1"
    tags = {spec["ResourceType"]: spec["Tags"] for spec in req["TagSpecifications"]}
    assert {"Key": RUN_ID_TAG, "Value": "r1"} in tags["instance"]
    assert {"Key": "spotrun:market", "Value": market} in tags["instance"]

    assert len(result.instances) == count and not result.errors and result.fleet_id
    assert {i.pool for i in result.instances} == {pool}
    assert {i.market for i in result.instances} == {market}
    assert not result.short_of(count) and result.short_of(count + 1)
    assert sorted(net.alive()) == sorted(result.instance_ids)

    # describe_many: one call for every node, private addresses in the one subnet.
    before = len(net.calls)
    seen = net.api.describe_many(result.instance_ids)
    assert [op for op, _ in net.calls[before:]] == ["DescribeInstances"]
    valid("DescribeInstances", net.calls[-1][1])
    assert list(seen) == result.instance_ids
    assert {s.subnet_id for s in seen.values()} == {net.subnet}
    assert {s.availability_zone for s in seen.values()} == {f"{REGION}a"}
    ips = [s.private_ip for s in seen.values()]
    assert all(ip and ipaddress.ip_address(ip) in net.cidr for ip in ips) and len(set(ips)) == count


def test_single_instance_request_is_unchanged_and_n_nodes_need_one_pool(net: Net) -> None:
    pools = [Pool("g5.xlarge", net.subnet), Pool("g6.xlarge", net.subnet)]
    net.api.create_fleet(run_id="r1", template_id=net.template, pools=pools, market="spot", max_price=0.25)
    (req,) = net.fleets()
    valid("CreateFleet", req)
    assert req["TargetCapacitySpecification"]["TotalTargetCapacity"] == 1
    assert req["SpotOptions"] == {"AllocationStrategy": "price-capacity-optimized", "MaxTotalPrice": "0.2500"}
    assert [o.get("Placement") for o in req["LaunchTemplateConfigs"][0]["Overrides"]] == [None, None]

    # N nodes come from one pool; the minimum lies within 1..N: refused before any request.
    two = pools
    with pytest.raises(ConfigError, match="one pool"):
        net.api.create_fleet(run_id="r1", template_id=net.template, pools=two, market="spot", count=2)
    for count, minimum in ((2, 3), (2, 0), (0, None)):
        with pytest.raises(ConfigError):
            net.api.create_fleet(run_id="r1", template_id=net.template, pools=two[:1], market="spot",
                                 count=count, min_count=minimum)
    assert len(net.fleets()) == 1


class PartialFill:
    """EC2 filling a fleet in part: the response keeps ``keep`` instances and says why not
    the rest; the others are terminated in moto's backend (AWS never launched them)."""

    def __init__(self, net: Net, keep: int) -> None:
        self.net, self.keep = net, keep
        net.client.meta.events.register("after-call.ec2.CreateFleet", self._after)

    def _after(self, parsed: dict, **_: Any) -> None:
        ids = [i for item in parsed["Instances"] for i in item["InstanceIds"]]
        item = parsed["Instances"][0]
        for iid in ids[self.keep:]:
            self.net.backend.get_instance(iid).terminate()
        parsed["Instances"] = [{**item, "InstanceIds": ids[: self.keep]}] if self.keep else []
        parsed["Errors"] = [{"LaunchTemplateAndOverrides": item["LaunchTemplateAndOverrides"], "Lifecycle": "spot",
                             "ErrorCode": "InsufficientInstanceCapacity", "ErrorMessage": "partial (injected)"}]


@pytest.mark.parametrize("keep", [1, 0])
def test_partial_fill_below_the_minimum_is_terminated(net: Net, keep: int) -> None:
    PartialFill(net, keep=keep)
    pool = Pool("g5.xlarge", net.subnet)
    result = net.api.create_fleet(run_id="r1", template_id=net.template, pools=[pool], market="spot", count=3)
    assert len(result.instances) == keep and [e.code for e in result.errors] == ["InsufficientInstanceCapacity"]
    assert result.short_of(3)
    kept = result.instance_ids
    assert sorted(net.alive()) == sorted(kept)

    settled = net.api.release_if_short(result, 3)
    assert settled.instances == [] and settled.fleet_id == result.fleet_id
    assert [e.code for e in settled.errors] == ["InsufficientInstanceCapacity", PARTIAL_CAPACITY]
    last = settled.errors[-1]
    assert last.is_capacity and last.pool == pool and last.market == "spot"
    assert f"got {keep} of the 3" in last.message
    assert net.alive() == []  # nothing left billing
    terminated = [p["InstanceIds"] for op, p in net.calls if op == "TerminateInstances"]
    assert terminated == ([kept] if keep else [])


def test_partial_fill_at_or_above_the_minimum_is_kept(net: Net) -> None:
    PartialFill(net, keep=2)
    result = net.api.create_fleet(run_id="r1", template_id=net.template, pools=[Pool("g5.xlarge", net.subnet)],
                                  market="spot", count=3, min_count=2)
    (req,) = net.fleets()
    assert req["SpotOptions"]["MinTargetCapacity"] == 2
    assert net.api.release_if_short(result, 2) is result
    assert sorted(net.alive()) == sorted(result.instance_ids) and len(result.instances) == 2
    assert not [op for op, _ in net.calls if op == "TerminateInstances"]


def test_describe_many_reports_missing_and_terminated(net: Net) -> None:
    result = net.api.create_fleet(run_id="r1", template_id=net.template, pools=[Pool("g5.xlarge", net.subnet)],
                                  market="on-demand", count=2)
    a, b = result.instance_ids
    net.api.terminate([b])
    unknown = "i-0123456789abcdef0"
    seen = net.api.describe_many([unknown, a, b, a])
    assert list(seen) == [unknown, a, b]
    assert seen[unknown].state == "missing" and not seen[unknown].alive
    assert seen[a].state == "running" and seen[a].alive and seen[a].private_ip
    assert seen[b].state in ("shutting-down", "terminated") and not seen[b].alive
    assert seen[a].market == "on-demand" and seen[a].instance_type == "g5.xlarge"
    # The single-instance call agrees, private address included.
    assert net.api.describe(a) == seen[a]
    assert net.api.describe_many([]) == {}


def test_placement_group_idempotent_create_and_delete(net: Net, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakePlacementGroups(net.client)
    name = net.api.ensure_placement_group("run-42")
    assert name == placement_group_name("run-42") == "spotrun-run-42"
    assert net.api.ensure_placement_group("run-42") == name  # a resumed controller: exists, fine
    assert list(fake.groups) == [name]
    for op, req in fake.requests:
        valid(op, req)
    req = fake.groups[name]
    assert req["Strategy"] == "cluster"
    (spec,) = req["TagSpecifications"]
    assert spec["ResourceType"] == "placement-group" and {"Key": RUN_ID_TAG, "Value": "run-42"} in spec["Tags"]

    # Instances still shutting down keep the group in use: retried within wait_s.
    fake.in_use = 2
    naps: list[float] = []
    assert net.api.delete_placement_group(name, wait_s=60, sleep=naps.append) is True
    assert fake.groups == {} and naps == [5.0, 10.0]
    assert net.api.delete_placement_group(name) is True  # gone already: fine
    for op, req in fake.requests:
        valid(op, req)

    # Out of patience: a warning with the command that finishes the cleanup, never an error.
    net.api.ensure_placement_group("run-43")
    fake.in_use = 5
    with caplog.at_level(logging.WARNING, logger="spotrun"):
        assert net.api.delete_placement_group("spotrun-run-43", wait_s=0, sleep=naps.append) is False
    assert "aws ec2 delete-placement-group --region us-east-1 --group-name spotrun-run-43" in caplog.text
    assert "spotrun-run-43" in fake.groups and len(naps) == 2
    # A bounded wait: EC2 still says InUse after it, and the group stays (and is named).
    assert net.api.delete_placement_group("spotrun-run-43", wait_s=12, sleep=naps.append) is False
    assert naps[2:] == [5.0, 7.0] and fake.in_use == 1

    fake.deny = True
    with pytest.raises(LaunchError, match="IAM policy"):
        net.api.ensure_placement_group("run-44")


@pytest.mark.slow  # two regions' moto backends and two boto3 sessions: ~3 s quiet, 8 s loaded
def test_two_regions_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real default-AMI parameter is AWS-reserved (moto refuses to store it): a stand-in
    # name proves each region's lookup goes to that region's SSM.
    monkeypatch.setattr(ec2mod, "DEFAULT_AMI_PARAMETER", "/spotrun-test/gpu-ami")
    with mock_aws():
        east, west = Net("us-east-1", for_region=True), Net("eu-west-1", for_region=True)
        for n, ami in ((east, "ami-0east0000000000000"), (west, "ami-0west0000000000000")):
            boto3.client("ssm", region_name=n.region).put_parameter(Name="/spotrun-test/gpu-ami", Value=ami,
                                                                    Type="String")
        assert (east.api.region, west.api.region) == ("us-east-1", "eu-west-1")
        assert east.api.resolve_ami(None) == "ami-0east0000000000000"
        assert west.api.resolve_ami(None) == "ami-0west0000000000000"
        # Each region's launch template lives in that region only.
        assert [t["LaunchTemplateId"] for t in east.client.describe_launch_templates()["LaunchTemplates"]] == [
            east.template]
        assert [t["LaunchTemplateId"] for t in west.client.describe_launch_templates()["LaunchTemplates"]] == [
            west.template]

        got = {}
        for n in (east, west):
            res = n.api.create_fleet(run_id="r1", template_id=n.template, pools=[Pool("g5.xlarge", n.subnet)],
                                     market="spot", count=2)
            got[n.region] = res.instance_ids
            assert len(res.instances) == 2
        for n, other in ((east, west), (west, east)):
            assert sorted(n.alive()) == sorted(got[n.region])
            assert {s.availability_zone for s in n.api.describe_many(got[n.region]).values()} == {f"{n.region}a"}
            assert {s.state for s in n.api.describe_many(got[other.region]).values()} == {"missing"}
        east.api.terminate(got["us-east-1"])
        assert east.alive() == [] and sorted(west.alive()) == sorted(got["eu-west-1"])
