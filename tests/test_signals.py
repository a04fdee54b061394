"""Signals: real processes, real SIGTERM/SIGINT; exit codes a supervisor can act on."""

from __future__ import annotations

import signal
import time

import pytest
import torch
from helpers import REPO, env_for, wait_for_line

import spotrun
from spotrun.format.commit import find_latest_valid
from spotrun.records.layout import DONE_MARKER, EXIT_FINISHED, EXIT_INTERRUPTED
from spotrun.storage import Storage

SCRIPT = str(REPO / "tests" / "scripts" / "sleepy_train.py")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_one_signal_saves_and_exits_resumable(tmp_path, sig, warm_python):
    url = str(tmp_path / "run")
    proc = warm_python.spawn([SCRIPT], env_for(url))
    wait_for_line(proc, "ready")
    time.sleep(0.2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_INTERRUPTED, out
    info = find_latest_valid(Storage(url))
    assert info is not None and info.step >= 1  # saved at the step the signal landed in
    assert not Storage(url).exists(DONE_MARKER)


def test_second_sigint_aborts_at_once(tmp_path, warm_python):
    url = str(tmp_path / "run")
    proc = warm_python.spawn([SCRIPT, "100", "30.0"], env_for(url))  # 30 s steps
    wait_for_line(proc, "ready")
    # Both inside one step: the second must abort without waiting for the step to end (a
    # wait would take up to 30 s; the bound leaves a loaded machine's teardown its seconds).
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    # Two SIGINTs that arrive before the first one's Python handler ran coalesce into one (the
    # step's sleep is interrupted to run it, but a loaded box may not schedule the process for
    # a while: 50 ms was too little, and 0.5 s failed once at the end of a whole run, exit 75
    # at the step's end). So after 0.5 s the second is sent, and again every 0.5 s until the
    # process is gone: the abort must still come long before the 30 s step ends.
    time.sleep(0.5)
    while proc.poll() is None and time.monotonic() - t0 < 8:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode in (-signal.SIGINT, 130), (proc.returncode, out)
    assert "KeyboardInterrupt" in out
    assert time.monotonic() - t0 < 10


def test_finished_run_exits_zero_with_done_marker_and_resume_is_noop(tmp_path, warm_python):
    url = str(tmp_path / "run")
    proc = warm_python.spawn([SCRIPT, "5"], env_for(url))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_FINISHED, out
    assert Storage(url).exists(DONE_MARKER)
    proc = warm_python.spawn([SCRIPT, "5"], env_for(url))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_FINISHED and "ready" not in out


def test_handlers_restored_on_exit(tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with spotrun.Checkpointer(str(tmp_path / "r"), model=torch.nn.Linear(2, 2), watchers=[]) as ck:
        assert signal.getsignal(signal.SIGTERM) == ck._interrupts._on_signal
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_failure_exits_nonzero_and_is_recorded(tmp_path):
    from spotrun.records.ledger import Ledger

    url = str(tmp_path / "r")
    with pytest.raises(ZeroDivisionError):
        with spotrun.Checkpointer(url, model=torch.nn.Linear(2, 2), watchers=[],
                                  handle_signals=False) as ck:
            for _ in ck.range(3):
                _ = 1 / 0
    ends = [r for r in Ledger(Storage(url)).records() if r["event"] == "segment_ended"]
    assert [r["reason"] for r in ends] == ["failed"]
