"""A second SIGTERM must not turn a committed stop into a crash (issue 9, item 11).

Real child processes, real signals. Supervisors (torchrun, systemd, a spot shutdown) often
send SIGTERM more than once; exit code 75 is what tells them "checkpoint committed, relaunch".
"""

from __future__ import annotations

import signal
import time

import pytest
import slowfs
from helpers import REPO, env_for, wait_for_line

from spotrun.format.commit import find_latest_valid
from spotrun.records.layout import EXIT_INTERRUPTED
from spotrun.storage import Storage

slowfs.register()
SCRIPT = str(REPO / "tests" / "scripts" / "stop_twice_train.py")


@pytest.mark.parametrize("gap", [0.3, 1.0])
def test_second_sigterm_after_the_stop_commit_still_exits_75(tmp_path, gap, warm_python):
    url = str(tmp_path / "run")
    # The teardown lingers 3 s after the with-block: the second SIGTERM lands there, where
    # the old handlers used to be back and the default action killed the process (-15).
    proc = warm_python.spawn([SCRIPT], env_for(url, STOP_TWICE_LINGER="3"))
    try:
        wait_for_line(proc, "ready")
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        wait_for_line(proc, "committed", timeout=60)  # "stop after notice: ... committed"
        time.sleep(gap)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, (proc.returncode, out)
    info = find_latest_valid(Storage(url))
    assert info is not None and info.step >= 1


def test_second_sigterm_during_the_stop_save_does_not_abort_it(tmp_path, warm_python):
    # Each payload write call sleeps 0.3 s: the stop save is still writing when the second
    # SIGTERM lands. The first SIGTERM already asked for a stop; the second changes nothing
    # (only a second Ctrl-C aborts, see test_signals.py), so the save commits and exit is 75.
    url = f"slowfile://{tmp_path}/run"
    proc = warm_python.spawn([SCRIPT], env_for(url, SPOTRUN_TEST_WRITE_DELAY="0.3"))
    try:
        wait_for_line(proc, "ready")
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        line = wait_for_line(proc, "checkpointing and stopping", timeout=60)
        step = int(line.rsplit("step", 1)[1])
        time.sleep(0.2)
        assert proc.poll() is None  # still saving
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, (proc.returncode, out)
    assert "committed" in out
    info = find_latest_valid(Storage(url))
    assert info is not None and info.step == step


def test_ctrl_c_after_the_stop_commit_exits_75_at_once(tmp_path, warm_python):
    # Ctrl-C, then Ctrl-C again while the process is still tearing down: the user means
    # "now", and the stop checkpoint is committed, so the code is 75 without the teardown.
    # (This one held before the fix too; it guards the handler installed after the commit.)
    url = str(tmp_path / "run")
    proc = warm_python.spawn([SCRIPT], env_for(url, STOP_TWICE_LINGER="30"))
    try:
        wait_for_line(proc, "ready")
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        wait_for_line(proc, "tearing down", timeout=60)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, (proc.returncode, out)
    assert took < 10, took  # not the 30 s teardown
    info = find_latest_valid(Storage(url))
    assert info is not None and info.step >= 1
