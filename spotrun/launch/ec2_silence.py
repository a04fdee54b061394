"""The EC2 controller's judge of nodes that EC2 still calls ``running`` but that are gone:
silent (no new heartbeat for ``--node-silence`` seconds) or failing EC2's status checks.

EC2's instance state says nothing about a machine whose kernel hung or whose network went:
it stays ``running``, its peers block in their collective until the process group's timeout
(30 min by default) and every instance bills. Each poll of a running attempt, with
``--node-silence S`` > 0 (default 120 s):

* every node agent writes ``launch/nodes/alive/<instance id>.json`` every 30 s
  (:mod:`spotrun.records.heartbeat`); the controller reads each running node's record and
  notes, by its *own* clock, when the record last changed. Unchanged for S seconds (or three
  of the node's own intervals, which its record states, when longer): silent.
  Measured on the controller's clock, so the machines' clocks may differ; a resumed
  controller counts from its first read (at worst S late, never early).
* a node that has not written its first record is not judged by its heartbeat: it boots or
  runs ``--setup`` (any length, the user's), and its agent writes the first record when it
  has its cluster file. Counting from the attempt's start plus a boot allowance would have to
  guess the setup's length, and a guess too short kills a healthy node; a node that never
  starts leaves its peers in torchrun's rendezvous, which its join timeout ends anyway.
* every node of a multi-node attempt silent at once is not a node loss but a run URL the
  nodes cannot write (or the controller cannot read rightly): warned, nothing terminated.
* EC2's status checks (DescribeInstanceStatus, one call for the attempt) ``impaired``, the
  system check or the instance check: lost too, heartbeat or not (a single-instance run
  too: it has no node agent, but a failed check still means it trains no more).

A node so judged is terminated first (it must never come back and write: it cannot once
terminated, and the run's writer lease already refuses a commit from a writer whose lease was
taken over), with one log line naming it and how long it was silent; then the attempt goes
on as for any vanished node: its status reads "shutting-down" with the reason code
:data:`.ec2.NODE_SILENT`, which :func:`.attempt.classify_instance` books as an interruption
(the ledger's segment end and ``recovery_started`` carry the words), so ``--recovery
replace`` keeps the survivors and starts one replacement in its slot, and ``relaunch``
relaunches. The survivors' agents see the next attempt's cluster file while their torchrun
still hangs and stop it (:mod:`.grow`, "A dead attempt").
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import TYPE_CHECKING

from ..records.heartbeat import Heartbeat, read_heartbeat, silence_limit
from ..records.launch_state import Segment
from .base import LaunchEventKind
from .ec2 import NODE_SILENT, InstanceStatus

if TYPE_CHECKING:
    from .controller import Ec2Controller

__all__ = ["SilenceWatch"]

log = logging.getLogger(__name__)


def _interval(raw: bytes) -> float:
    """The writer's interval its record states (0 when it states none or cannot be read)."""
    try:
        return Heartbeat.from_json(json.loads(raw)).interval_s or 0.0
    except (ValueError, TypeError):  # unreadable or odd: judged by --node-silence alone
        return 0.0


class SilenceWatch:
    """Finds and ends the silent or impaired nodes of ``ctl``'s running attempt."""

    def __init__(self, ctl: Ec2Controller) -> None:
        self.ctl = ctl
        # instance id -> (its record as last read, the controller's time it first read it).
        self._seen: dict[str, tuple[bytes, float]] = {}
        self._all_quiet_since: float | None = None

    @property
    def on(self) -> bool:
        return self.ctl.options.node_silence_s > 0

    def check(self, attempt: list[Segment], statuses: dict[str, InstanceStatus]) -> dict[str, InstanceStatus]:
        """``statuses`` with every node judged lost (see the module docstring) terminated and
        its status replaced by a gone one (:data:`.ec2.NODE_SILENT`); ``statuses`` itself when
        none is (or ``--node-silence 0``)."""
        if not self.on:
            return statuses
        running = [s for s in attempt if statuses[s.instance_id].state == "running"]
        if not running:
            return statuses
        why: dict[str, str] = {}
        try:
            failed = self._impaired(running)
        except Exception as exc:  # noqa: BLE001 - no verdict this poll; EC2's state still rules
            log.warning("could not read the status checks of %s: %s", ", ".join(s.instance_id for s in running), exc)
            failed = {}
        for seg in running:
            if seg.instance_id in failed:
                why[seg.instance_id] = (f"failed its EC2 {failed[seg.instance_id]} status check while EC2 said "
                                        "running; terminated by spotrun")
        if self.ctl.options.distributed:
            limit = self.ctl.options.node_silence_s
            for iid, quiet in self._silent(running).items():
                why.setdefault(iid, f"silent for {quiet:.0f}s (no heartbeat; --node-silence {limit:g}) while "
                                    "EC2 said running; terminated by spotrun")
        if not why:
            return statuses
        return self._declare(attempt, statuses, why)

    def _impaired(self, running: list[Segment]) -> dict[str, str]:
        out: dict[str, str] = {}
        for region, group in self.ctl._by_region(running).items():
            out.update(self.ctl._api(region).impaired([s.instance_id for s in group]))
        return out

    def _silent(self, running: list[Segment]) -> dict[str, float]:
        """Instance id -> seconds without a new heartbeat, for those silent past the limit."""
        ctl, limit = self.ctl, self.ctl.options.node_silence_s
        now = ctl.clock()
        ids = {s.instance_id for s in running}
        for gone in [i for i in self._seen if i not in ids]:
            del self._seen[gone]
        silent: dict[str, float] = {}
        beating = 0
        for seg in running:
            iid = seg.instance_id
            try:
                raw = read_heartbeat(ctl.storage, iid)
            except Exception as exc:  # noqa: BLE001 - an unreadable record judges nothing this poll
                log.warning("could not read %s's heartbeat: %s", iid, exc)
                return {}
            if raw is None:
                continue  # no first beat yet: booting or in --setup (see the module docstring)
            beating += 1
            seen = self._seen.get(iid)
            if seen is None or seen[0] != raw:
                self._seen[iid] = (raw, now)
                continue
            if now - seen[1] >= silence_limit(limit, _interval(raw)):
                silent[iid] = now - seen[1]
        if len(running) > 1 and silent and len(silent) == len(running) == beating:
            if self._all_quiet_since is None:
                self._all_quiet_since = now
                ctl._say(f"no node of attempt {running[0].group} wrote a heartbeat for {min(silent.values()):.0f}s: "
                         "the run URL is more likely unreachable from them than every machine gone; terminating "
                         "none (EC2's state and status checks still judge them)", LaunchEventKind.WARNING)
            return {}
        self._all_quiet_since = None
        return silent

    def _declare(self, attempt: list[Segment], statuses: dict[str, InstanceStatus],
                 why: dict[str, str]) -> dict[str, InstanceStatus]:
        ctl = self.ctl
        lost = [s for s in attempt if s.instance_id in why]
        for seg in lost:
            ctl._say(f"node {seg.node if seg.node is not None else 0} ({seg.instance_id}) {why[seg.instance_id]}",
                     LaunchEventKind.WARNING, seg.segment_id)
        ctl._terminate(lost)
        out = dict(statuses)
        for seg in lost:
            out[seg.instance_id] = dataclasses.replace(statuses[seg.instance_id], state="shutting-down",
                                                       reason_code=NODE_SILENT, reason_message=why[seg.instance_id],
                                                       transition_at=None)
            self._seen.pop(seg.instance_id, None)
        return out
