"""Exact resume: a real child process, real SIGTERMs, bit-for-bit equal final state."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest

from helpers import EXAMPLE, REPO, env_for, spawn
from spotrun.commit import list_checkpoints
from spotrun.layout import EXIT_FINISHED, EXIT_INTERRUPTED
from spotrun.resume_check import compare_checkpoints
from spotrun.storage import Storage

ARGS = [EXAMPLE, "--steps", "240", "--every-steps", "20", "--step-sleep", "0.01"]


def _committed_steps(url: str) -> list[int]:
    return [c.step for c in list_checkpoints(Storage(url)) if c.status == "committed"]


def _run_interrupted(url: str, interruptions: int, rng: random.Random) -> list[int]:
    """Interrupt the example at random moments, each after it has made fresh progress."""
    codes = []
    for _ in range(interruptions):
        before = max(_committed_steps(url), default=0)
        proc = spawn(ARGS, env_for(url))
        deadline = time.monotonic() + 60
        while max(_committed_steps(url), default=0) <= before:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.15))  # land anywhere: mid-step, mid-save, between
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        codes.append(proc.returncode)
        assert proc.returncode in (EXIT_INTERRUPTED, EXIT_FINISHED), out
    proc = spawn(ARGS, env_for(url))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_FINISHED, out
    return codes


def test_sigterm_several_times_resumes_bit_exact(tmp_path):
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    proc = spawn(ARGS, env_for(ref))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_FINISHED, out

    codes = _run_interrupted(cut, 3, random.Random(7))
    assert codes.count(EXIT_INTERRUPTED) >= 2, codes  # most signals land mid-training
    step, differences = compare_checkpoints(Storage(ref), Storage(cut))
    assert step == 240
    assert differences == []


def test_sigterm_checkpoint_is_at_the_interrupted_step(tmp_path):
    """The stop checkpoint is taken where the signal landed, not at the last scheduled one."""
    url = str(tmp_path / "run")
    proc = spawn([*ARGS[:-2], "--step-sleep", "0.03"], env_for(url))
    deadline = time.monotonic() + 60
    while not _committed_steps(url):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    time.sleep(0.25)  # several steps past the scheduled checkpoint at 20
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, out
    newest = max(_committed_steps(url))
    assert newest % 20 != 0, f"stop checkpoint should be off-schedule, got step {newest}"


def _check_resume(tmp_path, *extra):
    cmd = [sys.executable, "-m", "spotrun", "check-resume", "-k", "2", "--seed", "3",
           "--workdir", str(tmp_path / "cr"), "--", sys.executable, *ARGS, *extra]
    return subprocess.run(cmd, env=env_for(""), capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_check_resume_cli_passes_on_the_example(tmp_path):
    res = _check_resume(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS" in res.stdout


@pytest.mark.slow
def test_check_resume_cli_fails_without_rng_and_names_entries(tmp_path):
    res = _check_resume(tmp_path, "--no-rng")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAIL" in res.stdout
    # Dropout masks differ after resume, so the weights and the optimizer moments do.
    assert "objects.model.0.weight" in res.stdout
    assert "objects.optimizer.state" in res.stdout
