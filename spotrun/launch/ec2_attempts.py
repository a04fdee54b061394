"""How the EC2 controller turns what a fleet gave into the running attempt.

One instance becomes one segment; the N nodes of a multi-node attempt become N segments of
one ``group`` (the attempt id ``<run id>-a<K>``), ranked by instance id (node 0, the
smallest, hosts torchrun's c10d rendezvous, so a resumed controller derives the same
order), recorded only once every node has a private address, each with its cluster file
(``launch/nodes/<instance id>.json``, :mod:`spotrun.launch.node`).
:meth:`Ec2Attempts.reconcile` makes the state agree with what EC2 runs under the run id
after a controller died: it adopts an attempt launched but never recorded, and terminates
strays.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from ..errors import LaunchError
from ..records.events import Cloud, Market
from ..records.instance import InstanceInfo
from ..records.launch_state import Segment
from ..storage import Storage
from .base import LaunchEventKind
from .ec2 import FleetResult, InstanceStatus, LaunchedInstance, Pool

if TYPE_CHECKING:
    from .controller import Ec2Controller

__all__ = ["Ec2Attempts", "write_cluster_files"]

log = logging.getLogger(__name__)


class Ec2Attempts:
    """Records and wires up the attempts of ``ctl`` (see the module docstring)."""

    def __init__(self, ctl: Ec2Controller) -> None:
        self.ctl = ctl
        #: The highest attempt number handed out by this controller (an attempt on the
        #: survivors alone, ``--min-nodes``, has no segment of its own to count).
        self._last_k = 0

    def next_group(self, suffix: str = "") -> tuple[int, str]:
        """The next attempt's number and group id, ``<run id>-a<K>``: one more than any
        attempt recorded, so rendezvous ids never repeat and nodes rejoin only forward."""
        ks = [_attempt_number(s.group) for s in self.ctl.state.segments if s.group]
        k = max([self._last_k, len({s.group for s in self.ctl.state.segments if s.group}), *ks]) + 1
        self._last_k = k
        return k, f"{self.ctl.state.run_id}-a{k}{suffix}"

    def reconcile(self) -> None:
        """Make the state agree with what EC2 runs under this run id (after a crash).

        Instances running, unknown to the state: the controller died between launching them
        and writing the state; adopt them (one instance: the newest; N nodes: the set, when it
        is one attempt of M..N nodes of one pool, else none). Anything else alive under the
        run id is terminated, since two processes training one run would overwrite each
        other's checkpoints. A running attempt whose nodes are all alive is kept (its cluster
        files rewritten, in case the controller died before writing them).
        """
        ctrl = self.ctl
        alive = ctrl._alive_everywhere()
        attempt = ctrl.state.running
        keep: set[str] = set()
        if attempt:
            ids = {s.instance_id for s in attempt}
            keep = {s.instance_id for _, s in alive if s.instance_id in ids}
            # Nodes of several groups: survivors and their replacements, whose files were
            # written before they were recorded; rewriting them from here could only go back.
            if ctrl.options.distributed and keep == ids and len({s.group for s in attempt}) == 1:
                self.write_cluster(attempt)
        elif alive and not ctrl.options.distributed:
            region, newest = max(alive, key=lambda rs: (rs[1].launch_time or 0.0, rs[1].instance_id))
            keep = {newest.instance_id}
            ctrl._say(f"adopting {newest.instance_id} ({newest.instance_type}, {newest.market}): "
                      "it was launched for this run before the controller stopped")
            ctrl._begin_segment(newest.instance_id, Pool(newest.instance_type or "?", newest.subnet_id),
                                newest.market or Market.SPOT.value, fleet_id=None, started_at=newest.launch_time,
                                region=region)
        elif alive:
            regions = {r for r, _ in alive}
            kinds = {(s.instance_type, s.availability_zone, s.market) for _, s in alive}
            if len(regions) == 1 and len(kinds) == 1 and ctrl.options.need <= len(alive) <= ctrl.options.nodes:
                (region,) = regions
                found = [s for _, s in alive]
                ctrl._say(f"adopting {', '.join(s.instance_id for s in found)}: the nodes of an attempt "
                          "launched for this run before the controller stopped")
                launched = [LaunchedInstance(s.instance_id, Pool(s.instance_type or "?", s.subnet_id),
                                             s.market or Market.SPOT.value) for s in found]
                started = min((s.launch_time for s in found if s.launch_time), default=None)
                if self.begin_attempt(region, launched, fleet_id=None, started_at=started):
                    keep = {s.instance_id for s in found}
        # Anything else alive under this run id is a stray (if the state's own instance is
        # gone, the loop records its end; it must not be joined by a second one).
        extras: dict[str, list[str]] = {}
        for region, s in alive:
            if s.instance_id not in keep:
                extras.setdefault(region, []).append(s.instance_id)
        if extras:
            ids = [i for group in extras.values() for i in group]
            what = "more than one instance for this run" if not ctrl.options.distributed else \
                "not nodes of this run's attempt"
            ctrl._say(f"terminating {', '.join(ids)}: {what}")
            for region, group in extras.items():
                ctrl._api(region).terminate(group)

    def begin_segment(self, instance_id: str, pool: Pool, market: str, *, fleet_id: str | None,
                       started_at: float | None = None, region: str | None = None) -> Segment:
        ctrl = self.ctl
        region = region or ctrl.home
        api = ctrl._api(region)
        now = started_at or ctrl.clock()
        seg = Segment(
            segment_id=instance_id, instance_id=instance_id, instance_type=pool.instance_type,
            market=market, started_at=now, subnet_id=pool.subnet_id, fleet_id=fleet_id, region=region,
        )
        try:
            status = api.describe(instance_id)
            seg.availability_zone = status.availability_zone
        except LaunchError:
            pass
        ctrl.book.begin(seg, InstanceInfo(
            cloud=Cloud.AWS.value, instance_id=instance_id, instance_type=pool.instance_type,
            region=region, availability_zone=seg.availability_zone, market=market,
        ))
        where = f", {region}" if len(ctrl.regions) > 1 else ""
        ctrl._say(f"running on {instance_id} ({pool}, {market}, {seg.availability_zone or '?'}{where}); "
                  f"segment {len(ctrl.state.segments)}", LaunchEventKind.SEGMENT_STARTED, seg.segment_id)
        return seg

    def addresses(self, region: str, ids: list[str]) -> dict[str, InstanceStatus] | None:
        """Every node's status once each has a private address; None if one never gets one
        (within ``missing_grace_s``) or dies first."""
        ctrl = self.ctl
        api = ctrl._api(region)
        end = ctrl.clock() + ctrl.timing.missing_grace_s
        while True:
            statuses = api.describe_many(ids)
            if all(s.private_ip for s in statuses.values()):
                return statuses
            if any(s.state not in ("pending", "running", "missing") for s in statuses.values()):
                return None
            if ctrl.clock() >= end:
                return None
            ctrl.sleep(min(ctrl.timing.poll_s, 2.0))

    def begin_attempt(self, region: str, launched: list[LaunchedInstance], *, fleet_id: str | None,
                       started_at: float | None = None) -> list[Segment] | None:
        """Record the nodes of one attempt and write their cluster files; None (nothing
        recorded) when they never all got an address."""
        ctrl = self.ctl
        ids = sorted(i.instance_id for i in launched)  # rank order: see the module docstring
        by_id = {i.instance_id: i for i in launched}
        statuses = self.addresses(region, ids)
        if statuses is None:
            return None
        now = started_at or ctrl.clock()
        k, group = self.next_group()
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
        segs = ctrl.book.begin_many(started)
        self.write_cluster(segs, statuses, attempt=k)
        ctrl.replace.record_relaunch(group, started=len(segs))
        head = segs[0]
        short = f" ({len(segs)} of --nodes {ctrl.options.nodes}: --min-nodes {ctrl.options.need})" \
            if len(segs) < ctrl.options.nodes else ""
        ctrl._say(f"running on {len(segs)} node(s){short}: {', '.join(s.instance_id for s in segs)} "
                  f"({head.instance_type}, {head.market}, {head.availability_zone or '?'}, {region}); "
                  f"head {statuses[head.instance_id].private_ip}; attempt {group}",
                  LaunchEventKind.SEGMENT_STARTED, head.segment_id, group=group,
                  nodes=[s.instance_id for s in segs])
        return segs

    def write_cluster(self, segs: list[Segment], statuses: dict[str, InstanceStatus] | None = None, *,
                      group: str | None = None, attempt: int | None = None, host: int = 0,
                      grow: bool = False) -> None:
        """Every node's cluster file (:mod:`spotrun.launch.node`'s format), ``segs`` in slot
        order; ``group`` (default: theirs) names the attempt, ``host`` the store's node;
        ``grow``: the attempt grows a shrunk job back (.ec2_grow), and needs every node listed
        (elastic, torchrun would start on the survivors alone while the new ones boot)."""
        ctrl = self.ctl
        segs = sorted(segs, key=lambda s: s.node or 0)
        group = group or segs[0].group or segs[0].segment_id
        if statuses is None:
            statuses = ctrl._describe(segs)
        addresses = {s.instance_id: statuses[s.instance_id].private_ip for s in segs}
        if not all(addresses.values()):
            log.warning("no private address for every node of %s yet; cluster files not written", segs[0].group)
            return
        write_cluster_files(
            ctrl.storage, group=group, host=host,
            attempt=_attempt_number(group) if attempt is None else attempt,
            nodes=[{"instance_id": s.instance_id, "address": str(addresses[s.instance_id])} for s in segs],
            nproc_per_node=ctrl.options.nproc_per_node or 1,
            # An attempt has exactly the nodes listed; --min-nodes only lets torchrun start
            # without a straggler when fewer were asked to wait for.
            min_nodes=ctrl.options.need if ctrl.options.need < len(segs) and not grow else None, grow=grow,
        )

    def start(self, region: str, result: FleetResult) -> bool:
        """Record what a fleet gave as the running attempt; False (instances terminated) when
        the nodes could not be wired up."""
        ctrl = self.ctl
        api = ctrl._api(region)
        if not ctrl.options.distributed:
            got, extra = result.instances[0], result.instances[1:]
            if extra:
                api.terminate([i.instance_id for i in extra])
            seg = ctrl._begin_segment(got.instance_id, got.pool, got.market, fleet_id=result.fleet_id, region=region)
            ctrl.replace.record_relaunch(seg.segment_id, started=1)
            return True
        launched, extra = result.instances[: ctrl.options.nodes], result.instances[ctrl.options.nodes:]
        if extra:
            api.terminate([i.instance_id for i in extra])
        if self.begin_attempt(region, launched, fleet_id=result.fleet_id) is None:
            ids = [i.instance_id for i in launched]
            ctrl._say(f"terminating {', '.join(ids)}: not every node got a private address",
                      LaunchEventKind.WARNING)
            api.terminate(ids)
            return False
        return True



def write_cluster_files(storage: Storage, *, group: str, nodes: list[dict[str, str]], nproc_per_node: int,
                        min_nodes: int | None, host: int = 0, attempt: int = 0, grow: bool = False) -> list[str]:
    """Write every node's cluster file, ``launch/nodes/<instance id>.json``
    (:class:`spotrun.launch.node.ClusterSpec`: ``segment`` and ``rdzv_id`` are the attempt's
    group id, new for every attempt; node ``host`` hosts the rendezvous)."""
    from .node import ClusterSpec, write_cluster

    spec = ClusterSpec(segment=group, nodes=nodes, nproc_per_node=nproc_per_node, rdzv_id=group,
                       min_nodes=min_nodes, host=host, attempt=attempt, grow=grow)
    return write_cluster(storage, spec)


def _attempt_number(group: str | None) -> int:
    """K of a group id ``<run id>-a<K>[...]`` (0 when it names none)."""
    found = re.search(r"-a(\d+)(?:-m)?$", group or "")
    return int(found.group(1)) if found else 0
