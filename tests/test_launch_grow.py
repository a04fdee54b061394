"""Growing a ``--min-nodes`` job back to N (issue 22 item 3): the node agent's planned stop
(spotrun/launch/grow.py) and the EC2 controller's re-ask (spotrun/launch/ec2_grow.py).

- in process, torchrun stubbed: a node running an attempt sees a newer cluster file that
  grows, SIGTERMs its own torchrun once torchrun's handler is in place, and joins that
  attempt whatever the code; a newer file that does not grow is left for the rejoin wait;
- real processes: 143 from workers that missed their stop deadline rejoins, 143 from an agent
  that got the signal itself does not (``spotrun.distributed.last_agent_signal``); a real
  2-node job on ``tests/scripts/ddp_train.py`` stops at a step on a grow file and finishes in
  the grown attempt, bit-exact against the uninterrupted reference;
- moto EC2: a 3-node job shrunk to 2 re-asks for the missing node with a backoff, and on
  capacity writes the grown attempt (3 nodes, survivors kept in their slots, ``grow``) and a
  ``recovery_started`` record of mode ``grow``; ``spotrun status``/``cost`` count it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from test_launch_node_rejoin import _stub_torchrun

from spotrun.launch import node
from spotrun.launch.node import ClusterSpec, read_attempt_exit, write_cluster
from spotrun.storage import Storage


def _spec(segment: str, attempt: int, ids=("a", "b"), *, grow: bool = False, port: int = 29500) -> ClusterSpec:
    return ClusterSpec(segment=segment, nodes=[{"instance_id": i, "address": "127.0.0.1"} for i in ids],
                       nproc_per_node=1, rdzv_id=f"run-{segment}", port=port, attempt=attempt, grow=grow)


#: The node agent's arguments in process: quick looks, a bounded rejoin wait.
ARGV = ["--poll", "0.05", "--rejoin-timeout", "5", "--grow-poll", "0.05", "--", "python", "t.py"]


def _agent_main(monkeypatch: pytest.MonkeyPatch, url: Path, instance_id: str, torchrun_like) -> int:
    """The node agent's ``main(ARGV)`` in this process as ``instance_id`` of the run at ``url``,
    torchrun replaced by ``torchrun_like``; SIGTERM's handler put back as it was before."""
    before = signal.getsignal(signal.SIGTERM)
    _stub_torchrun(monkeypatch, torchrun_like)
    monkeypatch.setenv("SPOTRUN_URL", str(url))
    monkeypatch.setenv("SPOTRUN_INSTANCE_ID", instance_id)
    try:
        return node.main(ARGV)
    finally:
        signal.signal(signal.SIGTERM, before)


class _Signalled(Exception):
    """torch.distributed.elastic's SignalException, in shape."""


def test_a_grow_file_stops_the_running_attempt_and_the_node_joins_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attempt a2 (the survivor alone) runs; the controller writes a3 (grow, 2 nodes): the
    agent's SIGTERM reaches torchrun's handler (installed a moment after torchrun starts, as
    torch's PContext does), torchrun returns 75, the node runs a3, which finishes."""
    storage = Storage(str(tmp_path))
    write_cluster(storage, _spec("a2", 2, ids=("a",)))
    runs: list[str] = []
    got: list[float] = []

    def torchrun_like(argv: list[str]) -> int:
        runs.append(argv[argv.index("--rdzv-id") + 1])
        if len(runs) > 1:
            return 0
        signalled: list[int] = []
        time.sleep(0.3)  # the rendezvous: no handler of torchrun's yet (a SIGTERM would kill)
        signal.signal(signal.SIGTERM, lambda signum, _f: signalled.append(signum))
        threading_write = _later(0.2, lambda: write_cluster(storage, _spec("a3", 3, ids=("a", "z"), grow=True)))
        t0 = time.monotonic()
        while not signalled:
            assert time.monotonic() - t0 < 20, "no planned stop"
            time.sleep(0.01)
        got.append(time.monotonic() - t0)
        threading_write.join()
        return 75  # the ranks committed at one step

    assert _agent_main(monkeypatch, tmp_path, "a", torchrun_like) == 0
    assert runs == ["run-a2", "run-a3"] and got and got[0] < 10
    assert read_attempt_exit(storage, "a2", "a") == 75 and read_attempt_exit(storage, "a3", "a") == 0


def test_a_newer_file_that_does_not_grow_sends_no_signal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replacement's file (no grow) while the attempt runs is not a planned stop: no
    signal to the agent; the attempt is dead (a lost peer), so the workers it started would
    be killed (it has none here), and the node joins the new attempt. A session the agent's
    process led before the attempt (here: this test process's own child) is never touched:
    CI once lost the suite's warm interpreter to exactly that."""
    import subprocess

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    storage = Storage(str(tmp_path))
    write_cluster(storage, _spec("a1", 1))
    runs: list[str] = []
    signalled: list[int] = []

    def torchrun_like(argv: list[str]) -> int:
        runs.append(argv[argv.index("--rdzv-id") + 1])
        if len(runs) > 1:
            return 0
        signal.signal(signal.SIGTERM, lambda signum, _f: signalled.append(signum))
        write_cluster(storage, _spec("a2", 2, ids=("a", "b", "c")))
        time.sleep(1.0)  # twenty looks of the watch
        return 75

    try:
        assert _agent_main(monkeypatch, tmp_path, "b", torchrun_like) == 0
        assert runs == ["run-a1", "run-a2"] and signalled == []
        assert bystander.poll() is None, "the dead attempt's stop killed a session it did not start"
    finally:
        bystander.kill()
        bystander.wait()


def test_the_planned_stop_raised_outside_torchruns_handling_still_joins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's handler stays installed after it returns; the watch's SIGTERM that lands as
    torchrun is starting (its old handler raising) ends the call with an exception: that is
    the planned stop, the node joins the grown attempt (and does not crash)."""
    storage = Storage(str(tmp_path))
    write_cluster(storage, _spec("a2", 2, ids=("a",)))
    runs: list[str] = []

    def raising(signum, _frame):
        raise _Signalled(f"got signal {signum}")

    def torchrun_like(argv: list[str]) -> int:
        runs.append(argv[argv.index("--rdzv-id") + 1])
        if len(runs) > 1:
            return 0
        write_cluster(storage, _spec("a3", 3, ids=("z", "a"), grow=True))
        time.sleep(20)  # interrupted by the handler's exception
        return 0

    before = signal.signal(signal.SIGTERM, raising)  # a previous attempt's torchrun handler
    t0 = time.monotonic()
    try:
        assert _agent_main(monkeypatch, tmp_path, "a", torchrun_like) == 0
    finally:
        signal.signal(signal.SIGTERM, before)
    assert runs == ["run-a2", "run-a3"] and time.monotonic() - t0 < 15
    assert read_attempt_exit(storage, "a2", "a") == 1


def _later(delay: float, fn) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), fn()), daemon=True)
    thread.start()
    return thread


# -- the EC2 controller, against moto ---------------------------------------------------

@pytest.fixture()
def cloud(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from moto import mock_aws
    from test_launch_ec2_cluster import Cloud

    monkeypatch.setenv("SPOTRUN_CACHE_DIR", str(tmp_path / "cache"))
    with mock_aws():
        yield Cloud()


class _Shrink:
    """Drives an in-process EC2 controller on moto: a clock that advances 10 s a poll, the
    cluster files seen (one per attempt), and at the first one no capacity anywhere and the
    attempt's last node lost, so a job with ``--min-nodes`` goes on shrunk."""

    def __init__(self, cloud, storage: Storage) -> None:
        from test_launch_ec2 import ScarceCapacity
        from test_launch_ec2_cluster import HOME, T0
        from test_launch_ec2_replace import Calls

        self.cloud, self.storage = cloud, storage
        self.calls = Calls(cloud.clients[HOME])
        self.scarce = ScarceCapacity(cloud.clients[HOME], {})
        self.now = [T0]
        self.seen: list[dict] = []

    def tick(self, ctl) -> bool:
        """One poll: the clock moves on; True when a new attempt's cluster file is there."""
        from test_launch_ec2_cluster import cluster_file

        self.now[0] += 10
        running = ctl.state.running
        if not running:
            return False
        spec = cluster_file(self.storage, running[0].instance_id)
        if self.seen and self.seen[-1]["segment"] == spec["segment"]:
            return False
        self.seen.append(spec)
        if len(self.seen) == 1:
            for market in ("spot", "on-demand"):
                self.scarce.scarce[(market, "g5.xlarge")] = "InsufficientInstanceCapacity"
            self.cloud.spot_interrupt(running[-1].instance_id)
        return True

    def capacity_back(self) -> None:
        self.scarce.scarce.clear()

    def run(self, act, *, nodes: int, min_nodes: int, **timing: float):
        """The controller run to its finish with ``act`` called every poll: (controller, its
        printed lines). ``timing``: the grow's Timing fields (no replacement wait)."""
        from test_launch_ec2 import Lines
        from test_launch_ec2_cluster import FAST, controller, options

        from spotrun.launch.controller import Timing

        out = Lines()
        ctl = controller(self.cloud, self.storage, options(self.cloud, self.storage, nodes=nodes, min_nodes=min_nodes,
                                                           nproc_per_node=None), act, clock=self.now,
                         timing=Timing(**{**FAST.__dict__, "replace_wait_s": 0.0, **timing}), on_event=out)
        assert ctl.run().status == "finished", out.getvalue()
        return ctl, out

    def finish(self, ctl) -> None:
        """The command is done: done.json, and every node shuts down."""
        self.storage.write_bytes("done.json", b"{}")
        for s in ctl.state.running:
            self.cloud.shut_down(s.instance_id)


def test_ec2_a_shrunk_job_grows_back_with_a_backoff_keeping_the_survivors(cloud, tmp_path: Path) -> None:
    """3 nodes, --min-nodes 2: a node lost with no capacity anywhere, the two survivors go on
    (attempt -m). The controller asks for the missing node again 100 s after, then 200 s after
    that, then every 250 s (the cap); capacity comes back, and the next ask starts one
    instance in the empty slot and writes the grown attempt: 3 nodes, survivors in their
    slots, ``grow`` set (what the survivors' agents stop and join on); a ``recovery_started``
    of mode grow; no survivor terminated; the grow is no interruption."""
    from test_launch_ec2_cluster import HOME, cluster_file, launcher_records

    from spotrun.cost import report_for_run
    from spotrun.launch.controller import Ec2Controller
    from spotrun.launch.grow import note_waiting
    from spotrun.launch.limits import CostGuard, Limits
    from spotrun.launch.status import format_status, run_status

    storage = Storage(str(tmp_path / "run"))
    play = _Shrink(cloud, storage)
    calls, now, seen = play.calls, play.now, play.seen
    asks: list[tuple[float, int]] = []  # (clock, count) of every CreateFleet
    cloud.clients[HOME].meta.events.register(
        "provide-client-params.ec2.CreateFleet",
        lambda params, **_: asks.append((now[0], params["TargetCapacitySpecification"]["TotalTargetCapacity"])))
    status: list[str] = []
    shrunk_at: list[float] = []
    booting: list[float] = []

    def act(ctl: Ec2Controller) -> None:
        if play.tick(ctl):
            if len(seen) == 2:
                shrunk_at.append(now[0])
            elif len(seen) == 3:
                status.append(format_status(run_status(storage, live=False)))
                play.finish(ctl)
        running = ctl.state.running
        if not running:
            return
        if shrunk_at and now[0] >= shrunk_at[0] + 400:
            play.capacity_back()
        if ctl.grow.booting:
            booting.append(now[0])
            # Not in the ledger until it joins, but billed from its launch: --max-cost counts it.
            (b,) = ctl.booting()
            (_, e), = ctl.grow.booting
            assert (b.instance_type, b.launched_at) == ("g5.xlarge", e.launched_at) and b.availability_zone
            guard = CostGuard(Limits(max_cost_usd=1e6), storage, min_interval_s=0.0)
            guard.check(now[0], running=[s.segment_id for s in running])
            without = guard.spent_usd
            guard.check(now[0], running=[s.segment_id for s in running], booting=ctl.booting())
            assert guard.spent_usd > without
            # The new node boots; the survivors train on in the shrunk attempt meanwhile.
            assert cluster_file(storage, running[0].instance_id)["segment"] == seen[1]["segment"]
            if len(booting) == 3:  # its agent waits for its cluster file
                for _, e in ctl.grow.booting:
                    note_waiting(storage, e.instance.instance_id)

    ctl, out = play.run(act, nodes=3, min_nodes=2, grow_retry_s=100.0, grow_retry_max_s=250.0,
                        grow_boot_wait_s=300.0)
    first, shrunk, grown = seen
    ids = [n["instance_id"] for n in first["nodes"]]
    kept = ids[:2]
    assert [n["instance_id"] for n in shrunk["nodes"]] == kept and shrunk["segment"].endswith("-m")

    # The asks after the shrink: +100 s, then +200 s, then the 250 s cap; the third one (after
    # capacity came back at +400 s) got the node. Each a single instance.
    after = [(round(t - shrunk_at[0]), n) for t, n in asks if t >= shrunk_at[0]]
    assert [n for _, n in after] == [1, 1, 1], (after, out.getvalue())
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(after)]
    assert 90 <= after[0][0] <= 110 and 190 <= gaps[0] <= 210 and 240 <= gaps[1] <= 260, after
    assert "no capacity yet for 1 node(s) to grow back to 3" in out.getvalue()

    # The grown attempt: 3 nodes, the survivors in their slots, a new one in the empty slot,
    # a new rendezvous id, a later attempt number, a survivor hosting the store, grow set.
    (new,) = set(n["instance_id"] for n in grown["nodes"]) - set(kept)
    assert [n["instance_id"] for n in grown["nodes"]] == [*kept, new]
    assert grown["grow"] is True and shrunk.get("grow") is False and first.get("grow") is False
    assert grown["attempt"] == shrunk["attempt"] + 1 and grown["rdzv_id"] != shrunk["rdzv_id"]
    assert grown["host"] == 0 and grown["nodes"][0]["instance_id"] == kept[0]
    # Every node of it, not --min-nodes of them: the survivors join at once, the new node
    # boots; an elastic rendezvous would start without it.
    assert grown["min_nodes"] is None
    # What a survivor's agent, running the shrunk attempt, finds: the attempt to stop and join.
    spec = node._next_grow(storage, kept[1], ClusterSpec.from_json(shrunk))
    assert spec is not None and spec.segment == grown["segment"] and len(spec.nodes) == 3
    assert f"nodes      3 of 3 in attempt {grown['segment']}" in status[0], status[0]

    # The survivors were never terminated; the grow is no interruption (the loss was one).
    assert not set(calls.terminated) & set(kept) and ctl.state.interruptions == 1 and ctl.state.failures == 0
    recs = launcher_records(storage)
    modes = [(r["segment_id"], r["mode"], r["lost"], r["kept"], r["instances_started"])
             for r in recs if r["event"] == "recovery_started"]
    assert modes == [(shrunk["segment"], "replace", [ids[2]], kept, 0), (grown["segment"], "grow", [], kept, 1)]
    (grow_rec,) = [r for r in recs if r["event"] == "recovery_started" and r["mode"] == "grow"]
    # The stop was asked for once the new node's agent waited (three polls after its launch).
    assert len(booting) == 3 and grow_rec["lost_at"] == grow_rec["capacity_at"] == booting[-1]
    starts = sorted(r["segment_id"] for r in recs if r["event"] == "segment_started")
    assert starts == sorted([*ids, new])  # each survivor one segment: one start, one end
    ends = {r["segment_id"]: r["reason"] for r in recs if r["event"] == "segment_ended"}
    assert ends == {ids[2]: "interrupted", kept[0]: "finished", kept[1]: "finished", new: "finished"}

    # spotrun cost: the grow is a recovery of mode grow that started one instance, kept two.
    report = report_for_run(storage, offline=True)
    by_id = {seg.segment_id: seg for seg in report.segments}
    assert by_id[new].start == after[2][0] + shrunk_at[0]  # billed from its launch, boot included
    grows = [r for r in report.recoveries() if r.mode == "grow"]
    assert len(grows) == 1 and (grows[0].instances_started, grows[0].instances_kept) == (1, 2), report.recoveries()
    text = format_status(run_status(storage, live=False))
    assert "latest (grow)" in text and "instances 1 started, 2 kept" in text, text


# -- real processes ---------------------------------------------------------------------

_WORKER = '''\
"""A torchrun worker (no torch import) for the 143 test: attempt 1 exits 143 without a note,
on its own (mode alone: the stop checkpoint missed its deadline) or on the SIGTERM torchrun
forwards (mode signalled); any later attempt finishes (0)."""
import os, signal, sys, time
folder, mode = sys.argv[1], sys.argv[2]
run = os.environ["TORCHELASTIC_RUN_ID"]
open(os.path.join(folder, "start-" + run), "w").close()
if not run.endswith("-a1"):
    sys.exit(0)
signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
open(os.path.join(folder, "ready"), "w").close()
while not os.path.exists(os.path.join(folder, "go")):
    time.sleep(0.02)
os._exit(143)
'''


def _agent(url: str, iid: str, command: list[str], *extra: str):
    import subprocess

    from helpers import REPO, env_for

    return subprocess.Popen([sys.executable, "-m", "spotrun.launch.node", "--timeout", "120", "--poll", "0.1",
                             *extra, "--", *command],
                            env=env_for(url, SPOTRUN_INSTANCE_ID=iid), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=REPO)


def _wait(what: str, ready, procs, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{what}: a node exited {p.returncode} early:\n{p.communicate()[0][-4000:]}")
        assert time.monotonic() < deadline, f"{what}: timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_143_rejoins_only_when_the_agent_itself_was_not_signalled(tmp_path: Path) -> None:
    """Two one-node agents side by side (real torchrun, workers without torch): in both the
    worker exits 143 with no stop checkpoint and a newer cluster file names the node. Where
    only the worker stopped so (a peer's notice; its stop missed the deadline) the agent joins
    the next attempt; where the agent itself got the SIGTERM (its machine shutting down) it
    exits 143 and runs nothing more."""
    from helpers import finish_session, free_port

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs, folders, urls = {}, {}, {}
    for mode in ("alone", "signalled"):
        folders[mode] = tmp_path / mode
        folders[mode].mkdir()
        urls[mode] = str(tmp_path / f"run-{mode}")
        write_cluster(Storage(urls[mode]), _spec(f"{mode}-a1", 1, ids=("n",), port=free_port(following=2)))
        procs[mode] = _agent(urls[mode], "n", ["python", str(script), str(folders[mode]), mode],
                             "--rejoin-timeout", "60")
    try:
        _wait("workers ready", lambda: all((f / "ready").exists() for f in folders.values()), procs.values())
        for mode in procs:
            write_cluster(Storage(urls[mode]), _spec(f"{mode}-a2", 2, ids=("n",), port=free_port(following=2)))
        (folders["alone"] / "go").touch()
        os.killpg(procs["signalled"].pid, signal.SIGTERM)
        results = {mode: finish_session(p, 180) for mode, p in procs.items()}
    finally:
        # A failed wait leaves both agents running a worker that waits for "go" forever
        # (seen: an agent and its worker left an hour after such a failure).
        for p in procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    code, out = results["alone"]
    assert code == 0 and (folders["alone"] / "start-run-alone-a2").exists(), out[-4000:]
    assert read_attempt_exit(Storage(urls["alone"]), "alone-a1", "n") == 143
    code, out = results["signalled"]
    assert code == 143 and not (folders["signalled"] / "start-run-signalled-a2").exists(), out[-4000:]
    assert read_attempt_exit(Storage(urls["signalled"]), "signalled-a1", "n") == 143


@pytest.mark.slow
def test_a_real_one_node_attempt_grows_to_two_at_a_step_bit_exact(tmp_path: Path) -> None:
    """The survivor of a shrunk job runs alone (attempt a2-m, one node, FSDP2 on
    tests/scripts/fsdp_train.py); the launcher writes the grown attempt a3 (that node and a new
    one, ``grow``). The survivor's agent (the same process throughout: its machine kept) stops
    its torchrun at a step, the checkpoint committed there, joins a3 with the new node, and the
    job finishes on two nodes resumed from that very step (0 steps lost); what a3 restored
    (resharded 1 -> 2) is bit-exact what the stop saved."""
    import re

    import torch
    from helpers import REPO, finish_session, free_port
    from test_sharded_checkpointer import _flatten

    from spotrun.records.layout import EXIT_FINISHED, EXIT_INTERRUPTED

    url, dump = str(tmp_path / "run"), tmp_path / "dump"
    dump.mkdir()
    steps = 60
    cmd = ["python", str(REPO / "tests" / "scripts" / "fsdp_train.py"), "--url", url, "--steps", str(steps),
           "--every-steps", "5", "--step-sleep", "0.05", "--dump", str(dump)]
    storage = Storage(url)
    write_cluster(storage, _spec("a2-m", 2, ids=("node-a",), port=free_port(following=2)))
    survivor = _agent(url, "node-a", cmd, "--rejoin-timeout", "120", "--grow-poll", "0.1")
    from helpers import committed_steps

    _wait("a first checkpoint", lambda: bool(committed_steps(url)), [survivor])
    before = max(committed_steps(url))
    new = _agent(url, "node-c", cmd, "--rejoin-timeout", "120")
    grown = _spec("a3", 3, ids=("node-a", "node-c"), grow=True, port=free_port(following=3))
    write_cluster(storage, grown)
    results = {"node-a": finish_session(survivor, 300), "node-c": finish_session(new, 300)}
    show = "\n".join(f"--- {n} exited {c}:\n{o[-3000:]}" for n, (c, o) in results.items())
    assert {c for c, _ in results.values()} == {EXIT_FINISHED}, show
    out_a = results["node-a"][1]
    assert "grows the job to 2 node(s)" in out_a and "joining attempt a3 (2 nodes)" in out_a, show
    # The planned stop: one exit 75 at step S in the shrunk attempt, S's checkpoint committed,
    # and the grown attempt (both nodes) resumed from S: no step lost.
    (stop,) = [int(s) for s in re.findall(rf"^rank 0 exit {EXIT_INTERRUPTED} at step (\d+)$", out_a, re.MULTILINE)]
    assert before <= stop < steps and stop in committed_steps(url), show
    assert read_attempt_exit(storage, "a2-m", "node-a") == EXIT_INTERRUPTED
    assert read_attempt_exit(storage, "a3", "node-a") == 0 and read_attempt_exit(storage, "a3", "node-c") == 0
    assert "node 0 of 2 in segment a3" in out_a and "node 1 of 2 in segment a3" in results["node-c"][1]
    assert all(f"resumed from step {stop}" in o for _, o in results.values()), show
    assert len(re.findall(rf"^rank \d exit 0 at step {steps}$", out_a + results["node-c"][1], re.MULTILINE)) == 2
    assert (Path(url) / "done.json").exists()
    saved = _flatten(torch.load(dump / f"stopped-{stop}.pt", weights_only=True))
    loaded = _flatten(torch.load(dump / f"restored-{stop}.pt", weights_only=True))
    assert saved.keys() == loaded.keys()
    for key, value in saved.items():
        assert torch.equal(value, loaded[key]) if isinstance(value, torch.Tensor) else value == loaded[key], key


def test_ec2_a_new_node_that_never_waits_or_a_finish_while_it_boots_is_terminated_and_booked(
        cloud, tmp_path: Path) -> None:
    """Capacity comes back at once, but the first new node's agent never waits for its file
    (a broken boot): after grow_boot_wait_s it is terminated and booked (stopped, billed from
    its launch), the survivors untouched; the next ask's node is still booting when the run
    finishes: terminated and booked too. Nothing is left running; no grow happened."""
    from test_launch_ec2_cluster import launcher_records

    from spotrun.launch.controller import Ec2Controller

    storage = Storage(str(tmp_path / "run"))
    play = _Shrink(cloud, storage)
    calls, seen = play.calls, play.seen
    started: list[tuple[float, str]] = []

    def act(ctl: Ec2Controller) -> None:
        if play.tick(ctl) and len(seen) == 2:
            play.capacity_back()
        for _, e in ctl.grow.booting:
            if e.instance.instance_id not in [i for _, i in started]:
                started.append((e.launched_at, e.instance.instance_id))
        if len(started) == 2:  # the second one boots: the run finishes meanwhile
            play.finish(ctl)

    ctl, out = play.run(act, nodes=2, min_nodes=1, grow_retry_s=20.0, grow_retry_max_s=40.0,
                        grow_boot_wait_s=50.0)
    assert len(seen) == 2 and seen[1]["segment"].endswith("-m")  # never grown
    (t1, first), (t2, second) = started
    survivor = next(s.instance_id for s in ctl.state.segments if s.node == 0)
    assert first in calls.terminated and second in calls.terminated and survivor not in calls.terminated
    assert t2 - t1 >= 50 and "no node agent waiting on" in out.getvalue(), out.getvalue()
    assert cloud.running(ctl.state.run_id) == []
    recs = launcher_records(storage)
    ends = {r["segment_id"]: r for r in recs if r["event"] == "segment_ended"}
    starts = {r["segment_id"]: r for r in recs if r["event"] == "segment_started"}
    for iid in (first, second):
        assert ends[iid]["reason"] == "stopped", ends[iid]
    assert out.getvalue().count("a node to grow back not needed") == 2, out.getvalue()
    assert starts[first]["time"] <= t1 and ends[first]["time"] >= t1 + 50
    assert [r["mode"] for r in recs if r["event"] == "recovery_started"] == ["replace"]


@pytest.mark.parametrize("how", ["notice", "vanish"])
def test_ec2_a_node_lost_while_a_grow_boots_is_replaced_by_the_booting_machine(cloud, tmp_path: Path,
                                                                               how: str) -> None:
    """3 nodes, --min-nodes 2, shrunk to 2 after a loss with no capacity; capacity comes back
    and a machine boots to grow back. Then survivor node 1 gets a notice (or vanishes): the
    booting machine replaces it (no new ask, not terminated unused), in node 1's slot; the
    attempt is still shrunk, so the grow starts over and asks for slot 2 again."""
    from test_ec2_early_replace import _notice
    from test_launch_ec2_cluster import launcher_records

    from spotrun.launch.controller import Ec2Controller

    storage = Storage(str(tmp_path / "run"))
    play = _Shrink(cloud, storage)
    calls, now, seen = play.calls, play.now, play.seen
    grow_machine: list[str] = []
    fleets_at_loss: list[int] = []

    def act(ctl: Ec2Controller) -> None:
        if play.tick(ctl):
            if len(seen) == 2:
                play.capacity_back()  # the grow's first ask gets a machine
            elif len(seen) == 3:  # the attempt after node 1's loss: finish
                play.finish(ctl)
            return
        running = ctl.state.running
        if not running:
            return
        if ctl.grow.booting and not grow_machine:
            ((_, e),) = ctl.grow.booting
            grow_machine.append(e.instance.instance_id)
            node1 = next(s.instance_id for s in running if s.node == 1)
            if how == "notice":
                _notice(storage, node1, at=now[0])
            else:
                fleets_at_loss.append(len(calls.fleets))
                cloud.spot_interrupt(node1)
        elif how == "notice" and grow_machine and ctl.early.waiting and not fleets_at_loss:
            # The notice was seen: the booting machine is node 1's replacement; spot takes node 1.
            fleets_at_loss.append(len(calls.fleets))
            cloud.spot_interrupt(next(s.instance_id for s in running if s.node == 1))

    ctl, out = play.run(act, nodes=3, min_nodes=2, grow_retry_s=20.0, grow_retry_max_s=40.0,
                        grow_boot_wait_s=300.0)
    assert len(seen) == 3, out.getvalue()
    first, _, replaced = seen
    ids = [n["instance_id"] for n in first["nodes"]]
    (g,) = grow_machine
    # The booting machine took node 1's slot; nothing more was asked for between the loss
    # and the new attempt; it was never terminated before the run's end.
    assert [n["instance_id"] for n in replaced["nodes"]] == [ids[0], g], out.getvalue()
    assert len(calls.fleets) == fleets_at_loss[0], (calls.fleets, out.getvalue())
    assert "booting to grow the job back, replaces it instead" in out.getvalue()
    assert "a node to grow back not needed" not in out.getvalue()
    recs = launcher_records(storage)
    (rec,) = [r for r in recs if r["event"] == "recovery_started" and r["segment_id"] == replaced["segment"]]
    assert (rec["mode"], rec["lost"], rec["kept"], rec["instances_started"]) == ("replace", [ids[1]], [ids[0]], 1)
    starts = {r["segment_id"]: r for r in recs if r["event"] == "segment_started"}
    assert starts[g]["node"] == 1 and starts[g]["group"] == replaced["segment"]
    ends = {r["segment_id"]: r for r in recs if r["event"] == "segment_ended"}
    assert ends[g]["reason"] == "finished" and not ends[g].get("unused"), ends[g]
    assert cloud.running(ctl.state.run_id) == []


def test_a_cluster_file_grow_must_be_a_boolean_and_older_files_do_not_grow() -> None:
    from spotrun.errors import ConfigError

    data = _spec("a3", 3, grow=True).to_json()
    assert ClusterSpec.from_json(data).grow is True
    assert ClusterSpec.from_json({k: v for k, v in data.items() if k != "grow"}).grow is False
    with pytest.raises(ConfigError, match="grow 'yes' must be true or false"):
        ClusterSpec.from_json({**data, "grow": "yes"})


@pytest.mark.parametrize("bad", ["0", "nan", "-1", "often"])
def test_a_bad_grow_poll_is_refused_at_parse(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        node.main(["--grow-poll", bad, "--", "python", "t.py"])
    assert exc.value.code == 2 and "--grow-poll" in capsys.readouterr().err


def test_ec2_no_grow_with_recovery_relaunch(cloud, tmp_path: Path) -> None:
    """With --recovery relaunch the agents do not watch for a grow (no --rejoin-timeout in user
    data): an attempt on fewer nodes is left as it is, nothing asked for."""
    from test_launch_ec2_cluster import FAST, controller, options

    from spotrun.launch.controller import Timing
    from spotrun.records.launch_state import Segment

    storage = Storage(str(tmp_path / "run"))
    now = [1_800_000_000.0]
    for recovery, expect_asks in (("relaunch", 0), ("replace", 1)):
        opts = options(cloud, storage, nodes=3, min_nodes=2, nproc_per_node=None, recovery=recovery)
        ctl = controller(cloud, storage, opts, lambda _c: None, clock=now,
                         timing=Timing(**{**FAST.__dict__, "grow_retry_s": 10.0}))
        before = len(cloud.fleets["us-east-1"])
        attempt = [Segment(segment_id=f"i-{n}", instance_id=f"i-{n}", node=n, instance_type="g5.xlarge",
                           subnet_id=cloud.subnet, market="spot", started_at=now[0]) for n in range(2)]
        ctl.grow.check(attempt)
        now[0] += 11
        ctl.grow.check(attempt)
        assert len(cloud.fleets["us-east-1"]) - before == expect_asks and ctl.grow.asks == expect_asks, recovery
        ctl.grow.discard("the test is over")
