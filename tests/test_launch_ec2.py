"""EC2 mode of ``spotrun launch`` against moto: launch, interruption, relaunch, finish.

The controller runs synchronously; its injected ``sleep`` is the test's hook to act on the
world between polls (interrupt the instance in moto's backend, write done.json), so each
scenario is deterministic and takes well under a second.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from helpers import moto_ami
from moto import mock_aws
from moto.backends import get_backend
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models.instances import StateReason

from spotrun.errors import CapacityError, ConfigError
from spotrun.launch.base import LaunchEvent
from spotrun.launch.controller import Ec2Controller, Ec2Options, Timing
from spotrun.launch.ec2 import RUN_ID_TAG, Ec2Api
from spotrun.records.launch_state import STOP_FILE, exit_record_path, load_state
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

REGION = "us-east-1"
FAST = Timing(
    poll_s=0.0, capacity_retry_s=0.0, spot_wait_s=0.0, capacity_timeout_s=0.0,
    finish_grace_s=0.0, missing_grace_s=0.0, deadline_margin_s=3600.0,
)


class World:
    """moto's EC2 plus the pieces a launch needs (VPC, two subnets, an AMI, a role)."""

    def __init__(self) -> None:
        self.client = boto3.client("ec2", region_name=REGION)
        vpc = self.client.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        self.subnets = [
            self.client.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=az)[
                "Subnet"
            ]["SubnetId"]
            for i, az in enumerate(("us-east-1a", "us-east-1b"))
        ]
        self.ami = moto_ami(self.client)
        iam = boto3.client("iam", region_name=REGION)
        iam.create_role(RoleName="spotrun-node", AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                           "Action": "sts:AssumeRole"}]}))
        iam.create_instance_profile(InstanceProfileName="spotrun-node")
        iam.add_role_to_instance_profile(InstanceProfileName="spotrun-node", RoleName="spotrun-node")
        self.backend = get_backend("ec2")[DEFAULT_ACCOUNT_ID][REGION]

    def instance(self, instance_id: str) -> Any:
        return self.backend.get_instance(instance_id)

    def spot_interrupt(self, instance_id: str) -> None:
        inst = self.instance(instance_id)
        inst.terminate()
        inst.state_reason = StateReason(
            "Server.SpotInstanceTermination: Spot instance termination",
            "Server.SpotInstanceTermination",
        )

    def running(self, run_id: str) -> list[str]:
        resp = self.client.describe_instances(Filters=[
            {"Name": f"tag:{RUN_ID_TAG}", "Values": [run_id]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ])
        return [i["InstanceId"] for r in resp["Reservations"] for i in r["Instances"]]


@pytest.fixture()
def world() -> Iterator[World]:
    with mock_aws():
        yield World()


@pytest.fixture()
def storage(tmp_path) -> Storage:
    return Storage(str(tmp_path / "run"))


def options(world: World, storage: Storage, **kw: Any) -> Ec2Options:
    base = dict(
        run_url=storage.url, command=["python", "train.py", "--epochs", "3"],
        instance_types=["g5.xlarge", "g6.xlarge"], region=REGION, subnets=world.subnets,
        ami=world.ami, setup=["pip install spotrun mypkg"], iam_instance_profile="spotrun-node",
        env={"WANDB_MODE": "offline"},
    )
    base.update(kw)
    return Ec2Options(**base)


def controller(world: World, storage: Storage, opts: Ec2Options, on_sleep: Callable[[Ec2Controller], None],
               **kw: Any) -> Ec2Controller:
    ctl = Ec2Controller.start(storage, Ec2Api(world.client), opts, timing=kw.pop("timing", FAST),
                              **kw)
    ctl.sleep = lambda _s: on_sleep(ctl)
    return ctl


class Lines:
    """An event sink that keeps the launcher's messages, as the CLI would print them."""

    def __init__(self) -> None:
        self.events: list[LaunchEvent] = []

    def __call__(self, event: LaunchEvent) -> None:
        self.events.append(event)

    def getvalue(self) -> str:
        return "\n".join(e.message for e in self.events)


def segment_events(storage: Storage) -> list[tuple[str, str, str | None]]:
    return [
        (r["event"], r["segment_id"], r.get("reason"))
        for r in Ledger(storage).records()
        if r["event"] in ("segment_started", "segment_ended") and r.get("source") == "launcher"
    ]


def test_launch_interrupt_relaunch_finish(world: World, storage: Storage) -> None:
    seen: list[str] = []

    def act(ctl: Ec2Controller) -> None:
        cur = ctl.state.current
        assert cur is not None
        if cur.instance_id not in seen:
            seen.append(cur.instance_id)
            # While it runs, exactly one instance of the run exists in EC2.
            assert world.running(ctl.state.run_id) == [cur.instance_id]
            if len(seen) == 1:
                world.spot_interrupt(cur.instance_id)
            else:
                storage.write_bytes("done.json", b"{}")

    ctl = controller(world, storage, options(world, storage), act)
    outcome = ctl.run()

    assert outcome.status == "finished" and outcome.exit_code == 0
    assert outcome.interruptions == 1 and outcome.segments == 2
    first, second = seen
    assert world.instance(first).state == "terminated"
    # The controller terminated the second one (moto's instance never shuts itself down).
    assert world.instance(second).state == "terminated"
    # After an interruption the relaunch tries another pool first.
    pools = [(s.instance_type, s.subnet_id) for s in ctl.state.segments]
    assert pools[0] != pools[1]
    assert segment_events(storage) == [
        ("segment_started", first, None),
        ("segment_ended", first, "interrupted"),
        ("segment_started", second, None),
        ("segment_ended", second, "finished"),
    ]
    starts = [r for r in Ledger(storage).records() if r["event"] == "segment_started"]
    assert [r["instance"]["market"] for r in starts] == ["spot", "spot"]
    assert all(r["instance"]["cloud"] == "aws" and r["instance"]["region"] == REGION for r in starts)
    state = load_state(storage)
    assert state is not None and state.status == "finished" and state.interruptions == 1
    # Launch template cleaned up at the end.
    assert world.client.describe_launch_templates()["LaunchTemplates"] == []


def test_launch_parameters_imdsv2_tags_no_credentials(world: World, storage: Storage) -> None:
    calls: list[dict] = []
    world.client.meta.events.register(
        "provide-client-params.ec2.CreateFleet", lambda params, **_: calls.append(json.loads(json.dumps(params)))
    )
    templates: list[dict] = []

    def act(ctl: Ec2Controller) -> None:
        if not templates:
            lt = world.client.describe_launch_template_versions(
                LaunchTemplateId=ctl.state.launch_template_id)["LaunchTemplateVersions"][0]
            templates.append(lt)
            lt_tags = world.client.describe_launch_templates(
                LaunchTemplateIds=[ctl.state.launch_template_id])["LaunchTemplates"][0]["Tags"]
            templates.append({"tags": lt_tags})
        storage.write_bytes("done.json", b"{}")

    ctl = controller(world, storage, options(world, storage), act)
    assert ctl.run().status == "finished"
    run_id = ctl.state.run_id
    tag = {"Key": RUN_ID_TAG, "Value": run_id}

    data = templates[0]["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert int(data["MetadataOptions"]["HttpPutResponseHopLimit"]) == 2
    assert data["MetadataOptions"]["HttpEndpoint"] == "enabled"
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert data["ImageId"] == world.ami
    assert data["IamInstanceProfile"] == {"Name": "spotrun-node"}
    kinds = {spec["ResourceType"]: spec["Tags"] for spec in data["TagSpecifications"]}
    assert tag in kinds["instance"] and tag in kinds["volume"]
    assert tag in templates[1]["tags"]

    (fleet,) = calls
    assert fleet["Type"] == "instant"
    assert fleet["SpotOptions"]["AllocationStrategy"] == "price-capacity-optimized"
    assert fleet["TargetCapacitySpecification"] == {"TotalTargetCapacity": 1, "DefaultTargetCapacityType": "spot"}
    overrides = fleet["LaunchTemplateConfigs"][0]["Overrides"]
    assert {(o["InstanceType"], o["SubnetId"]) for o in overrides} == {
        (t, s) for t in ("g5.xlarge", "g6.xlarge") for s in world.subnets
    }
    fleet_tags = {spec["ResourceType"]: spec["Tags"] for spec in fleet["TagSpecifications"]}
    assert tag in fleet_tags["fleet"] and tag in fleet_tags["instance"]
    # The instance really carries the tag in EC2.
    resp = world.client.describe_instances(InstanceIds=[ctl.state.segments[0].instance_id])
    assert tag in resp["Reservations"][0]["Instances"][0]["Tags"]

    script = base64.b64decode(data["UserData"]).decode()
    assert script.startswith("#!/bin/bash")
    assert f"export SPOTRUN_URL={storage.url}" in script
    assert 'export SPOTRUN_SEGMENT_ID="$INSTANCE_ID"' in script
    assert "X-aws-ec2-metadata-token" in script  # IMDSv2 token before any metadata read
    assert "pip install spotrun mypkg" in script
    assert "python train.py --epochs 3" in script
    assert "export WANDB_MODE=offline" in script
    assert "shutdown -h now" in script
    # The test process has fake AWS credentials in its environment: none may leak.
    for secret_name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        assert secret_name not in script


@pytest.mark.parametrize(
    "change",
    [
        {"env": {"AWS_SECRET_ACCESS_KEY": "x"}},
        {"env": {"TOKEN": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}},
        {"setup": ["export AWS_SESSION_TOKEN=abc && pip install x"]},
        {"setup": ["aws configure set aws_access_key_id AKIAIOSFODNN7EXAMPLE"]},
    ],
)
def test_refuses_credentials_in_user_data(world: World, storage: Storage, change: dict) -> None:
    with pytest.raises(ConfigError, match="instance-profile"):
        Ec2Controller.start(storage, Ec2Api(world.client), options(world, storage, **change))
    assert world.client.describe_launch_templates()["LaunchTemplates"] == []


class ScarceCapacity:
    """Make some pools answer like AWS with no capacity, through botocore's event hooks.

    Overrides for scarce pools are removed from the request before it reaches moto and come
    back as per-pool ``Errors`` in the response, the way an instant fleet reports them. A
    request with only scarce pools never reaches moto at all.
    """

    def __init__(self, client: Any, scarce: dict[tuple[str, str], str]) -> None:
        self.scarce = scarce  # (market, instance_type) -> error code
        self.requests: list[tuple[str, list[tuple[str, str]]]] = []
        self._pending: list[dict] = []
        client.meta.events.register("provide-client-params.ec2.CreateFleet", self._params)
        client.meta.events.register("before-call.ec2.CreateFleet", self._before)
        client.meta.events.register("after-call.ec2.CreateFleet", self._after)

    def _params(self, params: dict, **_: Any) -> None:
        market = params["TargetCapacitySpecification"]["DefaultTargetCapacityType"]
        cfg = params["LaunchTemplateConfigs"][0]
        self.requests.append((market, [(o["InstanceType"], o.get("SubnetId")) for o in cfg["Overrides"]]))
        keep, self._pending = [], []
        for ov in cfg["Overrides"]:
            code = self.scarce.get((market, ov["InstanceType"]))
            if code is None:
                keep.append(ov)
            else:
                self._pending.append({
                    "LaunchTemplateAndOverrides": {"LaunchTemplateSpecification": cfg["LaunchTemplateSpecification"],
                                                   "Overrides": ov},
                    "Lifecycle": "spot" if market == "spot" else "on-demand",
                    "ErrorCode": code, "ErrorMessage": f"{code} (injected)",
                })
        cfg["Overrides"] = keep

    def _before(self, params: dict, **_: Any) -> Any:
        if self._pending and not params["body"].get("LaunchTemplateConfigs.1.Overrides.1.InstanceType"):
            class Http:
                status_code = 200
            return Http(), {"FleetId": "fleet-none", "Instances": [], "Errors": list(self._pending)}
        return None

    def _after(self, parsed: dict, **_: Any) -> None:
        if parsed.get("FleetId") != "fleet-none":
            parsed.setdefault("Errors", []).extend(self._pending)


def finish_at_once(storage: Storage) -> Callable[[Ec2Controller], None]:
    return lambda ctl: storage.write_bytes("done.json", b"{}")


def test_next_pool_on_capacity_error(world: World, storage: Storage) -> None:
    fake = ScarceCapacity(world.client, {("spot", "g5.xlarge"): "InsufficientInstanceCapacity"})
    ctl = controller(world, storage, options(world, storage), finish_at_once(storage))
    assert ctl.run().status == "finished"
    (seg,) = ctl.state.segments
    assert seg.instance_type == "g6.xlarge" and seg.market == "spot"
    assert world.instance(seg.instance_id).lifecycle == "spot"
    assert [m for m, _ in fake.requests] == ["spot"]


def test_on_demand_fallback_when_no_spot_anywhere(world: World, storage: Storage) -> None:
    fake = ScarceCapacity(world.client, {
        ("spot", "g5.xlarge"): "InsufficientInstanceCapacity",
        ("spot", "g6.xlarge"): "MaxSpotInstanceCountExceeded",
    })
    ctl = controller(world, storage, options(world, storage), finish_at_once(storage))
    assert ctl.run().status == "finished"
    (seg,) = ctl.state.segments
    assert seg.market == "on-demand"
    assert world.instance(seg.instance_id).lifecycle is None  # on-demand in moto
    assert [m for m, _ in fake.requests] == ["spot", "on-demand"]
    starts = [r for r in Ledger(storage).records() if r["event"] == "segment_started"]
    assert [r["instance"]["market"] for r in starts] == ["on-demand"]


def test_price_too_low_everywhere_falls_back_even_while_waiting_for_spot(world: World, storage: Storage) -> None:
    ScarceCapacity(world.client, {("spot", "g5.xlarge"): "SpotMaxPriceTooLow",
                                  ("spot", "g6.xlarge"): "SpotMaxPriceTooLow"})
    timing = Timing(poll_s=0, capacity_retry_s=0, spot_wait_s=10_000, capacity_timeout_s=10_000,
                    finish_grace_s=0, missing_grace_s=0)
    ctl = controller(world, storage, options(world, storage, max_price=0.2), finish_at_once(storage),
                     timing=timing)
    assert ctl.run().status == "finished"
    assert ctl.state.segments[0].market == "on-demand"


def test_no_fallback_gives_up_with_capacity_error(world: World, storage: Storage) -> None:
    ScarceCapacity(world.client, {("spot", "g5.xlarge"): "InsufficientInstanceCapacity",
                                  ("spot", "g6.xlarge"): "InsufficientInstanceCapacity"})
    ctl = controller(world, storage, options(world, storage, fallback="none"), finish_at_once(storage))
    with pytest.raises(CapacityError, match="g5.xlarge"):
        ctl.run()
    assert world.running(ctl.state.run_id) == []


def test_on_demand_after_max_interruptions(world: World, storage: Storage) -> None:
    def act(ctl: Ec2Controller) -> None:
        cur = ctl.state.current
        if cur.market == "spot":
            world.spot_interrupt(cur.instance_id)
        else:
            storage.write_bytes("done.json", b"{}")

    ctl = controller(world, storage, options(world, storage, max_interruptions=2), act)
    outcome = ctl.run()
    assert outcome.status == "finished" and outcome.interruptions == 2
    assert [s.market for s in ctl.state.segments] == ["spot", "spot", "on-demand"]
    assert [s.end_reason for s in ctl.state.segments] == ["interrupted", "interrupted", "finished"]


def test_command_failure_stops_the_run(world: World, storage: Storage) -> None:
    def act(ctl: Ec2Controller) -> None:
        cur = ctl.state.current
        # What the user data does when the command exits 1: record it, shut down.
        storage.write_bytes(exit_record_path(cur.segment_id), json.dumps({"exit_code": 1}).encode())
        inst = world.instance(cur.instance_id)
        inst.terminate()
        inst.state_reason = StateReason("Client.InstanceInitiatedShutdown: Instance initiated shutdown",
                                        "Client.InstanceInitiatedShutdown")

    ctl = controller(world, storage, options(world, storage), act)
    outcome = ctl.run()
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert "code 1" in outcome.message
    assert segment_events(storage)[-1][2] == "failed"
    assert load_state(storage).status == "failed"


def test_exit_75_shutdown_counts_as_interruption(world: World, storage: Storage) -> None:
    def act(ctl: Ec2Controller) -> None:
        cur = ctl.state.current
        if len(ctl.state.segments) == 1:
            storage.write_bytes(exit_record_path(cur.segment_id), b'{"exit_code": 75}')
            world.instance(cur.instance_id).terminate()
        else:
            storage.write_bytes("done.json", b"{}")

    ctl = controller(world, storage, options(world, storage), act)
    assert ctl.run().status == "finished"
    assert [s.end_reason for s in ctl.state.segments] == ["interrupted", "finished"]


class ControllerDied(BaseException):
    pass


def test_resume_after_controller_died_starts_no_duplicate(world: World, storage: Storage) -> None:
    def die(ctl: Ec2Controller) -> None:
        raise ControllerDied  # the controller process is gone; its instance keeps running

    ctl = controller(world, storage, options(world, storage), die)
    with pytest.raises(ControllerDied):
        ctl.run()
    run_id = ctl.state.run_id
    (first,) = world.running(run_id)

    launches: list[dict] = []
    world.client.meta.events.register("provide-client-params.ec2.CreateFleet",
                                      lambda params, **_: launches.append(params))
    seen: list[list[str]] = []

    def watch(ctl2: Ec2Controller) -> None:
        seen.append(world.running(run_id))
        storage.write_bytes("done.json", b"{}")

    ctl2 = Ec2Controller.resume(storage, Ec2Api(world.client), timing=FAST)
    ctl2.sleep = lambda _s: watch(ctl2)
    assert ctl2.run().status == "finished"
    assert launches == []  # no new capacity was requested
    assert seen[0] == [first]
    assert [s.instance_id for s in ctl2.state.segments] == [first]


def test_resume_adopts_instance_launched_before_state_was_written(world: World, storage: Storage) -> None:
    ctl = controller(world, storage, options(world, storage), lambda c: None)
    real_begin = ctl._begin_segment

    def crash_before_saving(*a: Any, **k: Any) -> None:
        raise ControllerDied

    ctl._begin_segment = crash_before_saving  # type: ignore[method-assign]
    with pytest.raises(ControllerDied):
        ctl.run()
    del real_begin
    run_id = ctl.state.run_id
    (orphan,) = world.running(run_id)
    assert load_state(storage).current is None

    launches: list[dict] = []
    world.client.meta.events.register("provide-client-params.ec2.CreateFleet",
                                      lambda params, **_: launches.append(params))
    ctl2 = Ec2Controller.resume(storage, Ec2Api(world.client), timing=FAST)
    ctl2.sleep = lambda _s: storage.write_bytes("done.json", b"{}")
    assert ctl2.run().status == "finished"
    assert launches == []
    assert [s.instance_id for s in ctl2.state.segments] == [orphan]
    assert segment_events(storage)[0] == ("segment_started", orphan, None)


def test_ctrl_c_terminates_and_says_so(world: World, storage: Storage) -> None:
    def ctrl_c(ctl: Ec2Controller) -> None:
        raise KeyboardInterrupt

    out = Lines()
    ctl = Ec2Controller.start(storage, Ec2Api(world.client), options(world, storage), timing=FAST,
                              on_event=out, on_ctrl_c="terminate")
    ctl.sleep = lambda _s: ctrl_c(ctl)
    outcome = ctl.run()
    assert outcome.exit_code == 130 and outcome.status == "stopped"
    iid = ctl.state.segments[0].instance_id
    assert world.instance(iid).state == "terminated"
    assert world.running(ctl.state.run_id) == []
    text = out.getvalue()
    assert f"terminated {iid}" in text and f"spotrun launch --resume {storage.url}" in text
    assert segment_events(storage)[-1] == ("segment_ended", iid, "stopped")


def test_ctrl_c_leave_prints_what_runs_and_how_to_stop(world: World, storage: Storage) -> None:
    out = Lines()
    ctl = Ec2Controller.start(storage, Ec2Api(world.client), options(world, storage), timing=FAST,
                              on_event=out, on_ctrl_c="leave")

    def ctrl_c(_s: float) -> None:
        raise KeyboardInterrupt

    ctl.sleep = ctrl_c
    assert ctl.run().exit_code == 130
    iid = ctl.state.segments[0].instance_id
    assert world.running(ctl.state.run_id) == [iid]
    text = out.getvalue()
    assert iid in text and f"spotrun stop {storage.url}" in text
    assert f"aws ec2 terminate-instances --region {REGION} --instance-ids {iid}" in text


def test_stop_file_stops_a_live_controller(world: World, storage: Storage) -> None:
    ctl = controller(world, storage, options(world, storage), lambda c: storage.write_bytes(STOP_FILE, b"{}"))
    outcome = ctl.run()
    assert outcome.status == "stopped" and outcome.exit_code == 0
    assert world.running(ctl.state.run_id) == []
    assert not storage.exists(STOP_FILE)


def test_deadline_near_means_on_demand(world: World, storage: Storage) -> None:
    import time

    ctl = controller(world, storage, options(world, storage, deadline=time.time() + 600),
                     finish_at_once(storage))
    assert ctl.run().status == "finished"
    assert [s.market for s in ctl.state.segments] == ["on-demand"]


def test_max_interruptions_without_fallback_stops(world: World, storage: Storage) -> None:
    def act(ctl: Ec2Controller) -> None:
        world.spot_interrupt(ctl.state.current.instance_id)

    ctl = controller(world, storage, options(world, storage, max_interruptions=1, fallback="none"), act)
    outcome = ctl.run()
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert "--fallback none" in outcome.message
    assert [s.end_reason for s in ctl.state.segments] == ["interrupted"]
    assert world.running(ctl.state.run_id) == []


def test_done_json_wins_over_a_failed_exit_record(world: World, storage: Storage) -> None:
    """A worker can abort in gloo's teardown after done.json: finished, with the code named."""
    def act(ctl: Ec2Controller) -> None:
        cur = ctl.state.current
        storage.write_bytes("done.json", b"{}")
        storage.write_bytes(exit_record_path(cur.segment_id), b'{"exit_code": 134}')
        world.instance(cur.instance_id).terminate()

    ctl = controller(world, storage, options(world, storage), act)
    outcome = ctl.run()
    assert outcome.status == "finished" and outcome.exit_code == 0
    assert ctl.state.segments[-1].end_reason == "finished"
    assert "exited with code 134" in (ctl.state.segments[-1].detail or "")


def test_ctrl_c_choice_comes_from_the_caller_and_nothing_is_printed(
        world: World, storage: Storage, capsys: pytest.CaptureFixture[str]) -> None:
    """The library never prompts or prints: the CLI's question arrives as a callable."""
    asked: list[str] = []

    def decide(description: str) -> str:
        asked.append(description)
        return "leave"

    out = Lines()
    ctl = Ec2Controller.start(storage, Ec2Api(world.client), options(world, storage), timing=FAST,
                              on_event=out, on_ctrl_c=decide)

    def ctrl_c(_s: float) -> None:
        raise KeyboardInterrupt

    ctl.sleep = ctrl_c
    assert ctl.run().status == "detached"
    iid = ctl.state.segments[0].instance_id
    assert len(asked) == 1 and iid in asked[0]
    assert world.running(ctl.state.run_id) == [iid]
    assert capsys.readouterr().out == ""
    assert any(e.kind.value == "segment_started" and e.segment_id == iid for e in out.events)
