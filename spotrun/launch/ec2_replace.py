"""The EC2 controller's partial recovery: keep the survivors of an attempt, replace only the
lost nodes (``--recovery replace``, :attr:`.attempt.Action.REPLACE`).

When some nodes of an N-node attempt are gone and the others still run, the controller:

1. ends the lost nodes' segments and keeps the survivors' instances running (their node
   agents note torchrun's exit and wait, ``--rejoin-timeout``, for the next cluster file;
   user data keeps the instance up while they wait). A survivor is one machine billing
   continuously: its segment goes on, one start and one end in the ledger;
2. asks for exactly ``len(lost)`` instances in the survivors' subnet (their zone), every
   ``--instance-types`` type, the survivors' type first, in the run's placement group, on
   the market the rules pick (:func:`.attempt.choose_market`); all or nothing;
3. once they have addresses, records them as the next attempt's segments (new group, each
   in a lost node's slot), writes every node's cluster file (new rendezvous id, a survivor
   hosting the store: it is up, the replacement may still be booting) and the ledger's
   ``recovery_started`` record.

No replacement within :attr:`.ec2_options.Timing.replace_wait_s`: with ``--min-nodes M`` and
at least M survivors, the job goes on on the survivors alone (a cluster file of just them:
the checkpoint reshards to the smaller world; :mod:`.ec2_grow` then asks for the missing
nodes again and grows the job back at a planned stop); else the survivors are terminated and the
run relaunches whole (whose own wait ends, without capacity, in the usual clear failure,
checkpoints kept). A survivor that dies meanwhile joins the lost; none left, a whole
relaunch. A controller that dies while a replacement is pending forgets it: ``--resume``
finds the survivors' open segments, and their agents give up after ``--rejoin-timeout``,
shut their instances down and the attempt ends as any other.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import LaunchError
from ..records.events import EndReason, Market
from ..records.launch_state import RunStatus, Segment
from ..records.ledger import Ledger
from .attempt import Decision, Verdict, classify_instance
from .base import LaunchEventKind, LaunchOutcome
from .ec2 import FleetResult, InstanceStatus, Pool

if TYPE_CHECKING:
    from .controller import Ec2Controller
    from .ec2_early import Early

__all__ = ["Ec2Replacement", "Pending"]

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """An attempt that lost nodes and waits for their replacements."""

    kept: list[Segment]
    lost: list[Segment]
    lost_at: float
    since: float
    why: str


class Ec2Replacement:
    """Keeps survivors and finds replacements for ``ctl`` (see the module docstring)."""

    def __init__(self, ctl: Ec2Controller) -> None:
        self.ctl = ctl
        self.pending: Pending | None = None
        #: The ``recovery_started`` fields of the next whole attempt (a relaunch after a loss).
        self.relaunch: dict[str, Any] | None = None

    # -- the ledger ----------------------------------------------------------------------

    def lost_at(self, segs: list[Segment]) -> float:
        """When the loss was known: the earliest notice one of ``segs`` received, else now."""
        now = self.ctl.clock()
        ids = {s.segment_id for s in segs}
        try:
            times = [float(r["detected_at"]) for r in Ledger(self.ctl.storage).records()
                     if r.get("event") == "notice_received" and r.get("segment_id") in ids
                     and isinstance(r.get("detected_at"), (int, float))]
        except Exception as exc:  # noqa: BLE001 - the books never stop the run
            log.warning("could not read the ledger for the notice times of %s: %s", sorted(ids), exc)
            times = []
        times = [t for t in times if math.isfinite(t) and t <= now]
        return min(times, default=now)

    def record(self, group: str, *, mode: str, lost: list[str], kept: list[str], started: int,
               lost_at: float, capacity_at: float | None, detail: str | None = None) -> None:
        try:
            Ledger(self.ctl.storage).recovery_started(
                segment_id=group, lost_at=lost_at, mode=mode, lost=tuple(lost), kept=tuple(kept),
                instances_started=started, capacity_at=capacity_at, detail=detail)
        except Exception as exc:  # noqa: BLE001 - the books never stop the run
            self.ctl._say(f"could not record the recovery in the ledger: {exc}", LaunchEventKind.WARNING)

    def record_relaunch(self, group: str, *, started: int) -> None:
        """The whole attempt ``group`` follows a loss: its ``recovery_started`` record."""
        if self.relaunch is None:
            return
        fields, self.relaunch = self.relaunch, None
        self.record(group, mode="relaunch", kept=[], started=started, capacity_at=self.ctl.clock(), **fields)

    def expect_relaunch(self, lost: list[Segment], why: str | None = None) -> None:
        """The next whole attempt follows the loss of ``lost`` (``why``: the verdict's words)."""
        if lost:
            self.relaunch = {"lost": [s.instance_id for s in lost], "lost_at": self.lost_at(lost), "detail": why}

    # -- keeping the survivors -----------------------------------------------------------

    def keep(self, attempt: list[Segment], statuses: dict[str, InstanceStatus], gone: list[Segment],
             verdict: Verdict, decision: Decision) -> bool:
        """Act on :attr:`Action.REPLACE`: end the lost nodes' segments, keep the survivors
        waiting for replacements. False (nothing done) when a survivor is not running."""
        ctl = self.ctl
        kept = [s for s in attempt if s.instance_id in decision.kept]
        lost = [s for s in attempt if s.instance_id in decision.lost]
        if not kept or any(statuses[s.instance_id].state != "running" for s in kept):
            return False
        lost_at = self.lost_at(lost)
        for seg in lost:
            status = statuses[seg.instance_id]
            node = ctl._node_end(seg, status)
            if status.state in ("stopped", "stopping"):
                ctl._terminate([seg])
            ctl._end_segment(seg, verdict.reason, exit_code=node.exit_code,
                             detail=classify_instance(node, done=False).detail,
                             ended_at=ctl._gone_at(seg, status))
        ctl.state.interruptions += decision.interruptions
        ctl._save()
        self.pending = Pending(kept=kept, lost=lost, lost_at=lost_at, since=ctl.clock(), why=verdict.detail)
        ctl._say(f"attempt {attempt[0].group}: {verdict.detail}; keeping {', '.join(s.instance_id for s in kept)} "
                 f"running, asking for {len(lost)} replacement(s)", LaunchEventKind.SEGMENT_ENDED, verdict.cause,
                 group=attempt[0].group, kept=[s.instance_id for s in kept], lost=[s.instance_id for s in lost])
        return True

    def step(self) -> LaunchOutcome | None:
        """One round for the pending replacement: done, given up, or wait and try again."""
        ctl = self.ctl
        p = self.pending
        assert p is not None
        statuses = ctl._describe(p.kept)
        dead = [s for s in p.kept if not statuses[s.instance_id].alive]
        if dead:
            for seg in dead:
                ctl._end_segment(seg, EndReason.INTERRUPTED, detail="lost while waiting for a replacement",
                                 ended_at=ctl._gone_at(seg, statuses[seg.instance_id]))
            p.kept = [s for s in p.kept if s not in dead]
            p.lost = sorted([*p.lost, *dead], key=lambda s: s.node or 0)
            ctl._say(f"{', '.join(s.instance_id for s in dead)} went too while waiting for a replacement",
                     LaunchEventKind.WARNING)
            if not p.kept:
                return self._relaunch("every node is gone")
        market, why = ctl.capacity.choose_market()
        if market is None:
            return ctl.ending.give_up(RunStatus.FAILED, why, exit_code=1)
        region = p.kept[0].region or ctl.home
        subnet = p.kept[0].subnet_id
        # Replacements asked for at the lost nodes' notices (.ec2_early) take their slots.
        early = ctl.early.take(p.lost)
        rest = [s for s in p.lost if s.instance_id not in early]
        n = len(rest)
        if not rest:
            if self._begin(region, [], fleet_id=None, early=early):
                return None
            early, rest, n = {}, list(p.lost), len(p.lost)  # _begin ended them
        launched, errors = self.ask(region, subnet, p.kept[0].instance_type, n, market)
        if launched is not None:
            if self._begin(region, launched.instances, fleet_id=launched.fleet_id, early=early):
                return None
            errors = [*errors, "replacements without an address"]
        elif early:
            # The early ones wait for the others; they are billed meanwhile, as a survivor is.
            ctl.early.put_back(early)
        waited = ctl.clock() - p.since
        if waited >= ctl.timing.replace_wait_s:
            where = f"{subnet or 'the default subnet'} ({p.kept[0].availability_zone or '?'})"
            if len(p.kept) >= ctl.options.need and ctl.options.min_nodes is not None:
                return self._shrink(f"no capacity for {n} replacement(s) in {where} for {waited:.0f}s")
            return self._relaunch(f"no capacity for {n} replacement(s) in {where} for {waited:.0f}s"
                                  + (f" ({'; '.join(errors[-3:])})" if errors else ""))
        ctl._say(f"no capacity for {n} replacement(s) yet ({'; '.join(errors[-3:]) or 'none given'}); "
                 f"asking again in {ctl.timing.capacity_retry_s:g}s", LaunchEventKind.CAPACITY)
        ctl.sleep(ctl.timing.capacity_retry_s)
        return None

    def ask(self, region: str, subnet: str | None, first_type: str | None, n: int,
            market: Market) -> tuple[FleetResult | None, list[str]]:
        """Ask EC2 for ``n`` instances in ``subnet`` (``first_type`` first, then every
        ``--instance-types`` type), in the run's placement group: all or nothing. The fleet
        that gave them (``n`` instances exactly), or None and the capacity errors."""
        ctl = self.ctl
        api = ctl._api(region)
        template = ctl.capacity.ensure_template(region)
        types = [first_type or "", *ctl.options.instance_types]
        pools = [Pool(t, subnet) for t in dict.fromkeys(t for t in types if t)]
        errors: list[str] = []
        for request in ([pools] if n == 1 else [[pool] for pool in pools]):
            ctl.state.attempts += 1
            ctl._save()
            result = api.create_fleet(
                run_id=ctl.state.run_id, template_id=template, pools=request, market=market.value,
                max_price=ctl.options.max_price if market.value == "spot" else None,
                client_token=f"spotrun-{ctl.state.run_id}-{ctl.state.attempts}", count=n,
                min_count=n if n > 1 else None, placement_group=ctl.capacity.placement(region))
            if n > 1:
                result = api.release_if_short(result, n)
            if result.instances:
                extra = result.instances[n:]
                if extra:
                    api.terminate([i.instance_id for i in extra])
                return FleetResult(result.fleet_id, result.instances[:n], result.errors), errors
            hard = [e for e in result.errors if not e.is_capacity]
            if hard and not any(e.is_capacity for e in result.errors):
                e = hard[0]
                raise LaunchError(f"create_fleet ({market}) for a replacement failed in {e.pool or 'every pool'}: "
                                  f"{e.code}: {e.message}")
            errors.extend(f"{e.pool or 'all pools'}: {e.code}" for e in result.errors)
        return None, errors

    def _begin(self, region: str, launched: list[Any], *, fleet_id: str | None,
               early: dict[str, Early] | None = None) -> bool:
        """Record the replacements (each in a lost node's slot; one asked for at a node's
        notice, ``early``, in that node's) and write the next attempt's cluster files; False
        (the new instances terminated, the early ones ended) when one never got an address."""
        ctl = self.ctl
        p = self.pending
        assert p is not None
        early = early or {}
        ids = sorted(i.instance_id for i in launched)
        all_ids = [*ids, *(e.instance.instance_id for e in early.values())]
        statuses = ctl.attempts.addresses(region, all_ids)
        if statuses is None:
            ctl._say(f"terminating {', '.join(all_ids)}: not every replacement got a private address",
                     LaunchEventKind.WARNING)
            if ids:
                ctl._api(region).terminate(ids)
            ctl.early.end(list(early.values()), EndReason.INTERRUPTED, "no private address")
            return False
        k, group = ctl.attempts.next_group()
        by_id = {i.instance_id: (i, fleet_id, None) for i in launched}
        by_id.update({e.instance.instance_id: (e.instance, e.fleet_id, e.launched_at) for e in early.values()})
        slots = [(s.node or 0, early[s.instance_id].instance.instance_id) for s in p.lost if s.instance_id in early]
        slots += list(zip([s.node or 0 for s in p.lost if s.instance_id not in early], ids, strict=True))
        started = []
        from ..records.events import Cloud
        from ..records.instance import InstanceInfo

        now = ctl.clock()
        for slot, iid in sorted(slots):
            (got, fleet, since), st = by_id[iid], statuses[iid]
            seg = Segment(segment_id=iid, instance_id=iid, instance_type=got.pool.instance_type, market=got.market,
                          started_at=now if since is None else since, availability_zone=st.availability_zone,
                          subnet_id=st.subnet_id or got.pool.subnet_id, fleet_id=fleet, group=group, node=slot,
                          region=region)
            started.append((seg, InstanceInfo(cloud=Cloud.AWS.value, instance_id=iid, instance_type=seg.instance_type,
                                              region=region, availability_zone=seg.availability_zone,
                                              market=got.market)))
        segs = ctl.book.begin_many(started)
        nodes = sorted([*p.kept, *segs], key=lambda s: s.node or 0)
        ctl.attempts.write_cluster(nodes, group=group, attempt=k, host=nodes.index(p.kept[0]))
        # Capacity came when the last replacement was there: an early one at its launch.
        capacity_at = now if ids else max(min(e.launched_at, now) for e in early.values())
        self.record(group, mode="replace", lost=[s.instance_id for s in p.lost],
                    kept=[s.instance_id for s in p.kept], started=len(segs), lost_at=p.lost_at,
                    capacity_at=max(capacity_at, p.lost_at), detail=p.why)
        ctl._say(f"replaced {', '.join(s.instance_id for s in p.lost)} with {', '.join(s.instance_id for s in segs)} "
                 f"({segs[0].instance_type}, {segs[0].market}, {segs[0].availability_zone or '?'}); attempt {group} "
                 f"on {len(nodes)} node(s), kept {', '.join(s.instance_id for s in p.kept)}",
                 LaunchEventKind.SEGMENT_STARTED, segs[0].segment_id, group=group,
                 nodes=[s.instance_id for s in nodes])
        ctl.wait.got_capacity()
        self.pending = None
        return True

    def _shrink(self, why: str) -> None:
        """``--min-nodes``: go on with the survivors alone (a smaller world, resharded)."""
        ctl = self.ctl
        p = self.pending
        assert p is not None
        ctl.early.discard("going on with the survivors")
        k, group = ctl.attempts.next_group(suffix="-m")
        ctl.attempts.write_cluster(p.kept, group=group, attempt=k, host=0)
        self.record(group, mode="replace", lost=[s.instance_id for s in p.lost],
                    kept=[s.instance_id for s in p.kept], started=0, lost_at=p.lost_at, capacity_at=ctl.clock(),
                    detail=p.why)
        ctl._say(f"{why}: going on with the {len(p.kept)} survivor(s) (--min-nodes {ctl.options.need}); "
                 f"attempt {group}", LaunchEventKind.CAPACITY, group=group)
        self.pending = None

    def _relaunch(self, why: str) -> None:
        """No replacement: terminate the survivors; the loop then launches a whole attempt."""
        ctl = self.ctl
        p = self.pending
        assert p is not None
        self.pending = None
        ctl.early.discard("every node relaunched")
        if p.kept:
            ctl._say(f"{why}: terminating {', '.join(s.instance_id for s in p.kept)} and relaunching every node",
                     LaunchEventKind.WARNING)
            ctl._terminate(p.kept)
            now = ctl.clock()
            for seg in p.kept:
                ctl._end_segment(seg, EndReason.INTERRUPTED, detail=f"terminated by spotrun: {why}", ended_at=now)
        self.relaunch = {"lost": [s.instance_id for s in p.lost], "lost_at": p.lost_at, "detail": p.why}
