"""The attempt policy every launcher shares: how an attempt ended, and what happens next.

An *attempt* is one start of the command: one instance (or simulated one), or the N nodes
of a multi-node job. Both launchers gather what they saw when it ended as plain values
(:class:`NodeEnd`, :class:`AttemptEnd`: exit codes, ``done.json``, a notice or node loss the
simulator played, EC2's state and reason) and ask this module, which does no I/O:

* :func:`classify_local` / :func:`classify_ec2`: the :class:`Verdict`, an
  :class:`~spotrun.records.events.EndReason` with its detail; the two differ only in the evidence
  each launcher has (the simulator knows what it did; the controller reads EC2's reasons);
* :func:`next_step`: the :class:`Decision` that follows (finish, replace, relaunch, stop,
  fail) and the counters it moves;
* :func:`choose_market` and :func:`fallback_reason`: on which market the next attempt asks
  for capacity (spot, or on-demand when the rules say so).

A verdict names the nodes whose machine is gone (:attr:`Verdict.lost`). With recovery
``"replace"`` (the launchers' default) an interruption that took a non-empty strict subset of
an attempt's nodes is :attr:`Action.REPLACE`: the survivors' machines stay and only the lost
nodes are started again (:attr:`Decision.lost`, :attr:`Decision.kept`); when every node is
lost, or with recovery ``"relaunch"``, the next attempt is a whole new one.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from ..records.events import EndReason, Market
from ..records.layout import EXIT_FINISHED, EXIT_INTERRUPTED, EXIT_STOP_UNSAVED
from .ec2 import NODE_SILENT, SPOT_INTERRUPTION

__all__ = [
    "KILLED",
    "RECOVERY_MODES",
    "UNSAVED_STOP",
    "Action",
    "AttemptEnd",
    "Decision",
    "NodeEnd",
    "Verdict",
    "choose_market",
    "classify_ec2",
    "classify_instance",
    "classify_local",
    "fallback_reason",
    "finished_detail",
    "next_step",
]

#: ``--recovery``: keep the survivors and replace only the lost nodes, or relaunch every node.
RECOVERY_MODES = ("replace", "relaunch")

#: Exit codes of a process the simulator killed (Popen's -signal, or a shell's 128 + signal).
KILLED = (-signal.SIGTERM, -signal.SIGKILL, 128 + signal.SIGTERM, 128 + signal.SIGKILL)

#: Exit codes of a command stopped by a signal whose stop checkpoint was not committed: 143
#: (``EXIT_STOP_UNSAVED``, the stop save missed its deadline; ``python -m spotrun.distributed``
#: passes it on from its workers) and 130 (a SIGINT through a shell). An interruption that
#: loses the steps since the previous checkpoint, never a failure of the command.
UNSAVED_STOP = (EXIT_STOP_UNSAVED, 128 + signal.SIGINT)


def _unsaved(code: int | None) -> str:
    return (f"stopped on an interruption, but its stop checkpoint was not committed (exit {code}); "
            "it resumes from the previous checkpoint")


@dataclass(frozen=True)
class NodeEnd:
    """What is known about how one node (instance) of an attempt ended.

    ``exit_code``: the command's, None when unknown (an EC2 instance that left no exit
    record). ``state``/``reason_code``: EC2's instance state and state-reason code (None
    and "" for the local simulator). ``rank``: the node's index in a multi-node attempt.
    """

    node_id: str
    exit_code: int | None = None
    state: str | None = None
    reason_code: str = ""
    rank: int | None = None
    #: EC2's state-reason message (or the controller's own, for :data:`.ec2.NODE_SILENT`).
    message: str = ""


@dataclass(frozen=True)
class AttemptEnd:
    """How an attempt ended, as plain values.

    Args:
        nodes: every node of the attempt (EC2: the nodes found gone), in rank order.
        done: ``done.json`` is in the run URL.
        stop_requested: the launcher forwarded a stop (Ctrl-C, ``spotrun stop``, a limit).
        notice_posted: the simulator posted an interruption notice to ``hit``.
        node_lost: the simulator made ``hit`` vanish without notice.
        hit: the node the simulator interrupted.
        first: the node that exited first.
    """

    nodes: tuple[NodeEnd, ...]
    done: bool = False
    stop_requested: bool = False
    notice_posted: bool = False
    node_lost: bool = False
    hit: str | None = None
    first: str | None = None

    def node(self, node_id: str | None) -> NodeEnd | None:
        return next((n for n in self.nodes if n.node_id == node_id), None)


@dataclass(frozen=True)
class Verdict:
    """How an attempt (or one node of it) ended: the reason, in words, and which node's end
    decided it (``cause``) and which nodes' machines are gone (``lost``)."""

    reason: EndReason
    detail: str
    cause: str | None = None
    lost: tuple[str, ...] = ()


class Action(str, enum.Enum):
    """What a launcher does after an attempt."""

    FINISH = "finish"  # the run is done
    REPLACE = "replace"  # a new attempt on the survivors' machines and one new node per lost one
    RELAUNCH = "relaunch"  # a new attempt (a whole one: every node new)
    STOP = "stop"  # end the run, keeping its checkpoints (it can be continued)
    FAIL = "fail"  # end the run as failed


@dataclass(frozen=True)
class Decision:
    """:func:`next_step`'s answer: the action, why, and what it adds to the run's counters.

    ``lost``/``kept``: for an interruption, the nodes whose machine is gone and the ones
    still running (in the attempt's order); :attr:`Action.REPLACE` keeps ``kept`` and starts
    one node per ``lost``."""

    action: Action
    why: str
    interruptions: int = 0
    failures: int = 0
    lost: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()


# -- how an attempt ended ---------------------------------------------------------------


def classify_local(end: AttemptEnd) -> Verdict:
    """The local simulator's verdict: it knows what it played (a notice, a node loss, a
    forwarded stop) and sees every node's exit code."""
    if len(end.nodes) == 1:
        return _classify_local_one(end)
    nodes, hit = end.nodes, end.node(end.hit)
    codes = ", ".join(f"{n.node_id} {n.exit_code}" for n in nodes)
    rcs = [n.exit_code for n in nodes]
    if end.done:
        if any(rc != EXIT_FINISHED for rc in rcs):
            return Verdict(EndReason.FINISHED, f"done.json written; warning: exit codes {codes}, ignored")
        return Verdict(EndReason.FINISHED, "every node exited 0, done.json written")
    if end.stop_requested:
        return Verdict(EndReason.STOPPED, f"Ctrl-C, exit codes {codes}")
    lost = (hit.node_id,) if hit is not None and (end.node_lost or end.notice_posted) else ()
    if end.node_lost:
        # The survivors' collectives failed (exit 1): the launcher's own doing, no failure.
        return Verdict(EndReason.INTERRUPTED, f"simulated node loss: {end.hit} vanished without notice; "
                       f"exit codes {codes}", end.hit, lost)
    if end.notice_posted and ((hit is not None and hit.exit_code in KILLED) or EXIT_INTERRUPTED in rcs):
        return Verdict(EndReason.INTERRUPTED, f"simulated spot interruption of {end.hit}; exit codes {codes}",
                       end.hit, lost)
    if EXIT_INTERRUPTED in rcs:
        return Verdict(EndReason.INTERRUPTED, f"the command stopped itself on a notice (exit 75); exit codes {codes}")
    if all(rc in UNSAVED_STOP for rc in rcs):
        return Verdict(EndReason.INTERRUPTED, f"the command {_unsaved(rcs[0])}; exit codes {codes}")
    if all(rc == EXIT_FINISHED for rc in rcs):
        return Verdict(EndReason.FAILED, "every node exited 0 without writing done.json; does the command run "
                       "its loop through spotrun.Checkpointer (range() or finish())?")
    first = end.node(end.first)
    culprit = first if first is not None and first.exit_code != EXIT_FINISHED else next(
        n for n in nodes if n.exit_code != EXIT_FINISHED)
    return Verdict(EndReason.FAILED, f"the command failed on {culprit.node_id} with exit code "
                   f"{culprit.exit_code}; exit codes {codes}", culprit.node_id)


def _classify_local_one(end: AttemptEnd) -> Verdict:
    node = end.nodes[0]
    rc = node.exit_code
    if end.done:
        if rc != EXIT_FINISHED:  # e.g. gloo's teardown aborting a worker after the run
            return Verdict(EndReason.FINISHED, f"done.json written; warning: the command then exited "
                           f"with code {rc}, ignored")
        return Verdict(EndReason.FINISHED, f"exit code {rc}, done.json written")
    if end.stop_requested:
        return Verdict(EndReason.STOPPED, f"Ctrl-C, the command exited with code {rc}")
    gone = (node.node_id,) if end.notice_posted or end.node_lost else ()
    if end.notice_posted and rc is not None and (rc == EXIT_INTERRUPTED or rc < 0 or rc in KILLED):
        how = "committed and exited 75" if rc == EXIT_INTERRUPTED else f"killed (exit {rc})"
        return Verdict(EndReason.INTERRUPTED, f"simulated spot interruption; the command {how}", node.node_id, gone)
    if rc == EXIT_INTERRUPTED:
        return Verdict(EndReason.INTERRUPTED, "the command stopped itself on a notice (exit 75)", node.node_id, gone)
    if rc in UNSAVED_STOP:
        return Verdict(EndReason.INTERRUPTED, f"the command {_unsaved(rc)}", node.node_id, gone)
    if end.node_lost:
        return Verdict(EndReason.INTERRUPTED, f"simulated machine loss without notice (exit {rc})",
                       node.node_id, gone)
    if rc == EXIT_FINISHED:
        return Verdict(EndReason.FAILED, "the command exited 0 without writing done.json; does it run its "
                       "loop through spotrun.Checkpointer (range() or finish())?", node.node_id)
    return Verdict(EndReason.FAILED, f"the command failed with exit code {rc}", node.node_id)


def finished_detail(code: int | None) -> str:
    """done.json decides that the run finished; an exit code after it (gloo's teardown can
    abort a worker once the run is done) is only worth a warning."""
    if code in (None, EXIT_FINISHED):
        return "done.json written"
    return f"done.json written; warning: the command then exited with code {code}, ignored"


def classify_instance(node: NodeEnd, *, done: bool) -> Verdict:
    """Why one EC2 instance is gone, from its exit record and EC2's state and reason."""
    code, rc, state, me = node.exit_code, node.reason_code, node.state, node.node_id
    if done:
        return Verdict(EndReason.FINISHED, finished_detail(code), me)
    if rc == SPOT_INTERRUPTION:
        return Verdict(EndReason.INTERRUPTED, "spot interruption", me, (me,))
    if code == EXIT_INTERRUPTED:
        return Verdict(EndReason.INTERRUPTED, "the command stopped on an interruption notice (exit 75)", me, (me,))
    if code in UNSAVED_STOP:
        return Verdict(EndReason.INTERRUPTED, f"the command {_unsaved(code)}", me, (me,))
    if code is not None:
        what = "exited 0 without writing done.json" if code == 0 else f"exited with code {code}"
        return Verdict(EndReason.FAILED, f"the command {what}; see /var/log/spotrun.log on the instance", me, (me,))
    if rc == NODE_SILENT:  # terminated by the controller (.ec2_silence); an exit record above says more
        return Verdict(EndReason.INTERRUPTED, node.message or "went silent; terminated by spotrun", me, (me,))
    if rc.startswith("Server."):
        return Verdict(EndReason.INTERRUPTED, f"EC2 ended the instance ({rc})", me, (me,))
    if rc == "Client.UserInitiatedShutdown":
        return Verdict(EndReason.STOPPED, "the instance was terminated from outside spotrun", me, (me,))
    if rc == "Client.InstanceInitiatedShutdown":
        return Verdict(EndReason.FAILED, "the instance shut down without an exit record (setup failed "
                       "before spotrun was installed?); see its console output", me, (me,))
    if state in ("stopped", "stopping"):
        return Verdict(EndReason.INTERRUPTED, f"the instance is {state}", me, (me,))
    if state == "missing":
        return Verdict(EndReason.INTERRUPTED, "the instance disappeared", me, (me,))
    return Verdict(EndReason.FAILED, f"instance {state} ({rc or 'no reason given'})", me, (me,))


#: When nodes of one attempt went for different reasons, the first of these present is the
#: attempt's: a vanished node makes the others' collectives fail, so its cause wins.
_PRECEDENCE = (EndReason.FINISHED, EndReason.INTERRUPTED, EndReason.STOPPED, EndReason.FAILED)


def classify_ec2(end: AttemptEnd) -> Verdict:
    """The EC2 controller's verdict on an attempt whose ``end.nodes`` are gone: one
    instance's own (no ``rank``), or for the nodes of an N-node attempt the first cause by
    :data:`_PRECEDENCE`, named by node."""
    verdicts = [(n, classify_instance(n, done=end.done)) for n in end.nodes]
    if len(verdicts) == 1 and verdicts[0][0].rank is None:  # a single-instance run
        return verdicts[0][1]
    lost = tuple(n.node_id for n, v in verdicts if v.lost)
    reason = next(r for r in _PRECEDENCE if any(v.reason is r for _, v in verdicts))
    node, verdict = next((n, v) for n, v in verdicts if v.reason is reason)
    if reason is EndReason.FINISHED:
        return Verdict(reason, verdict.detail, node.node_id, lost)
    return Verdict(reason, f"node {node.rank} ({node.node_id}) {verdict.detail}", node.node_id, lost)


# -- what next --------------------------------------------------------------------------


def next_step(verdict: Verdict, *, failures: int, max_failures: int, nodes: Sequence[str] = (),
              recovery: str = "relaunch") -> Decision:
    """After an attempt: an interruption relaunches (and counts, once per attempt however
    many nodes it had), or with ``recovery="replace"`` and some of ``nodes`` (the attempt's,
    in order) still there, replaces only the lost ones; a failure relaunches (whole) until
    ``failures`` (before this one) would pass ``max_failures``; a stop stops; done finishes."""
    if recovery not in RECOVERY_MODES:
        raise ValueError(f"recovery {recovery!r} must be one of {RECOVERY_MODES}")
    if verdict.reason is EndReason.FINISHED:
        return Decision(Action.FINISH, verdict.detail)
    if verdict.reason is EndReason.INTERRUPTED:
        lost = tuple(n for n in nodes if n in verdict.lost)
        kept = tuple(n for n in nodes if n not in verdict.lost)
        if recovery == "replace" and lost and kept:
            return Decision(Action.REPLACE, f"{verdict.detail}; keeping {', '.join(kept)}, replacing "
                            f"{', '.join(lost)}", interruptions=1, lost=lost, kept=kept)
        return Decision(Action.RELAUNCH, verdict.detail, interruptions=1, lost=lost or verdict.lost)
    if verdict.reason is EndReason.STOPPED:
        return Decision(Action.STOP, verdict.detail)
    if failures + 1 > max_failures:
        return Decision(Action.FAIL, verdict.detail, failures=1)
    return Decision(Action.RELAUNCH, verdict.detail, failures=1)


def choose_market(*, interruptions: int, max_interruptions: int | None, on_demand_fallback: bool,
                  deadline_near: bool) -> tuple[Market | None, str]:
    """The market the next attempt asks for first, and why: spot by default; on-demand once
    ``--max-interruptions`` were reached or the deadline is near (with the on-demand
    fallback allowed); None (the run must end) when interruptions ran out without it."""
    if max_interruptions is not None and interruptions >= max_interruptions:
        if on_demand_fallback:
            return Market.ON_DEMAND, f"{interruptions} spot interruptions (--max-interruptions {max_interruptions})"
        return None, (f"stopping after {interruptions} spot interruptions "
                      f"(--max-interruptions {max_interruptions}, --fallback none)")
    if deadline_near and on_demand_fallback:
        return Market.ON_DEMAND, "the deadline is near"
    return Market.SPOT, "default"


def fallback_reason(*, market: Market, on_demand_fallback: bool, price_blocked: bool, max_price: float | None,
                    waited_s: float, spot_wait_s: float, deadline_near: bool,
                    waited_too_long: str | None) -> str | None:
    """After a round of every region's pools found no capacity: why to fall back to
    on-demand now, or None (keep waiting for spot, or there is nothing to fall back to).
    ``waited_too_long``: "no spot capacity for 6h" once the ``--max-wait`` clock ran out."""
    if market is not Market.SPOT or not on_demand_fallback:
        return None
    if price_blocked:
        return f"spot is above --max-price {max_price} in every pool"
    if waited_s >= spot_wait_s:
        return f"no spot capacity for {waited_s:.0f}s"
    if deadline_near:
        return "the deadline is near"
    return waited_too_long
