"""The EC2 controller's search for capacity, and the per-region resources it needs.

One attempt asks, in order: the market :func:`.attempt.choose_market` picks (spot unless
the rules say on-demand), every pool of the home region (the pool of the last interrupted
spot segment last), then every pool of each further ``--regions`` region; when a whole round
found nothing, :func:`.attempt.fallback_reason` says whether to fall back to on-demand now,
else the round is tried again after ``capacity_retry_s`` until the wait clock
(``--max-wait``, or ``Timing.capacity_timeout_s``) runs out.

N nodes come from one pool per request (one type, one zone, all or nothing through
``MinTargetCapacity``), optionally in the run's cluster placement group; one instance from
whichever of the pools EC2 finds best.

Each region used gets the run's launch template (and placement group), created on first use
and recorded in the launch state at once, all deleted by :meth:`CapacitySearch.cleanup`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..errors import CapacityError, LaunchError
from ..records.events import EndReason, Market
from ..records.launch_state import STOP_FILE, RunStatus
from .attempt import choose_market, fallback_reason
from .base import LaunchEventKind, LaunchOutcome
from .ec2 import PRICE_ERRORS, Pool
from .limits import fmt_wait
from .userdata import build_user_data

if TYPE_CHECKING:
    from .controller import Ec2Controller

__all__ = ["CapacitySearch"]

log = logging.getLogger(__name__)


class CapacitySearch:
    """Finds the instances of the next attempt for ``ctl`` (see the module docstring).

    It reads the controller's options, timing, state and wait clock, asks EC2 through its
    per-region clients, and hands what a fleet gave to ``ctl.attempts.start`` (which records it).
    """

    def __init__(self, ctl: Ec2Controller) -> None:
        self.ctl = ctl

    # -- per-region resources ------------------------------------------------------------

    def ensure_template(self, region: str) -> str:
        """The run's launch template in ``region`` (created on first use there)."""
        ctl = self.ctl
        state, o = ctl.state, ctl.options
        tid = state.launch_templates.get(region)
        if tid:
            return tid
        api = ctl._api(region)
        user_data = build_user_data(
            run_url=o.run_url, run_id=state.run_id, command=o.command, setup=o.setup, env=o.env,
            secrets=o.secrets, nodes=o.nodes, nproc_per_node=o.nproc_per_node,
            rejoin_timeout_s=o.rejoin_timeout_s if o.recovery == "replace" else 0.0,
        )
        home = region == ctl.home
        ami = api.resolve_ami(o.amis.get(region) or o.ami)
        tid = api.create_launch_template(
            run_id=state.run_id,
            ami=ami,
            user_data=user_data,
            iam_instance_profile=o.iam_instance_profile,
            # Security groups and key pairs exist per region: the home region's only;
            # elsewhere the default VPC's default group (which lets its members talk).
            security_group_ids=o.security_group_ids if home else [],
            key_name=o.key_name if home else None,
        )
        state.launch_templates[region] = tid
        if home:
            state.launch_template_id = tid
        ctl._save()
        return tid

    def placement(self, region: str) -> str | None:
        """The run's cluster placement group in ``region`` (``--placement-group``), or None."""
        ctl = self.ctl
        if not ctl.options.placement_group:
            return None
        name = ctl.state.placement_groups.get(region)
        if name is None:
            name = ctl._api(region).ensure_placement_group(ctl.state.run_id)
            ctl.state.placement_groups[region] = name
            ctl._save()
        return name

    def cleanup(self) -> None:
        """Delete the run's launch templates and placement groups in every region."""
        ctl = self.ctl
        state = ctl.state
        templates = dict(state.launch_templates)
        if state.launch_template_id and not templates:
            templates[ctl.home] = state.launch_template_id  # recorded only the old way
        for region, tid in templates.items():
            ctl._api(region).delete_launch_template(tid)
        state.launch_templates.clear()
        state.launch_template_id = None
        for region, name in list(state.placement_groups.items()):
            # Nodes just terminated keep the group "in use" while they shut down.
            if ctl._api(region).delete_placement_group(name, wait_s=ctl.timing.cleanup_wait_s, sleep=ctl.sleep):
                del state.placement_groups[region]

    # -- the rules ---------------------------------------------------------------------

    def deadline_near(self) -> bool:
        d = self.ctl.options.deadline
        return d is not None and d - self.ctl.clock() < self.ctl.timing.deadline_margin_s

    def choose_market(self) -> tuple[Market | None, str]:
        """(spot | on-demand, why), or (None, why) when the rules say stop."""
        o, state = self.ctl.options, self.ctl.state
        near = self.deadline_near()
        on_demand = o.fallback == "on-demand"
        if near and not on_demand:
            log.warning("the deadline is near but --fallback none: staying on spot")
        return choose_market(interruptions=state.interruptions, max_interruptions=o.max_interruptions,
                             on_demand_fallback=on_demand, deadline_near=near)

    def avoid_pool(self) -> tuple[str, Pool] | None:
        """(region, pool) of the last interrupted spot segment: try the others first."""
        for seg in reversed(self.ctl.state.segments):
            if seg.end_reason == EndReason.INTERRUPTED and seg.market == Market.SPOT and seg.instance_type:
                return seg.region or self.ctl.home, Pool(seg.instance_type, seg.subnet_id)
            if seg.end_reason is not None:
                return None
        return None

    # -- the search ----------------------------------------------------------------------

    def launch(self) -> LaunchOutcome | None:
        """Start an attempt: spot (or on-demand) in every pool of every region, in order;
        None once it runs, or the run's outcome when it must end."""
        ctl = self.ctl
        market, why = self.choose_market()
        if market is None:
            return ctl.ending.give_up(RunStatus.FAILED, why, exit_code=1)
        if market is Market.ON_DEMAND and why != "default":
            ctl._say(f"using on-demand: {why}", LaunchEventKind.CAPACITY)
        avoid = self.avoid_pool() if market is Market.SPOT else None
        started = ctl.clock()
        regions = ctl.regions
        assert ctl.state.launch_template_id
        while True:
            errors: list[str] = []
            price_blocked = True
            for i, region in enumerate(regions):
                got = self.try_region(region, market, avoid[1] if avoid and avoid[0] == region else None, errors)
                if isinstance(got, LaunchOutcome):
                    return got
                if got is True:
                    ctl.wait.got_capacity()
                    ctl._save()
                    return None
                price_blocked = price_blocked and got == "price"
                if i + 1 < len(regions):
                    ctl._say(f"no {market} capacity in any pool of {region}; trying {regions[i + 1]}",
                             LaunchEventKind.CAPACITY)
            now = ctl.clock()
            waited = now - started
            ctl.wait.no_capacity(now)
            ctl._save()
            expired = ctl.wait.expired(now)
            reason = fallback_reason(
                market=market, on_demand_fallback=ctl.options.fallback == "on-demand",
                price_blocked=price_blocked, max_price=ctl.options.max_price, waited_s=waited,
                spot_wait_s=ctl.timing.spot_wait_s, deadline_near=self.deadline_near(),
                waited_too_long=None if expired is None else f"no spot capacity for {fmt_wait(ctl.wait.waited(now))}",
            )
            if reason is not None:
                ctl._say(f"falling back to on-demand: {reason}", LaunchEventKind.CAPACITY)
                market = Market.ON_DEMAND
                avoid = None
                continue
            if expired is not None:
                if ctl.options.max_wait_s is not None:
                    url = ctl.storage.display()
                    return ctl.ending.give_up(RunStatus.FAILED, f"{expired}; checkpoints kept. To keep waiting: "
                                        f"spotrun launch --resume {url} --max-wait DURATION", exit_code=1)
                pools = [f"{p}" + (f" in {r}" if len(regions) > 1 else "")
                         for r in regions for p in ctl.options.pools_in(r, ctl.home)]
                raise CapacityError(
                    f"no {market} capacity in {', '.join(pools)} for {ctl.wait.waited(now):.0f}s "
                    f"({'; '.join(errors[-len(pools):])}); add instance types, subnets or --regions, "
                    "or allow --fallback on-demand"
                )
            ctl.sleep(ctl.timing.capacity_retry_s)

    def try_region(self, region: str, market: Market, avoid: Pool | None, errors: list[str]) -> Any:
        """One region's pools, each until one gives the attempt: True when it runs, the run's
        outcome when a stop came, else ``"price"`` (every pool above --max-price) or False."""
        ctl = self.ctl
        api = ctl._api(region)
        template = self.ensure_template(region)
        group_name = self.placement(region)
        all_pools = ctl.options.pools_in(region, ctl.home)
        ordered = [p for p in all_pools if p != avoid] + [p for p in all_pools if p == avoid]
        round_pools = [p for p in ordered if p != avoid] or ordered
        n, need = ctl.options.nodes, ctl.options.need
        failed: set[Pool] = set()
        price_blocked: set[Pool] = set()
        where = f" in {region}" if len(ctl.regions) > 1 else ""
        while True:
            if ctl.storage.exists(STOP_FILE):
                return ctl.ending.stopped_by_request()
            # N nodes come from one pool per request (one type, one zone); one instance
            # from whichever of the pools EC2 finds best.
            request = round_pools[:1] if n > 1 else round_pools
            ctl.state.attempts += 1
            ctl._save()
            result = api.create_fleet(
                run_id=ctl.state.run_id,
                template_id=template,
                pools=request,
                market=market.value,
                max_price=ctl.options.max_price if market is Market.SPOT else None,
                client_token=f"spotrun-{ctl.state.run_id}-{ctl.state.attempts}",
                count=n,
                min_count=need if n > 1 else None,
                placement_group=group_name,
            )
            if n > 1:
                result = api.release_if_short(result, need)
            if result.instances and ctl.attempts.start(region, result):
                return True
            hard = [e for e in result.errors if not e.is_capacity]
            if hard and not any(e.is_capacity for e in result.errors):
                e = hard[0]
                raise LaunchError(f"create_fleet ({market}) failed in {e.pool or 'every pool'}{where}: "
                                  f"{e.code}: {e.message}")
            if not result.errors:
                failed.update(request)
                errors.append(f"{market}: no instance and no error for {', '.join(map(str, request))}{where}")
            for e in result.errors:
                pools = [e.pool] if e.pool else request
                failed.update(pools)
                if e.code in PRICE_ERRORS:
                    price_blocked.update(pools)
                msg = f"{market} {e.pool or 'all pools'}{where}: {e.code}"
                errors.append(msg)
                ctl._say(f"no capacity: {msg}", LaunchEventKind.CAPACITY)
            remaining = [p for p in ordered if p not in failed]
            if remaining:
                round_pools = remaining  # the next pool(s), in the same round
                continue
            return "price" if price_blocked >= set(all_pools) else False
