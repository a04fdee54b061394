"""Where a recovery's time went (issue 22's time targets), with real processes.

Each test here pins a waste found by tracing ``scripts/bench_recovery.py`` (BENCHMARKS.md,
"Recovery after losing a node"): without its fix the test fails.

- Node 0 (the rendezvous store's host) vanishing: the survivors' torchrun raised
  RendezvousConnectionError out of its monitoring loop (it asks the store how many nodes
  wait, every pass), their node agents died of it (exit 1 without the exit note), and the
  launcher relaunched every node from the run URL instead of keeping the survivor and
  starting one replacement. Now torchrun's outcome is 1 (a peer lost mid-attempt), the
  survivor waits, hosts the next attempt's store, and the run ends bit-exact: asserted in
  test_launch_local_nodes' node-loss chain, whose first launch loses node 0 (a 2-node run of
  its own here cost 24-27 s of the suite for the same launch).
- The node agent's way out: it noted its exit only after its peer server's linger, and an
  agent leaving for good (the noticed node's) spent 1.2-2.5 s finalizing an interpreter that
  imported torch while the local launcher waited for it before starting the next attempt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spotrun.storage import Storage

# -- the node agent's way out of an attempt -----------------------------------------------------

# A stand-in for spotrun.distributed (no torch: a second), installed by sitecustomize in the
# agent's own process, and an exit hook that marks whether the interpreter was finalized.
_SITE = '''\
import atexit, os, sys, types
m = types.ModuleType("spotrun.distributed")
def torchrun(argv):
    print("stand-in torchrun", flush=True)
    return int(os.environ["TEST_TORCHRUN_CODE"])
m.torchrun = torchrun
sys.modules["spotrun.distributed"] = m
def _finalized():
    with open(os.environ["TEST_FINALIZED"], "w") as f:
        f.write("1")
atexit.register(_finalized)
'''


def test_an_agent_done_with_its_attempts_leaves_without_interpreter_finalization(
        tmp_path: Path, child_env: dict) -> None:
    """After its last attempt the node agent leaves by os._exit once its output is flushed:
    finalizing an interpreter that imported torch took 1.2-2.5 s on this loaded machine
    (0.05-0.09 s without), and the local launcher waits for a leaving machine's agent (the
    noticed node's) before it starts the next attempt: traced at 2.1-3.3 s of a 13-16 s
    recovery after a notice."""
    from spotrun.launch.node import ClusterSpec, write_cluster

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITE)
    run = tmp_path / "run"
    write_cluster(Storage(str(run)), ClusterSpec(
        segment="s1", nodes=[{"instance_id": i, "address": "127.0.0.1"} for i in ("a", "b")],
        nproc_per_node=1, rdzv_id="r-s1", port=29400))
    marker = tmp_path / "finalized"
    env = {**child_env, "PYTHONPATH": f"{site}{os.pathsep}{child_env['PYTHONPATH']}",
           "SPOTRUN_URL": str(run), "SPOTRUN_INSTANCE_ID": "b", "SPOTRUN_LOCAL_DIR": "off",
           "TEST_TORCHRUN_CODE": "75", "TEST_FINALIZED": str(marker)}
    proc = subprocess.run([sys.executable, "-m", "spotrun.launch.node", "--poll", "0.05", "--", "python", "t.py"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 75, proc.stdout
    # Everything it printed and logged is there (flushed before leaving) ...
    assert "stand-in torchrun" in proc.stdout and "node 1 of 2 in segment s1" in proc.stdout, proc.stdout
    assert json.loads((run / "launch" / "nodes" / "exits" / "s1" / "b.json").read_text())["exit_code"] == 75
    # ... and the interpreter was not finalized.
    assert not marker.exists()
    # An error before any attempt still exits the ordinary way, with its message.
    bad = subprocess.run([sys.executable, "-m", "spotrun.launch.node", "--", "python", "t.py"],
                         env={**env, "SPOTRUN_URL": ""}, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode != 0 and "SPOTRUN_URL is not set" in bad.stderr


def test_the_exit_note_is_written_before_the_peer_server_lingers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher starts the next attempt once every node noted its exit; the node's peer
    server lingers after torchrun (until 1 s without a request) for transfers to it still
    under way. Noting the exit first overlaps that linger with the launcher's work (0.3-0.8 s
    after a notice, traced) instead of adding it. Safe: every worker sends its copies before
    it exits, so once every node noted its exit no transfer is left that the note could cut."""
    import types

    import spotrun
    from spotrun.launch import node
    from spotrun.launch.ports import free_port
    from spotrun.recovery import peer

    order: list[str] = []
    storage = Storage(str(tmp_path / "run"))
    node.write_cluster(storage, node.ClusterSpec(
        segment="s1", nodes=[{"instance_id": i, "address": "127.0.0.1"} for i in ("a", "b")],
        nproc_per_node=1, rdzv_id="r-s1", port=free_port(following=2)))

    def fake_torchrun(argv: list[str]) -> int:
        assert os.environ.get(peer.TOKEN_ENV), "no peer server for this attempt"
        return 75

    module = types.ModuleType("spotrun.distributed")
    module.torchrun = fake_torchrun  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "spotrun.distributed", module)
    monkeypatch.setattr(spotrun, "distributed", module, raising=False)
    real_stop, real_note = peer.PeerServer.stop, node.write_attempt_exit

    def stop(self, linger: bool = False) -> None:
        order.append("linger" if linger else "stop")
        real_stop(self, linger)

    def note(*args, **kwargs) -> None:
        order.append("note")
        real_note(*args, **kwargs)

    monkeypatch.setattr(peer.PeerServer, "stop", stop)
    monkeypatch.setattr(node, "write_attempt_exit", note)
    monkeypatch.setenv("SPOTRUN_URL", str(tmp_path / "run"))
    monkeypatch.setenv("SPOTRUN_INSTANCE_ID", "b")
    monkeypatch.setenv("SPOTRUN_LOCAL_DIR", str(tmp_path / "local"))
    assert node.main(["--poll", "0.05", "--", "python", "t.py"]) == 75
    assert order == ["note", "linger"], order
    assert node.read_attempt_exit(storage, "s1", "b") == 75
