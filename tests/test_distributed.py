"""All ranks stop together under torchrun (2 CPU ranks, gloo), and resume bit-exact.

Real torchrun, real worker processes, real signals and a real (fake) metadata server that
only one rank watches. The interruption always reaches ONE rank; the other must learn of it
through the per-step agreement, stop at the same step and write its half of the same
checkpoint. A deadlock shows up as a timeout, not a hung suite.
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
from helpers import (
    DDP_EVERY,
    DDP_SCRIPT,
    DDP_STEPS,
    REPO,
    committed_steps,
    env_for,
    finish_session,
    free_port,
    torchrun,
)
from warmfork import WarmExec

from spotrun.format.commit import list_checkpoints
from spotrun.notices.fake_server import FakeMetadataServer
from spotrun.proof.resume_check import compare_checkpoints
from spotrun.records.layout import EXIT_FINISHED, EXIT_INTERRUPTED
from spotrun.storage import Storage

pytestmark = pytest.mark.slow

STEPS, EVERY = DDP_STEPS, DDP_EVERY  # the shared ``ddp_reference`` run's (conftest.py)
TIMEOUT = 120  # a deadlocked pair of ranks would sit in a collective forever


def _launch(url: str, pid_dir: Path | None = None, *, warm: WarmExec, wrapper: bool = True,
            step_sleep: float = 0.0, **env: str) -> subprocess.Popen:
    """torchrun (or spotrun's torchrun wrapper) with two CPU workers running ddp_train.py,
    forks of ``warm`` (the ``warm_ranks`` fixture)."""
    args = ["--url", url, "--steps", str(STEPS), "--every-steps", str(EVERY), "--step-sleep", str(step_sleep)]
    if pid_dir is not None:
        args += ["--pid-dir", str(pid_dir)]
    return torchrun(DDP_SCRIPT, 2, *args, env=env_for(url, **env), wrapper=wrapper, warm=warm)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    return finish_session(proc, TIMEOUT)


def _wait_for_checkpoint(proc: subprocess.Popen, url: str, after: int = 0) -> None:
    deadline = time.monotonic() + TIMEOUT
    while max(committed_steps(url), default=0) <= after:
        if proc.poll() is not None:
            pytest.fail(f"torchrun exited {proc.returncode} early:\n{proc.communicate()[0][-4000:]}")
        assert time.monotonic() < deadline, f"no checkpoint after step {after} committed"
        time.sleep(0.05)


def _exits(out: str) -> dict[int, tuple[int, int]]:
    """{rank: (exit code, steps done)} from the script's last words."""
    return {int(r): (int(c), int(s))
            for r, c, s in re.findall(r"^rank (\d) exit (\d+) at step (\d+)$", out, re.M)}


def _last_step(out: str, rank: int) -> int:
    return max(int(s) for s in re.findall(rf"^rank {rank} step (\d+)$", out, re.M))


def _check_stopped_together(url: str, out: str, code: int, expect_code: int, after: int) -> int:
    """Both ranks exited 75 at one step past ``after`` (the step this launch resumed from),
    and that step's checkpoint, both ranks' halves of it, is the newest and committed."""
    assert code == expect_code, out[-4000:]
    if after:
        assert f"resumed from step {after} " in out, out[-4000:]
    exits = _exits(out)
    assert set(exits) == {0, 1}, out[-4000:]
    (code0, step0), (code1, step1) = exits[0], exits[1]
    assert code0 == code1 == EXIT_INTERRUPTED, exits
    assert step0 == step1, f"ranks stopped at different steps: {exits}"
    stop = step0
    assert after < stop < STEPS, f"stopped at {stop} (resumed from {after}); the interruption must land mid-run"
    # No rank trained a step past the stop (and neither stopped early).
    assert _last_step(out, 0) == _last_step(out, 1) == stop
    infos = {c.step: c for c in list_checkpoints(Storage(url))}
    assert max(infos) == stop and infos[stop].status == "committed"
    assert all(c.status == "committed" for c in infos.values()), infos
    manifest = infos[stop].manifest
    assert manifest is not None and manifest.world_size == 2
    assert sorted(manifest.files) == ["rank-00000.pt", "rank-00001.pt"]
    return stop


def _wait_pids(pid_dir: Path) -> dict[int, int]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        files = {r: pid_dir / f"rank{r}.pid" for r in (0, 1)}
        if all(f.exists() for f in files.values()):
            return {r: int(f.read_text()) for r, f in files.items()}
        time.sleep(0.05)
    raise AssertionError("workers never wrote their pids")


def _sigterm_one_rank(url: str, pid_dir: Path, rank: int, after: int, *, warm: WarmExec,
                      wrapper: bool = True) -> tuple[int, str]:
    pid_dir.mkdir()
    proc = _launch(url, pid_dir, warm=warm, wrapper=wrapper, step_sleep=0.05)
    pid = _wait_pids(pid_dir)[rank]
    _wait_for_checkpoint(proc, url, after)
    time.sleep(0.12)  # a couple of steps past the scheduled checkpoint
    os.kill(pid, signal.SIGTERM)
    return _finish(proc)


def test_every_kind_of_stop_stops_both_ranks_at_one_step_and_resumes_bit_exact(tmp_path, ddp_reference, warm_ranks):
    """One run through six launches, each resuming from the checkpoint the one before
    stopped at (one chain: every torchrun start costs seconds of a loaded 2-core box):

    1. SIGTERM to rank 1 only (not the committer), 2. SIGTERM to rank 0 only: one checkpoint,
       both stop, exit 75; only the signalled rank saw the signal, the other stopped through
       the per-step agreement;
    3. a notice that only rank 1 sees (it alone watches a metadata server);
    4. plain torchrun (why spotrun.distributed exists): its workers exit 75, it exits 1;
    5. SIGTERM to torchrun itself (a machine shutting down): forwarded, all commit one step;
    6. the finish, bit-exact against the uninterrupted run.
    """
    url = str(tmp_path / "run")
    stop = 0
    for launch, rank in ((1, 1), (2, 0)):
        code, out = _sigterm_one_rank(url, tmp_path / f"pids{launch}", rank, stop, warm=warm_ranks)
        stop = _check_stopped_together(url, out, code, EXIT_INTERRUPTED, stop)
        assert re.search(rf"rank{rank} spotrun[\w.]* signal notice 'SIGTERM'", out)
        assert not re.search(rf"rank{1 - rank} spotrun[\w.]* signal notice", out)

    with FakeMetadataServer("ec2") as imds:
        proc = _launch(url, warm=warm_ranks, step_sleep=0.05, SPOTRUN_TEST_IMDS_RANK1=imds.url,
                       SPOTRUN_POLL_INTERVAL="0.1", SPOTRUN_NOTICE_SOURCE="none")
        _wait_for_checkpoint(proc, url, stop)
        imds.post_interruption("terminate", in_seconds=120)
        code, out = _finish(proc)
        # Only rank 1 ever asked the metadata service anything.
        assert any("instance-action" in path for _, path, _ in imds.requests)
    stop = _check_stopped_together(url, out, code, EXIT_INTERRUPTED, stop)
    assert re.search(r"rank1 spotrun[\w.]* ec2 notice 'terminate'", out)
    assert not re.search(r"rank0 spotrun[\w.]* ec2 notice", out)
    assert re.search(r"rank1 spotrun[\w.]* stop after notice: posted \d\d:\d\d:\d\d", out), out[-4000:]

    code, out = _sigterm_one_rank(url, tmp_path / "pids4", 1, stop, warm=warm_ranks, wrapper=False)
    stop = _check_stopped_together(url, out, code, 1, stop)
    assert "exitcode  : 75" in out

    proc = _launch(url, warm=warm_ranks, step_sleep=0.05)
    _wait_for_checkpoint(proc, url, stop)
    proc.send_signal(signal.SIGTERM)
    code, out = _finish(proc)
    # torchrun does not report its workers' codes when it is signalled; their exit notes do.
    stop = _check_stopped_together(url, out, code, EXIT_INTERRUPTED, stop)

    code, out = _finish(_launch(url, warm=warm_ranks))
    assert code == EXIT_FINISHED, out[-4000:]
    assert f"resumed from step {stop} " in out
    assert _exits(out) == {0: (0, STEPS), 1: (0, STEPS)}
    step, differences = compare_checkpoints(Storage(ddp_reference), Storage(url))
    assert step == STEPS
    assert differences == []


ABORT = str(REPO / "tests" / "scripts" / "abort_after_done.py")


def _wrapper_once(url: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "spotrun.distributed", "--nproc-per-node", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), ABORT, *args]
    return subprocess.run(cmd, env=env or env_for(url), capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=REPO, check=False)


def test_wrapper_trusts_done_json_over_a_worker_that_aborts_after_it(tmp_path):
    """Issue 11 item 2: a worker aborting after done.json (gloo's teardown) is not a failure;
    a done.json left by an earlier launch does not cover a worker that dies in this one."""
    url = str(tmp_path / "run")
    res = _wrapper_once(url)
    out = res.stdout + res.stderr
    assert res.returncode == EXIT_FINISHED, out[-4000:]
    assert (tmp_path / "run" / "done.json").exists()
    assert "done.json written" in out and "codes [-6]" in out, out[-4000:]

    res = _wrapper_once(url, "before-done")
    assert res.returncode == 1, (res.stdout + res.stderr)[-4000:]

    # The URL only as the script's argument: the wrapper cannot read done.json, the workers'
    # exit notes (written once the run finished on every rank) say it instead.
    env = env_for("")
    del env["SPOTRUN_URL"]
    other = tmp_path / "by-argument"
    res = _wrapper_once("", "--url", str(other), env=env)
    out = res.stdout + res.stderr
    assert res.returncode == EXIT_FINISHED, out[-4000:]
    assert (other / "done.json").exists() and "codes [-6]" in out, out[-4000:]


def test_local_launcher_trusts_done_json_and_warns_of_the_exit_code(tmp_path, child_env):
    run = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "spotrun.cli", "launch", "--local", "--run-url", str(run),
         "--interruptions", "0", "--", sys.executable, ABORT],
        env=child_env, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "ended: finished" in out and "exited with code -6" in out, out[-4000:]
