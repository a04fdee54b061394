"""The copy on a peer through real node agents: two ``python -m spotrun.launch.node`` process
groups on 127.0.0.1, each with a local directory of its own (its machine's memory), a real
torchrun c10d rendezvous and tests/scripts/ddp_train.py (DDP, gloo, CPU).

A notice to node-b: both stop at one step and commit one checkpoint; each rank's sealed files
go to its buddy, rank 0's payload (which every rank reads) to the other node. Then node-b's
machine is gone (its local directory deleted, as a lost machine's memory is) and a replacement,
node-c, starts with an empty one beside the survivor node-a. The run URL's copies of the
stop checkpoint are then damaged on purpose: a restore that read them would find the damage
and fall back to an older step. Both nodes resume from the stop step, reading 0 checkpoint
bytes from the run URL (the survivor from its own copy and what it holds, the replacement
from its buddy), and finish bit-exact against the shared uninterrupted 2-rank run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DDP_EVERY, DDP_SCRIPT, DDP_STEPS, REPO, committed_steps, env_for, finish_session, free_port

from spotrun.launch.node import ClusterSpec, write_cluster
from spotrun.notices.fake_server import FakeMetadataServer
from spotrun.proof.resume_check import compare_checkpoints
from spotrun.records.layout import EXIT_FINISHED, EXIT_INTERRUPTED, checkpoint_dir
from spotrun.storage import Storage

pytestmark = pytest.mark.slow

TIMEOUT = 180


def _start(url: str, node: str, local: Path, step_sleep: float = 0.0, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "spotrun.launch.node", "--timeout", "120", "--poll", "0.1",
           "--", "python", DDP_SCRIPT, "--url", url, "--steps", str(DDP_STEPS),
           "--every-steps", str(DDP_EVERY), "--step-sleep", str(step_sleep)]
    return subprocess.Popen(cmd, env=env_for(url, SPOTRUN_INSTANCE_ID=node, SPOTRUN_LOCAL_DIR=str(local), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=REPO)


def _cluster(url: str, segment: str, nodes: list[str]) -> None:
    write_cluster(Storage(url), ClusterSpec(
        segment=segment, nproc_per_node=1, rdzv_id=f"peer-{segment}", port=free_port(),
        nodes=[{"instance_id": n, "address": "127.0.0.1"} for n in nodes]))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_replacement_restores_from_its_buddy_and_no_node_reads_the_run_url(tmp_path, ddp_reference):
    url = str(tmp_path / "run")
    local = {n: tmp_path / f"local-{n}" for n in ("node-a", "node-b", "node-c")}

    with FakeMetadataServer("ec2") as imds:
        notice = {"SPOTRUN_NOTICE_SOURCE": "ec2", "SPOTRUN_IMDS_ENDPOINT": imds.url,
                  "SPOTRUN_POLL_INTERVAL": "0.2"}
        procs = {"node-a": _start(url, "node-a", local["node-a"], 0.05),
                 "node-b": _start(url, "node-b", local["node-b"], 0.05, **notice)}
        _cluster(url, "p1", ["node-a", "node-b"])
        deadline = time.monotonic() + TIMEOUT
        while not committed_steps(url):
            for n, p in procs.items():
                assert p.poll() is None, f"{n} exited early:\n{p.communicate()[0][-4000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        imds.post_interruption("terminate", in_seconds=120)
        first = {n: finish_session(p, TIMEOUT) for n, p in procs.items()}
    shown = "\n".join(f"--- {n} exited {c}:\n{o[-3000:]}" for n, (c, o) in first.items())
    assert {c for c, _ in first.values()} == {EXIT_INTERRUPTED}, shown
    stop = max(committed_steps(url))
    assert 0 < stop < DDP_STEPS, shown
    assert all(re.search(rf"peer copy of step {stop}: .* sent", o) for _, o in first.values()), shown
    for node, (_, out) in first.items():
        print(node, *re.findall(rf".*peer copy of step {stop}: .*", out))

    # node-b's machine is gone, with what it held for node-a; node-a keeps everything.
    shutil.rmtree(local["node-b"])
    # The run URL's copies are damaged: reading them would mean resuming from an older step.
    for name in ("rank-00000.pt", "rank-00001.pt"):
        _flip(Path(url) / checkpoint_dir(stop) / name)

    procs = {"node-a": _start(url, "node-a", local["node-a"]),
             "node-c": _start(url, "node-c", local["node-c"])}
    _cluster(url, "p2", ["node-a", "node-c"])
    second = {n: finish_session(p, TIMEOUT) for n, p in procs.items()}
    shown = "\n".join(f"--- {n} exited {c}:\n{o[-3000:]}" for n, (c, o) in second.items())
    token = ClusterSpec.from_json(json.loads((Path(url) / "launch" / "nodes" / "node-c.json").read_text())).peer_token
    assert len(token) == 32 and not any(token in out for _, out in [*first.values(), *second.values()])
    assert {c for c, _ in second.values()} == {EXIT_FINISHED}, shown
    for node, (_, out) in second.items():
        resumed = next((line for line in out.splitlines() if "resumed from step" in line), "")
        print(node, resumed)
        assert f"resumed from step {stop} " in resumed, shown
        assert "0 B from the run URL" in resumed, resumed
        if node == "node-c":  # the replacement: everything from its buddy (node-a)
            assert re.search(r"0 B from this machine's copy, [1-9][\d.]* \w+ from peers", resumed), resumed
    step, differences = compare_checkpoints(Storage(ddp_reference), Storage(url))
    assert step == DDP_STEPS and differences == []
