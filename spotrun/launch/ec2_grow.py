"""The EC2 controller grows a job that went on shrunk (``--min-nodes``) back to N nodes.

(Any attempt running on fewer than N nodes, with ``--recovery replace``: the survivors of a
loss, or an elastic start with fewer nodes than asked for.)
:mod:`.ec2_replace` goes on with the survivors alone when no replacement came within
``replace_wait_s`` (a cluster file of just them, the checkpoint resharded to the smaller
world). While that attempt runs, :class:`Ec2Grow` asks EC2 again for the missing count, in
the survivors' subnet and placement group, the survivors' type first, on the market the rules
pick (:meth:`.ec2_replace.Ec2Replacement.ask`: all or nothing), with a backoff: the first ask
``grow_retry_s`` after the attempt was seen shrunk, then twice the wait each time, at most
``grow_retry_max_s`` (each ask is one ``create_fleet`` call; a busy zone is not hammered for
the hours a job may run shrunk). The instances then boot while the shrunk attempt trains on;
once every new node's agent notes that it waits for its cluster file
(:func:`.grow.note_waiting`, ``launch/nodes/waiting/<instance id>.json``) and each has an
address:

1. each becomes a segment of the next attempt (a new group), in an empty slot, billed from
   its launch;
2. every node's cluster file names that attempt: N nodes, the survivors in their slots, a new
   rendezvous id, a survivor hosting the store (it is up; a new machine may still boot), and
   ``grow`` set, no ``min_nodes`` (an elastic rendezvous would start without the new nodes).
   The survivors' node agents, watching their file while torchrun runs
   (:mod:`.grow`), stop their attempt with a SIGTERM to torchrun: the ranks agree on one step,
   commit the stop checkpoint there and exit 75 (no step lost), and the agents join the grown
   attempt, which resumes from that checkpoint resharded to N;
3. the ledger gets a ``recovery_started`` record of mode ``grow`` (nothing lost, the survivors
   kept, the instances started; ``lost_at`` and ``capacity_at`` the moment the file was
   written: the pause it costs is the stop, the rendezvous and the restore, which ``spotrun
   cost`` splits as for any recovery).

It is a planned stop, not an interruption: the survivors keep running (their segments go on),
nothing counts toward ``--max-interruptions`` or ``--max-failures``, and the controller's
exit codes do not change. Not while a replacement asked for at a notice waits (the attempt is
about to lose a node: that recovery goes first). A failed ask (no capacity, an API error, an
instance without an address) only waits longer: the shrunk attempt goes on. A new instance
that dies while it boots, or whose agent is not waiting within ``grow_boot_wait_s``, is
terminated with the others of that ask and booked (begun at its launch, ended then,
``stopped``: billed, never trained), and the asks go on with the backoff. When the attempt or
the run ends meanwhile (the finish, a stop, Ctrl-C, a controller error),
:meth:`Ec2Grow.discard` terminates and books them the same way. A node of the attempt that
gets a notice or is lost meanwhile takes a booting one as its replacement instead
(:meth:`Ec2Grow.hand_over`: it boots in the survivors' subnet already, on the market the
rules picked); the grow starts over once the attempt has recovered, and waits while a
replacement asked for at a notice is pending. A controller that
dies forgets the backoff; ``--resume`` asks again from its start.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..errors import LaunchError
from ..records.events import Cloud, EndReason
from ..records.instance import InstanceInfo
from ..records.launch_state import Segment
from .base import LaunchEventKind
from .ec2_early import Early, _segment
from .grow import noted_waiting

if TYPE_CHECKING:
    from .controller import Ec2Controller

__all__ = ["Ec2Grow"]

log = logging.getLogger(__name__)


class Ec2Grow:
    """Grows ``ctl``'s shrunk attempt back to ``--nodes`` (see the module docstring)."""

    def __init__(self, ctl: Ec2Controller) -> None:
        self.ctl = ctl
        #: When to ask next (controller clock), None while the attempt is not shrunk.
        self.next_at: float | None = None
        #: The wait after the next failed ask.
        self.delay = 0.0
        #: Asks made for the current shrunk stretch (for the messages and tests).
        self.asks = 0
        #: (slot, instance) of the new nodes booting, not yet in the attempt; since when.
        self.booting: list[tuple[int, Early]] = []
        self.booting_since = 0.0

    def missing(self, attempt: list[Segment]) -> list[int]:
        """The empty slots of ``attempt`` (node indices 0..N-1 no running node holds)."""
        held = {s.node or 0 for s in attempt}
        return [i for i in range(self.ctl.options.nodes) if i not in held]

    def check(self, attempt: list[Segment]) -> None:
        """One poll of a running attempt: ask for the missing nodes when it is time, or see
        whether the ones asked for are ready to join."""
        ctl = self.ctl
        o, t = ctl.options, ctl.timing
        # Only agents started with --rejoin-timeout (user data, --recovery replace) watch for a
        # grow; with relaunch the survivors would never stop for it.
        shrunk = (o.distributed and o.min_nodes is not None and o.recovery == "replace"
                  and 0 < len(attempt) < o.nodes)
        if not shrunk:
            self.discard("the attempt has every node")
            self.next_at, self.asks = None, 0
            return
        if self.booting:
            if not ctl.early.waiting:  # a node of the attempt is going: its recovery goes first
                self._poll_booting(attempt)
            return
        now = ctl.clock()
        if self.next_at is None:
            self.next_at, self.delay = now + t.grow_retry_s, t.grow_retry_s
            return
        if now < self.next_at or ctl.early.waiting:
            return
        self.asks += 1
        if not self._ask(attempt):
            self._back_off()

    def discard(self, why: str) -> None:
        """Terminate and book the new nodes still booting (the grow is off)."""
        if self.booting:
            early, self.booting = [e for _, e in self.booting], []
            self.ctl.early.end(early, EndReason.STOPPED, f"a node to grow back not needed ({why})")

    def hand_over(self, n: int) -> list[Early]:
        """Up to ``n`` of the new nodes still booting, taken out of the grow: a node of the
        attempt is being lost, and a machine already booting in its subnet, on the market the
        rules picked, replaces it sooner than a new ask (and is not terminated unused). The
        grow starts over (its backoff from the start) once the attempt has recovered."""
        given, self.booting = self.booting[:n], self.booting[n:]
        if given:
            self.next_at, self.asks = None, 0
        return [e for _, e in given]

    def _back_off(self) -> None:
        t = self.ctl.timing
        self.delay = min(max(2 * self.delay, t.grow_retry_s), t.grow_retry_max_s)
        self.next_at = self.ctl.clock() + self.delay

    def _ask(self, attempt: list[Segment]) -> bool:
        """Ask for the missing nodes once; True when they were started (now booting)."""
        ctl = self.ctl
        slots = self.missing(attempt)
        market, why = ctl.capacity.choose_market()
        if market is None:
            ctl._say(f"not growing back to {ctl.options.nodes} node(s): {why}", LaunchEventKind.CAPACITY)
            return False
        first = attempt[0]
        region = first.region or ctl.home
        try:
            launched, errors = ctl.replace.ask(region, first.subnet_id, first.instance_type, len(slots), market)
        except LaunchError as exc:
            ctl._say(f"could not ask for {len(slots)} node(s) to grow back: {exc}; the attempt goes on with "
                     f"{len(attempt)}", LaunchEventKind.WARNING)
            return False
        if launched is None:
            t = ctl.timing
            ctl._say(f"no capacity yet for {len(slots)} node(s) to grow back to {ctl.options.nodes} "
                     f"({'; '.join(errors[-3:]) or 'none given'}); asking again in "
                     f"{min(max(2 * self.delay, t.grow_retry_s), t.grow_retry_max_s):g}s", LaunchEventKind.CAPACITY)
            return False
        now = ctl.clock()
        got = sorted(launched.instances, key=lambda i: i.instance_id)
        self.booting = [(slot, Early(f"slot {slot}", inst, region, launched.fleet_id, now,
                                             first.availability_zone))
                        for slot, inst in zip(slots, got, strict=True)]
        self.booting_since = now
        ctl._say(f"capacity is back: started {', '.join(i.instance_id for i in got)} to grow back to "
                 f"{ctl.options.nodes} node(s); the {len(attempt)} running node(s) train on while "
                 f"{'it boots' if len(got) == 1 else 'they boot'}", LaunchEventKind.CAPACITY)
        return True

    def _poll_booting(self, attempt: list[Segment]) -> None:
        ctl = self.ctl
        early = [e for _, e in self.booting]
        region = early[0].region
        ids = [e.instance.instance_id for e in early]
        statuses = ctl._describe([_segment(e) for e in early])
        dead = [i for i in ids if not statuses[i].alive and statuses[i].state != "missing"]
        waited = ctl.clock() - self.booting_since
        why = None
        if dead:
            why = f"{', '.join(dead)} went while booting"
        elif all(noted_waiting(ctl.storage, i) for i in ids):
            addresses = ctl.attempts.addresses(region, ids)
            if addresses is not None:
                self._begin(attempt, addresses)
                return
            why = "not every new node got a private address"
        elif waited >= ctl.timing.grow_boot_wait_s:
            why = f"no node agent waiting on {', '.join(i for i in ids if not noted_waiting(ctl.storage, i))} " \
                  f"after {waited:.0f}s"
        if why is not None:
            self.discard(f"{why}; the attempt goes on with {len(attempt)}")
            self._back_off()

    def _begin(self, attempt: list[Segment], statuses: dict[str, Any]) -> None:
        ctl = self.ctl
        now = ctl.clock()
        k, group = ctl.attempts.next_group()
        started = []
        for slot, e in self.booting:
            got, st = e.instance, statuses[e.instance.instance_id]
            seg = Segment(segment_id=got.instance_id, instance_id=got.instance_id, instance_type=got.pool.instance_type,
                          market=got.market, started_at=e.launched_at, availability_zone=st.availability_zone,
                          subnet_id=st.subnet_id or got.pool.subnet_id, fleet_id=e.fleet_id, group=group, node=slot,
                          region=e.region)
            started.append((seg, InstanceInfo(cloud=Cloud.AWS.value, instance_id=seg.instance_id,
                                              instance_type=seg.instance_type, region=e.region,
                                              availability_zone=seg.availability_zone, market=got.market)))
        self.booting = []
        segs = ctl.book.begin_many(started)
        nodes = sorted([*attempt, *segs], key=lambda s: s.node or 0)
        ctl.attempts.write_cluster(nodes, group=group, attempt=k, host=nodes.index(attempt[0]), grow=True)
        kept = [s.instance_id for s in sorted(attempt, key=lambda s: s.node or 0)]
        ctl.replace.record(group, mode="grow", lost=[], kept=kept, started=len(segs), lost_at=now, capacity_at=now)
        self.next_at, self.asks = None, 0
        ctl._say(f"growing to {len(nodes)} node(s) with {', '.join(s.instance_id for s in segs)} "
                 f"({segs[0].instance_type}, {segs[0].market}, {segs[0].availability_zone or '?'}); the "
                 f"{len(attempt)} running node(s) stop at a step (checkpoint committed) and join attempt {group}",
                 LaunchEventKind.SEGMENT_STARTED, segs[0].segment_id, group=group,
                 nodes=[s.instance_id for s in nodes], kept=kept)
