"""A rank whose attempt is dead (a peer vanished: its next collective failed) while its save is
still being written leaves promptly: the write can never commit (the commit is a gather this
rank never reaches again), so its open uploads are aborted instead of waited for.

Two real gloo ranks (tests/scripts/dead_attempt_write.py); the save of step 6 writes slowly
(half a second per write call, well over 30 s in all); rank 1 is killed -9 while rank 0
writes it. Whatever the write did, step 6 has no manifest and step 3 stays the latest,
intact and loadable. The lease follows what is known of the write: one that ended (its upload
aborted) lets rank 0 release the lease on its way out; one nothing could abort is left
running, so the lease stays held (not renewed) until the process is gone, and only then may
the next writer take the run over (at once here: its pid is gone on this host).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, env_for, free_port, wait_for_line

from spotrun.checkpoint import saver as saver_mod
from spotrun.format.commit import read_manifest, verify_checkpoint
from spotrun.format.snapshot import payload_name, read_payload
from spotrun.records.layout import checkpoint_dir
from spotrun.records.lease import Lease, read_lease
from spotrun.storage import Storage

SCRIPT = str(REPO / "tests" / "scripts" / "dead_attempt_write.py")
# From the failed collective to the exit: the aborts' budget, the wait for the write, slack.
PROMPT_S = saver_mod.DEAD_ABORT_S + saver_mod.DEAD_WRITE_WAIT_S + 3.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["abortable", "stuck"])
def test_a_rank_whose_peer_vanished_mid_save_aborts_the_write_and_leaves_promptly(tmp_path, mode):
    run_dir = tmp_path / "run"
    port = str(free_port())
    procs: dict[int, subprocess.Popen] = {}
    try:
        for rank in (0, 1):
            env = env_for(f"slowfile://{run_dir}", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port, SPOTRUN_NOTICE_SOURCE="none",
                          SPOTRUN_LOCAL_DIR="off", OMP_NUM_THREADS="1", SPOTRUN_TEST_WRITE_DELAY="0")
            out = subprocess.PIPE if rank == 0 else open(tmp_path / "rank1.log", "w")  # noqa: SIM115
            procs[rank] = subprocess.Popen([sys.executable, SCRIPT, mode, str(run_dir)], env=env,
                                           stdout=out, stderr=subprocess.STDOUT, text=True)
        wait_for_line(procs[0], "rank 0 step 8", timeout=240)  # step 6's save is being written
        assert not (run_dir / checkpoint_dir(6) / "manifest.json").exists()
        t_kill = time.monotonic()
        os.kill(procs[1].pid, signal.SIGKILL)  # the other node vanishes
        out, _ = procs[0].communicate(timeout=120)
        gone_after = time.monotonic() - t_kill
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert procs[0].returncode == 1, out[-3000:]
    left = [line for line in out.splitlines() if line.startswith("rank 0 left after")]
    assert left, out[-3000:]
    print(mode, left[0], f"(the process gone {gone_after:.2f} s after the kill)")
    assert float(left[0].split()[4]) < PROMPT_S, out[-3000:]  # was: until the write ended (30+ s)
    assert gone_after < PROMPT_S + 10, out[-3000:]
    assert "was being written when this rank failed" in out, out[-3000:]

    run = Storage(str(run_dir))
    # Nothing of step 6 was committed; step 3 is the latest, whole and loadable.
    assert not (run_dir / checkpoint_dir(6) / "manifest.json").exists()
    manifest = read_manifest(run, 3)
    assert verify_checkpoint(run, manifest, deep=True) == []
    payload = read_payload(run, 3, payload_name(0), manifest.files[payload_name(0)])
    assert "objects" in payload  # loads: verified byte for byte against the manifest first

    lease = read_lease(run)
    assert lease is not None and lease.pid == procs[0].pid
    if mode == "abortable":
        # The write ended at its next block after the abort: nothing of it can land later.
        assert "aborted 1 open upload(s)" in out, out[-3000:]
        assert lease.released_at is not None, lease
    else:
        # Nothing could stop it: the lease stayed held (not released) while it might write.
        assert "left to end with this process" in out, out[-3000:]
        assert lease.released_at is None, lease
        # The process is gone now, so the next writer takes the run over at once.
        nxt = Lease(run, segment_id="next", wait_s=5)
        t0 = time.monotonic()
        nxt.acquire()
        assert time.monotonic() - t0 < 3
        nxt.release()
