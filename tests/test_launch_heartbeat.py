"""A node that goes silent while EC2 still calls it running (``--node-silence``).

The node agent's heartbeat is checked on a real agent process (torchrun stubbed, so no torch
import): it appears, carries the attempt, is refreshed, and stops when the process is frozen
(SIGSTOP, the local simulator's silent loss). The controller's side runs in-process against
moto as tests/test_launch_ec2_replace.py does (whose fixtures and helpers it reuses): each poll
the injected ``sleep`` lets the live nodes beat through the agent's own writer and moves an
injected clock 10 s, so a 60 s silence takes a few polls and no real wait.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import test_launch_ec2_cluster
from helpers import wait_for
from moto.ec2.models.instances import Instance
from test_launch_ec2 import Lines
from test_launch_ec2_cluster import HOME, T0, Cloud, cluster_file, controller, launcher_records, options
from test_launch_ec2_replace import Calls

from spotrun.errors import ConfigError
from spotrun.launch import node
from spotrun.launch.base import LaunchEventKind
from spotrun.launch.controller import Ec2Controller, Ec2Options
from spotrun.launch.node import ClusterSpec, write_cluster
from spotrun.records.heartbeat import Heartbeat, HeartbeatWriter, heartbeat_file, read_heartbeat
from spotrun.storage import Storage

cloud = test_launch_ec2_cluster.cloud
storage = test_launch_ec2_cluster.storage

REPO = Path(__file__).resolve().parents[1]

# -- the node agent's heartbeat (a real process) ------------------------------------------

# The agent with spotrun.distributed stood in for (no torch import): its torchrun runs until
# the test writes "stop" next to the run, then exits 0.
AGENT = textwrap.dedent(
    """
    import os, sys, time, types
    import spotrun
    stop = os.path.join(os.environ["SPOTRUN_URL"], "stop-fake-torchrun")
    def torchrun(argv):
        deadline = time.monotonic() + 60
        while not os.path.exists(stop) and time.monotonic() < deadline:
            time.sleep(0.05)
        return 0
    module = types.ModuleType("spotrun.distributed")
    module.torchrun = torchrun
    sys.modules["spotrun.distributed"] = module
    spotrun.distributed = module
    import spotrun.launch.node as node
    sys.exit(node.main(["--timeout", "30", "--poll", "0.05", "--", "python", "t.py"]))
    """
)


def _beat(st: Storage, iid: str) -> Heartbeat | None:
    raw = read_heartbeat(st, iid)
    return None if raw is None else Heartbeat.from_json(json.loads(raw))


def test_a_node_agent_writes_its_heartbeat_refreshes_it_and_a_frozen_one_goes_silent(tmp_path: Path) -> None:
    run = tmp_path / "run"
    st = Storage(str(run))
    write_cluster(st, ClusterSpec(segment="a1", nodes=[{"instance_id": "i-0aaa", "address": "127.0.0.1"}],
                                  nproc_per_node=1, rdzv_id="run-a1", port=29500))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               SPOTRUN_URL=str(run), SPOTRUN_INSTANCE_ID="i-0aaa", SPOTRUN_HEARTBEAT_S="0.2")
    proc = subprocess.Popen([sys.executable, "-c", AGENT], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        first = wait_for(lambda: _beat(st, "i-0aaa"))
        assert (first.instance_id, first.attempt, first.pid) == ("i-0aaa", "a1", proc.pid)
        # Refreshed in place: one object, a later beat, a later time.
        later = wait_for(lambda: (b := _beat(st, "i-0aaa")) and b.seq >= first.seq + 3 and b)
        assert later.time > first.time and later.pid == proc.pid
        assert [n for n in os.listdir(run / "launch" / "nodes" / "alive") if not n.startswith(".")] == ["i-0aaa.json"]
        # Frozen (the simulator's silent loss): the record stops changing.
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.3)  # a write under way when it froze has landed or never will
        frozen = read_heartbeat(st, "i-0aaa")
        time.sleep(1.0)  # five beats' worth
        assert read_heartbeat(st, "i-0aaa") == frozen
        os.kill(proc.pid, signal.SIGCONT)
        wait_for(lambda: read_heartbeat(st, "i-0aaa") != frozen)
        (run / "stop-fake-torchrun").write_text("")
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    # The writer stopped with the agent: nothing is written after it exited.
    last = read_heartbeat(st, "i-0aaa")
    time.sleep(0.5)
    assert read_heartbeat(st, "i-0aaa") == last


def test_a_heartbeat_that_cannot_be_written_is_retried_never_fatal(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "run"
    blocker.mkdir()
    (blocker / "launch").write_text("a file where the folder should be")  # every write fails
    w = HeartbeatWriter(Storage(str(blocker)), "i-0aaa", 0.05)
    assert w.beat() is False and w.beat() is False and w.failures == 2
    assert sum("could not write its heartbeat" in r.getMessage() for r in caplog.records) == 1
    (blocker / "launch").unlink()
    assert w.beat() is True and w.failures == 0 and read_heartbeat(Storage(str(blocker)), "i-0aaa") is not None
    with pytest.raises(ConfigError, match="heartbeat file"):
        heartbeat_file("../x")


def test_node_silence_is_checked(cloud: Cloud, storage: Storage) -> None:
    for bad in (-1.0, float("nan"), 86401.0, True, None):
        with pytest.raises(ConfigError, match="--node-silence"):
            options(cloud, storage, node_silence_s=bad).validate()
    # Checked in place (validate.number with text=False): a numeric string is refused, not
    # passed on as a str that the controller would later compare with a float.
    with pytest.raises(ConfigError, match=r"--node-silence='120' is text; give it as a number, e.g. 120 \(0: off\)"):
        options(cloud, storage, node_silence_s="120").validate()
    options(cloud, storage, node_silence_s=0).validate()
    # The survivors' rejoin wait, checked alike (its own copy of the rules took True for 1 s).
    for bad in (True, "900", -1.0, float("inf")):
        with pytest.raises(ConfigError, match="rejoin_timeout_s="):
            options(cloud, storage, rejoin_timeout_s=bad).validate()
    assert Ec2Options(run_url="x", command=["c"], instance_types=["t"]).node_silence_s == 120.0


# -- the controller ------------------------------------------------------------------------


class World:
    """The nodes as the controller sees them through the run URL: each poll every running
    node beats (the agent's own writer, one beat), except the ones made silent or still
    booting; the clock moves 10 s a poll; the run finishes after ``polls`` polls, so a
    controller that never acts still ends."""

    def __init__(self, cloud: Cloud, storage: Storage, *, polls: int = 40) -> None:
        self.cloud, self.storage, self.polls = cloud, storage, polls
        self.calls = Calls(cloud.clients[HOME])
        self.now = [T0]
        self.n = 0
        self.quiet: set[str] = set()  # never beat (again)
        self.writers: dict[str, HeartbeatWriter] = {}
        self.specs: list[dict] = []
        self.terminated_at: dict[str, float] = {}
        self.last_beat: dict[str, float] = {}
        cloud.clients[HOME].meta.events.register(
            "provide-client-params.ec2.TerminateInstances",
            lambda params, **_: self.terminated_at.update({i: self.now[0] for i in params["InstanceIds"]}))
        self.status_calls = 0
        cloud.clients[HOME].meta.events.register("provide-client-params.ec2.DescribeInstanceStatus",
                                                 lambda **_: self._status_call())

    def _status_call(self) -> None:
        self.status_calls += 1

    def poll(self, ctl: Ec2Controller) -> list[str]:
        """One poll's world; the running attempt's instance ids."""
        self.n += 1
        self.now[0] += 10
        ids = [s.instance_id for s in ctl.state.running]
        if ids and ctl.options.distributed:
            spec = cluster_file(self.storage, ids[0])
            if not self.specs or self.specs[-1]["segment"] != spec["segment"]:
                self.specs.append(spec)
        for iid in ids:
            if iid not in self.quiet:
                w = self.writers.setdefault(iid, HeartbeatWriter(self.storage, iid, 1.0))
                assert w.beat()
                self.last_beat[iid] = self.now[0]
        if self.n >= self.polls:
            self.finish(ctl)
        return ids

    def finish(self, ctl: Ec2Controller) -> None:
        self.storage.write_bytes("done.json", b"{}")
        for s in ctl.state.running:
            self.cloud.shut_down(s.instance_id)


def _run(world: World, act, **opts: Any) -> tuple[Ec2Controller, Lines]:
    out = Lines()
    ctl = controller(world.cloud, world.storage, options(world.cloud, world.storage, **opts), act,
                     clock=world.now, on_event=out)
    outcome = ctl.run()
    assert outcome.status == "finished", out.getvalue()
    return ctl, out


def test_a_silent_node_is_terminated_and_replaced_alone_after_node_silence(cloud: Cloud, storage: Storage) -> None:
    """3 nodes; node 1 stops beating at poll 3 while EC2 says running. After 60 s without a
    new heartbeat (the controller's clock) it is terminated, exactly one instance is asked
    for into its slot, the survivors stay and find the next attempt as their GrowWatch does."""
    world = World(cloud, storage)
    silent: list[str] = []

    def act(ctl: Ec2Controller) -> None:
        ids = world.poll(ctl)
        if world.n == 3:
            silent.append(ids[1])
            world.quiet.add(ids[1])
        if len(world.specs) == 2 and world.n < world.polls:
            world.finish(ctl)

    ctl, out = _run(world, act, nodes=3, node_silence_s=60.0)
    (lost,) = silent
    a1, a2 = world.specs
    first = [n["instance_id"] for n in a1["nodes"]]
    kept = [first[0], first[2]]
    # Terminated once it was silent for 60 s, not before, within two polls of it.
    went_quiet = world.last_beat[lost]
    assert 60 <= world.terminated_at[lost] - went_quiet <= 80, (world.terminated_at, went_quiet)
    assert world.calls.terminated[0] == lost and not set(world.calls.terminated) & set(kept)
    assert world.calls.fleets == [3, 1]
    second = [n["instance_id"] for n in a2["nodes"]]
    (new,) = set(second) - set(first)
    assert second == [first[0], new, first[2]] and ctl.state.interruptions == 1
    # One line at the decision, naming the node and how long it was silent.
    (line,) = [e.message for e in out.events if e.kind is LaunchEventKind.WARNING and "silent for" in e.message]
    assert line.startswith(f"node 1 ({lost}) silent for ") and "--node-silence 60" in line
    # The books: the lost node's segment ends as an interruption saying why; the recovery too.
    recs = launcher_records(storage)
    (end,) = [r for r in recs if r["event"] == "segment_ended" and r["segment_id"] == lost]
    (seg,) = [s for s in ctl.state.segments if s.segment_id == lost]  # state.json keeps the words
    assert end["reason"] == seg.end_reason == "interrupted" and "silent for" in (seg.detail or ""), (end, seg)
    (rec,) = [r for r in recs if r["event"] == "recovery_started"]
    assert (rec["mode"], rec["lost"], rec["kept"], rec["instances_started"]) == ("replace", [lost], kept, 1)
    assert "silent for" in rec["detail"] and lost in rec["detail"], rec
    # What a survivor's agent, still in a1 (its torchrun blocked), finds: the next attempt.
    nxt = node._look_next(storage, kept[1], ClusterSpec.from_json(a1))
    assert nxt is not None and nxt.segment == a2["segment"]


def test_a_booting_node_without_a_first_heartbeat_is_not_silent(cloud: Cloud, storage: Storage) -> None:
    """Node 1 never writes a heartbeat (booting, in --setup) for 300 s, 5 x --node-silence:
    nothing is terminated; the run finishes on its first attempt."""
    world = World(cloud, storage, polls=30)

    def act(ctl: Ec2Controller) -> None:
        if world.n == 0:
            world.quiet.add(ctl.state.running[1].instance_id)
        world.poll(ctl)

    ctl, out = _run(world, act, nodes=2, node_silence_s=60.0)
    assert world.calls.terminated == [] and world.calls.fleets == [2] and ctl.state.interruptions == 0, out.getvalue()
    assert world.status_calls >= 25  # the status checks were asked, every poll


def test_a_node_beating_slower_than_node_silence_is_judged_by_its_own_interval(cloud: Cloud,
                                                                              storage: Storage) -> None:
    """Node 1's agent beats every 90 s (its SPOTRUN_HEARTBEAT_S, which the controller cannot
    see but its record states) under --node-silence 60: not silent between its beats; once it
    stops, silent after three of its intervals (270 s), not after 60."""
    world = World(cloud, storage, polls=60)
    slow: list[str] = []

    def act(ctl: Ec2Controller) -> None:
        if world.n == 0:
            slow.append(ctl.state.running[1].instance_id)
            world.quiet.add(slow[0])  # World's own 1 s writer never beats for it
        ids = world.poll(ctl)
        if slow[0] in ids and world.n % 9 == 1 and world.n < 20:  # polls 1, 10, 19: every 90 s
            assert HeartbeatWriter(storage, slow[0], 90.0).beat()
            world.last_beat[slow[0]] = world.now[0]
        if len(world.specs) == 2 and world.n < world.polls:
            world.finish(ctl)

    _, out = _run(world, act, nodes=2, node_silence_s=60.0)
    (iid,) = slow
    assert world.calls.terminated[:1] == [iid], out.getvalue()
    assert 270 <= world.terminated_at[iid] - world.last_beat[iid] <= 290, (world.terminated_at, world.last_beat)
    assert world.calls.fleets == [2, 1]


def test_node_silence_zero_changes_nothing(cloud: Cloud, storage: Storage) -> None:
    """--node-silence 0: a node silent for 300 s is left alone, and EC2 is asked nothing more."""
    world = World(cloud, storage, polls=30)

    def act(ctl: Ec2Controller) -> None:
        ids = world.poll(ctl)
        if world.n == 1:
            world.quiet.add(ids[1])

    ctl, out = _run(world, act, nodes=2, node_silence_s=0.0)
    assert world.calls.terminated == [] and world.calls.fleets == [2] and ctl.state.interruptions == 0
    assert world.status_calls == 0 and "silent" not in out.getvalue()


def test_every_node_silent_at_once_is_the_run_url_not_a_loss(cloud: Cloud, storage: Storage) -> None:
    world = World(cloud, storage, polls=20)

    def act(ctl: Ec2Controller) -> None:
        ids = world.poll(ctl)
        if world.n == 2:
            world.quiet.update(ids)

    ctl, out = _run(world, act, nodes=2, node_silence_s=60.0)
    assert world.calls.terminated == [] and ctl.state.interruptions == 0
    assert out.getvalue().count("more likely unreachable") == 1, out.getvalue()


def test_a_failed_status_check_relaunches_a_single_instance_run(cloud: Cloud, storage: Storage,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One instance, no node agent (no heartbeat): EC2's system status check turns impaired
    while it says running; the controller terminates it and relaunches."""
    world = World(cloud, storage)
    impaired: set[str] = set()
    healthy = Instance.system_status
    monkeypatch.setattr(Instance, "system_status", property(
        lambda self: {"Status": "impaired", "Details": [{"Name": "reachability", "Status": "failed"}]}
        if self.id in impaired else healthy.fget(self)))
    attempts: list[str] = []

    def act(ctl: Ec2Controller) -> None:
        ids = world.poll(ctl)
        if ids and (not attempts or attempts[-1] != ids[0]):
            attempts.append(ids[0])
            if len(attempts) == 1:
                impaired.add(ids[0])
            elif world.n < world.polls:
                world.finish(ctl)

    ctl, out = _run(world, act, nodes=1, nproc_per_node=None, node_silence_s=60.0)
    first, second = attempts
    assert second != first and second not in world.calls.terminated
    assert world.calls.terminated[0] == first and ctl.state.interruptions == 1 and world.calls.fleets == [1, 1]
    assert f"{first}) failed its EC2 system status check" in out.getvalue(), out.getvalue()
    (rec,) = [r for r in launcher_records(storage) if r["event"] == "recovery_started"]
    assert rec["mode"] == "relaunch" and rec["lost"] == [first] and "status check" in rec["detail"]


def test_a_silent_node_is_booked_an_interruption_unless_its_exit_record_says_more() -> None:
    from spotrun.launch.attempt import NodeEnd, classify_instance
    from spotrun.launch.ec2 import NODE_SILENT

    words = "silent for 130s (no heartbeat; --node-silence 120) while EC2 said running; terminated by spotrun"
    v = classify_instance(NodeEnd("i-1", None, "shutting-down", NODE_SILENT, 1, message=words), done=False)
    assert (v.reason.value, v.detail, v.lost) == ("interrupted", words, ("i-1",))
    # Its command had exited 1 and the machine was shutting down: the exit record decides.
    v = classify_instance(NodeEnd("i-1", 1, "shutting-down", NODE_SILENT, 1, message=words), done=False)
    assert v.reason.value == "failed" and "exited with code 1" in v.detail


def test_with_recovery_relaunch_a_silent_node_relaunches_every_node(cloud: Cloud, storage: Storage) -> None:
    world = World(cloud, storage)

    def act(ctl: Ec2Controller) -> None:
        ids = world.poll(ctl)
        if world.n == 2:
            world.quiet.add(ids[0])
        if len(world.specs) == 2 and world.n < world.polls:
            world.finish(ctl)

    ctl, _ = _run(world, act, nodes=2, node_silence_s=60.0, recovery="relaunch")
    first = [n["instance_id"] for n in world.specs[0]["nodes"]]
    assert world.calls.fleets == [2, 2] and ctl.state.interruptions == 1
    assert world.calls.terminated[:2] == [first[0], first[1]], world.calls.terminated  # the silent one first
    (rec,) = [r for r in launcher_records(storage) if r["event"] == "recovery_started"]
    assert rec["mode"] == "relaunch" and rec["lost"] == [first[0]] and "silent for" in rec["detail"], rec
