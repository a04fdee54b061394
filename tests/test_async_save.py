"""Async two-phase saves: same bytes as sync, training goes on while writing, failures and
interruptions never cost the last committed checkpoint."""

from __future__ import annotations

import signal
import time
import uuid

import pytest
import slowfs
import torch
from helpers import REPO, env_for, wait_for_line

import spotrun
from spotrun.cli import main as cli_main
from spotrun.format.commit import find_latest_valid, list_checkpoints
from spotrun.records.layout import EXIT_INTERRUPTED
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

slowfs.register()


def _setup(seed=0):
    spotrun.seed_everything(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.1), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    return model, opt, sched


def _train(ck, model, opt, sched, steps):
    for _step in ck.range(steps):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _digests(url):
    return {c.step: dict(c.manifest.files)
            for c in list_checkpoints(Storage(url)) if c.manifest}


def test_async_and_sync_write_identical_checkpoints(tmp_path):
    urls = {}
    for mode in (True, False):
        url = urls[mode] = str(tmp_path / f"async-{mode}")
        model, opt, sched = _setup()
        with spotrun.Checkpointer(url, model=model, optimizer=opt, scheduler=sched, every_steps=4,
                                  keep_last=10, async_save=mode, handle_signals=False,
                                  watchers=[]) as ck:
            _train(ck, model, opt, sched, 13)
    a, s = _digests(urls[True]), _digests(urls[False])
    assert sorted(a) == [4, 8, 12, 13]
    assert a == s


def test_training_continues_while_a_slow_save_persists(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTRUN_TEST_WRITE_DELAY", "0.02")  # per write call: a slow disk
    url = f"slowfile://{tmp_path}/run"
    model, opt, _sched = _setup()
    step_times = []
    with spotrun.Checkpointer(url, model=model, optimizer=opt, every_steps=10, keep_last=10,
                              handle_signals=False, watchers=[]) as ck:
        for step in ck.range(40):
            loss = model(torch.randn(8, 16)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            time.sleep(0.005)
            step_times.append((time.time(), step + 1))
    commits = [r for r in Ledger(Storage(url)).records() if r["event"] == "checkpoint_committed"]
    assert [r["step"] for r in commits] == [10, 20, 30, 40]
    c10 = next(r for r in commits if r["step"] == 10)
    # Steps after 10 completed before step 10's checkpoint was durable...
    during = [s for t, s in step_times if s > 10 and t < c10["committed_at"]]
    assert len(during) >= 3, during
    # ...and the pause training saw is a small part of the whole save.
    assert c10["stall_s"] < c10["save_s"] / 2


def test_background_failure_surfaces_at_next_step_and_keeps_last_checkpoint():
    url = f"failmem://{uuid.uuid4().hex}"
    model, opt, _sched = _setup()
    with spotrun.Checkpointer(url, model=model, optimizer=opt, every_steps=2,
                              handle_signals=False, watchers=[]) as ck:
        ck.restore()
        for step in (1, 2):
            ck.step(step)
        ck.wait()
        slowfs.FailMemFS.failing = True
        try:
            ck.step(3)
            ck.step(4)  # starts a save that fails in the background
            with pytest.raises(spotrun.SaveError, match="step 4 failed.*previous checkpoint is intact"):
                for step in range(5, 50):
                    ck.step(step)
                    time.sleep(0.01)
        finally:
            slowfs.FailMemFS.failing = False
    info = find_latest_valid(Storage(url))
    assert info is not None and info.step == 2


SCRIPT = str(REPO / "tests" / "scripts" / "slow_save_train.py")


@pytest.mark.slow
def test_sigterm_during_inflight_save_commits_it_before_exit(tmp_path, warm_python):
    url = f"slowfile://{tmp_path}/run"
    env = env_for(url, SPOTRUN_TEST_WRITE_DELAY="0.05")
    proc = warm_python.spawn([SCRIPT], env)
    wait_for_line(proc, "step 23")  # the save of step 20 is being written (slowly)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out
    committed = [c.step for c in list_checkpoints(Storage(url)) if c.status == "committed"]
    assert 20 in committed, committed          # the in-flight save was finished and committed
    assert max(committed) > 20, committed      # then the stop checkpoint at the signal's step
    assert cli_main(["verify", url]) == 0


@pytest.mark.slow
def test_kill9_during_inflight_save_leaves_previous_checkpoint(tmp_path, warm_python):
    url = f"slowfile://{tmp_path}/run"
    env = env_for(url, SPOTRUN_TEST_WRITE_DELAY="0.05")
    proc = warm_python.spawn([SCRIPT], env)
    wait_for_line(proc, "step 43")  # 20 committed (probably), 40 in flight
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    info = find_latest_valid(Storage(url))
    assert info is not None and info.step in (20, 40)
    assert cli_main(["verify", url]) == 0
