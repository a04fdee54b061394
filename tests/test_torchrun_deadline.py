"""A stop checkpoint that misses its deadline under torchrun is an interruption, not a failure.

Every rank of a 2-rank torchrun stops together on a SIGTERM to one of them; their stop save
cannot commit within ``SPOTRUN_STOP_TIMEOUT`` (``slowfile://`` payload writes sleep), so each
exits 143 (``EXIT_STOP_UNSAVED``). Plain torchrun turns that into 1, which the launchers count
as a failure of the command (``--max-failures`` ends the run); ``python -m
spotrun.distributed`` passes 143 on, and the attempt policy books it as an interruption that
lost the steps since the previous checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, committed_steps, env_for, finish_session, free_port, ledger_events, torchrun, wait_for_line

from spotrun.launch.attempt import (
    Action,
    AttemptEnd,
    NodeEnd,
    classify_ec2,
    classify_instance,
    classify_local,
    next_step,
)
from spotrun.records.events import EndReason
from spotrun.records.layout import EXIT_STOP_UNSAVED

SCRIPT = str(REPO / "tests" / "scripts" / "ddp_deadline_train.py")
SIGINT_EXIT = 128 + signal.SIGINT


@pytest.mark.slow
def test_missed_stop_deadline_under_torchrun_exits_143_not_1(tmp_path, warm_ranks):
    folder = tmp_path / "run"
    url = f"slowfile://{folder}"
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = env_for(url, SPOTRUN_TEST_WRITE_DELAY="1", SPOTRUN_STOP_TIMEOUT="3", SPOTRUN_NOTICE_SOURCE="none")
    proc = torchrun(SCRIPT, 2, "--url", url, "--steps", "100000", "--every-steps", "1000000",
                    "--step-sleep", "0.05", "--pid-dir", str(pid_dir), env=env, warm=warm_ranks)
    pids = _pids(proc, pid_dir)
    wait_for_line(proc, "rank 1 step 5", timeout=120)
    os.kill(pids[1], signal.SIGTERM)  # the notice reaches one rank; the other learns by agreement
    code, out = finish_session(proc, 180)
    assert "did not commit within" in out, out[-4000:]
    assert code == EXIT_STOP_UNSAVED, (code, out[-4000:])
    assert committed_steps(str(folder)) == []  # nothing committed: the stop save was abandoned
    ended = ledger_events(str(folder), "segment_ended")
    assert ended and {e["reason"] for e in ended} == {"interrupted"}, ended


def _pids(proc, pid_dir: Path) -> dict[int, int]:
    files = {r: pid_dir / f"rank{r}.pid" for r in (0, 1)}
    _wait_for(proc, lambda: all(f.exists() for f in files.values()), "the workers' pids")
    return {r: int(f.read_text()) for r, f in files.items()}


def _wait_for(proc, ready, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"torchrun exited {proc.returncode} before {what}:\n{proc.communicate()[0][-4000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.05)


# -- the attempt policy: 143 / 130 are interruptions, never failures -----------------------


@pytest.mark.parametrize("code", [EXIT_STOP_UNSAVED, SIGINT_EXIT])
def test_ec2_instance_exit_143_is_an_interruption(code):
    verdict = classify_instance(NodeEnd("i-1", exit_code=code, state="terminated"), done=False)
    assert verdict.reason is EndReason.INTERRUPTED and "not committed" in verdict.detail, verdict
    decision = next_step(verdict, failures=0, max_failures=1)
    assert decision.action is Action.RELAUNCH and decision.failures == 0 and decision.interruptions == 1
    # a node of a 3-node attempt: replaced, the others kept
    ends = AttemptEnd(nodes=(NodeEnd("i-1", exit_code=code, state="terminated", rank=1),))
    verdict = classify_ec2(ends)
    assert verdict.reason is EndReason.INTERRUPTED and verdict.lost == ("i-1",)
    decision = next_step(verdict, failures=0, max_failures=1, nodes=["i-0", "i-1", "i-2"], recovery="replace")
    assert decision.action is Action.REPLACE and decision.kept == ("i-0", "i-2") and decision.failures == 0


@pytest.mark.parametrize(("codes", "notice"), [
    ((EXIT_STOP_UNSAVED, EXIT_STOP_UNSAVED), True),  # the noticed node's torchrun and its peer's
    ((EXIT_STOP_UNSAVED, 1), True),
    ((EXIT_STOP_UNSAVED, EXIT_STOP_UNSAVED), False),  # a signal from outside the simulator
    ((SIGINT_EXIT, SIGINT_EXIT), False),
])
def test_local_nodes_exit_143_is_an_interruption(codes, notice):
    nodes = tuple(NodeEnd(f"node{i}", exit_code=c, rank=i) for i, c in enumerate(codes))
    end = AttemptEnd(nodes=nodes, notice_posted=notice, hit="node0" if notice else None, first="node0")
    verdict = classify_local(end)
    assert verdict.reason is EndReason.INTERRUPTED, verdict
    decision = next_step(verdict, failures=0, max_failures=1, nodes=["node0", "node1"], recovery="replace")
    assert decision.failures == 0 and decision.interruptions == 1


@pytest.mark.parametrize("code", [EXIT_STOP_UNSAVED, SIGINT_EXIT])
def test_local_one_node_exit_143_without_notice_is_an_interruption(code):
    verdict = classify_local(AttemptEnd(nodes=(NodeEnd("local", exit_code=code),)))
    assert verdict.reason is EndReason.INTERRUPTED and "not committed" in verdict.detail, verdict
    assert verdict.lost == ()  # the machine is still there


def test_a_real_failure_is_still_a_failure():
    assert classify_instance(NodeEnd("i-1", exit_code=1, state="terminated"), done=False).reason is EndReason.FAILED
    end = AttemptEnd(nodes=(NodeEnd("a", exit_code=EXIT_STOP_UNSAVED, rank=0), NodeEnd("b", exit_code=1, rank=1)))
    assert classify_local(end).reason is EndReason.FAILED  # no notice, and one node crashed


# A worker whose stop takes ``STOP_TAKES`` seconds after SIGTERM, then commits (a marker file
# and the exit note the Checkpointer leaves) and exits 75: a stop checkpoint of a large state.
SLOW_STOP = """
import os, signal, sys, time
from spotrun.distributed import note_exit
def stop(signum, frame):
    time.sleep(float(os.environ["STOP_TAKES"]))
    open(os.environ["MARK"], "w").write("committed")
    note_exit(75)
    os._exit(75)
signal.signal(signal.SIGTERM, stop)
open(os.environ["READY"], "w").write("ready")
while True:
    time.sleep(0.1)
"""


def _slow_stop(tmp_path: Path, takes: float, *torchrun_args: str, **env: str) -> tuple[int, bool, str]:
    """SIGTERM to ``python -m spotrun.distributed`` (the agent, as a launcher's stop or a planned
    grow sends it) whose one worker needs ``takes`` s to commit: (exit code, committed, output)."""
    script = tmp_path / "slow_stop.py"
    script.write_text(SLOW_STOP)
    ready, mark = tmp_path / "ready", tmp_path / "mark"
    run_env = env_for(str(tmp_path / "run"), STOP_TAKES=str(takes), READY=str(ready), MARK=str(mark), **env)
    proc = subprocess.Popen([sys.executable, "-m", "spotrun.distributed", *torchrun_args, "--nproc-per-node", "1",
                             "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)],
                            env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=REPO)
    _wait_for(proc, ready.exists, "the worker's start")
    proc.send_signal(signal.SIGTERM)
    code, out = finish_session(proc, 120)
    return code, mark.exists(), out


@pytest.mark.slow
def test_torchrun_waits_for_a_stop_longer_than_its_30_s_default(tmp_path):
    """torch's agent SIGKILLs signalled workers after 30 s; a stop checkpoint may take up to
    SPOTRUN_STOP_TIMEOUT. Without the longer bound the worker dies at 30 s, uncommitted (143)."""
    code, committed, out = _slow_stop(tmp_path, 33, SPOTRUN_STOP_TIMEOUT="40")
    assert committed and code == 75, (code, out[-4000:])


def test_a_shutdown_timeout_the_user_gives_is_kept(tmp_path):
    code, committed, out = _slow_stop(tmp_path, 33, "--shutdown-timeout", "2")
    assert not committed and code == 128 + signal.SIGTERM, (code, out[-4000:])
