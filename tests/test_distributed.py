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

from conftest import free_port
from helpers import REPO, committed_steps, env_for, finish_session
from spotrun.commit import list_checkpoints
from spotrun.layout import EXIT_FINISHED, EXIT_INTERRUPTED
from spotrun.notices.fake_server import FakeMetadataServer
from spotrun.resume_check import compare_checkpoints
from spotrun.storage import Storage

pytestmark = pytest.mark.slow

SCRIPT = str(REPO / "tests" / "scripts" / "ddp_train.py")
STEPS, EVERY = 60, 10
TIMEOUT = 120  # a deadlocked pair of ranks would sit in a collective forever


def _launch(url: str, pid_dir: Path | None = None, *, wrapper: bool = True,
            step_sleep: float = 0.0, **env: str) -> subprocess.Popen:
    """torchrun (or spotrun's torchrun wrapper) with two CPU workers running ddp_train.py."""
    runner = ["-m", "spotrun.distributed"] if wrapper else ["-m", "torch.distributed.run"]
    cmd = [sys.executable, *runner, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), SCRIPT, "--url", url, "--steps", str(STEPS),
           "--every-steps", str(EVERY), "--step-sleep", str(step_sleep)]
    if pid_dir is not None:
        cmd += ["--pid-dir", str(pid_dir)]
    return subprocess.Popen(cmd, env=env_for(url, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=REPO)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    return finish_session(proc, TIMEOUT)


def _wait_for_checkpoint(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not committed_steps(url):
        if proc.poll() is not None:
            pytest.fail(f"torchrun exited {proc.returncode} early:\n{proc.communicate()[0][-4000:]}")
        assert time.monotonic() < deadline, "no checkpoint committed"
        time.sleep(0.05)


def _exits(out: str) -> dict[int, tuple[int, int]]:
    """{rank: (exit code, steps done)} from the script's last words."""
    return {int(r): (int(c), int(s))
            for r, c, s in re.findall(r"^rank (\d) exit (\d+) at step (\d+)$", out, re.M)}


def _last_step(out: str, rank: int) -> int:
    return max(int(s) for s in re.findall(rf"^rank {rank} step (\d+)$", out, re.M))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """One uninterrupted torchrun run, the yardstick for every resumed one."""
    url = str(tmp_path_factory.mktemp("ddp") / "reference")
    code, out = _finish(_launch(url))
    assert code == EXIT_FINISHED, out[-4000:]
    assert _exits(out) == {0: (0, STEPS), 1: (0, STEPS)}
    assert committed_steps(url)[-1] == STEPS
    return url


def _check_stopped_together(url: str, out: str, code: int, expect_code: int) -> int:
    assert code == expect_code, out[-4000:]
    exits = _exits(out)
    assert set(exits) == {0, 1}, out[-4000:]
    (code0, step0), (code1, step1) = exits[0], exits[1]
    assert code0 == code1 == EXIT_INTERRUPTED, exits
    assert step0 == step1, f"ranks stopped at different steps: {exits}"
    stop = step0
    assert 0 < stop < STEPS, f"stopped at {stop}; the interruption must land mid-run"
    # No rank trained a step past the stop (and neither stopped early).
    assert _last_step(out, 0) == _last_step(out, 1) == stop
    infos = {c.step: c for c in list_checkpoints(Storage(url))}
    assert max(infos) == stop and infos[stop].status == "committed"
    assert all(c.status == "committed" for c in infos.values()), infos
    manifest = infos[stop].manifest
    assert manifest is not None and manifest.world_size == 2
    assert sorted(manifest.files) == ["rank-00000.pt", "rank-00001.pt"]
    return stop


def _resume_and_compare(url: str, reference: str, stop: int) -> None:
    code, out = _finish(_launch(url))
    assert code == EXIT_FINISHED, out[-4000:]
    assert f"resumed from step {stop} " in out
    assert _exits(out) == {0: (0, STEPS), 1: (0, STEPS)}
    step, differences = compare_checkpoints(Storage(reference), Storage(url))
    assert step == STEPS
    assert differences == []


def _wait_pids(pid_dir: Path) -> dict[int, int]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        files = {r: pid_dir / f"rank{r}.pid" for r in (0, 1)}
        if all(f.exists() for f in files.values()):
            return {r: int(f.read_text()) for r, f in files.items()}
        time.sleep(0.05)
    raise AssertionError("workers never wrote their pids")


@pytest.mark.parametrize("rank", [1, 0])
def test_sigterm_to_one_rank_stops_both_at_one_step(tmp_path, reference, rank):
    """SIGTERM to rank 1 (not the committer) or rank 0 only: one checkpoint, both stop, 75."""
    url, pids = str(tmp_path / "run"), tmp_path / "pids"
    pids.mkdir()
    proc = _launch(url, pids, step_sleep=0.05)
    pid = _wait_pids(pids)[rank]
    _wait_for_checkpoint(proc, url)
    time.sleep(0.12)  # a couple of steps past the scheduled checkpoint
    os.kill(pid, signal.SIGTERM)
    code, out = _finish(proc)
    stop = _check_stopped_together(url, out, code, EXIT_INTERRUPTED)
    # Only the signalled rank saw the signal; the other stopped through the agreement.
    assert f"rank{rank} spotrun signal notice 'SIGTERM'" in out
    assert f"rank{1 - rank} spotrun signal notice" not in out
    _resume_and_compare(url, reference, stop)


def test_plain_torchrun_exits_1_when_workers_exit_75(tmp_path):
    """What torchrun itself does (why spotrun.distributed exists): exit 1, not 75."""
    url, pids = str(tmp_path / "run"), tmp_path / "pids"
    pids.mkdir()
    proc = _launch(url, pids, wrapper=False, step_sleep=0.05)
    pid = _wait_pids(pids)[1]
    _wait_for_checkpoint(proc, url)
    os.kill(pid, signal.SIGTERM)
    code, out = _finish(proc)
    _check_stopped_together(url, out, code, 1)
    assert "exitcode  : 75" in out


def test_notice_to_one_rank_only_stops_both_at_one_step(tmp_path, reference):
    """Rank 1 alone watches a metadata server; rank 0 never sees the notice, yet stops."""
    url = str(tmp_path / "run")
    with FakeMetadataServer("ec2") as imds:
        proc = _launch(url, step_sleep=0.05, SPOTRUN_TEST_IMDS_RANK1=imds.url,
                       SPOTRUN_POLL_INTERVAL="0.1", SPOTRUN_NOTICE_SOURCE="none")
        _wait_for_checkpoint(proc, url)
        imds.post_interruption("terminate", in_seconds=120)
        code, out = _finish(proc)
        # Only rank 1 ever asked the metadata service anything.
        assert any("instance-action" in path for _, path, _ in imds.requests)
    stop = _check_stopped_together(url, out, code, EXIT_INTERRUPTED)
    assert "rank1 spotrun ec2 notice 'terminate'" in out
    assert "rank0 spotrun ec2 notice" not in out
    assert re.search(r"rank1 spotrun stop after notice: posted \d\d:\d\d:\d\d", out), out[-4000:]
    _resume_and_compare(url, reference, stop)


def test_sigterm_to_torchrun_itself_reaches_every_rank(tmp_path):
    """What a machine shutting down does: torchrun forwards SIGTERM; all commit one step."""
    url = str(tmp_path / "run")
    proc = _launch(url, step_sleep=0.05)
    _wait_for_checkpoint(proc, url)
    proc.send_signal(signal.SIGTERM)
    code, out = _finish(proc)
    # torchrun does not report its workers' codes when it is signalled; their exit notes do.
    _check_stopped_together(url, out, code, EXIT_INTERRUPTED)


ABORT = str(REPO / "tests" / "scripts" / "abort_after_done.py")


def _wrapper_once(url: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "spotrun.distributed", "--nproc-per-node", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), ABORT, *args]
    return subprocess.run(cmd, env=env or env_for(url), capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=REPO)


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
