"""EC2 calls of the launcher: the launch template, instant fleets, instance lookups.

Everything here is a thin, testable layer over one boto3 EC2 client; the decisions (which
pools, spot or on-demand, when to give up) live in :mod:`spotrun.launch.controller`.

Capacity comes from ``create_fleet(Type="instant")``: one synchronous call that tries every
pool (instance type x subnet) it is given and answers with the instances it got *and* one
error per pool it could not fill, so a scarce pool costs no extra round trip and never
fails the request as a whole.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..errors import ConfigError, CredentialsError, EndpointUnreachableError, LaunchError

__all__ = [
    "CAPACITY_ERRORS",
    "PRICE_ERRORS",
    "RUN_ID_TAG",
    "MARKET_TAG",
    "SPOT_INTERRUPTION",
    "Ec2Api",
    "FleetResult",
    "InstanceStatus",
    "Pool",
    "PoolError",
]

log = logging.getLogger("spotrun")

RUN_ID_TAG = "spotrun:run-id"
MARKET_TAG = "spotrun:market"
SPOT_INTERRUPTION = "Server.SpotInstanceTermination"
#: Per-pool errors that mean "no capacity here now": try another pool.
CAPACITY_ERRORS = frozenset(
    {
        "InsufficientInstanceCapacity",
        "MaxSpotInstanceCountExceeded",
        "SpotMaxPriceTooLow",
        "UnfulfillableCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
    }
)
#: The spot price is above ``--max-price`` in that pool.
PRICE_ERRORS = frozenset({"SpotMaxPriceTooLow"})
ALIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
DEFAULT_AMI_PARAMETER = (
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
)


@dataclass(frozen=True, order=True)
class Pool:
    """One capacity pool: an instance type, optionally pinned to a subnet (and so a zone)."""

    instance_type: str
    subnet_id: str | None = None

    def override(self) -> dict[str, Any]:
        out: dict[str, Any] = {"InstanceType": self.instance_type}
        if self.subnet_id:
            out["SubnetId"] = self.subnet_id
        return out

    def __str__(self) -> str:
        return f"{self.instance_type}@{self.subnet_id}" if self.subnet_id else self.instance_type


@dataclass(frozen=True)
class PoolError:
    pool: Pool | None
    code: str
    message: str
    market: str

    @property
    def is_capacity(self) -> bool:
        return self.code in CAPACITY_ERRORS


@dataclass(frozen=True)
class LaunchedInstance:
    instance_id: str
    pool: Pool
    market: str  # "spot" | "on-demand"


@dataclass
class FleetResult:
    fleet_id: str | None
    instances: list[LaunchedInstance] = field(default_factory=list)
    errors: list[PoolError] = field(default_factory=list)


@dataclass(frozen=True)
class InstanceStatus:
    instance_id: str
    state: str  # pending | running | shutting-down | terminated | stopping | stopped | missing
    reason_code: str
    reason_message: str
    instance_type: str | None = None
    availability_zone: str | None = None
    subnet_id: str | None = None
    market: str | None = None
    launch_time: float | None = None
    #: When EC2 says the instance changed state (from ``StateTransitionReason``, e.g.
    #: "User initiated (2025-01-02 03:04:05 GMT)"); None when it gives no time.
    transition_at: float | None = None

    @property
    def alive(self) -> bool:
        return self.state in ("pending", "running")


def _err_pool(err: dict[str, Any]) -> Pool | None:
    ov = (err.get("LaunchTemplateAndOverrides") or {}).get("Overrides") or {}
    if not ov.get("InstanceType"):
        return None
    return Pool(ov["InstanceType"], ov.get("SubnetId"))


def _unreachable(what: str, exc: Exception, region: str) -> EndpointUnreachableError:
    return EndpointUnreachableError(
        f"{what}: cannot reach the EC2 API in {region} ({type(exc).__name__}: {exc}); check the "
        "network, --region and AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_EC2"
    )


def _client_error_code(exc: Exception) -> str:
    resp = getattr(exc, "response", None) or {}
    return str((resp.get("Error") or {}).get("Code") or type(exc).__name__)


class Ec2Api:
    """The EC2 calls the launcher makes, on one region's client.

    Args:
        client: a boto3 EC2 client (the tests pass one built under ``moto.mock_aws``).
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.region: str = client.meta.region_name

    @classmethod
    def for_region(cls, region: str | None) -> Ec2Api:
        import boto3
        import botocore.exceptions

        try:
            session = boto3.session.Session(region_name=region)
            if not session.region_name:
                raise ConfigError("no AWS region: pass --region or set AWS_DEFAULT_REGION")
            return cls(session.client("ec2"))
        except botocore.exceptions.NoCredentialsError as exc:  # pragma: no cover - env specific
            raise CredentialsError(f"no AWS credentials for EC2 ({exc}); configure them") from exc

    # -- wrapping errors ---------------------------------------------------------------

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        import botocore.exceptions

        try:
            return fn(**kwargs)
        except (botocore.exceptions.EndpointConnectionError,
                botocore.exceptions.ConnectTimeoutError) as exc:
            # botocore has already retried; no request reached EC2, so nothing was created.
            raise _unreachable(what, exc, self.region) from exc
        except botocore.exceptions.NoCredentialsError as exc:
            raise CredentialsError(
                f"{what}: no AWS credentials; configure AWS_PROFILE or an instance role"
            ) from exc
        except botocore.exceptions.ClientError as exc:
            code = _client_error_code(exc)
            if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
                raise LaunchError(
                    f"{what}: not allowed ({code}); add the permission to the controller's IAM "
                    "policy (see docs/launch.md)"
                ) from exc
            raise LaunchError(f"{what} failed: {code}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise LaunchError(f"{what} failed: {type(exc).__name__}: {exc}") from exc

    # -- the launch template -----------------------------------------------------------

    def resolve_ami(self, ami: str | None) -> str:
        """``ami``, or the latest AWS Deep Learning base AMI from its public SSM parameter."""
        if ami:
            return ami
        import boto3

        ssm = boto3.client("ssm", region_name=self.region)
        try:
            return str(ssm.get_parameter(Name=DEFAULT_AMI_PARAMETER)["Parameter"]["Value"])
        except Exception as exc:  # noqa: BLE001 - any failure has the same fix
            raise ConfigError(
                f"could not look up the default GPU AMI ({exc}); pass --ami ami-..."
            ) from exc

    def create_launch_template(
        self,
        *,
        run_id: str,
        ami: str,
        user_data: str,
        iam_instance_profile: str | None,
        security_group_ids: Sequence[str] = (),
        key_name: str | None = None,
    ) -> str:
        """Create the run's launch template; returns its id.

        IMDSv2 only (``HttpTokens=required``), hop limit 2 so containers on the instance can
        still reach the metadata service, shutdown from inside terminates, and the run id tag
        on the template, the instances and their volumes.
        """
        tags = [{"Key": RUN_ID_TAG, "Value": run_id}, {"Key": "Name", "Value": f"spotrun-{run_id}"}]
        data: dict[str, Any] = {
            "ImageId": ami,
            "UserData": base64.b64encode(user_data.encode()).decode(),
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {
                "HttpTokens": "required",
                "HttpPutResponseHopLimit": 2,
                "HttpEndpoint": "enabled",
            },
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
        }
        if iam_instance_profile:
            key = "Arn" if iam_instance_profile.startswith("arn:") else "Name"
            data["IamInstanceProfile"] = {key: iam_instance_profile}
        if security_group_ids:
            data["SecurityGroupIds"] = list(security_group_ids)
        if key_name:
            data["KeyName"] = key_name
        resp = self._call(
            "creating the launch template",
            self.client.create_launch_template,
            LaunchTemplateName=f"spotrun-{run_id}",
            LaunchTemplateData=data,
            TagSpecifications=[{"ResourceType": "launch-template", "Tags": tags}],
        )
        return str(resp["LaunchTemplate"]["LaunchTemplateId"])

    def delete_launch_template(self, template_id: str) -> None:
        try:
            self.client.delete_launch_template(LaunchTemplateId=template_id)
        except Exception as exc:  # noqa: BLE001 - cleanup only
            log.warning("could not delete launch template %s: %s", template_id, exc)

    # -- capacity ----------------------------------------------------------------------

    def create_fleet(
        self,
        *,
        run_id: str,
        template_id: str,
        pools: Sequence[Pool],
        market: str,
        max_price: float | None = None,
        client_token: str | None = None,
    ) -> FleetResult:
        """One instant fleet for one instance, spot or on-demand, across ``pools``."""
        if not pools:
            raise LaunchError("no capacity pools to try")
        tags = [{"Key": RUN_ID_TAG, "Value": run_id}]
        kwargs: dict[str, Any] = {
            "Type": "instant",
            "TargetCapacitySpecification": {
                "TotalTargetCapacity": 1,
                "DefaultTargetCapacityType": market,
            },
            "LaunchTemplateConfigs": [
                {
                    "LaunchTemplateSpecification": {
                        "LaunchTemplateId": template_id,
                        "Version": "$Latest",
                    },
                    "Overrides": [p.override() for p in pools],
                }
            ],
            "TagSpecifications": [
                {"ResourceType": "fleet", "Tags": tags},
                {"ResourceType": "instance", "Tags": [*tags, {"Key": MARKET_TAG, "Value": market}]},
            ],
        }
        if market == "spot":
            spot: dict[str, Any] = {"AllocationStrategy": "price-capacity-optimized"}
            if max_price is not None:
                spot["MaxTotalPrice"] = f"{max_price:.4f}"
            kwargs["SpotOptions"] = spot
            # Per pool too, so a pool over the price is reported as SpotMaxPriceTooLow.
            if max_price is not None:
                for ov in kwargs["LaunchTemplateConfigs"][0]["Overrides"]:
                    ov["MaxPrice"] = f"{max_price:.4f}"
        else:
            kwargs["OnDemandOptions"] = {"AllocationStrategy": "lowest-price"}
        if client_token:
            kwargs["ClientToken"] = client_token
        resp = self._call("create_fleet", self.client.create_fleet, **kwargs)
        result = FleetResult(fleet_id=resp.get("FleetId"))
        for item in resp.get("Instances") or []:
            ov = (item.get("LaunchTemplateAndOverrides") or {}).get("Overrides") or {}
            itype = ov.get("InstanceType") or item.get("InstanceType")
            pool = Pool(itype, ov.get("SubnetId")) if itype else pools[0]
            lifecycle = item.get("Lifecycle") or market
            for iid in item.get("InstanceIds") or []:
                result.instances.append(
                    LaunchedInstance(iid, pool, "spot" if lifecycle == "spot" else "on-demand")
                )
        for err in resp.get("Errors") or []:
            result.errors.append(
                PoolError(
                    pool=_err_pool(err),
                    code=str(err.get("ErrorCode", "")),
                    message=str(err.get("ErrorMessage", "")),
                    market="spot" if err.get("Lifecycle") == "spot" else market,
                )
            )
        return result

    # -- watching ----------------------------------------------------------------------

    def describe(self, instance_id: str) -> InstanceStatus:
        """The instance's state and, once it is gone, why (``StateReason.Code``)."""
        import botocore.exceptions

        try:
            resp = self.client.describe_instances(InstanceIds=[instance_id])
        except (botocore.exceptions.EndpointConnectionError,
                botocore.exceptions.ConnectTimeoutError) as exc:
            raise _unreachable(f"describe_instances {instance_id}", exc, self.region) from exc
        except botocore.exceptions.ClientError as exc:
            # Right after create_fleet the id may not be visible yet (eventual consistency);
            # long after termination it disappears. The caller decides which it is.
            if _client_error_code(exc) == "InvalidInstanceID.NotFound":
                return InstanceStatus(instance_id, "missing", "", "")
            raise LaunchError(f"describe_instances {instance_id} failed: {exc}") from exc
        for res in resp.get("Reservations") or []:
            for inst in res.get("Instances") or []:
                if inst.get("InstanceId") == instance_id:
                    return _status(inst)
        return InstanceStatus(instance_id, "missing", "", "")

    def find_run_instances(self, run_id: str, states: Sequence[str] = ALIVE_STATES) -> list[InstanceStatus]:
        """Every instance tagged with ``run_id`` in one of ``states``, oldest first."""
        resp = self._call(
            "describe_instances",
            self.client.describe_instances,
            Filters=[
                {"Name": f"tag:{RUN_ID_TAG}", "Values": [run_id]},
                {"Name": "instance-state-name", "Values": list(states)},
            ],
        )
        found = [_status(i) for r in resp.get("Reservations") or [] for i in r.get("Instances") or []]
        found.sort(key=lambda s: (s.launch_time or 0.0, s.instance_id))
        return found

    def terminate(self, instance_ids: Sequence[str]) -> None:
        if instance_ids:
            self._call(
                "terminate_instances", self.client.terminate_instances, InstanceIds=list(instance_ids)
            )


def _status(inst: dict[str, Any]) -> InstanceStatus:
    reason = inst.get("StateReason") or {}
    launch = inst.get("LaunchTime")
    launch_ts = launch.timestamp() if hasattr(launch, "timestamp") else None
    return InstanceStatus(
        instance_id=inst["InstanceId"],
        state=(inst.get("State") or {}).get("Name", "unknown"),
        reason_code=str(reason.get("Code") or ""),
        reason_message=str(reason.get("Message") or ""),
        instance_type=inst.get("InstanceType"),
        availability_zone=(inst.get("Placement") or {}).get("AvailabilityZone"),
        subnet_id=inst.get("SubnetId"),
        market="spot" if inst.get("InstanceLifecycle") == "spot" else "on-demand",
        launch_time=launch_ts,
        transition_at=transition_time(str(inst.get("StateTransitionReason") or "")),
    )


def transition_time(reason: str) -> float | None:
    """The epoch time in an EC2 ``StateTransitionReason`` ("... (YYYY-MM-DD HH:MM:SS GMT)")."""
    m = re.search(r"\((\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2}) (?:GMT|UTC)\)", reason)
    if not m:
        return None
    try:
        when = datetime.strptime(f"{m.group(1)} {m.group(2)}", "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None
    return when.replace(tzinfo=timezone.utc).timestamp()
