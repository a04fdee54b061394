"""Issue 13, item 6: the IAM policies in docs/launch.md are exactly what the code calls.

Every AWS API call is recorded at the SDK (botocore's and aiobotocore's ``_make_api_call``)
while the code runs against the moto server on 127.0.0.1: the controller through a whole
launch (default-AMI lookup, spot interruption, relaunch, finish, live prices), Ctrl-C,
``status`` and ``stop``; the instance through restore, saves (one multipart), retention, a
multipart upload that loses its connection, ``finish`` and the exit record. Each operation
maps to its IAM action (plus the actions AWS checks on the caller for it, e.g. CreateFleet
runs RunInstances and CreateTags as the caller), and the set must equal the documented
policy's: nothing missing, nothing granted and never used.

moto does not evaluate IAM, so this proves the list of actions, not that AWS accepts the
resource ARNs and conditions; docs/launch.md says what was checked by hand.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from helpers import FakePlacementGroups, moto_ami
from moto.backends import get_backend
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models.instances import StateReason

import spotrun
from spotrun.cli.launch import print_cost_report
from spotrun.errors import ConfigError, SaveError
from spotrun.launch.controller import Ec2Controller, Ec2Options, Timing
from spotrun.launch.ec2 import RUN_ID_TAG, Ec2Api
from spotrun.launch.status import run_status, stop_run
from spotrun.storage import Storage

REPO = Path(__file__).resolve().parents[1]
REGION = "us-east-1"
FAST = Timing(poll_s=0.0, capacity_retry_s=0.0, spot_wait_s=0.0, capacity_timeout_s=0.0,
              finish_grace_s=0.0, missing_grace_s=0.0, deadline_margin_s=3600.0)

# SDK operation -> the IAM actions AWS checks for it. Operations not listed map to
# "<service>:<Operation>" (true for EC2, SSM, Pricing); an unknown S3 operation fails the
# test so a new call cannot slip past the docs.
_S3 = {
    "GetObject": ["s3:GetObject"], "HeadObject": ["s3:GetObject"],
    "PutObject": ["s3:PutObject"], "CreateMultipartUpload": ["s3:PutObject"],
    "UploadPart": ["s3:PutObject"], "CompleteMultipartUpload": ["s3:PutObject"],
    "AbortMultipartUpload": ["s3:AbortMultipartUpload"],
    "DeleteObject": ["s3:DeleteObject"], "DeleteObjects": ["s3:DeleteObject"],
    "ListObjectsV2": ["s3:ListBucket"], "ListObjects": ["s3:ListBucket"], "HeadBucket": ["s3:ListBucket"],
    "CopyObject": ["s3:GetObject", "s3:PutObject"],
}
# What AWS checks on the caller beyond the action itself (EC2 Fleet and launch-template docs):
# an instant fleet launches as the caller (RunInstances), tags on create (CreateTags), passes
# the template's instance profile role (PassRole) and, the first time in an account, creates
# the spot / fleet service-linked roles.
_IMPLIED = {
    "ec2:CreateFleet": ["ec2:RunInstances", "ec2:CreateTags", "iam:PassRole", "iam:CreateServiceLinkedRole"],
    "ec2:CreateLaunchTemplate": ["ec2:CreateTags"],
    "ec2:CreatePlacementGroup": ["ec2:CreateTags"],  # tagged with the run id on create
}


def actions_for(calls: set[tuple[str, str]]) -> set[str]:
    out: set[str] = set()
    for service, op in calls:
        if service == "s3":
            assert op in _S3, f"S3 operation {op} has no IAM mapping in this test: add it, and to docs/launch.md"
            acts = _S3[op]
        else:
            acts = [f"{service}:{op}"]
        for act in acts:
            out.add(act)
            out.update(_IMPLIED.get(act, []))
    return out


class Recorder:
    """Records (service, operation) of every SDK call, sync (boto3) and async (s3fs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import aiobotocore.client
        import botocore.client

        self.calls: set[tuple[str, str]] = set()
        sync_call = botocore.client.BaseClient._make_api_call
        async_call = aiobotocore.client.AioBaseClient._make_api_call
        rec = self

        def record(client: Any, op: str) -> None:
            prefix = client.meta.service_model.signing_name  # "ec2", "s3", "ssm", "pricing"
            rec.calls.add((prefix, op))

        def sync_wrapper(client: Any, op: str, params: Any) -> Any:
            record(client, op)
            return sync_call(client, op, params)

        async def async_wrapper(client: Any, op: str, params: Any) -> Any:
            record(client, op)
            return await async_call(client, op, params)

        monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", sync_wrapper)
        monkeypatch.setattr(aiobotocore.client.AioBaseClient, "_make_api_call", async_wrapper)

    def take(self) -> set[tuple[str, str]]:
        out, self.calls = self.calls, set()
        return out


def documented_policies() -> dict[str, dict]:
    """The JSON policy under each '### ' heading of the IAM section of docs/launch.md."""
    text = (REPO / "docs" / "launch.md").read_text()
    iam = text[text.index("\n## IAM"):]
    iam = iam[: iam.find("\n## ", 1)] if "\n## " in iam[1:] else iam
    out = {}
    for section in re.split(r"\n### ", iam)[1:]:
        title = section.splitlines()[0].strip()
        m = re.search(r"```json\n(.*?)\n```", section, re.DOTALL)
        if m:
            out[title] = json.loads(m.group(1))
    return out


def granted(policy: dict) -> set[str]:
    acts: set[str] = set()
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        a = st["Action"]
        acts.update([a] if isinstance(a, str) else a)
    return acts


@pytest.fixture()
def ec2_world(s3_bucket: str) -> Iterator[dict]:
    """VPC, subnets, AMI and an instance profile on the moto server (AWS_ENDPOINT_URL is set)."""
    ec2 = boto3.client("ec2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=az)["Subnet"]["SubnetId"]
               for i, az in enumerate(("us-east-1a", "us-east-1b"))]
    name = f"spotrun-node-{uuid.uuid4().hex[:6]}"
    iam = boto3.client("iam", region_name=REGION)
    iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                                                "Action": "sts:AssumeRole"}]}))
    iam.create_instance_profile(InstanceProfileName=name)
    iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    yield {"ec2": ec2, "subnets": subnets, "ami": moto_ami(ec2), "profile": name,
           "backend": get_backend("ec2")[DEFAULT_ACCOUNT_ID][REGION]}


def _controller_cycle(world: dict, bucket: str, tmp_path: Path) -> str:
    ec2 = world["ec2"]
    api = Ec2Api(ec2)
    # The default AMI comes from a public SSM parameter moto does not hold: the call is made.
    with pytest.raises(ConfigError):
        api.resolve_ami(None)

    def opts(url: str) -> Ec2Options:
        return Ec2Options(run_url=url, command=["python", "train.py"], instance_types=["g5.xlarge", "g6.xlarge"],
                          region=REGION, subnets=world["subnets"], ami=world["ami"],
                          setup=["pip install spotrun"], iam_instance_profile=world["profile"])

    # 1. launch, spot interruption, relaunch, finish; the report asks for live prices.
    run_id = f"iam-{uuid.uuid4().hex[:8]}"
    storage = Storage(f"s3://{bucket}/runs/one")
    seen: list[str] = []

    def act(ctl: Ec2Controller) -> None:
        cur = ctl.state.current
        if cur.instance_id in seen:
            return
        seen.append(cur.instance_id)
        if len(seen) == 1:
            inst = world["backend"].get_instance(cur.instance_id)
            inst.terminate()
            inst.state_reason = StateReason("Server.SpotInstanceTermination: x", "Server.SpotInstanceTermination")
        else:
            storage.write_bytes("done.json", b"{}")

    ctl = Ec2Controller.start(storage, api, opts(storage.url), run_id=run_id, timing=FAST)
    ctl.sleep = lambda _s: act(ctl)
    assert ctl.run().status == "finished"
    print_cost_report(storage, offline=False)  # what `spotrun launch` prints at the end
    tags = ec2.describe_instances(InstanceIds=[seen[0]])["Reservations"][0]["Instances"][0]["Tags"]
    assert {"Key": RUN_ID_TAG, "Value": run_id} in tags  # what the per-run Terminate condition pins

    # 2. a second run: Ctrl-C leaves it running; status and stop from "another terminal".
    storage2 = Storage(f"s3://{bucket}/runs/two")
    ctl2 = Ec2Controller.start(storage2, api, opts(storage2.url), timing=FAST, on_ctrl_c="leave")

    def interrupt(_s: float) -> None:
        raise KeyboardInterrupt

    ctl2.sleep = interrupt
    assert ctl2.run().exit_code == 130
    assert run_status(storage2, live=True)["mode"] == "ec2"
    assert stop_run(storage2, wait_s=0, sleep=lambda _s: None)["terminated"]
    return run_id


def _multi_node_cycle(world: dict, bucket: str) -> None:
    """A 2-node launch in a placement group, to its finish (moto has no placement groups: the
    fake answers them after botocore validated the request, so the calls are recorded)."""
    FakePlacementGroups(world["ec2"])
    storage = Storage(f"s3://{bucket}/runs/nodes")
    opts = Ec2Options(run_url=storage.url, command=["python", "train.py"], instance_types=["g5.12xlarge"],
                      region=REGION, subnets=world["subnets"][:1], ami=world["ami"],
                      iam_instance_profile=world["profile"], nodes=2, nproc_per_node=4, placement_group=True)
    ctl = Ec2Controller.start(storage, Ec2Api(world["ec2"]), opts, timing=FAST)
    ctl.sleep = lambda _s: storage.write_bytes("done.json", b"{}")
    assert ctl.run().status == "finished"
    assert len(ctl.state.segments) == 2


def _instance_cycle(bucket: str, fault_proxy: Any, moto_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTRUN_S3_PART_MIB", "5")
    monkeypatch.setenv("SPOTRUN_S3_RETRIES", "0")
    monkeypatch.setenv("SPOTRUN_S3_RETRY_SECONDS", "1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    url = f"s3://{bucket}/runs/one"
    opts = {"client_kwargs": {"endpoint_url": fault_proxy.url}, "skip_instance_cache": True}
    model = torch.nn.Linear(1200, 1200)  # 5.8 MB of weights: a two-part multipart upload
    with spotrun.Checkpointer(url, model=model, handle_signals=False, watchers=[], async_save=False,
                              keep_last=1, storage_options=opts) as ck:
        ck.restore()
        for step in (1, 2):  # the second save's retention deletes the first
            ck.steps_done = step
            ck.save()
        # Item 12: the connection drops mid-upload. A SaveError (not botocore's error), and
        # the upload is aborted, so no orphan parts stay billed.
        fault_proxy.add("reset", method="PUT", path=r"partNumber=2")
        ck.steps_done = 3
        with pytest.raises(SaveError):
            ck.save()
        fault_proxy.clear()
        ck.finish()
    # The boot script's exit record.
    Storage(url, opts).write_bytes("launch/exit-i-0123.json", b'{"exit_code": 0}')


@pytest.mark.slow
def test_documented_iam_is_exactly_what_the_code_calls(ec2_world: dict, s3_bucket: str, moto_server: str,
                                                       fault_proxy: Any, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    monkeypatch.setenv("SPOTRUN_CACHE_DIR", str(tmp_path / "cache"))  # no cached price skips a call
    rec = Recorder(monkeypatch)
    run_id = _controller_cycle(ec2_world, s3_bucket, tmp_path)
    controller = actions_for(rec.take())
    _multi_node_cycle(ec2_world, s3_bucket)
    placement = actions_for(rec.take()) - controller
    _instance_cycle(s3_bucket, fault_proxy, moto_server, monkeypatch)
    instance = actions_for(rec.take())
    # (Checked after recording: these are the test's calls, not the code's.)
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name=REGION)
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert [r for r in fault_proxy.log if r.action == "reset"], "the fault never fired"

    docs = documented_policies()
    ctl_policy, node_policy = docs["The controller"], docs["The instance profile"]
    pg_policy = docs["Multi-node with `--placement-group` (the controller, in addition)"]
    assert granted(pg_policy) - granted(ctl_policy) == placement, (
        f"placement groups: missing from the doc: {sorted(placement - granted(pg_policy))}; "
        f"granted but never called: {sorted(granted(pg_policy) - granted(ctl_policy) - placement)}")
    assert granted(ctl_policy) == controller, (
        f"missing from the doc: {sorted(controller - granted(ctl_policy))}; "
        f"granted but never called: {sorted(granted(ctl_policy) - controller)}")
    assert granted(node_policy) == instance, (
        f"missing from the doc: {sorted(instance - granted(node_policy))}; "
        f"granted but never called: {sorted(granted(node_policy) - instance)}")
    # The spot price history and on-demand price calls are what a live report needs.
    assert {"ec2:DescribeSpotPriceHistory", "pricing:GetProducts", "s3:AbortMultipartUpload"} <= controller | instance

    # TerminateInstances: only instances whose run-id tag is this run's (the value pinned).
    (term,) = [st for st in ctl_policy["Statement"] if st["Action"] == "ec2:TerminateInstances"]
    cond = term["Condition"]["StringEquals"]
    assert list(cond) == [f"aws:ResourceTag/{RUN_ID_TAG}"] and cond[f"aws:ResourceTag/{RUN_ID_TAG}"] == "RUN_ID"
    assert run_id.startswith("iam-")


def test_documented_secret_policy_matches_the_boot_script() -> None:
    from spotrun.launch.userdata import build_user_data

    script = build_user_data(run_url="s3://b/r", run_id="r", command=["true"],
                             secrets={"A": "ssm:/p", "B": "arn:aws:secretsmanager:us-east-1:123456789012:secret:b"})
    called = set()
    if "get-parameter" in script and "get_parameter(" in script:
        called.add("ssm:GetParameter")
    if "get-secret-value" in script and "get_secret_value(" in script:
        called.add("secretsmanager:GetSecretValue")
    assert granted(documented_policies()["Secrets (optional, on the instance profile)"]) == called
