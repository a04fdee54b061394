"""A worker that noted its exit (run finished, or stop committed) and then hangs on its way
out (torch's gloo process group destructor deadlocking on the GIL, pytorch issue 56297, seen
in this suite) must not keep torchrun's agent waiting forever: spotrun's torchrun kills it
once it used under 1% of a core for ``SPOTRUN_FINISHED_STUCK_S`` and exits as the notes say. A worker still
working after its note (it uses CPU) is left alone. Real torchrun, real worker processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The worker notes "finished" as the Checkpointer does after its last barrier, then either
# blocks with no CPU (as the deadlocked teardown does) or computes for a while and exits 0.
WORKER = """\
import os, sys, time
from spotrun.distributed import note_exit
note_exit(0)
print("noted", flush=True)
if sys.argv[1] == "hang":
    import threading
    threading.Event().wait()  # no CPU from here on, like a deadlock
if sys.argv[1] == "poll":  # a little CPU, as the deadlock's thread polling the GIL every 5 ms
    while True:
        time.sleep(0.005)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:  # busy: CPU ticks keep moving
    sum(range(10000))
print("done working", flush=True)
"""


def _torchrun(tmp_path: Path, *args: str, stuck_s: str = "2") -> tuple[subprocess.CompletedProcess[str], float]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "SPOTRUN_FINISHED_STUCK_S": stuck_s, "SPOTRUN_WARM_WORKERS": "0"}
    env.pop("SPOTRUN_URL", None)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "spotrun.distributed", "--standalone", "--nproc-per-node", "1",
                          "--monitor-interval", "0.1", str(script), *args],
                         env=env, capture_output=True, text=True, timeout=120)
    return res, time.monotonic() - t0


def test_a_worker_stuck_after_the_run_finished_is_killed_and_the_run_ends_0(tmp_path):
    res, took = _torchrun(tmp_path, "hang")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "noted" in res.stdout and "used under 1% of a core for" in out and "killing it" in out, out[-3000:]
    assert took < 60  # without the watch: until the test's timeout


def test_a_worker_that_only_polls_after_its_note_is_stuck_too(tmp_path):
    res, took = _torchrun(tmp_path, "poll", stuck_s="3")
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "killing it" in out and took < 60, out[-3000:]


def test_a_worker_still_working_after_its_note_is_left_alone(tmp_path):
    res, _ = _torchrun(tmp_path, "work", "5")
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "done working" in res.stdout, out[-3000:]
    assert "killing it" not in out


@pytest.mark.parametrize("value", ["soon", "-1"])
def test_a_bad_setting_is_named_and_the_default_used(monkeypatch, caplog, value):
    from spotrun import distributed

    monkeypatch.setenv("SPOTRUN_FINISHED_STUCK_S", value)
    assert distributed._finished_stuck_s() == distributed.FINISHED_STUCK_S
    assert "SPOTRUN_FINISHED_STUCK_S" in caplog.text


def test_a_worker_stuck_after_its_stop_checkpoint_committed_is_killed_and_the_run_ends_75(tmp_path):
    script = tmp_path / "stop.py"
    script.write_text("from spotrun.distributed import note_exit\nnote_exit(75)\n"
                      "import threading\nthreading.Event().wait()\n")
    env = {**os.environ, "SPOTRUN_FINISHED_STUCK_S": "2", "SPOTRUN_WARM_WORKERS": "0"}
    env.pop("SPOTRUN_URL", None)
    res = subprocess.run([sys.executable, "-m", "spotrun.distributed", "--standalone", "--nproc-per-node", "1",
                          "--monitor-interval", "0.1", str(script)], env=env, capture_output=True, text=True,
                         timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 75 and "killing it" in out, out[-3000:]
