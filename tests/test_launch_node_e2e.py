"""A 2-node job on this machine: two ``python -m spotrun.launch.node`` process groups.

Each "node" is its own session (as its own machine would be), knows only its instance id
and the run URL, finds the head through its cluster file and joins a real torchrun c10d
rendezvous on 127.0.0.1 (node-a hosts the store, node-b joins). The workers are
tests/scripts/ddp_train.py (DDP, gloo, CPU, deterministic). Issue 14 items 1, 2 and 8:

- one job through three segments, each relaunch a new segment (new rendezvous id and port):
  a notice to one node only (both wrappers exit 75 at the same step, one checkpoint); then
  the head's machine vanishes (SIGKILL of its agent and workers, no notice: the survivor's
  collectives fail and its wrapper exits non-zero); the last segment resumes from the last
  committed checkpoint, both nodes finish (done.json) and the final state is bit-exact
  against the shared uninterrupted 2-rank run (``ddp_reference``, conftest.py). Each node has
  a local directory of its own (its machine's memory: the local copy and the peer copies,
  spotrun/recovery/peer.py); after the notice node-b's machine is replaced (its directory
  deleted) and the run URL's copies of the stop checkpoint are damaged on purpose, so the
  replacement resumes from that step only by reading 0 bytes from the run URL (its files
  come from its buddy, node-a). Chained in
  one test because each 2-node start costs ~10-30 s of a loaded 2-core box. A joining
  node's machine vanishing is test_launch_warm's first loss (the same node
  launcher, through the CLI);
- a SIGTERM to a node's process group reaches each worker once (a 1-node job with a
  worker that counts signals and imports no torch).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DDP_EVERY, DDP_SCRIPT, DDP_STEPS, REPO, committed_steps, env_for, finish_session, free_port

from spotrun.format.commit import list_checkpoints
from spotrun.launch.node import ClusterSpec, write_cluster
from spotrun.notices.fake_server import FakeMetadataServer
from spotrun.proof.resume_check import compare_checkpoints
from spotrun.records.layout import EXIT_FINISHED, EXIT_INTERRUPTED, checkpoint_dir
from spotrun.storage import Storage

pytestmark = pytest.mark.slow

SCRIPT = DDP_SCRIPT
STEPS, EVERY = DDP_STEPS, DDP_EVERY  # the shared ``ddp_reference`` run's (conftest.py)
NODES = ("node-a", "node-b")  # node-a hosts the rendezvous store
TIMEOUT = 180  # two nodes, four torch imports on a loaded 2-core box; a deadlock would be forever


def _write_cluster(url: str, segment: str) -> ClusterSpec:
    spec = ClusterSpec(segment=segment, nproc_per_node=1, rdzv_id=f"test-{segment}",
                       port=free_port(following=len(NODES)),
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
    found = re.findall(r"^rank \d exit (\d+) at step (\d+)$", out, re.MULTILINE)
    assert len(found) == 1, out[-4000:]
    return int(found[0][0]), int(found[0][1])


def _show(results: dict[str, tuple[int, str]]) -> str:
    return "\n".join(f"--- {n} exited {c}:\n{o[-3000:]}" for n, (c, o) in results.items())


def _wait_for_checkpoint_after(procs: dict[str, subprocess.Popen], url: str, after: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while max(committed_steps(url), default=0) <= after:
        for n, p in procs.items():
            if p.poll() is not None:
                pytest.fail(f"{n} exited {p.returncode} early:\n{p.communicate()[0][-4000:]}")
        assert time.monotonic() < deadline, f"no checkpoint after step {after} committed"
        time.sleep(0.05)


def _resumed_from(results: dict[str, tuple[int, str]], step: int) -> None:
    assert any(f"resumed from step {step} " in out for _, out in results.values()), _show(results)


def test_sigterm_to_a_nodes_process_group_reaches_each_worker_once(tmp_path):
    """What a launcher stopping a node does: one SIGTERM per worker (torchrun forwards it;
    the group signal itself does not reach the workers), and the node exits 75."""
    url, folder = str(tmp_path / "run"), tmp_path / "signals"
    folder.mkdir()
    write_cluster(Storage(url), ClusterSpec(
        segment="s1", nproc_per_node=2, rdzv_id="signals-s1", port=free_port(following=2),
        nodes=[{"instance_id": "node-a", "address": "127.0.0.1"}]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "spotrun.launch.node", "--", "python",
         str(REPO / "tests" / "scripts" / "count_signals.py"), str(folder)],
        env=env_for(url, SPOTRUN_INSTANCE_ID="node-a"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=REPO)
    deadline = time.monotonic() + TIMEOUT
    while len(list(folder.glob("ready-*"))) < 2:
        if proc.poll() is not None:
            pytest.fail(f"the node exited {proc.returncode} early:\n{proc.communicate()[0][-4000:]}")
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    code, out = finish_session(proc, TIMEOUT)
    assert code == EXIT_INTERRUPTED, out[-4000:]
    assert {p.name: p.read_text() for p in folder.glob("count-*")} == {"count-0": "1", "count-1": "1"}


def _session(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[4])


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


def _vanish(procs: dict[str, subprocess.Popen], victim: str) -> tuple[str, int, float, str]:
    """SIGKILL a node's agent and workers at once, as a reclaimed machine would go.

    Returns (survivor, its exit code, seconds from the kill to its exit, its output).
    """
    doomed = _descendants(procs[victim].pid)
    assert len(doomed) >= 2, "the node's worker was not found"
    # Why a SIGTERM to a node's process group reaches each worker once: only the agent
    # (this node's process) is in that group; the workers are in sessions of their own and
    # hear the signal only as the agent forwards it.
    assert all(_session(p) != procs[victim].pid for p in doomed[1:])
    t_kill = time.monotonic()
    os.killpg(procs[victim].pid, signal.SIGKILL)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    survivor = next(n for n in NODES if n != victim)
    code, out = finish_session(procs[survivor], TIMEOUT)
    took = time.monotonic() - t_kill
    procs[victim].communicate()
    return survivor, code, took, out


def test_notice_then_vanished_head_relaunch_and_finish_bit_exact(tmp_path, ddp_reference):
    url = str(tmp_path / "run")
    times: list[str] = []
    local = {n: {"SPOTRUN_LOCAL_DIR": str(tmp_path / f"local-{n}")} for n in NODES}

    # Segment 1: a notice to node-b only; node-a never sees one, yet both stop at one step.
    t0 = time.monotonic()
    with FakeMetadataServer("ec2") as imds_a, FakeMetadataServer("ec2") as imds_b:
        env = {n: {"SPOTRUN_NOTICE_SOURCE": "ec2", "SPOTRUN_IMDS_ENDPOINT": s.url,
                   "SPOTRUN_POLL_INTERVAL": "0.2", **local[n]}
               for n, s in (("node-a", imds_a), ("node-b", imds_b))}
        procs = _job(url, "s1", step_sleep=0.05, env=env)
        _wait_for_checkpoint_after(procs, url, 0)
        t_notice = time.monotonic()
        imds_b.post_interruption("terminate", in_seconds=120)
        results = _finish_all(procs)
        # Both nodes watched their own metadata service; only node-b's posted a notice.
        assert any("instance-action" in path for _, path, _ in imds_a.requests)
    times.append(f"s1 notice: start to notice {t_notice - t0:.1f}s, notice to both exited "
                 f"{time.monotonic() - t_notice:.1f}s")
    exits = {n: _exit_line(out) for n, (_, out) in results.items()}
    assert {c for c, _ in results.values()} == {EXIT_INTERRUPTED}, _show(results)
    assert {c for c, _ in exits.values()} == {EXIT_INTERRUPTED}, exits
    (stop,) = {s for _, s in exits.values()}  # the same step on both nodes
    assert 0 < stop < STEPS, f"stopped at {stop}; the notice must land mid-run"
    assert re.search(r"spotrun[\w.]* ec2 notice 'terminate'", results["node-b"][1])
    assert not re.search(r"spotrun[\w.]* ec2 notice", results["node-a"][1])
    infos = {c.step: c for c in list_checkpoints(Storage(url))}
    assert max(infos) == stop and all(c.status == "committed" for c in infos.values()), infos
    assert sorted(infos[stop].manifest.files) == ["rank-00000.pt", "rank-00001.pt"]
    # node-b's machine is replaced by one with empty memory; the run URL's copies are damaged
    # (a restore that read them would resume from an older step).
    shutil.rmtree(local["node-b"]["SPOTRUN_LOCAL_DIR"])
    for name in infos[stop].manifest.files:
        path = Path(url) / checkpoint_dir(stop) / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    # Segment 2: the head (the store's host) vanishes.
    last = stop
    t0 = time.monotonic()
    procs = _job(url, "s2", step_sleep=0.05, env=local)
    _wait_for_checkpoint_after(procs, url, last)
    time.sleep(0.3)  # a few steps past it
    survivor, code, took, out = _vanish(procs, "node-a")
    times.append(f"s2: node-a killed {time.monotonic() - t0 - took:.1f}s after "
                 f"start; survivor {survivor} exited {code} {took:.1f}s after the kill")
    # What the survivor said (shown with pytest -s; the launchers classify on it).
    times.extend([f"  {survivor}: {line[:200]}" for line in out.splitlines()
                 if re.search(r"Error|error|exitcode|exited", line)][:8])
    assert code not in (EXIT_FINISHED, EXIT_INTERRUPTED), out[-4000:]
    resumed = next((line for line in out.splitlines() if f"resumed from step {last} " in line), "")
    # The replacement: everything from its buddy (a peer), nothing from the run URL.
    assert re.search(r"0 B from this machine's copy, [1-9][\d.]* \w+ from peers, 0 B from the run URL",
                     resumed), out[-4000:]
    assert not Path(url, "done.json").exists()
    assert max(committed_steps(url)) > last
    last = max(committed_steps(url))
    assert last < STEPS, "the run finished before the kill; give it more steps"

    # Segment 3: resumes from the last committed checkpoint, both nodes finish, bit-exact.
    t0 = time.monotonic()
    results = _finish_all(_job(url, "s3", env=local))
    times.append(f"s3 finish: {time.monotonic() - t0:.1f}s")
    print("\n".join(times))
    for (code, out) in results.values():
        assert code == EXIT_FINISHED, _show(results)
        assert _exit_line(out) == (EXIT_FINISHED, STEPS), _show(results)
        assert "test-s3" in out  # joined the new rendezvous, not an old one
    assert "node 0 of 2" in results["node-a"][1] and "host" in results["node-a"][1]
    assert "node 1 of 2" in results["node-b"][1]
    _resumed_from(results, last)
    token = json.loads(Path(url, "launch", "nodes", "node-a.json").read_text())["peer_token"]
    assert len(token) == 32 and not any(token in out for _, out in results.values())  # never in logs
    assert Path(url, "done.json").exists()
    # Every scheduled checkpoint after the resume, the last one written by both nodes' ranks.
    assert set(range(last - last % EVERY + EVERY, STEPS + 1, EVERY)) <= set(committed_steps(url))
    manifest = {c.step: c for c in list_checkpoints(Storage(url))}[STEPS].manifest
    assert manifest is not None and manifest.world_size == 2
    step, differences = compare_checkpoints(Storage(ddp_reference), Storage(url))
    assert step == STEPS
    assert differences == []
