"""The attempt policy (spotrun.launch.attempt), as tables: how an attempt ended, from plain
values, and what happens next. Both launchers run on these functions; their end-to-end
tests (test_launch_local*, test_launch_ec2*) show the same verdicts on real runs."""

from __future__ import annotations

import pytest

from spotrun.launch.attempt import (
    Action,
    AttemptEnd,
    Decision,
    NodeEnd,
    Verdict,
    choose_market,
    classify_ec2,
    classify_instance,
    classify_local,
    fallback_reason,
    next_step,
)
from spotrun.records.events import EndReason, Market

# One letter each keeps every table row on one line.
I, F, S, X = EndReason.INTERRUPTED, EndReason.FAILED, EndReason.STOPPED, EndReason.FINISHED  # noqa: E741


def _one(rc: int, **kw: object) -> AttemptEnd:
    return AttemptEnd(nodes=(NodeEnd("sim-1", rc),), **kw)  # type: ignore[arg-type]


# -- the local simulator, one node ---------------------------------------------------------


@pytest.mark.parametrize(("rc", "kw", "reason", "words", "lost"), [
    (0, {"done": True}, X, "exit code 0, done.json written", ()),
    (-6, {"done": True}, X, "warning: the command then exited with code -6", ()),  # teardown abort
    (75, {"done": True, "stop_requested": True}, X, "done.json", ()),  # done wins over everything
    (130, {"stop_requested": True}, S, "Ctrl-C, the command exited with code 130", ()),
    (75, {"stop_requested": True, "notice_posted": True}, S, "Ctrl-C", ()),
    (75, {"notice_posted": True}, I, "committed and exited 75", ("sim-1",)),
    (-15, {"notice_posted": True}, I, "killed (exit -15)", ("sim-1",)),
    (137, {"notice_posted": True}, I, "killed (exit 137)", ("sim-1",)),
    (1, {"notice_posted": True}, F, "failed with exit code 1", ()),
    (75, {}, I, "stopped itself on a notice", ()),
    (-9, {"node_lost": True}, I, "simulated machine loss without notice (exit -9)", ("sim-1",)),
    (0, {"node_lost": True}, I, "machine loss", ("sim-1",)),
    (0, {}, F, "exited 0 without writing done.json", ()),
    (3, {}, F, "failed with exit code 3", ()),
    (-9, {}, F, "exit code -9", ()),  # killed by someone else than the simulator: a failure
])
def test_local_one_node(rc: int, kw: dict, reason: EndReason, words: str, lost: tuple) -> None:
    got = classify_local(_one(rc, **kw))
    assert got.reason is reason and words in got.detail, got
    assert got.lost == lost


def _nodes(*rcs: int) -> tuple[NodeEnd, ...]:
    return tuple(NodeEnd(f"sim-1-n{i}", rc, rank=i) for i, rc in enumerate(rcs))


# -- the local simulator, several nodes ------------------------------------------------------


@pytest.mark.parametrize(("rcs", "kw", "reason", "words", "cause"), [
    ((0, 0), {"done": True}, X, "every node exited 0", None),
    ((0, 1), {"done": True}, X, "warning: exit codes sim-1-n0 0, sim-1-n1 1, ignored", None),
    ((75, 75), {"stop_requested": True, "notice_posted": True}, S, "Ctrl-C", None),
    ((1, -9), {"node_lost": True}, I, "simulated node loss: sim-1-n1 vanished", "sim-1-n1"),
    ((75, 75), {"notice_posted": True}, I, "simulated spot interruption of sim-1-n1", "sim-1-n1"),
    ((1, -9), {"notice_posted": True}, I, "sim-1-n1 -9", "sim-1-n1"),  # the hit node killed at its deadline
    ((1, 1), {"notice_posted": True}, F, "failed on sim-1-n0 with exit code 1", "sim-1-n0"),
    ((75, 1), {}, I, "stopped itself on a notice", None),
    ((0, 0), {}, F, "every node exited 0 without writing done.json", None),
    ((3, 1), {}, F, "failed on sim-1-n0 with exit code 3", "sim-1-n0"),
    ((0, 4), {}, F, "failed on sim-1-n1 with exit code 4", "sim-1-n1"),  # the first exit was fine
])
def test_local_nodes_end_as_one(rcs: tuple, kw: dict, reason: EndReason, words: str, cause: str | None) -> None:
    end = AttemptEnd(nodes=_nodes(*rcs), hit="sim-1-n1", first="sim-1-n0", **kw)
    got = classify_local(end)
    assert got.reason is reason and words in got.detail, got
    assert got.cause == cause


def test_local_nodes_lost_names_only_the_hit_node() -> None:
    end = AttemptEnd(nodes=_nodes(1, -9, 1), hit="sim-1-n1", first="sim-1-n1", node_lost=True)
    assert classify_local(end).lost == ("sim-1-n1",)  # the survivors are not lost


# -- EC2: one instance ---------------------------------------------------------------------


@pytest.mark.parametrize(("node", "done", "reason", "words"), [
    (NodeEnd("i-1", 1, "terminated", "Server.SpotInstanceTermination"), True, X, "done.json written; warning"),
    (NodeEnd("i-1", None, "terminated", ""), True, X, "done.json written"),
    (NodeEnd("i-1", 1, "terminated", "Server.SpotInstanceTermination"), False, I, "spot interruption"),
    (NodeEnd("i-1", 75, "terminated", "Client.InstanceInitiatedShutdown"), False, I, "exit 75"),
    (NodeEnd("i-1", 0, "terminated", "Client.InstanceInitiatedShutdown"), False, F, "exited 0 without writing"),
    (NodeEnd("i-1", 2, "terminated", "Client.InstanceInitiatedShutdown"), False, F, "exited with code 2"),
    (NodeEnd("i-1", None, "terminated", "Server.InternalError"), False, I, "EC2 ended the instance"),
    (NodeEnd("i-1", None, "terminated", "Client.UserInitiatedShutdown"), False, S, "from outside spotrun"),
    (NodeEnd("i-1", None, "terminated", "Client.InstanceInitiatedShutdown"), False, F, "without an exit record"),
    (NodeEnd("i-1", None, "stopped", ""), False, I, "the instance is stopped"),
    (NodeEnd("i-1", None, "missing", ""), False, I, "disappeared"),
    (NodeEnd("i-1", None, "terminated", ""), False, F, "no reason given"),
])
def test_ec2_one_instance(node: NodeEnd, done: bool, reason: EndReason, words: str) -> None:
    got = classify_instance(node, done=done)
    assert got.reason is reason and words in got.detail, got
    assert classify_ec2(AttemptEnd(nodes=(node,), done=done)) == got  # one instance: its own verdict
    assert got.lost == (() if reason is X else ("i-1",))


# -- EC2: the nodes of one attempt -----------------------------------------------------------


SPOT = "Server.SpotInstanceTermination"
USER = "Client.UserInitiatedShutdown"
SELF = "Client.InstanceInitiatedShutdown"


@pytest.mark.parametrize(("gone", "reason", "cause"), [
    # One node reclaimed: the attempt was interrupted, named by that node.
    ([("i-a", 0, None, SPOT)], I, "i-a"),
    # A failure and a reclaim together: the reclaim made the other fail, so it wins.
    ([("i-a", 0, 1, SELF), ("i-b", 1, None, SPOT)], I, "i-b"),
    ([("i-a", 0, None, USER), ("i-b", 1, 2, SELF)], S, "i-a"),
    ([("i-a", 0, 2, SELF), ("i-b", 1, 3, SELF)], F, "i-a"),
])
def test_ec2_nodes_end_as_one(gone: list, reason: EndReason, cause: str) -> None:
    nodes = tuple(NodeEnd(i, code, "terminated", rc, rank=r) for i, r, code, rc in gone)
    got = classify_ec2(AttemptEnd(nodes=nodes))
    assert got.reason is reason and got.cause == cause
    rank = next(r for i, r, _, _ in gone if i == cause)
    assert got.detail.startswith(f"node {rank} ({cause}) ")
    assert got.lost == tuple(i for i, *_ in gone)


def test_ec2_nodes_done_wins() -> None:
    nodes = (NodeEnd("i-a", 1, "terminated", SPOT, rank=0),)
    assert classify_ec2(AttemptEnd(nodes=nodes, done=True)).reason is X


# -- what next -------------------------------------------------------------------------------


@pytest.mark.parametrize(("reason", "failures", "max_failures", "decision"), [
    (X, 0, 0, Decision(Action.FINISH, "d")),
    (I, 0, 0, Decision(Action.RELAUNCH, "d", interruptions=1)),
    (I, 5, 0, Decision(Action.RELAUNCH, "d", interruptions=1)),  # interruptions are never failures
    (S, 0, 3, Decision(Action.STOP, "d")),
    (F, 0, 0, Decision(Action.FAIL, "d", failures=1)),
    (F, 0, 1, Decision(Action.RELAUNCH, "d", failures=1)),
    (F, 1, 1, Decision(Action.FAIL, "d", failures=1)),
    (F, 1, 3, Decision(Action.RELAUNCH, "d", failures=1)),
])
def test_next_step(reason: EndReason, failures: int, max_failures: int, decision: Decision) -> None:
    assert next_step(Verdict(reason, "d"), failures=failures, max_failures=max_failures) == decision


@pytest.mark.parametrize(("kw", "market", "words"), [
    ({"interruptions": 0, "max_interruptions": None, "on_demand_fallback": True, "deadline_near": False},
     Market.SPOT, "default"),
    ({"interruptions": 2, "max_interruptions": 3, "on_demand_fallback": True, "deadline_near": False},
     Market.SPOT, "default"),
    ({"interruptions": 3, "max_interruptions": 3, "on_demand_fallback": True, "deadline_near": False},
     Market.ON_DEMAND, "3 spot interruptions (--max-interruptions 3)"),
    ({"interruptions": 3, "max_interruptions": 3, "on_demand_fallback": False, "deadline_near": False},
     None, "--fallback none"),
    ({"interruptions": 0, "max_interruptions": None, "on_demand_fallback": True, "deadline_near": True},
     Market.ON_DEMAND, "deadline is near"),
    ({"interruptions": 0, "max_interruptions": None, "on_demand_fallback": False, "deadline_near": True},
     Market.SPOT, "default"),
    ({"interruptions": 0, "max_interruptions": 0, "on_demand_fallback": True, "deadline_near": False},
     Market.ON_DEMAND, "--max-interruptions 0"),
])
def test_choose_market(kw: dict, market: Market | None, words: str) -> None:
    got, why = choose_market(**kw)
    assert got is market and words in why


_ROUND = {"market": Market.SPOT, "on_demand_fallback": True, "price_blocked": False, "max_price": 0.5,
          "waited_s": 10.0, "spot_wait_s": 600.0, "deadline_near": False, "waited_too_long": None}


@pytest.mark.parametrize(("kw", "words"), [
    ({}, None),  # keep waiting for spot
    ({"price_blocked": True}, "spot is above --max-price 0.5 in every pool"),
    ({"waited_s": 600.0}, "no spot capacity for 600s"),
    ({"deadline_near": True}, "the deadline is near"),
    ({"waited_too_long": "no spot capacity for 6h"}, "no spot capacity for 6h"),
    ({"price_blocked": True, "on_demand_fallback": False}, None),  # --fallback none: nothing to fall to
    ({"price_blocked": True, "market": Market.ON_DEMAND}, None),  # already on-demand
])
def test_fallback_reason(kw: dict, words: str | None) -> None:
    assert fallback_reason(**{**_ROUND, **kw}) == words


# -- replace only what was lost (--recovery) -------------------------------------------------

ABC = ("n0", "n1", "n2")


@pytest.mark.parametrize(("reason", "lost", "recovery", "action", "kept"), [
    (I, ("n1",), "replace", Action.REPLACE, ("n0", "n2")),  # one of three: keep two
    (I, ("n0", "n2"), "replace", Action.REPLACE, ("n1",)),  # a pool taken together: two replacements
    (I, ABC, "replace", Action.RELAUNCH, ()),  # every node lost: a whole new attempt
    (I, (), "replace", Action.RELAUNCH, ABC),  # nobody's machine is gone (a stop on its own): relaunch
    (I, ("n1",), "relaunch", Action.RELAUNCH, ("n0", "n2")),  # --recovery relaunch: today's behaviour
    (I, ("elsewhere",), "replace", Action.RELAUNCH, ABC),  # a lost id not of this attempt
    (F, ("n1",), "replace", Action.FAIL, ()),  # a failure is never replaced in place
    (S, ("n1",), "replace", Action.STOP, ()),
    (X, ("n1",), "replace", Action.FINISH, ()),
])
def test_next_step_replaces_only_the_lost(reason: EndReason, lost: tuple, recovery: str, action: Action,
                                          kept: tuple) -> None:
    got = next_step(Verdict(reason, "d", lost=lost), failures=0, max_failures=0, nodes=ABC, recovery=recovery)
    assert got.action is action, got
    if action is Action.REPLACE:
        assert got.kept == kept and got.lost == tuple(n for n in ABC if n in lost)
        assert got.interruptions == 1 and got.failures == 0  # one interruption, however many lost
        assert f"keeping {', '.join(kept)}" in got.why
    if action is Action.RELAUNCH:
        assert got.interruptions == 1


def test_next_step_replace_single_node_is_a_relaunch() -> None:
    got = next_step(Verdict(I, "d", lost=("sim-1",)), failures=0, max_failures=0, nodes=("sim-1",),
                    recovery="replace")
    assert got.action is Action.RELAUNCH and got.lost == ("sim-1",)


def test_next_step_refuses_an_unknown_recovery() -> None:
    with pytest.raises(ValueError, match="recovery 'spare'"):
        next_step(Verdict(I, "d"), failures=0, max_failures=0, recovery="spare")
