"""Notices end to end: a real training process, a fake EC2 metadata service on loopback.

The child is ``examples/train.py`` unchanged; only its environment points the EC2 watcher
at :class:`FakeMetadataServer`. Times come from three clocks that do not share code: the
test's own (when it posted), the run ledger (when the child detected and committed), and
the child's log line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from statistics import median

import pytest
from conftest import free_port
from helpers import EXAMPLE, REPO, env_for
from warmfork import WarmChild, WarmPython

from spotrun.format.commit import list_checkpoints
from spotrun.notices.fake_server import FakeMetadataServer
from spotrun.proof.resume_check import compare_checkpoints
from spotrun.records.layout import EXIT_FINISHED, EXIT_INTERRUPTED
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

STEPS, EVERY, STEP_SLEEP = 160, 40, 0.02
ARGS = [EXAMPLE, "--steps", str(STEPS), "--every-steps", str(EVERY)]
POLL = 0.2
# Generous: CI boxes with two shared cores stall a process for hundreds of ms at a time.
MARGIN = 2.0
OVERHEAD_SCRIPT = str(REPO / "tests" / "scripts" / "notice_overhead.py")


def _committed(url: str) -> list[int]:
    return [c.step for c in list_checkpoints(Storage(url)) if c.status == "committed"]


def _notice_env(url: str, imds: FakeMetadataServer) -> dict[str, str]:
    return env_for(url, SPOTRUN_NOTICE_SOURCE="ec2", SPOTRUN_IMDS_ENDPOINT=imds.url,
                   SPOTRUN_POLL_INTERVAL=str(POLL))


def _start(warm: WarmPython, url: str, imds: FakeMetadataServer, *extra: str) -> WarmChild:
    return warm.spawn([*ARGS, "--step-sleep", str(STEP_SLEEP), *extra], _notice_env(url, imds))


def _wait(proc: WarmChild, ready, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"child exited {proc.returncode} before {what}:\n{proc.communicate()[0]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.02)


def _polling(imds: FakeMetadataServer) -> bool:
    return any(path.endswith("spot/instance-action") for _, path, _ in imds.requests)


def _events(url: str, event: str) -> list[dict]:
    return [r for r in Ledger(Storage(url)).records() if r["event"] == event]


def _log_times(out: str) -> tuple[float, float, float]:
    """(posted, detected, committed) from the Checkpointer's "stop after notice" line."""
    m = re.search(r"stop after notice: posted (\S+), detected (\S+), committed (\S+) ", out)
    assert m, out

    def epoch(hms: str) -> float:  # HH:MM:SS.mmmZ (UTC) today; tests do not run at midnight
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        return datetime.strptime(f"{day} {hms}", "%Y-%m-%d %H:%M:%S.%fZ").replace(
            tzinfo=timezone.utc).timestamp()

    return epoch(m[1]), epoch(m[2]), epoch(m[3])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, warm_python) -> str:
    # Every run of the example here is a fork of the warm interpreter (tests/warmfork.py): no
    # torch import per run; the bit-exact comparisons are between forks, the reference too.
    url = str(tmp_path_factory.mktemp("e2e") / "reference")
    proc = warm_python.spawn(ARGS, env_for(url))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_FINISHED, out
    return url


@pytest.mark.slow
def test_stop_notice_commits_exits_75_in_time_and_resumes_bit_exact(tmp_path, reference, warm_python):
    url = str(tmp_path / "run")
    with FakeMetadataServer("ec2") as imds:
        proc = _start(warm_python, url, imds)
        _wait(proc, lambda: _committed(url), "a first checkpoint")
        posted = time.time()
        deadline = imds.post_interruption("terminate", in_seconds=120)
        out, _ = proc.communicate(timeout=60)
        exited = time.time()
        assert proc.returncode == EXIT_INTERRUPTED, out

        stop = max(_committed(url))
        assert EVERY <= stop < STEPS
        (notice,) = _events(url, "notice_received")
        assert (notice["source"], notice["action"]) == ("ec2", "terminate")
        assert notice["deadline"] == deadline
        commit = next(r for r in _events(url, "checkpoint_committed") if r["step"] == stop)
        detect_s = notice["detected_at"] - posted
        commit_s = commit["committed_at"] - posted
        # A step of the example: the sleep plus a tiny MLP's forward/backward.
        step_s = STEP_SLEEP + 0.05
        budget = POLL + step_s + commit["save_s"] + MARGIN
        print(f"\nnotice -> detected {detect_s * 1000:.0f} ms, -> committed {commit_s * 1000:.0f} ms "
              f"(save {commit['save_s'] * 1000:.0f} ms), -> exited {(exited - posted) * 1000:.0f} ms; "
              f"poll {POLL}s, budget {budget:.2f}s")
        assert -0.01 <= detect_s <= POLL + MARGIN
        assert detect_s <= commit_s <= budget
        # The log has all three times, in order, matching the ledger to the millisecond.
        log_posted, log_detected, log_committed = _log_times(out)
        assert log_posted <= posted + 0.001  # EC2 posts 2 min before its deadline
        assert abs(log_detected - notice["detected_at"]) < 0.002
        assert log_detected <= log_committed and abs(log_committed - commit["committed_at"]) < 0.5

        # The notice is withdrawn (a new machine); the relaunch resumes and finishes.
        imds.clear()
        proc = warm_python.spawn(ARGS, _notice_env(url, imds))
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_FINISHED, out
    assert f"resumed from step {stop} " in out
    step, differences = compare_checkpoints(Storage(reference), Storage(url))
    assert step == STEPS
    assert differences == []


@pytest.mark.slow
def test_rebalance_checkpoints_without_stopping(tmp_path, reference, warm_python):
    url = str(tmp_path / "run")
    with FakeMetadataServer("ec2") as imds:
        # No scheduled checkpoints: any checkpoint before the end is the rebalance one.
        proc = warm_python.spawn([EXAMPLE, "--steps", str(STEPS), "--every-steps", "100000",
                      "--step-sleep", str(STEP_SLEEP)], _notice_env(url, imds))
        _wait(proc, lambda: _polling(imds), "a poll of the metadata service")
        posted = time.time()
        imds.post_rebalance()
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_FINISHED, out
    (notice,) = _events(url, "notice_received")
    assert notice["action"] == "rebalance"
    commits = [(r["step"], r["committed_at"]) for r in _events(url, "checkpoint_committed")]
    assert len(commits) == 2, commits
    (extra, extra_at), (last, _) = commits
    assert 0 < extra < STEPS and last == STEPS
    assert extra_at - posted <= POLL + STEP_SLEEP + 0.05 + MARGIN
    assert "rebalance" in out and "stop after notice" not in out
    # An extra checkpoint does not perturb training.
    step, differences = compare_checkpoints(Storage(reference), Storage(url))
    assert (step, differences) == (STEPS, [])


def test_deadline_too_close_still_saves_and_says_so(tmp_path, warm_python):
    url = str(tmp_path / "run")
    with FakeMetadataServer("ec2") as imds:
        proc = _start(warm_python, url, imds)
        # One save measured first: that is what "too close" is judged against.
        _wait(proc, lambda: _committed(url), "a first checkpoint")
        imds.post_interruption("terminate", in_seconds=0)  # the deadline is already here
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert re.search(r"0\.0s left before the machine goes but saves have taken up to "
                     r"\d+\.\d+s; trying anyway", out), out
    assert "stop after notice: posted" in out
    # The attempt finished: the newest checkpoint is the stop one, committed after detection.
    stop = max(_committed(url))
    (notice,) = _events(url, "notice_received")
    commit = next(r for r in _events(url, "checkpoint_committed") if r["step"] == stop)
    assert commit["committed_at"] >= notice["detected_at"]
    assert all(c.status == "committed" for c in list_checkpoints(Storage(url)))


def test_no_reachable_endpoint_adds_under_a_second(tmp_path):
    """ec2 at a closed loopback port, and auto, cost under 1 s over no watching at all."""
    closed = f"http://127.0.0.1:{free_port()}"
    res = subprocess.run(
        [sys.executable, OVERHEAD_SCRIPT, str(tmp_path), "5", "none=none",
         f"ec2=ec2@{closed}", "auto=auto"],
        env=env_for(""), capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads(res.stdout.strip().splitlines()[-1])
    med = {name: median(times) for name, times in result["seconds"].items()}
    print("\nwrapped 20-step run, median of 5: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in med.items()))
    assert med["ec2"] - med["none"] < 1.0, med
    assert med["auto"] - med["none"] < 1.0, med
    # The ec2 watcher really ran against the closed port, and never found a service.
    assert len(result["states"]["ec2"]) == 5 and "polling" not in result["states"]["ec2"]
    assert "polling ec2 notices failed" not in res.stderr  # no per-poll error spam
