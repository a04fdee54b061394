"""The stop deadline (issue 20): a stop checkpoint that cannot commit in time ends the process
with 143 every time, after aborting open transfers and recording the segment's end.

The abandoned save thread is still inside ``torch.save`` (writing to a store whose writes take
a second each) when the process leaves; an interpreter shutting down under it used to die
with SIGSEGV or SIGABRT in about half the runs. Ten real children, run side by side.
"""

from __future__ import annotations

import signal
import subprocess

import pytest
from helpers import REPO, env_for, ledger_events, spawn, wait_for_line

from spotrun.records.layout import EXIT_STOP_UNSAVED

SCRIPT = str(REPO / "tests" / "scripts" / "stop_deadline_exit.py")
RUNS_PER_WRAPPER = 5


@pytest.mark.slow
def test_missed_stop_deadline_exits_143_every_time(tmp_path):
    children: list[tuple[str, str, str, subprocess.Popen]] = []
    for mode in ("checkpointer", "session"):
        for i in range(RUNS_PER_WRAPPER):
            folder = str(tmp_path / f"{mode}-{i}")
            marker = str(tmp_path / f"{mode}-{i}.aborted")
            env = env_for(f"slowfile://{folder}", SPOTRUN_TEST_WRITE_DELAY="1",
                          SPOTRUN_STOP_TIMEOUT="3", SPOTRUN_NOTICE_SOURCE="none")
            children.append((mode, folder, marker, spawn([SCRIPT, mode, marker], env)))
    try:
        for _, _, _, proc in children:
            wait_for_line(proc, "step 3", timeout=180)
            proc.send_signal(signal.SIGTERM)
        results = []
        for mode, folder, marker, proc in children:
            out, _ = proc.communicate(timeout=120)
            results.append((mode, folder, marker, proc.returncode, out))
    finally:
        for *_, proc in children:
            if proc.poll() is None:
                proc.kill()
    codes = [(mode, code) for mode, _, _, code, _ in results]
    assert all(code == EXIT_STOP_UNSAVED for _, code in codes), (
        codes, [out[-1500:] for *_, code, out in results if code != EXIT_STOP_UNSAVED])
    for mode, folder, marker, _, out in results:
        assert "did not commit within" in out and "SPOTRUN_STOP_TIMEOUT=3s" in out, out[-3000:]
        with open(marker) as f:  # abort_all ran before the process left
            assert f.read() == "aborted"
        ended = ledger_events(folder, "segment_ended")
        assert [e["reason"] for e in ended] == ["interrupted"], (mode, ended)
