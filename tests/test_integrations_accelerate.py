"""Accelerate under spotrun (spotrun.integrations.accelerate): real processes, real signals.

The child is examples/accelerate_train.py: an MLP with dropout, AdamW and warmup, a
spotrun.ResumableLoader registered for checkpointing, on CPU. The extras
(``spotrun[accelerate]``) are installed in CI. The notice path is the one the Hugging Face
and Lightning tests drive (the same RunSession); here a SIGTERM stops the run.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from helpers import REPO, committed_steps, env_for, ledger_events, run_to_end, spawn

from spotrun.format.commit import list_damaged
from spotrun.integrations.compare import compare_runs
from spotrun.records.layout import DONE_MARKER, EXIT_INTERRUPTED, checkpoint_dir
from spotrun.storage import Storage

EXAMPLE = str(REPO / "examples" / "accelerate_train.py")
STEPS, SAVE = 40, 10
ARGS = [EXAMPLE, "--steps", str(STEPS), "--save-steps", str(SAVE)]


def _env(url: str) -> dict[str, str]:
    return env_for(url, OMP_NUM_THREADS="1")


def _run(url: str) -> str:
    return run_to_end(ARGS, _env(url))


@pytest.mark.slow
def test_sigterm_then_damaged_newest_resume_to_the_uninterrupted_result(tmp_path):
    reference, url = str(tmp_path / "reference"), str(tmp_path / "run")
    _run(reference)
    assert committed_steps(reference) == [STEPS - SAVE, STEPS]
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
            "custom_checkpoint_0.pkl"} <= set(Storage(reference).list_dir(checkpoint_dir(STEPS)))

    # SIGTERM mid-run: the step finishes, save_state, commit, exit 75.
    proc = spawn([*ARGS, "--step-sleep", "0.15"], _env(url))
    deadline = time.monotonic() + 240
    while not committed_steps(url):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out[-4000:]
    steps = committed_steps(url)
    stop = steps[-1]
    assert SAVE <= stop < STEPS and len(steps) == 2
    assert [r["reason"] for r in ledger_events(url, "segment_ended")] == ["interrupted"]

    # The stop checkpoint is damaged: the relaunch moves it aside, resumes from the one
    # before and ends where the uninterrupted run ended, every file equal.
    weights = Path(url) / checkpoint_dir(stop) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)
    weights.write_bytes(bytes(data))
    out = _run(url)
    assert f"skipping damaged checkpoint at step {stop}" in out
    assert f"resuming from step {steps[0]} " in out
    assert len(list_damaged(Storage(url))) == 1 and Storage(url).exists(DONE_MARKER)
    assert compare_runs(reference, url) == (STEPS, [])
    assert [r["reason"] for r in ledger_events(url, "segment_ended")] == ["interrupted", "finished"]
