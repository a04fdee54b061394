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

Where each part lives: how an attempt ended and what next, :mod:`.attempt` (shared with the
local simulator); the search for capacity and the per-region resources, :mod:`.capacity`;
recording and wiring an attempt's instances, :mod:`.ec2_attempts`; the ways a run ends
(finished, given up, stopped, Ctrl-C), :mod:`.ec2_ending`. This module is the loop.

**N nodes** (``--nodes N``): a segment is an *attempt* of N instances from ONE
``create_fleet`` (one pool: one instance type in one subnet/zone, all or nothing through
``MinTargetCapacity``, optionally in the run's cluster placement group). When a pool cannot
give them, the next pool is asked, as for one instance. Once every node has a private
address the controller writes each node's cluster file (``launch/nodes/<instance id>.json``,
read by :mod:`spotrun.launch.node`): the nodes in rank order, **sorted by instance id**
(node 0, the smallest id, hosts torchrun's c10d rendezvous), so a resumed controller
derives the same order. Every node is its own segment (segment id = instance id) in the
state and the ledger, all with the attempt's ``group`` and their rank as ``node``. When
nodes are lost to an interruption and others still run, ``--recovery replace`` (the default)
keeps the survivors and asks only for replacements (:mod:`.ec2_replace`); otherwise (every
node lost, a failure, ``--recovery relaunch``) the attempt is over: the controller terminates
the survivors (their shutdown SIGTERMs the command, which may commit), ends every node's
segment with the attempt's reason, counts ONE interruption (or failure) and relaunches a
full new attempt. The ledger gets a ``recovery_started`` record before each attempt that
follows a loss. A node's interruption notice (the ``notice_received`` record its wrapper
writes into the run ledger) makes the controller ask for that node's replacement at once,
before the node is gone (:mod:`.ec2_early`). A node that EC2 still calls running but that
wrote no heartbeat for ``--node-silence`` seconds, or failed its status checks, is terminated
and lost like any other (:mod:`.ec2_silence`).
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

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any, ClassVar

from ..errors import ConfigError
from ..records.events import EndReason
from ..records.launch_state import (
    STOP_FILE,
    LaunchState,
    RunStatus,
    Segment,
    exit_record_path,
    load_state,
    new_run_id,
)
from ..records.layout import EXIT_FINISHED
from ..storage import Storage
from .attempt import (
    Action,
    AttemptEnd,
    NodeEnd,
    Verdict,
    classify_ec2,
    classify_instance,
    next_step,
)
from .base import EventSink, LaunchEvent, LaunchEventKind, LaunchOutcome, log_events
from .book import RunBook
from .capacity import CapacitySearch
from .common import is_done
from .ec2 import NODE_SILENT, Ec2Api, InstanceStatus, Pool
from .ec2_attempts import Ec2Attempts
from .ec2_early import EarlyReplacements
from .ec2_ending import Ec2Ending
from .ec2_grow import Ec2Grow
from .ec2_options import Ec2Options, Timing
from .ec2_replace import Ec2Replacement
from .ec2_silence import SilenceWatch
from .limits import Booting, CostGuard, Limits, WaitClock
from .userdata import build_user_data

__all__ = ["Ec2Controller", "Ec2Options", "LaunchOutcome", "Timing"]

log = logging.getLogger(__name__)


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
        self.replace = Ec2Replacement(self)
        self.early = EarlyReplacements(self)
        self.grow = Ec2Grow(self)
        self.silence = SilenceWatch(self)
        self.attempts = Ec2Attempts(self)
        self.ending = Ec2Ending(self)

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
                        nodes=options.nodes, nproc_per_node=options.nproc_per_node,
                        rejoin_timeout_s=options.rejoin_timeout_s if options.recovery == "replace" else 0.0)
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
               max_wait_s: float | None = None, node_silence_s: float | None = None,
               **kwargs: Any) -> Ec2Controller:
        """A controller that continues the launch recorded at ``storage``.

        ``max_cost_usd``/``max_wait_s`` replace the run's limits (how a run stopped by one
        continues: raise it and resume); ``node_silence_s`` its ``--node-silence``.
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
        if node_silence_s is not None:
            state.options["node_silence_s"] = node_silence_s
            Ec2Options.from_dict(state.options).validate()
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
                return self.ending.finish()
            self.capacity.ensure_template(self.home)
            self.attempts.reconcile()
            while True:
                self._save()
                if self.storage.exists(STOP_FILE):
                    return self.ending.stopped_by_request()
                if is_done(self.storage):
                    return self.ending.finish()
                if self.replace.pending is not None:
                    why = self._over_budget()
                    if why is not None:
                        return self.ending.budget_stop(why)
                    outcome = self.replace.step()
                    if outcome is not None:
                        return outcome
                    continue
                attempt = self.state.running
                if not attempt:
                    why = self._over_budget()
                    if why is not None:
                        return self.ending.budget_stop(why)
                    outcome = self.capacity.launch()
                    if outcome is not None:
                        return outcome
                    continue
                statuses = self.silence.check(attempt, self._describe(attempt))
                gone = [s for s in attempt if not self._still_there(s, statuses[s.instance_id])]
                if not gone:
                    for seg in attempt:
                        if statuses[seg.instance_id].alive:
                            self._seen_alive[seg.segment_id] = self.clock()
                    why = self._over_budget()
                    if why is not None:
                        return self.ending.budget_stop(why)
                    self.early.check(attempt)
                    self.grow.check(attempt)
                    self.sleep(self.timing.poll_s)
                    continue
                outcome = self._attempt_over(attempt, statuses, gone)
                if outcome is not None:
                    return outcome
        except KeyboardInterrupt:
            return self.ending.ctrl_c()
        except Exception as exc:
            self.ending.left_running(exc)
            raise

    def _still_there(self, seg: Segment, status: InstanceStatus) -> bool:
        return status.alive or (status.state == "missing"
                                and self.clock() - seg.started_at < self.timing.missing_grace_s)

    # -- steps -------------------------------------------------------------------------

    def _save(self) -> None:
        self.state.waiting_since = self.wait.since
        self.book.save()

    def _say(self, msg: str, kind: LaunchEventKind = LaunchEventKind.INFO,
             segment_id: str | None = None, **data: Any) -> None:
        self.on_event(LaunchEvent(kind, msg, segment_id, data))

    def _begin_segment(self, instance_id: str, pool: Pool, market: str, *, fleet_id: str | None,
                       started_at: float | None = None, region: str | None = None) -> Segment:
        """One instance's segment begins (:meth:`.ec2_attempts.Ec2Attempts.begin_segment`;
        called through here so that a test can make the controller die at this point)."""
        return self.attempts.begin_segment(instance_id, pool, market, fleet_id=fleet_id,
                                           started_at=started_at, region=region)

    def _end_segment(self, seg: Segment, reason: str, *, exit_code: int | None = None,
                     detail: str | None = None, ended_at: float | None = None, unused: bool = False) -> None:
        self.book.end(seg, reason, ended_at=self.clock() if ended_at is None else ended_at,
                      exit_code=exit_code, detail=detail, unused=unused)

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
            from ..records.ledger import Ledger

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
        return NodeEnd(seg.instance_id, self._read_exit_record(seg), status.state, status.reason_code, seg.node,
                       message=status.reason_message if status.reason_code == NODE_SILENT else "")

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
        decision = next_step(verdict, failures=self.state.failures, max_failures=self.options.max_failures,
                             nodes=[s.instance_id for s in attempt], recovery=self.options.recovery)
        if decision.action is Action.REPLACE and len(attempt) > 1:
            # Machines booting to grow the job back replace the lost nodes that have no early
            # replacement yet, rather than being terminated unused.
            unreplaced = [s.instance_id for s in gone if s.instance_id not in self.early.waiting]
            self.early.adopt(unreplaced, self.grow.hand_over(len(unreplaced)))
        self.grow.discard(f"attempt {attempt[0].group} lost a node")
        if verdict.reason is EndReason.FINISHED:
            if len(attempt) > 1:
                return self.ending.finish()
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
            if verdict.reason is EndReason.INTERRUPTED:
                self.replace.expect_relaunch([seg], verdict.detail)
        else:
            if decision.action is Action.REPLACE and self.replace.keep(attempt, statuses, gone, verdict, decision):
                return None
            self.early.discard(f"attempt {attempt[0].group} ended: {verdict.reason}")
            if verdict.reason is EndReason.INTERRUPTED:
                self.replace.expect_relaunch([s for s in attempt if s in gone], verdict.detail)
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
            return self.ending.finish()
        if decision.action is Action.STOP:
            return self.ending.give_up(RunStatus.STOPPED, f"{decision.why}; resume with: spotrun launch --resume "
                                 f"{self.storage.display()}", exit_code=1)
        self._save()
        if decision.action is Action.FAIL:
            return self.ending.give_up(RunStatus.FAILED, f"{decision.why} ({self.state.failures} failure(s), "
                                 f"--max-failures {self.options.max_failures})", exit_code=1)
        return None

    def _over_budget(self) -> str | None:
        """The ``--max-cost`` reason to stop, once the run's spend reached it."""
        if self.options.max_cost_usd is None:
            return None
        return self.cost_guard.check(self.clock(), running=[s.segment_id for s in self.state.running],
                                     booting=self.booting())

    def booting(self) -> list[Booting]:
        """The machines started for a replacement (at a notice) or a grow that are not in the
        ledger yet: billed from their launch, they reach the ledger only when they join, so
        ``--max-cost`` counts them here (or a budget would be late by their boot)."""
        return [e.booting() for e in self.early.waiting.values()] + [e.booting() for _, e in self.grow.booting]

    # -- Ctrl-C ------------------------------------------------------------------------
