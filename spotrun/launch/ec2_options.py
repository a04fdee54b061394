"""What ``spotrun launch`` (EC2 mode) was asked to do, and every wait of its controller."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..validate import number
from .common import MAX_NODES, MAX_NPROC_PER_NODE, check_count
from .ec2 import Pool
from .limits import Limits

__all__ = ["Ec2Options", "Timing"]


@dataclass
class Timing:
    """Every wait of the controller, in seconds (tests shrink them all)."""

    poll_s: float = 15.0
    #: Between rounds of create_fleet when no pool has capacity.
    capacity_retry_s: float = 30.0
    #: How long to keep asking for spot before ``--fallback on-demand`` takes over.
    spot_wait_s: float = 600.0
    #: Without ``--max-wait``: give up (CapacityError) after this long with no capacity in
    #: any pool, region or market allowed (the same wait clock ``--max-wait`` sets).
    capacity_timeout_s: float = 3600.0
    #: After done.json appears: how long the instance may take to shut itself down.
    finish_grace_s: float = 300.0
    #: A new instance id may be invisible to DescribeInstances for a little while.
    missing_grace_s: float = 120.0
    #: Fall back to on-demand once the deadline is this close.
    deadline_margin_s: float = 3600.0
    #: At the end: how long a placement group may stay "in use" by nodes shutting down.
    cleanup_wait_s: float = 180.0
    #: ``--recovery replace``: how long to ask for the lost nodes' replacements (next to the
    #: survivors) before going on without them (``--min-nodes``) or relaunching every node.
    replace_wait_s: float = 600.0
    #: ``--min-nodes``: while an attempt runs on fewer nodes, ask for the missing ones this
    #: long after it was seen shrunk, then twice as long after each ask that got none...
    grow_retry_s: float = 60.0
    #: ... at most this long between two asks (.ec2_grow).
    grow_retry_max_s: float = 900.0
    #: How long the new nodes of a grow may boot before their agents wait for their cluster
    #: file (user data, ``--setup``); then they are terminated and the asks go on.
    grow_boot_wait_s: float = 900.0


@dataclass
class Ec2Options:
    """What ``spotrun launch`` (EC2 mode) was asked to do; persisted for ``--resume``."""

    run_url: str
    command: list[str]
    instance_types: list[str]
    region: str | None = None
    subnets: list[str] = field(default_factory=list)
    ami: str | None = None
    setup: list[str] = field(default_factory=list)
    iam_instance_profile: str | None = None
    security_group_ids: list[str] = field(default_factory=list)
    key_name: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)  # NAME -> ssm:/path or secret ARN
    max_interruptions: int | None = None
    max_failures: int = 0
    fallback: str = "on-demand"  # "on-demand" | "none"
    max_price: float | None = None
    deadline: float | None = None  # epoch seconds
    #: Nodes per attempt (``--nodes``), processes per node (``--nproc-per-node``, None: 1
    #: node runs the command as is; set, it runs under torchrun), ``--min-nodes`` (None: N).
    nodes: int = 1
    nproc_per_node: int | None = None
    min_nodes: int | None = None
    placement_group: bool = False
    #: ``--regions``, home first ([]: just ``region``); ``amis``: region -> AMI id when
    #: ``--ami`` names one per region.
    regions: list[str] = field(default_factory=list)
    amis: dict[str, str] = field(default_factory=dict)
    max_cost_usd: float | None = None
    max_wait_s: float | None = None
    #: ``--recovery``: "replace" keeps the running nodes of a partial loss and asks only for
    #: replacements; "relaunch" terminates them and starts a whole new attempt.
    recovery: str = "replace"
    #: How long a survivor's node agent waits for the next attempt's cluster file (the
    #: replacement's capacity search and boot come first); then it exits and shuts down.
    rejoin_timeout_s: float = 900.0
    #: ``--node-silence``: a node EC2 still calls running whose heartbeat has not changed for
    #: this long (or whose status checks fail) is terminated and lost (:mod:`.ec2_silence`);
    #: 0: off. Well above the nodes' 30 s beat and the 15 s poll.
    node_silence_s: float = 120.0

    def validate(self) -> None:
        if not self.command:
            raise ConfigError("no command to run; put it after --, e.g. spotrun launch ... -- python train.py")
        if not self.instance_types:
            raise ConfigError("no instance types; pass --instance-types g5.xlarge,g6.xlarge")
        if self.fallback not in ("on-demand", "none"):
            raise ConfigError(f"--fallback {self.fallback!r} is not on-demand or none")
        if self.max_interruptions is not None and self.max_interruptions < 0:
            raise ConfigError("--max-interruptions must be >= 0")
        if self.max_failures < 0:
            raise ConfigError("--max-failures must be >= 0")
        if self.max_price is not None and self.max_price <= 0:
            raise ConfigError("--max-price must be a positive USD-per-hour price")
        check_count(self.nodes, 1, MAX_NODES, f"--nodes {self.nodes!r}: a job needs 1 to {MAX_NODES} nodes, "
                    "e.g. --nodes 2")
        if self.nproc_per_node is not None:
            check_count(self.nproc_per_node, 1, MAX_NPROC_PER_NODE, f"--nproc-per-node {self.nproc_per_node!r}: "
                        f"a node runs 1 to {MAX_NPROC_PER_NODE} processes (usually one per GPU)")
        if self.min_nodes is not None and not 1 <= self.min_nodes <= self.nodes:
            raise ConfigError(f"--min-nodes {self.min_nodes} must be between 1 and --nodes {self.nodes}")
        if self.regions:
            if any(not r or not isinstance(r, str) for r in self.regions):
                raise ConfigError("--regions holds an empty name; give regions like us-east-1,us-west-2")
            if len(set(self.regions)) != len(self.regions):
                raise ConfigError(f"--regions {','.join(self.regions)} names a region twice; list each once")
            if self.region is not None and self.region != self.regions[0]:
                raise ConfigError(f"--region {self.region} is not the first of --regions "
                                  f"{','.join(self.regions)} (the home region); drop --region or put it first")
        regions = self.regions or ([self.region] if self.region else [])
        if self.ami and self.amis:
            raise ConfigError("--ami gives one AMI for every region or one per region (r1=ami-..,r2=ami-..), not both")
        if self.ami and len(regions) > 1:
            raise ConfigError(f"--ami {self.ami}: an AMI id belongs to one region, and the run may use "
                              f"{len(regions)}; give one per region (--ami {regions[0]}=ami-..,{regions[1]}=ami-..) "
                              "or leave --ami out (the default GPU AMI is looked up in each region)")
        if self.amis:
            missing = [r for r in regions if r not in self.amis]
            unknown = [r for r in self.amis if r not in regions]
            if missing or unknown or not regions:
                raise ConfigError(f"--ami names {','.join(self.amis)} but the run's regions are "
                                  f"{','.join(regions) or 'not given'}; give one AMI for each region of --regions")
        Limits(self.max_cost_usd, self.max_wait_s).validate()
        if self.recovery not in ("replace", "relaunch"):
            raise ConfigError(f"--recovery {self.recovery!r}: use replace or relaunch")
        number(self.node_silence_s, "--node-silence", minimum=0.0, maximum=86400.0, example="120 (0: off)",
               text=False)
        number(self.rejoin_timeout_s, "rejoin_timeout_s", minimum=0.0, maximum=86400.0, example="900", text=False)

    @property
    def distributed(self) -> bool:
        """Whether the command runs under torchrun through cluster files (``--nodes`` > 1 or
        ``--nproc-per-node`` given)."""
        return self.nodes > 1 or self.nproc_per_node is not None

    @property
    def need(self) -> int:
        """The fewest nodes an attempt may start with (``--min-nodes``, default ``--nodes``)."""
        return self.min_nodes if self.min_nodes is not None else self.nodes

    def pools_in(self, region: str, home: str) -> list[Pool]:
        """The pools of ``region``: ``--subnets`` are the home region's; elsewhere EC2 picks
        a subnet of the default VPC."""
        subnets: list[str | None] = list(self.subnets) if region == home and self.subnets else [None]
        return [Pool(t, s) for t in self.instance_types for s in subnets]

    @property
    def pools(self) -> list[Pool]:
        """The home region's pools (every type x every ``--subnets`` entry)."""
        subnets: list[str | None] = list(self.subnets) or [None]
        return [Pool(t, s) for t in self.instance_types for s in subnets]

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ec2Options:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
