"""The real ``spotrun launch/status/stop`` commands on EC2 mode, with the run on S3.

EC2 and S3 both come from one moto server on 127.0.0.1 (the ``s3_bucket`` fixture points
``AWS_ENDPOINT_URL`` at it), so the CLI builds its own clients exactly as it would on AWS.
"""

from __future__ import annotations

import io
import json
import threading
from contextlib import redirect_stdout
from typing import Any

import boto3
import pytest
from helpers import moto_ami, wait_for
from moto.backends import get_backend
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models.instances import StateReason

from spotrun.cli import main
from spotrun.cli.launch import parse_deadline
from spotrun.errors import ConfigError
from spotrun.format.manifest import Manifest
from spotrun.launch.controller import Ec2Controller, Ec2Options, Timing
from spotrun.launch.ec2 import Ec2Api
from spotrun.records.launch_state import load_state
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

REGION = "us-east-1"


@pytest.fixture()
def aws(s3_bucket: str, moto_server: str) -> dict:
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_server)
    vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.1.0/24", AvailabilityZone="us-east-1b")["Subnet"]["SubnetId"]
    ami = moto_ami(ec2)
    return {"ec2": ec2, "subnet": subnet, "ami": ami, "url": f"s3://{s3_bucket}/runs/cli"}


def run_cli(*argv: str) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(list(argv))
    return code, buf.getvalue()


def spot_interrupt(instance_id: str) -> None:
    inst = get_backend("ec2")[DEFAULT_ACCOUNT_ID][REGION].get_instance(instance_id)
    inst.terminate()
    inst.state_reason = StateReason("Server.SpotInstanceTermination: x", "Server.SpotInstanceTermination")


@pytest.mark.slow
def test_cli_launch_interrupt_status_finish_on_s3(aws: dict) -> None:
    url = aws["url"]
    storage = Storage(url)
    result: dict[str, Any] = {}

    def launch() -> None:
        result["code"], result["out"] = run_cli(
            "launch", "--run-url", url, "--instance-types", "g5.xlarge,g6.xlarge", "--region", REGION,
            "--subnets", aws["subnet"], "--ami", aws["ami"], "--setup", "pip install spotrun",
            "--poll", "0.05", "--offline-prices", "--on-ctrl-c", "terminate", "--",
            "python", "train.py", "--steps", "1000",
        )

    t = threading.Thread(target=launch, daemon=True)
    t.start()
    seg1 = wait_for(lambda: (s := load_state(storage)) and s.current, what="first instance")
    spot_interrupt(seg1.instance_id)
    seg2 = wait_for(lambda: (s := load_state(storage)) and s.current and s.current.segment_id != seg1.segment_id
                    and s.current, what="relaunch")

    code, out = run_cli("status", url, "--json")
    assert code == 0
    st = json.loads(out)
    assert st["mode"] == "ec2" and st["status"] == "running" and st["controller_alive"]
    assert st["interruptions"] == 1
    assert st["current"]["instance_id"] == seg2.instance_id
    assert st["current"]["state"] == "running"
    assert [s.get("reason") for s in st["segments"]] == ["interrupted", None]
    code, text = run_cli("status", url)
    assert code == 0 and seg2.instance_id in text and "interruptions 1" in text

    # What the instance does when the command finishes: done.json, then its own shutdown.
    storage.write_bytes("done.json", b"{}")
    inst = get_backend("ec2")[DEFAULT_ACCOUNT_ID][REGION].get_instance(seg2.instance_id)
    inst.terminate()
    inst.state_reason = StateReason("Client.InstanceInitiatedShutdown: x", "Client.InstanceInitiatedShutdown")
    t.join(60)
    assert not t.is_alive()
    assert result["code"] == 0, result.get("out")
    events = [(r["event"], r["segment_id"], r.get("reason")) for r in Ledger(storage).records()
              if r.get("source") == "launcher"]
    # (The relaunch follows a loss: the launcher's recovery_started names the next segment.)
    assert events == [
        ("segment_started", seg1.instance_id, None), ("segment_ended", seg1.instance_id, "interrupted"),
        ("recovery_started", seg2.instance_id, None),
        ("segment_started", seg2.instance_id, None), ("segment_ended", seg2.instance_id, "finished"),
    ]
    assert "run finished" in result["out"]


def test_cli_stop_without_controller_terminates_and_keeps_checkpoints(aws: dict) -> None:
    url = aws["url"]
    storage = Storage(url)
    # A committed (empty) checkpoint: the launcher reads manifests, it does not load payloads.
    storage.write_bytes("000000000010/manifest.json", Manifest(step=10, files={}).to_json())

    class Died(BaseException):
        pass

    def die(_s: float) -> None:
        raise Died

    opts = Ec2Options(run_url=url, command=["python", "t.py"], instance_types=["g5.xlarge"],
                      region=REGION, subnets=[aws["subnet"]], ami=aws["ami"])
    ctl = Ec2Controller.start(storage, Ec2Api(aws["ec2"]), opts, timing=Timing(poll_s=0))
    ctl.sleep = die
    with pytest.raises(Died):
        ctl.run()
    iid = ctl.state.current.instance_id

    code, out = run_cli("stop", url, "--wait", "0.2")
    assert code == 0 and iid in out
    desc = aws["ec2"].describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert desc["State"]["Name"] == "terminated"
    state = load_state(storage)
    assert state.status == "stopped" and state.current is None
    assert storage.exists("000000000010/manifest.json")
    ends = [r for r in Ledger(storage).records() if r["event"] == "segment_ended"]
    assert [(r["segment_id"], r["reason"]) for r in ends] == [(iid, "stopped")]

    code, out = run_cli("status", url, "--json", "--no-aws")
    st = json.loads(out)
    assert st["status"] == "stopped" and st["last_checkpoint"] == 10 and st["current"] is None


def test_cli_usage_errors(tmp_path: Any, capsys: Any) -> None:
    assert main(["launch", "--run-url", "s3://b/x", "--", "python", "t.py"]) == 2
    assert "--instance-types" in capsys.readouterr().err
    assert main(["launch", "--local"]) == 2
    assert "no command" in capsys.readouterr().err
    assert main(["launch", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no launch state" in capsys.readouterr().err
    assert main(["stop", str(tmp_path / "nothing")]) == 2


def test_parse_deadline() -> None:
    assert parse_deadline("6h", now=1000.0) == 1000.0 + 6 * 3600
    assert parse_deadline("90m", now=0.0) == 5400.0
    assert parse_deadline("2025-06-01T12:00Z") == 1748779200.0
    assert parse_deadline("2025-06-01T12:00") == 1748779200.0
    with pytest.raises(ConfigError):
        parse_deadline("tomorrow")
