"""ResumableLoader's own rank sharding under real torchrun (2 CPU ranks, gloo), instead of
DistributedSampler: SIGTERM to ``python -m spotrun.distributed``, resume, bit-exact.

The same stopped run is also resumed on ONE rank: the loader's position is global, so the
single rank carries on with exactly the samples the two ranks had not read (per epoch, each
sample once). The other direction (more ranks than saved) needs the checkpointer to give a
new rank rank 0's copy of the loader state; until it does, that test is an expected failure.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections import Counter

import pytest
from helpers import REPO, committed_steps, env_for, finish_session, torchrun
from warmfork import WarmExec

from spotrun.proof.resume_check import compare_checkpoints
from spotrun.records.layout import EXIT_FINISHED, EXIT_INTERRUPTED
from spotrun.storage import Storage

pytestmark = pytest.mark.slow

SCRIPT = str(REPO / "tests" / "scripts" / "ddp_loader_train.py")
STEPS, EVERY, SAMPLES = 60, 10, 400  # 2 ranks x 16 per step: 12.5 steps an epoch, ~5 epochs
TIMEOUT = 240  # a loaded 2-core machine runs one of these in about a minute


def _launch(url: str, warm: WarmExec, nproc: int = 2, step_sleep: float = 0.0) -> subprocess.Popen:
    """torchrun of the script, its ranks forks of ``warm`` (the ``warm_ranks`` fixture)."""
    return torchrun(SCRIPT, nproc, "--url", url, "--steps", str(STEPS), "--every-steps", str(EVERY),
                    "--samples", str(SAMPLES), "--step-sleep", str(step_sleep), env=env_for(url), warm=warm)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    return finish_session(proc, TIMEOUT)


def _steps(out: str) -> dict[tuple[int, int], tuple[int, list[int]]]:
    """{(rank, step): (epoch, dataset indices)} from the script's per-step lines."""
    return {(int(r), int(s)): (int(e), [int(i) for i in idx.split(",")])
            for r, s, e, idx in re.findall(r"^rank (\d) step (\d+) epoch (\d+) idx ([\d,]+)$",
                                           out, re.MULTILINE)}


def _exits(out: str) -> dict[int, tuple[int, int]]:
    return {int(r): (int(c), int(s))
            for r, c, s in re.findall(r"^rank (\d) exit (\d+) at step (\d+)$", out, re.MULTILINE)}


def _per_epoch(*runs: dict) -> dict[int, Counter]:
    epochs: dict[int, Counter] = {}
    for steps in runs:
        for epoch, idx in steps.values():
            epochs.setdefault(epoch, Counter()).update(idx)
    return epochs


def _interrupt(url: str, nproc: int, warm: WarmExec) -> tuple[int, dict]:
    """Run on ``nproc`` ranks, SIGTERM the wrapper a few steps past its first checkpoint."""
    proc = _launch(url, warm, nproc, step_sleep=0.05)
    deadline = time.monotonic() + TIMEOUT
    while not committed_steps(url):
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} early:\n{proc.communicate()[0][-4000:]}")
        assert time.monotonic() < deadline, "no checkpoint committed"
        time.sleep(0.05)
    time.sleep(0.15)
    proc.send_signal(signal.SIGTERM)
    code, out = _finish(proc)
    assert code == EXIT_INTERRUPTED, out[-4000:]
    exits = _exits(out)
    assert set(exits) == set(range(nproc)), out[-4000:]
    stops = {s for c, s in exits.values()}
    assert {c for c, s in exits.values()} == {EXIT_INTERRUPTED} and len(stops) == 1, exits
    stop = stops.pop()
    assert 0 < stop < STEPS and max(committed_steps(url)) == stop
    steps = _steps(out)
    assert set(steps) == {(r, s) for r in range(nproc) for s in range(1, stop + 1)}
    return stop, steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory, warm_ranks) -> tuple[str, dict]:
    """One uninterrupted 2-rank run, the yardstick."""
    url = str(tmp_path_factory.mktemp("loader") / "reference")
    code, out = _finish(_launch(url, warm_ranks))
    assert code == EXIT_FINISHED, out[-4000:]
    assert _exits(out) == {0: (0, STEPS), 1: (0, STEPS)}
    steps = _steps(out)
    assert set(steps) == {(r, s) for r in (0, 1) for s in range(1, STEPS + 1)}
    return url, steps


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, warm_ranks) -> tuple[str, int, dict]:
    """A 2-rank run stopped by SIGTERM to the wrapper (copied by each test that resumes it)."""
    url = str(tmp_path_factory.mktemp("loader") / "stopped")
    stop, steps = _interrupt(url, 2, warm_ranks)
    return url, stop, steps


def test_sigterm_then_resume_on_same_ranks_is_bit_exact(tmp_path, reference, stopped, warm_ranks):
    ref_url, ref_steps = reference
    url = str(tmp_path / "run")
    shutil.copytree(stopped[0], url)
    stop, head = stopped[1], stopped[2]
    code, out = _finish(_launch(url, warm_ranks))
    assert code == EXIT_FINISHED, out[-4000:]
    assert f"resumed from step {stop} " in out
    tail = _steps(out)
    assert set(tail) == {(r, s) for r in (0, 1) for s in range(stop + 1, STEPS + 1)}
    # Every rank read, step by step, exactly the batches of the uninterrupted run.
    assert {**head, **tail} == ref_steps
    step, differences = compare_checkpoints(Storage(ref_url), Storage(url))
    assert step == STEPS and differences == []


def test_resume_on_one_rank_reads_the_unread_samples_once(tmp_path, stopped, warm_ranks):
    url = str(tmp_path / "run")
    shutil.copytree(stopped[0], url)
    stop, head = stopped[1], stopped[2]
    code, out = _finish(_launch(url, warm_ranks, nproc=1))
    assert code == EXIT_FINISHED, out[-4000:]
    assert f"resumed from step {stop} " in out
    tail = _steps(out)
    assert set(tail) == {(0, s) for s in range(stop + 1, STEPS + 1)}
    epochs = _per_epoch(head, tail)
    complete = sorted(epochs)[:-1]  # the last epoch is still under way at step 60
    assert len(complete) >= 2
    for e in complete:
        assert epochs[e] == Counter(range(SAMPLES)), f"epoch {e}"


def test_resume_on_more_ranks_reads_the_unread_samples_once(tmp_path, warm_ranks):
    url = str(tmp_path / "run")
    stop, head = _interrupt(url, 1, warm_ranks)
    code, out = _finish(_launch(url, warm_ranks, nproc=2))
    assert code == EXIT_FINISHED, out[-4000:]
    assert f"resumed from step {stop} " in out
    tail = _steps(out)
    epochs = _per_epoch(head, tail)
    for e in sorted(epochs)[:-1]:
        assert epochs[e] == Counter(range(SAMPLES)), f"epoch {e}"
