"""Where a recovery's time went (issue 22's time targets), with real processes.

Each test here pins a waste found by tracing ``scripts/bench_recovery.py`` (BENCHMARKS.md,
"Recovery after losing a node"): without its fix the test fails.

- Node 0 (the rendezvous store's host) vanishing: the survivors' torchrun raised
  RendezvousConnectionError out of its monitoring loop (it asks the store how many nodes
  wait, every pass), their node agents died of it (exit 1 without the exit note), and the
  launcher relaunched every node from the run URL instead of keeping the survivor and
  starting one replacement. Now torchrun's outcome is 1 (a peer lost mid-attempt), the
  survivor waits, hosts the next attempt's store, and the run ends bit-exact.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DDP_EVERY, DDP_SCRIPT, DDP_STEPS, REPO

from spotrun.proof.resume_check import compare_checkpoints
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

TIMEOUT = 420  # two 2-node attempts on a loaded 2-core box; a hang would be forever


@pytest.mark.slow
def test_node_0_vanishing_keeps_the_survivor_which_hosts_the_next_rendezvous(
        tmp_path: Path, ddp_reference: str, child_env: dict) -> None:
    run = tmp_path / "run"
    # --seed 1 draws node 0 (sim-1-n0, the store's host) for the loss.
    argv = [sys.executable, "-m", "spotrun.cli", "launch", "--local", "--run-url", str(run),
            "--nodes", "2", "--nproc-per-node", "1", "--interruptions", "1", "--node-losses", "1",
            "--seed", "1", "--grace", "1", "--recovery", "replace", "--",
            sys.executable, DDP_SCRIPT, "--url", str(run), "--steps", str(DDP_STEPS),
            "--every-steps", str(DDP_EVERY), "--step-sleep", "0.05"]
    child_env = {**child_env, "SPOTRUN_LOCAL_DIR": str(tmp_path / "local")}
    proc = subprocess.run(argv, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=TIMEOUT, cwd=REPO, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out[-8000:]
    assert "sim-1-n0 (node 0) vanished without notice" in out, out[-8000:]
    assert "relaunching every node" not in out, out[-8000:]
    assert re.search(r"sim-1 ended: interrupted \(simulated node loss.*; keeping sim-1-n1", out), out[-8000:]
    recoveries = [(r["segment_id"], r["mode"], r["lost"], r["kept"], r["instances_started"])
                  for r in Ledger(Storage(str(run))).records()
                  if r["event"] == "recovery_started" and r["source"] == "launcher"]
    assert recoveries == [("sim-2", "replace", ["sim-1-n0"], ["sim-1-n1"], 1)], recoveries
    # The survivor hosts the next attempt's store; the replacement takes node 0's slot.
    spec = json.loads((run / "launch" / "nodes" / "sim-1-n1.json").read_text())
    assert [n["instance_id"] for n in spec["nodes"]] == ["sim-2-n0", "sim-1-n1"] and spec["host"] == 1
    assert (run / "done.json").exists()
    step, differences = compare_checkpoints(Storage(ddp_reference), Storage(str(run)))
    assert step == DDP_STEPS and differences == []
