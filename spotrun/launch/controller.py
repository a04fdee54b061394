"""The EC2 controller: keep the run's instance (or its N nodes) running the command until
the run is done.

The loop, every ``poll_s``::

    stop requested (spotrun stop)?  -> stop
    done.json in the run URL?       -> let the instance shut itself down, finish
    no instance?                    -> choose spot or on-demand, launch (pool by pool)
    instance gone?                  -> why: spot interruption / exit record / user -> relaunch
                                       or stop on failure limits

Every decision is written to ``RUN_URL/launch/state.json`` *before* the next one is taken,
and every instance carries the run id tag, so a controller that dies can be replaced by
``spotrun launch --resume RUN_URL`` without ever running two instances of one run.

Fallback to on-demand (``--fallback on-demand``), when any rule says so:

* the run had ``--max-interruptions`` spot interruptions already;
* every pool answers ``SpotMaxPriceTooLow`` (spot is above ``--max-price``);
* ``--deadline`` is less than ``deadline_margin_s`` away;
* no spot pool had capacity for ``spot_wait_s``.

All time constants live in :class:`Timing` so tests run the whole loop in seconds.

**N nodes** (``--nodes N``): a segment is an *attempt* of N instances from ONE
``create_fleet`` (one pool: one instance type in one subnet/zone, all or nothing through
``MinTargetCapacity``, optionally in the run's cluster placement group). When a pool cannot
give them, the next pool is asked, as for one instance. Once every node has a private
address the controller writes each node's cluster file (``launch/nodes/<instance id>.json``,
read by :mod:`spotrun.launch.node`): the nodes in rank order, **sorted by instance id**
(node 0, the smallest id, hosts torchrun's c10d rendezvous), so a resumed controller
derives the same order. Every node is its own segment (segment id = instance id) in the
state and the ledger, all with the attempt's ``group`` and their rank as ``node``. When any
node goes, the attempt is over: the controller terminates the survivors (their shutdown
SIGTERMs the command, which may commit), ends every node's segment with the attempt's
reason, counts ONE interruption (or failure) and relaunches a full new attempt.
``--min-nodes M`` accepts an attempt of M..N nodes; a smaller attempt is not grown while it
runs, the next relaunch asks for N again.

**Regions** (``--regions r1,r2``, r1 = home): when no pool of a region has capacity (after
the pool fallback within it) the next region is tried, before the on-demand fallback, which
comes only once every region failed for spot. ``--subnets``, ``--security-group-ids`` and
``--key-name`` belong to the home region; other regions use their default VPC (its default
subnets and security group). Each region gets its own launch template (and placement
group), all deleted at the end.

**Limits**: ``--max-cost`` is checked every poll (:class:`~.limits.CostGuard`, the ledger
priced from the offline snapshot); reached, the run is stopped as ``spotrun stop`` does
(exit 1). ``--max-wait`` is a :class:`~.limits.WaitClock` started by the first full round of
every region and market allowed that found no capacity, reset when capacity comes, kept in
the state across ``--resume``; expired, the run fails (exit 1). Without ``--max-wait`` the
same clock runs with :attr:`Timing.capacity_timeout_s` and ends in a :class:`CapacityError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any, ClassVar

from ..errors import ConfigError, LaunchError
from ..events import Cloud, EndReason, Market
from ..instance import InstanceInfo
from ..layout import EXIT_FINISHED
from ..storage import Storage
from .attempt import (
    Action,
    AttemptEnd,
    NodeEnd,
    Verdict,
    classify_ec2,
    classify_instance,
    finished_detail,
    next_step,
)
from .base import EventSink, LaunchEvent, LaunchEventKind, LaunchOutcome, log_events
from .book import RunBook
from .capacity import CapacitySearch
from .common import is_done
from .ec2 import (
    Ec2Api,
    FleetResult,
    InstanceStatus,
    LaunchedInstance,
    Pool,
)
from .ec2_options import Ec2Options, Timing
from .limits import CostGuard, Limits, WaitClock
from .state import (
    STOP_FILE,
    LaunchState,
    RunStatus,
    Segment,
    exit_record_path,
    load_state,
    new_run_id,
)
from .userdata import build_user_data

__all__ = ["Ec2Controller", "Ec2Options", "LaunchOutcome", "Timing"]

log = logging.getLogger("spotrun")


class Ec2Controller:
    """Keeps the run going on EC2; see the module docstring.

    Args:
        storage: the run URL.
        api: the EC2 calls in the run's home region.
        state: the run's launch state (new or loaded for ``--resume``).
        timing: the waits.
        on_ctrl_c: what Ctrl-C does to instances still running: ``"terminate"``,
            ``"leave"``, or a function given their description that returns one of those
            (the CLI asks the user through it).
        on_event: receives every :class:`LaunchEvent` (default: the ``spotrun`` logger).
        api_for: region -> its :class:`Ec2Api`, for the other regions of ``--regions``
            (default :meth:`Ec2Api.for_region`; tests pass moto clients).
    """

    mode: ClassVar[str] = "ec2"

    def __init__(
        self,
        storage: Storage,
        api: Ec2Api,
        state: LaunchState,
        *,
        timing: Timing | None = None,
        on_ctrl_c: str | Callable[[str], str] = "terminate",
        on_event: EventSink = log_events,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        api_for: Callable[[str], Ec2Api] | None = None,
    ) -> None:
        self.storage = storage
        self.api = api
        self.state = state
        self.options = Ec2Options.from_dict(state.options)
        self.timing = timing or Timing()
        self.on_ctrl_c = on_ctrl_c
        self.on_event = on_event
        self.clock = clock
        self.sleep = sleep
        self.book = RunBook(storage, state, heartbeat_s=self.timing.poll_s)
        # segment id -> the last time a poll saw its instance alive (proof of life).
        self._seen_alive: dict[str, float] = {}
        self.home: str = api.region
        self._apis: dict[str, Ec2Api] = {self.home: api}
        self._api_for = api_for or Ec2Api.for_region
        self.regions: list[str] = list(self.options.regions) or [self.home]
        if self.regions[0] != self.home:
            raise ConfigError(f"the controller's EC2 client is in {self.home} but the run's home region is "
                              f"{self.regions[0]}; build it for {self.regions[0]}")
        if state.launch_template_id and not state.launch_templates:
            # A state written before region failover: its one template is the home region's.
            state.launch_templates[self.home] = state.launch_template_id
        limits = Limits(self.options.max_cost_usd, self.options.max_wait_s).validate()
        self.cost_guard = CostGuard(limits, storage, min_interval_s=max(30.0, self.timing.poll_s))
        # One clock for "no capacity anywhere": --max-wait, or the default patience.
        wait_s = limits.max_wait_s if limits.max_wait_s is not None else self.timing.capacity_timeout_s
        self.wait = WaitClock(wait_s, since=state.waiting_since)
        self.capacity = CapacitySearch(self)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def start(cls, storage: Storage, api: Ec2Api, options: Ec2Options, *, run_id: str | None = None,
              **kwargs: Any) -> Ec2Controller:
        """A controller for a new run at ``storage`` (refuses a URL another launch owns).

        ``run_id`` (default: random) is the ``spotrun:run-id`` tag value; naming it lets an
        IAM policy scope TerminateInstances to this run's instances (docs/launch.md, IAM).
        """
        options.validate()
        existing = load_state(storage)
        if existing is not None and existing.status == RunStatus.RUNNING:
            raise ConfigError(
                f"{storage.display()} already has a launch (run id {existing.run_id}, "
                f"status running); pick it up with: spotrun launch --resume {storage.display()}"
            )
        # The script is built now so that bad options fail before anything is created.
        build_user_data(run_url=options.run_url, run_id="check", command=options.command,
                        setup=options.setup, env=options.env, secrets=options.secrets,
                        nodes=options.nodes, nproc_per_node=options.nproc_per_node)
        state = LaunchState(
            mode="ec2", run_id=run_id or new_run_id(), created_at=time.time(), options=options.to_dict()
        )
        if existing is not None:
            # A finished/stopped/failed run launched again: keep its counters and history.
            state.segments = existing.segments
            state.interruptions = existing.interruptions
        return cls(storage, api, state, **kwargs)

    @classmethod
    def resume(cls, storage: Storage, api: Ec2Api | None = None, *, max_cost_usd: float | None = None,
               max_wait_s: float | None = None, **kwargs: Any) -> Ec2Controller:
        """A controller that continues the launch recorded at ``storage``.

        ``max_cost_usd``/``max_wait_s`` replace the run's limits (how a run stopped by one
        continues: raise it and resume).
        """
        state = load_state(storage)
        if state is None:
            raise ConfigError(
                f"no launch state at {storage.display('launch/state.json')}; start the run with "
                "spotrun launch --run-url ... -- CMD"
            )
        if state.mode != "ec2":
            raise ConfigError(f"{storage.display()} was launched in {state.mode} mode, not EC2")
        if max_cost_usd is not None or max_wait_s is not None:
            Limits(max_cost_usd, max_wait_s).validate()
            if max_cost_usd is not None:
                state.options["max_cost_usd"] = max_cost_usd
            if max_wait_s is not None:
                state.options["max_wait_s"] = max_wait_s
                state.waiting_since = None  # a new patience counts from now
        if api is None:
            regions = state.options.get("regions") or []
            api = Ec2Api.for_region(regions[0] if regions else state.options.get("region"))
        if state.status in (RunStatus.STOPPED, RunStatus.FAILED):
            # Resuming a run that was stopped means: carry on.
            state.status = RunStatus.RUNNING
            state.failures = 0
        return cls(storage, api, state, **kwargs)

    # -- regions -----------------------------------------------------------------------

    def _api(self, region: str | None) -> Ec2Api:
        region = region or self.home
        if region not in self._apis:
            self._apis[region] = self._api_for(region)
        return self._apis[region]

    def _regions_used(self) -> list[str]:
        """Every region the run may have instances or resources in, home first."""
        return [r or self.home for r in self.state.regions_used(self.home)]

    def _by_region(self, segs: list[Segment]) -> dict[str, list[Segment]]:
        out: dict[str, list[Segment]] = {}
        for seg in segs:
            out.setdefault(seg.region or self.home, []).append(seg)
        return out

    def _describe(self, segs: list[Segment]) -> dict[str, InstanceStatus]:
        """Instance id -> status for ``segs``: one call per region (``describe`` for one)."""
        out: dict[str, InstanceStatus] = {}
        for region, group in self._by_region(segs).items():
            api = self._api(region)
            if len(group) == 1:
                out[group[0].instance_id] = api.describe(group[0].instance_id)
            else:
                out.update(api.describe_many([s.instance_id for s in group]))
        return out

    def _terminate(self, segs: list[Segment]) -> None:
        for region, group in self._by_region(segs).items():
            self._api(region).terminate([s.instance_id for s in group])

    def _alive_everywhere(self, states: tuple[str, ...] = ("pending", "running")) -> list[tuple[str, InstanceStatus]]:
        """(region, instance) for every instance tagged with the run id, in every region used."""
        return [(region, s) for region in self._regions_used()
                for s in self._api(region).find_run_instances(self.state.run_id) if s.state in states]

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> LaunchOutcome:
        """Run until the run is done, fails or is stopped. Ctrl-C: see ``on_ctrl_c``."""
        try:
            if self.state.status == RunStatus.FINISHED or is_done(self.storage):
                return self._finish()
            self.capacity.ensure_template(self.home)
            self._reconcile()
            while True:
                self._save()
                if self.storage.exists(STOP_FILE):
                    return self._stopped_by_request()
                if is_done(self.storage):
                    return self._finish()
                attempt = self.state.running
                if not attempt:
                    why = self._over_budget()
                    if why is not None:
                        return self._budget_stop(why)
                    outcome = self.capacity.launch()
                    if outcome is not None:
                        return outcome
                    continue
                statuses = self._describe(attempt)
                gone = [s for s in attempt if not self._still_there(s, statuses[s.instance_id])]
                if not gone:
                    for seg in attempt:
                        if statuses[seg.instance_id].alive:
                            self._seen_alive[seg.segment_id] = self.clock()
                    why = self._over_budget()
                    if why is not None:
                        return self._budget_stop(why)
                    self.sleep(self.timing.poll_s)
                    continue
                outcome = self._attempt_over(attempt, statuses, gone)
                if outcome is not None:
                    return outcome
        except KeyboardInterrupt:
            return self._ctrl_c()
        except Exception as exc:
            self._left_running(exc)
            raise

    def _still_there(self, seg: Segment, status: InstanceStatus) -> bool:
        return status.alive or (status.state == "missing"
                                and self.clock() - seg.started_at < self.timing.missing_grace_s)

    def _left_running(self, exc: BaseException) -> None:
        """The controller is dying of an error: say what may still run and how to stop it."""
        running = self.state.running
        url = self.storage.display()
        with contextlib.suppress(Exception):
            self.state.message = f"controller stopped: {exc}"
            self._save()
        if running:
            cur = running[0]
            what = (f"instance {cur.instance_id} ({cur.instance_type}, {cur.market})" if len(running) == 1 else
                    f"instances {', '.join(s.instance_id for s in running)} ({cur.instance_type}, {cur.market})")
            self._say(f"controller error ({exc}); {what} in {cur.region or self.home} may still be running. "
                      f"Watch it again: spotrun launch --resume {url}; stop it: spotrun stop {url}",
                      LaunchEventKind.WARNING)

    # -- steps -------------------------------------------------------------------------

    def _save(self) -> None:
        self.state.waiting_since = self.wait.since
        self.book.save()

    def _say(self, msg: str, kind: LaunchEventKind = LaunchEventKind.INFO,
             segment_id: str | None = None, **data: Any) -> None:
        self.on_event(LaunchEvent(kind, msg, segment_id, data))

    def _reconcile(self) -> None:
        """Make the state agree with what EC2 runs under this run id (after a crash).

        Instances running, unknown to the state: the controller died between launching them
        and writing the state; adopt them (one instance: the newest; N nodes: the set, when it
        is one attempt of M..N nodes of one pool, else none). Anything else alive under the
        run id is terminated, since two processes training one run would overwrite each
        other's checkpoints. A running attempt whose nodes are all alive is kept (its cluster
        files rewritten, in case the controller died before writing them).
        """
        alive = self._alive_everywhere()
        attempt = self.state.running
        keep: set[str] = set()
        if attempt:
            ids = {s.instance_id for s in attempt}
            keep = {s.instance_id for _, s in alive if s.instance_id in ids}
            if self.options.distributed and keep == ids:
                self._write_cluster(attempt)
        elif alive and not self.options.distributed:
            region, newest = max(alive, key=lambda rs: (rs[1].launch_time or 0.0, rs[1].instance_id))
            keep = {newest.instance_id}
            self._say(f"adopting {newest.instance_id} ({newest.instance_type}, {newest.market}): "
                      "it was launched for this run before the controller stopped")
            self._begin_segment(newest.instance_id, Pool(newest.instance_type or "?", newest.subnet_id),
                                newest.market or Market.SPOT.value, fleet_id=None, started_at=newest.launch_time,
                                region=region)
        elif alive:
            regions = {r for r, _ in alive}
            kinds = {(s.instance_type, s.availability_zone, s.market) for _, s in alive}
            if len(regions) == 1 and len(kinds) == 1 and self.options.need <= len(alive) <= self.options.nodes:
                (region,) = regions
                found = [s for _, s in alive]
                self._say(f"adopting {', '.join(s.instance_id for s in found)}: the nodes of an attempt "
                          "launched for this run before the controller stopped")
                launched = [LaunchedInstance(s.instance_id, Pool(s.instance_type or "?", s.subnet_id),
                                             s.market or Market.SPOT.value) for s in found]
                started = min((s.launch_time for s in found if s.launch_time), default=None)
                if self._begin_attempt(region, launched, fleet_id=None, started_at=started):
                    keep = {s.instance_id for s in found}
        # Anything else alive under this run id is a stray (if the state's own instance is
        # gone, the loop records its end; it must not be joined by a second one).
        extras: dict[str, list[str]] = {}
        for region, s in alive:
            if s.instance_id not in keep:
                extras.setdefault(region, []).append(s.instance_id)
        if extras:
            ids = [i for group in extras.values() for i in group]
            what = "more than one instance for this run" if not self.options.distributed else \
                "not nodes of this run's attempt"
            self._say(f"terminating {', '.join(ids)}: {what}")
            for region, group in extras.items():
                self._api(region).terminate(group)

    def _begin_segment(self, instance_id: str, pool: Pool, market: str, *, fleet_id: str | None,
                       started_at: float | None = None, region: str | None = None) -> Segment:
        region = region or self.home
        api = self._api(region)
        now = started_at or self.clock()
        seg = Segment(
            segment_id=instance_id, instance_id=instance_id, instance_type=pool.instance_type,
            market=market, started_at=now, subnet_id=pool.subnet_id, fleet_id=fleet_id, region=region,
        )
        try:
            status = api.describe(instance_id)
            seg.availability_zone = status.availability_zone
        except LaunchError:
            pass
        self.book.begin(seg, InstanceInfo(
            cloud=Cloud.AWS.value, instance_id=instance_id, instance_type=pool.instance_type,
            region=region, availability_zone=seg.availability_zone, market=market,
        ))
        where = f", {region}" if len(self.regions) > 1 else ""
        self._say(f"running on {instance_id} ({pool}, {market}, {seg.availability_zone or '?'}{where}); "
                  f"segment {len(self.state.segments)}", LaunchEventKind.SEGMENT_STARTED, seg.segment_id)
        return seg

    def _addresses(self, region: str, ids: list[str]) -> dict[str, InstanceStatus] | None:
        """Every node's status once each has a private address; None if one never gets one
        (within ``missing_grace_s``) or dies first."""
        api = self._api(region)
        end = self.clock() + self.timing.missing_grace_s
        while True:
            statuses = api.describe_many(ids)
            if all(s.private_ip for s in statuses.values()):
                return statuses
            if any(s.state not in ("pending", "running", "missing") for s in statuses.values()):
                return None
            if self.clock() >= end:
                return None
            self.sleep(min(self.timing.poll_s, 2.0))

    def _begin_attempt(self, region: str, launched: list[LaunchedInstance], *, fleet_id: str | None,
                       started_at: float | None = None) -> list[Segment] | None:
        """Record the nodes of one attempt and write their cluster files; None (nothing
        recorded) when they never all got an address."""
        ids = sorted(i.instance_id for i in launched)  # rank order: see the module docstring
        by_id = {i.instance_id: i for i in launched}
        statuses = self._addresses(region, ids)
        if statuses is None:
            return None
        now = started_at or self.clock()
        k = len({s.group for s in self.state.segments if s.group}) + 1
        group = f"{self.state.run_id}-a{k}"
        started: list[tuple[Segment, InstanceInfo]] = []
        for rank, iid in enumerate(ids):
            got, st = by_id[iid], statuses[iid]
            seg = Segment(
                segment_id=iid, instance_id=iid, instance_type=got.pool.instance_type, market=got.market,
                started_at=now, availability_zone=st.availability_zone,
                subnet_id=st.subnet_id or got.pool.subnet_id, fleet_id=fleet_id, group=group, node=rank,
                region=region,
            )
            started.append((seg, InstanceInfo(
                cloud=Cloud.AWS.value, instance_id=iid, instance_type=seg.instance_type, region=region,
                availability_zone=seg.availability_zone, market=got.market)))
        segs = self.book.begin_many(started)
        self._write_cluster(segs, statuses)
        head = segs[0]
        short = f" ({len(segs)} of --nodes {self.options.nodes}: --min-nodes {self.options.need})" \
            if len(segs) < self.options.nodes else ""
        self._say(f"running on {len(segs)} node(s){short}: {', '.join(s.instance_id for s in segs)} "
                  f"({head.instance_type}, {head.market}, {head.availability_zone or '?'}, {region}); "
                  f"head {statuses[head.instance_id].private_ip}; attempt {group}",
                  LaunchEventKind.SEGMENT_STARTED, head.segment_id, group=group,
                  nodes=[s.instance_id for s in segs])
        return segs

    def _write_cluster(self, segs: list[Segment], statuses: dict[str, InstanceStatus] | None = None) -> None:
        """Every node's cluster file (:mod:`spotrun.launch.node`'s format)."""
        segs = sorted(segs, key=lambda s: s.node or 0)
        if statuses is None:
            statuses = self._describe(segs)
        addresses = {s.instance_id: statuses[s.instance_id].private_ip for s in segs}
        if not all(addresses.values()):
            log.warning("no private address for every node of %s yet; cluster files not written", segs[0].group)
            return
        write_cluster_files(
            self.storage, group=segs[0].group or segs[0].segment_id,
            nodes=[{"instance_id": s.instance_id, "address": str(addresses[s.instance_id])} for s in segs],
            nproc_per_node=self.options.nproc_per_node or 1,
            # An attempt has exactly the nodes listed; --min-nodes only lets torchrun start
            # without a straggler when fewer were asked to wait for.
            min_nodes=self.options.need if self.options.need < len(segs) else None,
        )

    def _end_segment(self, seg: Segment, reason: str, *, exit_code: int | None = None,
                     detail: str | None = None, ended_at: float | None = None) -> None:
        self.book.end(seg, reason, ended_at=self.clock() if ended_at is None else ended_at,
                      exit_code=exit_code, detail=detail)

    def _gone_at(self, seg: Segment, status: InstanceStatus) -> float:
        """When the segment's instance went, at the earliest the evidence supports.

        Noticing is not going: a controller that was down (or slow) for hours would bill
        hours that never ran. The end is EC2's state-transition time when it gives one, else
        the interruption notice's deadline (a reclaimed spot instance is gone by then), else
        the last proof of life; never before the last proof of life (the wrapper's last
        ledger record, the last poll that saw the instance alive) and never after now.
        """
        now = self.clock()
        alive_until = max(seg.started_at, self._seen_alive.get(seg.segment_id, seg.started_at))
        deadlines: list[float] = []
        try:
            from ..ledger import Ledger

            for r in Ledger(self.storage).records():
                if r.get("segment_id") != seg.segment_id or r.get("source") == "launcher":
                    continue
                t = r.get("time")
                if isinstance(t, float) and math.isfinite(t) and t <= now:
                    alive_until = max(alive_until, t)
                d = r.get("deadline") if r.get("event") == "notice_received" else None
                if isinstance(d, (int, float)) and math.isfinite(d):
                    deadlines.append(float(d))
        except Exception as exc:  # noqa: BLE001 - the bill's precision never stops the run
            log.warning("could not read the run ledger to time the end of %s: %s", seg.segment_id, exc)
        if status.transition_at is not None:
            gone = status.transition_at
        elif deadlines:
            gone = min(deadlines)
        else:
            gone = alive_until
        return min(now, max(alive_until, gone))

    def _start(self, region: str, result: FleetResult) -> bool:
        """Record what a fleet gave as the running attempt; False (instances terminated) when
        the nodes could not be wired up."""
        api = self._api(region)
        if not self.options.distributed:
            got, extra = result.instances[0], result.instances[1:]
            if extra:
                api.terminate([i.instance_id for i in extra])
            self._begin_segment(got.instance_id, got.pool, got.market, fleet_id=result.fleet_id, region=region)
            return True
        launched, extra = result.instances[: self.options.nodes], result.instances[self.options.nodes:]
        if extra:
            api.terminate([i.instance_id for i in extra])
        if self._begin_attempt(region, launched, fleet_id=result.fleet_id) is None:
            ids = [i.instance_id for i in launched]
            self._say(f"terminating {', '.join(ids)}: not every node got a private address",
                      LaunchEventKind.WARNING)
            api.terminate(ids)
            return False
        return True

    def _read_exit_record(self, seg: Segment) -> int | None:
        rel = exit_record_path(seg.segment_id)
        if not self.storage.exists(rel):
            return None
        try:
            return int(json.loads(self.storage.read_bytes(rel))["exit_code"])
        except (ValueError, KeyError, TypeError):
            return None

    def _node_end(self, seg: Segment, status: InstanceStatus) -> NodeEnd:
        """What the controller knows about how ``seg``'s instance ended, as plain values."""
        return NodeEnd(seg.instance_id, self._read_exit_record(seg), status.state, status.reason_code, seg.node)

    def classify(self, seg: Segment, status: InstanceStatus) -> tuple[EndReason, int | None, str]:
        """Why the segment's instance is gone: (reason, exit code, detail)."""
        node = self._node_end(seg, status)
        verdict = classify_instance(node, done=is_done(self.storage))
        return verdict.reason, node.exit_code, self._warn_finished(verdict, node.exit_code)

    def _warn_finished(self, verdict: Verdict, code: int | None) -> str:
        if verdict.reason is EndReason.FINISHED and code not in (None, EXIT_FINISHED):
            log.warning("done.json written, so the run finished, although the command exited with "
                        "code %d", code)
        return verdict.detail

    def _attempt_over(self, attempt: list[Segment], statuses: dict[str, InstanceStatus],
                      gone: list[Segment]) -> LaunchOutcome | None:
        """A node (or the one instance) of the attempt is gone: the attempt is over, for
        every node; the policy (:mod:`.attempt`) says why and what next."""
        ends = {s.segment_id: self._node_end(s, statuses[s.instance_id]) for s in gone}
        done = is_done(self.storage)
        verdict = classify_ec2(AttemptEnd(nodes=tuple(ends[s.segment_id] for s in gone), done=done))
        if verdict.reason is EndReason.FINISHED:
            if len(attempt) > 1:
                return self._finish()
            self._warn_finished(verdict, ends[gone[0].segment_id].exit_code)
        single = len(attempt) == 1
        if single:
            seg, status = attempt[0], statuses[attempt[0].instance_id]
            ended_at = self._gone_at(seg, status)
            if status.state in ("stopped", "stopping"):
                self._terminate([seg])
            self._end_segment(seg, verdict.reason, exit_code=ends[seg.segment_id].exit_code,
                              detail=verdict.detail, ended_at=ended_at)
            self._say(f"{seg.instance_id} ended: {verdict.reason} ({verdict.detail})",
                      LaunchEventKind.SEGMENT_ENDED, seg.segment_id)
        else:
            why = verdict.detail
            still = [s for s in attempt
                     if statuses[s.instance_id].state not in ("terminated", "shutting-down", "missing")]
            if still:
                self._say(f"terminating {', '.join(s.instance_id for s in still)}: {why}; the attempt cannot "
                          "go on without it (their shutdown sends SIGTERM, so the command may commit)")
                self._terminate(still)
            now = self.clock()
            for seg in attempt:
                if seg in gone:
                    node = ends[seg.segment_id]
                    code, detail = node.exit_code, classify_instance(node, done=done).detail
                    ended_at = self._gone_at(seg, statuses[seg.instance_id])
                else:
                    code, detail, ended_at = None, f"terminated by spotrun: {why}", now
                self._end_segment(seg, verdict.reason, exit_code=code, detail=detail, ended_at=ended_at)
            self._say(f"attempt {attempt[0].group} ended: {verdict.reason} ({why}); {len(attempt)} node(s)",
                      LaunchEventKind.SEGMENT_ENDED, verdict.cause, group=attempt[0].group)
        return self._after_attempt(verdict)

    def _after_attempt(self, verdict: Verdict) -> LaunchOutcome | None:
        """Count an ended attempt (one per attempt, however many nodes) and act on the
        policy's next step."""
        decision = next_step(verdict, failures=self.state.failures, max_failures=self.options.max_failures)
        self.state.interruptions += decision.interruptions
        self.state.failures += decision.failures
        if decision.action is Action.FINISH:
            return self._finish()
        if decision.action is Action.STOP:
            return self._give_up(RunStatus.STOPPED, f"{decision.why}; resume with: spotrun launch --resume "
                                 f"{self.storage.display()}", exit_code=1)
        self._save()
        if decision.action is Action.FAIL:
            return self._give_up(RunStatus.FAILED, f"{decision.why} ({self.state.failures} failure(s), "
                                 f"--max-failures {self.options.max_failures})", exit_code=1)
        return None

    def _wait_gone(self, segs: list[Segment], timeout: float) -> dict[str, InstanceStatus]:
        end = self.clock() + timeout
        statuses = self._describe(segs)
        while any(s.alive for s in statuses.values()) and self.clock() < end:
            self.sleep(min(self.timing.poll_s, max(0.0, end - self.clock())))
            statuses = self._describe(segs)
        return statuses

    def _finish(self) -> LaunchOutcome:
        attempt = self.state.running
        if attempt:
            statuses = self._wait_gone(attempt, self.timing.finish_grace_s)
            alive = [s for s in attempt if statuses[s.instance_id].alive]
            if alive:
                self._say(f"terminating {', '.join(s.instance_id for s in alive)}: the run is done but "
                          f"{'it' if len(alive) == 1 else 'they'} did not shut down")
                self._terminate(alive)
            for seg in attempt:
                ended_at = None if seg in alive else self._gone_at(seg, statuses[seg.instance_id])
                code = self._read_exit_record(seg)
                detail = self._warn_finished(Verdict(EndReason.FINISHED, finished_detail(code)), code)
                self._end_segment(seg, EndReason.FINISHED, exit_code=code, detail=detail, ended_at=ended_at)
        self.capacity.cleanup()
        self.state.status = RunStatus.FINISHED
        self.state.message = "done.json written"
        self._save()
        self._say(f"run finished after {len(self.state.segments)} segment(s), "
                  f"{self.state.interruptions} interruption(s)", LaunchEventKind.OUTCOME)
        return LaunchOutcome(RunStatus.FINISHED, 0, "finished", len(self.state.segments), self.state.interruptions)

    def _give_up(self, status: str, why: str, *, exit_code: int) -> LaunchOutcome:
        attempt = self.state.running
        if attempt:
            self._terminate(attempt)
            for seg in attempt:
                self._end_segment(seg, EndReason.STOPPED if status == RunStatus.STOPPED else EndReason.FAILED, detail=why)
        self.capacity.cleanup()
        self.state.status = status
        self.state.message = why
        self._save()
        self._say(f"run {status}: {why}", LaunchEventKind.OUTCOME)
        return LaunchOutcome(status, exit_code, why, len(self.state.segments), self.state.interruptions)

    def _terminate_all(self) -> list[str]:
        """Terminate every instance of the run, in every region used (what ``stop`` does)."""
        found: dict[str, list[str]] = {}
        for region, s in self._alive_everywhere(("pending", "running", "stopping", "stopped")):
            found.setdefault(region, []).append(s.instance_id)
        for region, ids in found.items():
            self._api(region).terminate(ids)
        return [i for ids in found.values() for i in ids]

    def _stopped_by_request(self) -> LaunchOutcome:
        self.storage.remove(STOP_FILE)
        self._terminate_all()
        return self._give_up(RunStatus.STOPPED, "stopped by spotrun stop; checkpoints kept", exit_code=0)

    def _over_budget(self) -> str | None:
        """The ``--max-cost`` reason to stop, once the run's spend reached it."""
        if self.options.max_cost_usd is None:
            return None
        return self.cost_guard.check(self.clock(), running=[s.segment_id for s in self.state.running])

    def _budget_stop(self, why: str) -> LaunchOutcome:
        """Stop as ``spotrun stop`` does (the shutdown SIGTERMs the command, which commits)."""
        url = self.storage.display()
        self._terminate_all()
        return self._give_up(RunStatus.STOPPED, f"{why}; checkpoints kept. To continue, raise the limit: "
                             f"spotrun launch --resume {url} --max-cost USD", exit_code=1)

    # -- Ctrl-C ------------------------------------------------------------------------

    def _ctrl_c(self) -> LaunchOutcome:
        """Never leave an instance running without saying so (see ``on_ctrl_c``)."""
        url = self.storage.display()
        try:
            alive = self._alive_everywhere()
        except Exception as exc:  # noqa: BLE001 - we must still say something useful
            running = self.state.running
            ids = ", ".join(s.instance_id for s in running)
            self._say(f"interrupted; could not list the run's instances ({exc}). "
                      f"{'Instance ' + ids + ' may still be running. ' if running else ''}"
                      f"Stop everything with: spotrun stop {url}")
            return LaunchOutcome(RunStatus.DETACHED, 130, "interrupted", len(self.state.segments), self.state.interruptions)
        if not alive:
            self._say(f"interrupted; no instance is running for this run. Resume with: spotrun launch --resume {url}")
            self._save()
            return LaunchOutcome(RunStatus.DETACHED, 130, "interrupted", len(self.state.segments), self.state.interruptions)
        desc = ", ".join(f"{s.instance_id} ({s.instance_type} {s.market} in {s.availability_zone})" for _, s in alive)
        choice = self.on_ctrl_c(desc) if callable(self.on_ctrl_c) else self.on_ctrl_c
        if choice not in ("terminate", "leave"):
            choice = "terminate"  # never leave compute running unless told to
        by_region: dict[str, list[str]] = {}
        for region, s in alive:
            by_region.setdefault(region, []).append(s.instance_id)
        if choice == "terminate":
            for region, ids in by_region.items():
                self._api(region).terminate(ids)
            for seg in self.state.running:
                self._end_segment(seg, EndReason.STOPPED, detail="Ctrl-C on the controller")
            self.state.status = RunStatus.STOPPED
            self.state.message = "Ctrl-C on the controller"
            self._save()
            all_ids = [s.instance_id for _, s in alive]
            self._say(f"terminated {', '.join(all_ids)} (its shutdown sends SIGTERM, so the command "
                      f"commits a checkpoint). Checkpoints are kept at {url}. "
                      f"Resume with: spotrun launch --resume {url}")
            return LaunchOutcome(RunStatus.STOPPED, 130, "Ctrl-C", len(self.state.segments), self.state.interruptions)
        self._save()
        regions = ", ".join(by_region)
        commands = "; ".join(f"aws ec2 terminate-instances --region {region} --instance-ids {' '.join(ids)}"
                             for region, ids in by_region.items())
        self._say(f"left running: {desc} in {regions}; it keeps training into {url} but nothing "
                  f"relaunches it now. Watch it again: spotrun launch --resume {url}; stop it: "
                  f"spotrun stop {url} (or {commands})")
        return LaunchOutcome(RunStatus.DETACHED, 130, "Ctrl-C, instance left running", len(self.state.segments),
                             self.state.interruptions)


def write_cluster_files(storage: Storage, *, group: str, nodes: list[dict[str, str]], nproc_per_node: int,
                        min_nodes: int | None) -> list[str]:
    """Write every node's cluster file, ``launch/nodes/<instance id>.json``
    (:class:`spotrun.launch.node.ClusterSpec`: ``segment`` and ``rdzv_id`` are the attempt's
    group id, new for every attempt; node 0 hosts the rendezvous)."""
    from .node import ClusterSpec, write_cluster

    spec = ClusterSpec(segment=group, nodes=nodes, nproc_per_node=nproc_per_node, rdzv_id=group,
                       min_nodes=min_nodes)
    return write_cluster(storage, spec)
