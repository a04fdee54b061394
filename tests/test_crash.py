"""Crash consistency: kill -9 at random moments during saves, locally and on S3.

Every time, the next restore must succeed from a committed checkpoint and ``spotrun
verify`` must pass: a half-written save is never taken for a checkpoint. Each round's
process is a fork of one interpreter that imported torch (``warm_python``,
tests/warmfork.py): a real process, SIGKILLed mid-save, without a torch import per round.
"""

from __future__ import annotations

import random
import signal
import time
import uuid

import pytest
import torch
from helpers import REPO, env_for, wait_for_line
from warmfork import WarmPython

import spotrun
from spotrun.cli import main as cli_main
from spotrun.format.commit import find_latest_valid, list_checkpoints
from spotrun.storage import Storage

SCRIPT = str(REPO / "tests" / "scripts" / "big_state.py")


def _kill_during_saves(warm: WarmPython, url: str, kills: int, seed: int) -> int:
    """Returns how many kills left an uncommitted (half-written) checkpoint folder."""
    rng = random.Random(seed)
    return sum(_kill_once(warm, url, rng) for _ in range(kills))


def _kill_once(warm: WarmPython, url: str, rng: random.Random) -> bool:
    """One start of the script, SIGKILLed once it saves every step; whether that left an
    uncommitted checkpoint folder. The run stays restorable and intact."""
    proc = warm.spawn([SCRIPT, "100000"], env_for(url))
    # By "step 3", step 1 is committed (a save waits for the one before it); from here
    # on every step is followed by a save, so most kills land inside one.
    wait_for_line(proc, "step 3")
    time.sleep(rng.uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    infos = list_checkpoints(Storage(url))
    # Restorable, and intact, after every kill.
    info = find_latest_valid(Storage(url))
    assert info is not None
    assert cli_main(["verify", url]) == 0
    return any(i.status == "incomplete" for i in infos)


def _restore_matches(url: str) -> None:
    info = find_latest_valid(Storage(url))
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 1024))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    with spotrun.Checkpointer(url, model=model, optimizer=opt, handle_signals=False, watchers=[]) as ck:
        assert ck.restore() == info.step


@pytest.mark.slow
def test_kill9_during_local_saves(tmp_path, warm_python):
    url = str(tmp_path / "run")
    # Saves take most of each step, so most kills land inside one.
    assert _kill_during_saves(warm_python, url, kills=8, seed=11) >= 1
    _restore_matches(url)


@pytest.mark.slow
def test_kill9_during_s3_saves(s3_bucket, warm_python):
    url = f"s3://{s3_bucket}/crash-{uuid.uuid4().hex[:6]}"
    _kill_during_saves(warm_python, url, kills=4, seed=12)
    _restore_matches(url)
