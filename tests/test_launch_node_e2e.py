"""A 2-node job on this machine: two ``python -m spotrun.launch.node`` process groups.

Each "node" is its own session (as its own machine would be), knows only its instance id
and the run URL, finds the head through its cluster file and joins a real torchrun c10d
rendezvous on 127.0.0.1 (node-a hosts the store, node-b joins). The workers are
tests/scripts/ddp_train.py (DDP, gloo, CPU, deterministic). Issue 14 items 1, 2 and 8:

- uninterrupted: both nodes finish, done.json (the reference for the others);
- a notice to one node only: both wrappers exit 75 at the same step, one checkpoint;
  relaunched (new segment, new rendezvous id and port) it finishes bit-exact;
- one node's machine vanishes (SIGKILL of its agent and workers, no notice): the
  survivor's collectives fail and its wrapper exits non-zero; relaunched, the job resumes
  from the last committed checkpoint and finishes bit-exact.
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

from conftest import free_port
from helpers import REPO, committed_steps, env_for, finish_session
from spotrun.commit import list_checkpoints
from spotrun.launch.node import ClusterSpec, write_cluster
from spotrun.layout import EXIT_FINISHED, EXIT_INTERRUPTED
from spotrun.notices.fake_server import FakeMetadataServer
from spotrun.resume_check import compare_checkpoints
from spotrun.storage import Storage

pytestmark = pytest.mark.slow

SCRIPT = str(REPO / "tests" / "scripts" / "ddp_train.py")
STEPS, EVERY = 60, 10
NODES = ("node-a", "node-b")  # node-a hosts the rendezvous store
TIMEOUT = 180  # two nodes, four torch imports on a loaded 2-core box; a deadlock would be forever


def _write_cluster(url: str, segment: str) -> ClusterSpec:
    spec = ClusterSpec(segment=segment, nproc_per_node=1, rdzv_id=f"test-{segment}",
                       port=free_port(),
                       nodes=[{"instance_id": n, "address": "127.0.0.1"} for n in NODES])
    write_cluster(Storage(url), spec)
    return spec


def _start_node(url: str, node: str, *, step_sleep: float, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "spotrun.launch.node", "--timeout", "120", "--poll", "0.1",
           "--", "python", SCRIPT, "--url", url, "--steps", str(STEPS),
           "--every-steps", str(EVERY), "--step-sleep", str(step_sleep)]
    return subprocess.Popen(cmd, env=env_for(url, SPOTRUN_INSTANCE_ID=node, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=REPO)


def _job(url: str, segment: str, *, step_sleep: float = 0.0,
         env: dict[str, dict[str, str]] | None = None) -> dict[str, subprocess.Popen]:
    """Both nodes started first (they wait for their cluster file), then the file written."""
    env = env or {}
    procs = {n: _start_node(url, n, step_sleep=step_sleep, **env.get(n, {})) for n in NODES}
    _write_cluster(url, segment)
    return procs


def _finish_all(procs: dict[str, subprocess.Popen]) -> dict[str, tuple[int, str]]:
    return {n: finish_session(p, TIMEOUT) for n, p in procs.items()}


def _exit_line(out: str) -> tuple[int, int]:
    """(exit code, steps done) from the worker's last words (one worker per node)."""
    found = re.findall(r"^rank \d exit (\d+) at step (\d+)$", out, re.M)
    assert len(found) == 1, out[-4000:]
    return int(found[0][0]), int(found[0][1])


def _show(results: dict[str, tuple[int, str]]) -> str:
    return "\n".join(f"--- {n} exited {c}:\n{o[-3000:]}" for n, (c, o) in results.items())


def _wait_for_checkpoint(procs: dict[str, subprocess.Popen], url: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not committed_steps(url):
        for n, p in procs.items():
            if p.poll() is not None:
                pytest.fail(f"{n} exited {p.returncode} early:\n{p.communicate()[0][-4000:]}")
        assert time.monotonic() < deadline, "no checkpoint committed"
        time.sleep(0.05)


def _resume_and_compare(url: str, reference: str, segment: str, stop: int) -> None:
    results = _finish_all(_job(url, segment))
    for n, (code, out) in results.items():
        assert code == EXIT_FINISHED, _show(results)
        assert _exit_line(out) == (EXIT_FINISHED, STEPS), _show(results)
        assert f"test-{segment}" in out  # joined the new rendezvous, not the old one
    assert any(f"resumed from step {stop} " in out for _, out in results.values()), _show(results)
    step, differences = compare_checkpoints(Storage(reference), Storage(url))
    assert step == STEPS
    assert differences == []


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """One uninterrupted 2-node run, the yardstick for every resumed one."""
    url = str(tmp_path_factory.mktemp("nodes") / "reference")
    t0 = time.monotonic()
    results = _finish_all(_job(url, "s1"))
    print(f"uninterrupted 2-node run: {time.monotonic() - t0:.1f}s")
    for n, (code, out) in results.items():
        assert code == EXIT_FINISHED, _show(results)
        assert _exit_line(out) == (EXIT_FINISHED, STEPS), _show(results)
    assert "node 0 of 2" in results["node-a"][1] and "host" in results["node-a"][1]
    assert "node 1 of 2" in results["node-b"][1]
    assert (Path(url) / "done.json").exists()
    assert committed_steps(url) == list(range(EVERY, STEPS + 1, EVERY))
    manifest = {c.step: c for c in list_checkpoints(Storage(url))}[STEPS].manifest
    assert manifest is not None and manifest.world_size == 2
    return url


def test_two_nodes_finish(reference):
    """The fixture's assertions are the test: a 2-node job through cluster files finishes."""
    assert Path(reference, "done.json").exists()


def test_notice_to_one_node_stops_both_at_one_step_and_resumes_bit_exact(tmp_path, reference):
    url = str(tmp_path / "run")
    with FakeMetadataServer("ec2") as imds_a, FakeMetadataServer("ec2") as imds_b:
        env = {n: {"SPOTRUN_NOTICE_SOURCE": "ec2", "SPOTRUN_IMDS_ENDPOINT": s.url,
                   "SPOTRUN_POLL_INTERVAL": "0.2"}
               for n, s in (("node-a", imds_a), ("node-b", imds_b))}
        procs = _job(url, "s1", step_sleep=0.05, env=env)
        _wait_for_checkpoint(procs, url)
        imds_b.post_interruption("terminate", in_seconds=120)
        results = _finish_all(procs)
        # Both nodes watched their own metadata service; only node-b's posted a notice.
        assert any("instance-action" in path for _, path, _ in imds_a.requests)
    exits = {n: _exit_line(out) for n, (_, out) in results.items()}
    assert {c for c, _ in results.values()} == {EXIT_INTERRUPTED}, _show(results)
    assert {c for c, _ in exits.values()} == {EXIT_INTERRUPTED}, exits
    (stop,) = {s for _, s in exits.values()}  # the same step on both nodes
    assert 0 < stop < STEPS, f"stopped at {stop}; the notice must land mid-run"
    assert "spotrun ec2 notice 'terminate'" in results["node-b"][1]
    assert "spotrun ec2 notice" not in results["node-a"][1]
    infos = {c.step: c for c in list_checkpoints(Storage(url))}
    assert max(infos) == stop and all(c.status == "committed" for c in infos.values()), infos
    assert sorted(infos[stop].manifest.files) == ["rank-00000.pt", "rank-00001.pt"]
    _resume_and_compare(url, reference, "s2", stop)


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun's workers live in sessions of their own,
    so killing the node's process group alone would leave them running)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


@pytest.mark.parametrize("victim", ["node-b", "node-a"])
def test_vanished_node_fails_the_survivor_then_resumes_bit_exact(tmp_path, reference, victim):
    """node-b: a joining node vanishes; node-a: the rendezvous head (store host) vanishes."""
    url = str(tmp_path / "run")
    procs = _job(url, "s1", step_sleep=0.05)
    _wait_for_checkpoint(procs, url)
    time.sleep(0.3)  # a few steps past the first checkpoint
    doomed = _descendants(procs[victim].pid)
    assert len(doomed) >= 2, "the node's worker was not found"
    t_kill = time.monotonic()
    os.killpg(procs[victim].pid, signal.SIGKILL)
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    survivor = next(n for n in NODES if n != victim)
    code, out = finish_session(procs[survivor], TIMEOUT)
    took = time.monotonic() - t_kill
    procs[victim].communicate()
    print(f"{victim} killed: survivor {survivor} exited {code} after {took:.1f}s")
    assert code not in (EXIT_FINISHED, EXIT_INTERRUPTED), out[-4000:]
    assert not Path(url, "done.json").exists()
    last = committed_steps(url)[-1]
    assert 0 < last < STEPS
    _resume_and_compare(url, reference, "s2", last)
