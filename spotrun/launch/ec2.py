"""EC2 calls of the launcher: the launch template, instant fleets, instance lookups.

Everything here is a thin, testable layer over one boto3 EC2 client; the decisions (which
pools, spot or on-demand, when to give up) live in :mod:`spotrun.launch.controller`.

Capacity comes from ``create_fleet(Type="instant")``: one synchronous call that tries every
pool (instance type x subnet) it is given and answers with the instances it got *and* one
error per pool it could not fill, so a scarce pool costs no extra round trip and never
fails the request as a whole.

An N-node segment is one such request for N instances of ONE pool (one instance type in one
subnet, so every node is in one zone and reaches the others), optionally in a cluster
placement group. EC2 may fill it only in part: :meth:`Ec2Api.release_if_short` terminates
a partial set the job cannot use.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..errors import ConfigError, CredentialsError, EndpointUnreachableError, LaunchError

__all__ = [
    "CAPACITY_ERRORS",
    "MARKET_TAG",
    "NODE_SILENT",
    "PARTIAL_CAPACITY",
    "PRICE_ERRORS",
    "RUN_ID_TAG",
    "SPOT_INTERRUPTION",
    "Ec2Api",
    "FleetResult",
    "InstanceStatus",
    "Pool",
    "PoolError",
    "placement_group_name",
]

log = logging.getLogger(__name__)

RUN_ID_TAG = "spotrun:run-id"
MARKET_TAG = "spotrun:market"
SPOT_INTERRUPTION = "Server.SpotInstanceTermination"
#: Not an EC2 code: :meth:`Ec2Api.release_if_short` reports with it that a pool gave fewer
#: instances than the job needs (and that they were terminated).
PARTIAL_CAPACITY = "spotrun.PartialCapacity"
#: Not an EC2 code: the controller terminated a node that EC2 still called running because
#: it went silent (no heartbeat for ``--node-silence``) or failed its status checks
#: (:mod:`spotrun.launch.ec2_silence`); its message says which, and for how long.
NODE_SILENT = "spotrun.NodeSilent"
#: Per-pool errors that mean "no capacity here now": try another pool.
CAPACITY_ERRORS = frozenset(
    {
        "InsufficientInstanceCapacity",
        "MaxSpotInstanceCountExceeded",
        "SpotMaxPriceTooLow",
        "UnfulfillableCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        PARTIAL_CAPACITY,
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

    @property
    def instance_ids(self) -> list[str]:
        return [i.instance_id for i in self.instances]

    def short_of(self, min_count: int) -> bool:
        """Whether the fleet gave fewer than ``min_count`` instances (a partial fill)."""
        return len(self.instances) < min_count


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
    #: The address the other nodes of the run reach this one at (None until EC2 assigns it).
    private_ip: str | None = None

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
        except Exception as exc:
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
        count: int = 1,
        min_count: int | None = None,
        placement_group: str | None = None,
    ) -> FleetResult:
        """One instant fleet for ``count`` instances, spot or on-demand.

        One instance may come from any of ``pools``. ``count > 1`` (the nodes of one job) takes
        exactly one pool: nodes of mixed types or zones make a slow or broken torchrun job.
        Then EC2 is also told to launch nothing unless it can launch ``min_count`` (default
        ``count``) at once (``MinTargetCapacity``); should it still return fewer, every
        instance it gave comes back with the errors, and :meth:`release_if_short` decides.
        ``max_price`` is per instance-hour. ``placement_group`` (a cluster group from
        :meth:`ensure_placement_group`) goes into every pool's ``Placement``.
        """
        if not pools:
            raise LaunchError("no capacity pools to try")
        if count < 1:
            raise ConfigError(f"asked for {count} instances; a segment needs at least 1 node")
        need = count if min_count is None else min_count
        if not 1 <= need <= count:
            raise ConfigError(f"--min-nodes {need} must be between 1 and --nodes {count}")
        if count > 1 and len(pools) != 1:
            raise ConfigError(
                f"the {count} nodes of a segment come from one pool (one instance type in one "
                f"subnet), got {len(pools)}: {', '.join(map(str, pools))}; request one pool at a time"
            )
        tags = [{"Key": RUN_ID_TAG, "Value": run_id}]
        kwargs: dict[str, Any] = {
            "Type": "instant",
            "TargetCapacitySpecification": {
                "TotalTargetCapacity": count,
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
        overrides = kwargs["LaunchTemplateConfigs"][0]["Overrides"]
        if placement_group:
            for ov in overrides:
                ov["Placement"] = {"GroupName": placement_group}
        if market == "spot":
            options: dict[str, Any] = {"AllocationStrategy": "price-capacity-optimized"}
            if max_price is not None:
                # MaxTotalPrice caps the whole fleet's hourly price.
                options["MaxTotalPrice"] = f"{max_price * count:.4f}"
            kwargs["SpotOptions"] = options
            # Per pool too, so a pool over the price is reported as SpotMaxPriceTooLow.
            if max_price is not None:
                for ov in overrides:
                    ov["MaxPrice"] = f"{max_price:.4f}"
        else:
            options = {"AllocationStrategy": "lowest-price"}
            kwargs["OnDemandOptions"] = options
        if count > 1:
            # All or nothing at EC2's end (MinTargetCapacity requires a Single* flag; with one
            # pool both hold anyway): a partial set of nodes is billed and useless.
            options.update(SingleInstanceType=True, SingleAvailabilityZone=True, MinTargetCapacity=need)
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

    def release_if_short(self, result: FleetResult, min_count: int) -> FleetResult:
        """``result`` when it holds at least ``min_count`` instances; else none of them.

        A job of N nodes cannot start on fewer than its minimum, and instances it cannot use
        still bill: they are terminated here, and the result comes back with no instances and
        one more error (:data:`PARTIAL_CAPACITY`, a capacity error) naming the pool, so the
        caller moves on to the next pool as for any shortage. EC2's own errors are kept.
        """
        if not result.short_of(min_count):
            return result
        got = result.instance_ids
        if got:
            log.info("fleet %s gave %d of the %d instances needed; terminating %s",
                     result.fleet_id, len(got), min_count, ", ".join(got))
            self.terminate(got)
        # The pool the request named: the instances' own, else the one EC2's errors name.
        first = result.instances[0] if result.instances else None
        pool = first.pool if first else next((e.pool for e in result.errors if e.pool), None)
        market = first.market if first else (result.errors[0].market if result.errors else "spot")
        msg = f"got {len(got)} of the {min_count} instances needed"
        if got:
            msg += f" (terminated {', '.join(got)})"
        return FleetResult(
            fleet_id=result.fleet_id,
            instances=[],
            errors=[*result.errors, PoolError(pool, PARTIAL_CAPACITY, msg, market)],
        )

    # -- placement groups -------------------------------------------------------------

    def ensure_placement_group(self, run_id: str) -> str:
        """Create the run's cluster placement group (or keep it, if it exists); its name.

        A cluster group packs the nodes onto one low-latency network segment of one zone.
        Idempotent, so a resumed controller can call it again: the name comes from the run
        id, and EC2's "already exists" is success. Tagged with the run id.
        """
        import botocore.exceptions

        name = placement_group_name(run_id)

        def create(**kwargs: Any) -> Any:
            try:
                return self.client.create_placement_group(**kwargs)
            except botocore.exceptions.ClientError as exc:
                if _client_error_code(exc) == "InvalidPlacementGroup.Duplicate":
                    log.info("placement group %s exists already; using it", name)
                    return None
                raise

        tags = [{"Key": RUN_ID_TAG, "Value": run_id}, {"Key": "Name", "Value": name}]
        self._call(
            f"creating the placement group {name}",
            create,
            GroupName=name,
            Strategy="cluster",
            TagSpecifications=[{"ResourceType": "placement-group", "Tags": tags}],
        )
        return name

    def delete_placement_group(
        self, name: str, *, wait_s: float = 0.0, sleep: Callable[[float], None] = time.sleep
    ) -> bool:
        """Delete a placement group; True when it is gone (a group that does not exist is).

        EC2 refuses while instances in it are still shutting down (``InUse``): that is
        retried for up to ``wait_s`` seconds. Cleanup only: any failure is logged with the
        command that finishes the job, never raised (an empty group costs nothing).
        """
        # Counted in slept seconds, not the clock, so an injected sleep keeps it bounded.
        waited, delay = 0.0, 5.0
        while True:
            try:
                self.client.delete_placement_group(GroupName=name)
                return True
            except Exception as exc:  # noqa: BLE001 - cleanup only
                code = _client_error_code(exc)
                if code == "InvalidPlacementGroup.Unknown":
                    return True
                if code == "InvalidPlacementGroup.InUse" and waited < wait_s:
                    nap = min(delay, wait_s - waited)
                    sleep(nap)
                    waited += nap
                    delay = min(delay * 2, 30.0)
                    continue
                log.warning(
                    "could not delete placement group %s (%s); delete it once its instances are "
                    "gone: aws ec2 delete-placement-group --region %s --group-name %s",
                    name, code, self.region, name,
                )
                return False

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

    def describe_many(self, instance_ids: Sequence[str]) -> dict[str, InstanceStatus]:
        """:meth:`describe` for many instances in one call: id -> status, every id present.

        An id EC2 does not (yet, or any more) know is ``"missing"``, as in :meth:`describe`.
        The ids go in as a filter, not ``InstanceIds``: one unknown id there fails the whole
        call with ``InvalidInstanceID.NotFound``, while a filter just leaves it out.
        """
        ids = list(dict.fromkeys(instance_ids))
        out: dict[str, InstanceStatus] = {}
        for chunk, resp in self._by_id_filter("describe_instances", self.client.describe_instances, ids):
            for res in resp.get("Reservations") or []:
                for inst in res.get("Instances") or []:
                    if inst.get("InstanceId") in chunk:
                        out[inst["InstanceId"]] = _status(inst)
        return {iid: out.get(iid) or InstanceStatus(iid, "missing", "", "") for iid in ids}

    def impaired(self, instance_ids: Sequence[str]) -> dict[str, str]:
        """Instance id -> which check failed, for those of ``instance_ids`` whose EC2 status
        checks say ``impaired`` (DescribeInstanceStatus: the system check, EC2's hardware and
        network, and the instance check, its kernel and network stack). ``initializing`` and
        ``insufficient-data`` are not failures: a booting instance is judged once checked.
        Ids as a filter, as :meth:`describe_many` (an unknown id would fail the call)."""
        out: dict[str, str] = {}
        for chunk, resp in self._by_id_filter("describe_instance_status", self.client.describe_instance_status,
                                              list(dict.fromkeys(instance_ids))):
            for st in resp.get("InstanceStatuses") or []:
                failed = [name for name, key in (("system", "SystemStatus"), ("instance", "InstanceStatus"))
                          if (st.get(key) or {}).get("Status") == "impaired"]
                if failed and st.get("InstanceId") in chunk:
                    out[st["InstanceId"]] = " and ".join(failed)
        return out

    def _by_id_filter(self, what: str, call: Any, ids: list[str]) -> Iterator[tuple[list[str], dict[str, Any]]]:
        """(the chunk of ids, one response page) for ``call`` filtered by instance id: EC2
        caps one filter at 200 values (N nodes stay far below: one call), and pages follow
        ``NextToken``."""
        for start in range(0, len(ids), 200):
            chunk = ids[start:start + 200]
            token: str | None = None
            while True:
                kwargs: dict[str, Any] = {"Filters": [{"Name": "instance-id", "Values": chunk}]}
                if token:
                    kwargs["NextToken"] = token
                resp = self._call(f"{what} {', '.join(chunk)}", call, **kwargs)
                yield chunk, resp
                token = resp.get("NextToken")
                if not token:
                    break

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


def placement_group_name(run_id: str) -> str:
    """The name of the run's cluster placement group (what the controller records)."""
    return f"spotrun-{run_id}"


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
        private_ip=inst.get("PrivateIpAddress") or None,
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
