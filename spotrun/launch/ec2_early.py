"""The EC2 controller asks for a node's replacement at its interruption notice, not at its loss
(``--recovery replace``, N nodes).

A spot notice gives two minutes: about what an instance's boot and ``--setup`` take. Asked
for only once the noticed instance is gone, the replacement boots while the survivors wait;
asked for at the notice, it boots while the noticed node writes its stop checkpoint.

**How the controller learns of a notice.** The noticed node's wrapper records it already:
every rank that sees a notice writes a ``notice_received`` record (its ``segment_id`` is the
instance id, ``SPOTRUN_SEGMENT_ID``) into the run's ledger in the run URL, whose file name
starts with the notice's detection time. Each poll, :class:`NoticeScan` lists the ledger and
reads only records it has not read before (their names), so no new channel is needed and no
EC2 call: what the controller reads is what the cost report reads. Only EC2's own notices
count (``source`` ``ec2``, not a rebalance recommendation): a signal can be spotrun's own
shutdown, a rebalance only a hint.

**One instance per noticed node**, asked for in the survivors' subnet and placement group as
a replacement is (:meth:`.ec2_replace.Ec2Replacement.ask`), on the market the rules pick, once
(no capacity: the loss asks again, as before). It boots, its node agent waits for its cluster
file. When the attempt then loses the noticed node and goes on with the survivors
(:attr:`.attempt.Action.REPLACE`), the early instance takes that node's slot in the next
attempt (:meth:`take`) and its segment begins at its launch: the books bill it from then, and
the recovery's ``capacity_at`` is that launch. When the attempt ends in a way that needs no
replacement (the run finished or was stopped, every node lost -> a whole relaunch, the
survivors not kept), the early instance is terminated and its segment is recorded, begun at
its launch and ended now (:meth:`discard`), ``stopped``: it was billed and never trained.

Until then it is no segment of the state (the running attempt stays the attempt's nodes
only); a controller that dies meanwhile forgets it, and ``--resume`` terminates it as a stray
of the run id (the minutes it ran are then missing from the books, as for any instance
launched and never recorded).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import LaunchError
from ..records.events import Cloud, EndReason
from ..records.instance import InstanceInfo
from ..records.launch_state import Segment
from ..records.layout import LEDGER_DIR
from ..storage import Storage
from .base import LaunchEventKind
from .ec2 import LaunchedInstance
from .limits import Booting

if TYPE_CHECKING:
    from .controller import Ec2Controller

__all__ = ["Early", "EarlyReplacements", "NoticeScan"]

log = logging.getLogger(__name__)

#: Notices read from the ledger are trusted only this long before the attempt's start (the
#: wrapper's clock against the controller's): older records are not read at all.
CLOCK_SLACK_S = 600.0


@dataclass
class Early:
    """A replacement asked for at ``noticed``'s notice, booting, not yet in the attempt."""

    noticed: str
    instance: LaunchedInstance
    region: str
    fleet_id: str | None
    launched_at: float
    #: The zone it was asked in (its subnet's), for pricing it while it boots.
    availability_zone: str | None = None

    def booting(self) -> Booting:
        """What ``--max-cost`` counts for it until it is booked (billed from its launch)."""
        return Booting(self.instance.pool.instance_type, self.instance.market, self.region,
                       self.availability_zone, self.launched_at)


class NoticeScan:
    """The EC2 notices the run's ledger holds, read incrementally (see the module docstring)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._read: set[str] = set()
        #: segment id -> the earliest detection time of an EC2 notice it recorded.
        self.noticed: dict[str, float] = {}

    def scan(self, since: float) -> dict[str, float]:
        """Read the ledger records new since the last scan (those recorded from ``since`` on);
        return every segment with an EC2 interruption notice and when it was detected."""
        try:
            names = [n for n in self.storage.list_dir(LEDGER_DIR)
                     if n.endswith(".json") and not n.startswith(".") and n not in self._read]
        except Exception as exc:  # noqa: BLE001 - an early replacement is an optimisation
            log.warning("could not list the run ledger for notices: %s", exc)
            return dict(self.noticed)
        floor = max(0, round((since - CLOCK_SLACK_S) * 1e9))
        for name in sorted(names):
            self._read.add(name)
            try:
                if int(name.split("-", 1)[0]) < floor:
                    continue
                record = json.loads(self.storage.read_bytes(f"{LEDGER_DIR}/{name}"))
            except Exception as exc:  # noqa: BLE001 - a damaged record is the report's business
                log.debug("skipping ledger record %s: %s", name, exc)
                continue
            if not isinstance(record, dict) or record.get("event") != "notice_received":
                continue
            if record.get("source") != "ec2" or record.get("action") == "rebalance":
                continue
            sid, at = record.get("segment_id"), record.get("detected_at")
            if isinstance(sid, str) and isinstance(at, (int, float)):
                self.noticed[sid] = min(float(at), self.noticed.get(sid, float(at)))
        return dict(self.noticed)


class EarlyReplacements:
    """The replacements ``ctl`` asked for at notices (see the module docstring)."""

    def __init__(self, ctl: Ec2Controller) -> None:
        self.ctl = ctl
        self.scan = NoticeScan(ctl.storage)
        #: noticed instance id -> its early replacement.
        self.waiting: dict[str, Early] = {}
        #: noticed instance ids already asked for (once each, found or not).
        self._asked: set[str] = set()

    def check(self, attempt: list[Segment]) -> None:
        """A poll of a running N-node attempt: ask for one replacement per newly noticed node."""
        ctl = self.ctl
        if len(attempt) < 2 or ctl.options.recovery != "replace":
            return
        noticed = self.scan.scan(min(s.started_at for s in attempt))
        for seg in attempt:
            if seg.instance_id in noticed and seg.instance_id not in self._asked:
                self._asked.add(seg.instance_id)
                self._ask(seg, [s for s in attempt if s is not seg])

    def _ask(self, noticed: Segment, others: list[Segment]) -> None:
        ctl = self.ctl
        if self.adopt([noticed.instance_id], ctl.grow.hand_over(1)):
            return
        market, _ = ctl.capacity.choose_market()
        if market is None or not others:
            return
        home = others[0]
        region = home.region or ctl.home
        try:
            result, errors = ctl.replace.ask(region, home.subnet_id, home.instance_type, 1, market)
        except LaunchError as exc:
            ctl._say(f"could not ask for {noticed.instance_id}'s replacement at its notice: {exc}",
                     LaunchEventKind.WARNING)
            return
        if result is None:
            ctl._say(f"{noticed.instance_id} has an interruption notice; no capacity for its replacement yet "
                     f"({'; '.join(errors[-3:]) or 'none given'}); asking again once it is gone",
                     LaunchEventKind.CAPACITY)
            return
        (got,) = result.instances
        self.waiting[noticed.instance_id] = Early(noticed.instance_id, got, region, result.fleet_id, ctl.clock(),
                                                   home.availability_zone)
        ctl._say(f"{noticed.instance_id} has an interruption notice: asked for its replacement now, "
                 f"{got.instance_id} ({got.pool}, {got.market}) boots while it writes its stop checkpoint",
                 LaunchEventKind.CAPACITY, noticed.instance_id, early=got.instance_id)

    def adopt(self, lost_ids: list[str], spare: list[Early]) -> bool:
        """Machines already booting (for a grow back) become the replacements of ``lost_ids``,
        one each, in order; billed from their own launch. True when any was adopted."""
        for iid, e in zip(lost_ids, spare, strict=False):
            self.waiting[iid] = dataclasses.replace(e, noticed=iid)
            self._asked.add(iid)
            self.ctl._say(f"{iid} is going: {e.instance.instance_id} ({e.instance.pool}, {e.instance.market}), "
                          "booting to grow the job back, replaces it instead", LaunchEventKind.CAPACITY, iid,
                          early=e.instance.instance_id)
        return bool(spare)

    def take(self, lost: list[Segment]) -> dict[str, Early]:
        """The early replacements of ``lost`` that still run: lost instance id -> replacement
        (taken out of the waiting list; one that is gone is booked and dropped)."""
        mine = [self.waiting.pop(s.instance_id) for s in lost if s.instance_id in self.waiting]
        if not mine:
            return {}
        statuses = self.ctl._describe([_segment(e) for e in mine])
        gone = [e for e in mine if not statuses[e.instance.instance_id].alive]
        if gone:
            self.end(gone, EndReason.INTERRUPTED, "gone before it could join the next attempt")
        return {e.noticed: e for e in mine if e not in gone}

    def put_back(self, early: dict[str, Early]) -> None:
        self.waiting.update(early)

    def discard(self, why: str) -> None:
        """The attempt needs no replacement any more: terminate and book every early one."""
        if self.waiting:
            early, self.waiting = list(self.waiting.values()), {}
            self.end(early, EndReason.STOPPED, f"an early replacement not needed ({why})")
        self._asked.clear()

    def end(self, early: list[Early], reason: EndReason, why: str) -> None:
        """Terminate ``early`` and record each as a segment begun at its launch, ended now."""
        ctl = self.ctl
        if not early:
            return
        ids = [e.instance.instance_id for e in early]
        try:  # before terminating: one that already went (its agent gave up) bills until then
            statuses = ctl._describe([_segment(e) for e in early])
        except LaunchError:
            statuses = {}
        ctl._say(f"terminating {', '.join(ids)}: {why}", LaunchEventKind.WARNING)
        for e in early:
            try:
                ctl._api(e.region).terminate([e.instance.instance_id])
            except LaunchError as exc:
                ctl._say(f"could not terminate {e.instance.instance_id}: {exc}", LaunchEventKind.WARNING)
        now = ctl.clock()
        for e in early:
            seg = _segment(e)
            st = statuses.get(seg.instance_id)
            gone_at = st.transition_at if st is not None and not st.alive and st.transition_at else None
            ended_at = max(e.launched_at, min(now, gone_at) if gone_at is not None else now)
            seg.availability_zone = st.availability_zone if st is not None else None
            ctl.book.begin(seg, InstanceInfo(cloud=Cloud.AWS.value, instance_id=seg.instance_id,
                                             instance_type=seg.instance_type, region=e.region,
                                             availability_zone=seg.availability_zone, market=seg.market))
            # No attempt ran on it: the cost report books it as the recovery's spare, not as an
            # attempt or an interruption of training.
            ctl._end_segment(seg, reason, detail=f"terminated by spotrun: {why}", ended_at=ended_at, unused=True)


def _segment(e: Early) -> Segment:
    return Segment(segment_id=e.instance.instance_id, instance_id=e.instance.instance_id,
                   instance_type=e.instance.pool.instance_type, market=e.instance.market,
                   started_at=e.launched_at, subnet_id=e.instance.pool.subnet_id, fleet_id=e.fleet_id,
                   region=e.region)
