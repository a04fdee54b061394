"""A node that vanishes silently must not hang the survivors (``--loss-mode silent``).

On EC2 a reclaimed or failed machine disappears without closing its sockets: no FIN, no RST.
The local simulator plays that with SIGSTOP of the lost node's agent and workers (their
sockets stay open, nothing answers). Without the fix the survivor's rank waits in its gloo
collective up to the process group's timeout (30 min by default) and nothing else notices
(measured: no log line from any layer in 101 s). With it, the launcher declares the node
lost at once and writes the next attempt's cluster files (the survivor kept, one replacement
in the lost slot); the survivor's node agent sees the newer attempt naming it while its own
still runs, stops its workers (SIGTERM, SIGKILL after a grace) and joins it; its torchrun
agent, blocked on the lost node's rendezvous store, is left behind (the agent starts afresh
in the same process).

ONE run (2 nodes x 1 process, tests/scripts/ddp_train.py; ``--seed 1`` makes the lost node
node 0, the rendezvous host: the worst case) shared by the assertions: the run finishes,
the lost machine's processes were stopped (state T) while the survivor rejoined, the survivor
rejoined within a bound far under gloo's timeout (a hang fails it), it was kept (one
replacement), the next attempt resumed from the last commit before the loss and the run ends
bit-exact against the shared uninterrupted 2-rank run, and no stopped process is left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DDP_EVERY, DDP_SCRIPT, DDP_STEPS, REPO

from spotrun.launch.proctree import descendants, kill_tree
from spotrun.proof.resume_check import compare_checkpoints
from spotrun.records.launch_state import load_state
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")]

#: From the loss to the survivor's node agent starting the next attempt. Measured 12-21 s on
#: the loaded 2-core box (1 s poll, 5 s grace, 1 s for torchrun's agent here since the lost
#: node hosted its store, a fresh agent's imports); gloo's default timeout is 1800 s.
REJOIN_BOUND_S = 60.0
TIMEOUT = 420  # the whole run; each wait below is bounded too


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _ids(pid: int) -> tuple[int, int] | None:
    """(process group, session) of ``pid``, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[2]), int(fields[3])


def _in_groups(groups: set[int]) -> list[tuple[int, str | None]]:
    """Every process whose group or session is one of ``groups``, with its state."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ids = _ids(int(entry))
            if ids is not None and (ids[0] in groups or ids[1] in groups):
                out.append((int(entry), _state(int(entry))))
    return out


@pytest.fixture(scope="module")
def vanish_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    run = tmp_path_factory.mktemp("vanish") / "run"
    out = run.parent / "launch.out"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    argv = [sys.executable, "-m", "spotrun.cli", "launch", "--local", "--run-url", str(run), "--nodes", "2",
            "--nproc-per-node", "1", "--interruptions", "1", "--node-losses", "1", "--loss-mode", "silent",
            "--grace", "1", "--seed", "1", "--",
            sys.executable, DDP_SCRIPT, "--url", str(run), "--steps", str(DDP_STEPS),
            "--every-steps", str(DDP_EVERY), "--step-sleep", "0.05"]
    seen: dict = {"groups": set(), "stopped": []}
    with open(out, "w") as sink:
        proc = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + TIMEOUT
            while proc.poll() is None:
                assert time.monotonic() < deadline, out.read_text()[-8000:]
                now = time.monotonic()
                text = out.read_text()
                # The node agents' process groups (each in a session of its own), for the
                # leftover check at the end.
                for pid in [proc.pid, *descendants(proc.pid)]:
                    ids = _ids(pid)
                    if ids is not None and ids[1] != proc.pid:
                        seen["groups"].add(ids[1])
                if "loss_at" not in seen and "vanished silently: SIGSTOP" in text:
                    seen["loss_at"] = now
                if "loss_at" in seen and "rejoin_at" not in seen:
                    # While the survivor has not rejoined, the lost machine stays stopped.
                    stopped = [p for p, st in _in_groups(seen["groups"]) if st == "T"]
                    seen["stopped"] = max(seen["stopped"], stopped, key=len)
                    if "spotrun node sim-1-n1: node 1 of 2 in segment sim-2" in text:
                        seen["rejoin_at"] = now
                    assert now - seen["loss_at"] < REJOIN_BOUND_S, (
                        f"the survivor did not rejoin within {REJOIN_BOUND_S:g}s of the silent loss "
                        f"(hung in its dead attempt?):\n{text[-8000:]}")
                time.sleep(0.2)
            seen["code"] = proc.returncode
        finally:
            if proc.poll() is None:  # its own cleanup (every exit path reaps stopped nodes) first
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    kill_tree(proc.pid)
                    proc.wait()
    seen["text"] = out.read_text()
    # Exiting processes (zombies until reaped) are not left behind: a few seconds to go.
    end = time.monotonic() + 10
    while (left := [(p, st) for p, st in _in_groups(seen["groups"]) if st not in ("Z", None)]) \
            and time.monotonic() < end:
        time.sleep(0.2)
    seen["left"] = left
    for pid, _ in seen["left"]:  # never leave anything behind, even when the test fails
        kill_tree(pid)  # SIGKILL ends a stopped process too
    seen["run"] = run
    return seen


def test_survivors_rejoin_promptly_and_the_run_finishes(vanish_run: dict) -> None:
    text = vanish_run["text"]
    assert vanish_run["code"] == 0, text[-8000:]
    assert "sim-1-n0 (node 0) vanished silently: SIGSTOP" in text
    # The lost machine's processes (agent and worker at least) were stopped, not killed,
    # while the survivor left its dead attempt: the survivor saw no reset connection.
    assert len(vanish_run["stopped"]) >= 2, text[-8000:]
    took = vanish_run["rejoin_at"] - vanish_run["loss_at"]
    print(f"silent loss -> survivor's agent in the next attempt: {took:.1f}s (bound {REJOIN_BOUND_S:g}s)")
    assert took < REJOIN_BOUND_S
    # How the survivor left: the newer attempt seen by its watch, its worker stopped.
    assert "spotrun node sim-1-n1: attempt sim-2 replaces a lost node while this attempt runs" in text
    assert re.search(r"spotrun: sim-1 ended: interrupted \(simulated node loss.*; keeping sim-1-n1", text)
    assert "spotrun: run finished" in text


def test_the_survivor_is_kept_and_one_node_replaces_the_lost_one(vanish_run: dict) -> None:
    storage = Storage(str(vanish_run["run"]))
    records = [r for r in Ledger(storage).records() if r.get("source") == "launcher"]
    recoveries = [(r["segment_id"], r["mode"], r["lost"], r["kept"], r["instances_started"])
                  for r in records if r["event"] == "recovery_started"]
    assert recoveries == [("sim-2", "replace", ["sim-1-n0"], ["sim-1-n1"], 1)], recoveries
    # One machine, one segment: the survivor's dead attempt is not its interruption, the
    # lost node's is (one interruption in the run).
    started = sorted(r["segment_id"] for r in records if r["event"] == "segment_started")
    ended = sorted((r["segment_id"], r["reason"]) for r in records if r["event"] == "segment_ended")
    assert started == ["sim-1-n0", "sim-1-n1", "sim-2-n0"], started
    assert ended == [("sim-1-n0", "interrupted"), ("sim-1-n1", "finished"), ("sim-2-n0", "finished")], ended
    assert load_state(storage).interruptions == 1


def test_resumes_from_the_last_commit_bit_exact(vanish_run: dict, ddp_reference: str) -> None:
    text = vanish_run["text"]
    before = text[:text.index("vanished silently")]
    last = max(int(s) for s in re.findall(r"checkpoint at step (\d+) committed", before))
    # (A commit whose log line was still in a pipe when the node stopped may be newer.)
    (resumed,) = {int(s) for s in re.findall(r"segment 2 \(.*resuming after step (\d+)\)", text)}
    assert last <= resumed < DDP_STEPS, text[-8000:]
    assert len(re.findall(rf"resumed from step {resumed} at ", text)) == 2, text[-8000:]  # both ranks
    run = vanish_run["run"]
    assert (run / "done.json").exists()
    step, differences = compare_checkpoints(Storage(ddp_reference), Storage(str(run)))
    assert step == DDP_STEPS and differences == []


def test_no_stopped_process_is_left_behind(vanish_run: dict) -> None:
    assert vanish_run["groups"], "no node process group was seen"
    assert vanish_run["left"] == [], vanish_run["left"]  # stopped (T) or running: none


# -- the node agent's side alone, without torch (seconds) ----------------------------------

STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(120)")


def test_a_dead_attempt_kills_the_workers_then_leaves_a_stuck_agent_behind() -> None:
    """A newer attempt that does not grow: the watch stops the workers (SIGTERM ignored here,
    so SIGKILL after the grace), and when torchrun does not return (``stop()`` never called)
    it hands the new attempt to ``on_stuck``; a growing one is still the planned stop."""
    from spotrun.launch.grow import GrowWatch
    from spotrun.launch.proctree import worker_sessions

    worker = subprocess.Popen([sys.executable, "-c", STUBBORN], start_new_session=True, stdout=subprocess.PIPE,
                              text=True)
    assert worker.stdout.readline() == "ready\n"  # its SIGTERM handler is in place
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # not a worker
    try:
        mine = worker_sessions(os.getpid())
        assert worker.pid in mine and helper.pid not in mine
        spec = type("Spec", (), {"grow": False, "segment": "sim-2", "nodes": ()})()
        stuck: list = []
        t0 = time.monotonic()
        watch = GrowWatch(lambda: spec, 0.05, name="t", dead_grace_s=0.5, stuck_s=lambda s: 0.3,
                          on_stuck=stuck.append, workers=lambda: [worker.pid])
        assert worker.wait(timeout=30) == -signal.SIGKILL  # SIGTERM ignored: killed after the grace
        end = time.monotonic() + 30
        while not stuck and time.monotonic() < end:
            time.sleep(0.05)
        assert stuck == [spec] and watch.dead and watch.spec is spec and not watch.sent
        assert 0.5 <= time.monotonic() - t0 < 30
        assert helper.poll() is None  # only the workers
        watch.stop()
    finally:
        for proc in (worker, helper):
            proc.kill()
            proc.wait()
        worker.stdout.close()


def test_the_stuck_bound_is_short_when_the_store_host_is_gone() -> None:
    from spotrun.launch.grow import DEAD_RETURN_S
    from spotrun.launch.node import ClusterSpec, _stuck_s

    def spec(segment: str, ids: list[str], host: int = 0) -> ClusterSpec:
        return ClusterSpec(segment=segment, nodes=[{"instance_id": i, "address": "127.0.0.1"} for i in ids],
                           nproc_per_node=1, rdzv_id=f"r-{segment}", host=host)

    old = spec("sim-1", ["a", "b"])
    assert _stuck_s(old, spec("sim-2", ["c", "b"], host=1)) == 1.0  # a hosted the store and is lost
    assert _stuck_s(old, spec("sim-2", ["a", "c"])) == DEAD_RETURN_S  # b was lost: a's store answers
