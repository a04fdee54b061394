"""Lightning under spotrun (spotrun.integrations.lightning): real processes, real signals, a
fake metadata service.

The child is examples/lightning_train.py: an MLP with dropout, AdamW and warmup, fed by a
spotrun.ResumableLoader, on CPU. The extras (``spotrun[lightning]``) are installed in CI.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO, committed_steps, env_for, ledger_events, run_to_end, spawn, wait_child, warm_server
from warmfork import WarmExec

from spotrun.format.commit import list_checkpoints, list_damaged
from spotrun.notices.fake_server import FakeMetadataServer
from spotrun.proof.resume_check import compare_checkpoints
from spotrun.records.layout import DONE_MARKER, EXIT_INTERRUPTED, checkpoint_dir
from spotrun.storage import Storage

EXAMPLE = str(REPO / "examples" / "lightning_train.py")
STEPS, SAVE = 40, 10
ARGS = [EXAMPLE, "--steps", str(STEPS), "--save-steps", str(SAVE)]
SLEEP = ["--step-sleep", "0.15"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _env(url: str, **extra: str) -> dict[str, str]:
    return env_for(url, **ONE_THREAD, **extra)


def _run(url: str, warm: WarmExec, *extra: str, timeout: float = 300) -> str:
    return run_to_end(warm.args(*ARGS, *extra), _env(url), timeout)


def _read_until(proc, needle: str, timeout: float = 120.0) -> str:
    """The child's output up to and including the first line containing ``needle``."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"exited {proc.wait()} before {needle!r}:\n{''.join(lines)[-4000:]}")
        lines.append(line)
        if needle in line:
            return "".join(lines)
    pytest.fail(f"no {needle!r} within {timeout}s")


@pytest.fixture(scope="module")
def warm() -> Iterator[WarmExec]:
    """The server of this module's runs: Lightning imported once, not in each of them."""
    with warm_server("import lightning.pytorch, spotrun.integrations.lightning", **ONE_THREAD) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tmp_path_factory, warm) -> str:
    url = str(tmp_path_factory.mktemp("lightning") / "reference")
    _run(url, warm)
    return url


@pytest.mark.slow
def test_sigterm_notice_and_damage_resume_to_the_uninterrupted_result(tmp_path, reference, warm):
    url = str(tmp_path / "run")
    # 1. SIGTERM mid-run: checkpoint at the end of the current batch, exit 75.
    proc = spawn(warm.args(*ARGS, *SLEEP), _env(url))
    wait_child(proc, lambda: committed_steps(url), "a first checkpoint")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out[-4000:]
    first_stop = max(committed_steps(url))
    assert SAVE <= first_stop < STEPS
    assert not Storage(url).exists(DONE_MARKER)
    assert [r["reason"] for r in ledger_events(url, "segment_ended")] == ["interrupted"]

    # 2. Resumed from there; a spot notice from the fake metadata service stops it again.
    with FakeMetadataServer("ec2") as imds:
        proc = spawn(warm.args(*ARGS, *SLEEP), _env(url, SPOTRUN_NOTICE_SOURCE="ec2",
                                           SPOTRUN_IMDS_ENDPOINT=imds.url, SPOTRUN_POLL_INTERVAL="0.2"))
        wait_child(proc, lambda: max(committed_steps(url)) > first_stop, "a checkpoint after the resume")
        imds.post_interruption("terminate", in_seconds=120)
        seen = _read_until(proc, "exiting 75")
        # A supervisor's SIGTERMs while the process tears down (Lightning restores its
        # handlers, the interpreter finalises) do not turn the committed stop into -15.
        while proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        out = seen + proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_INTERRUPTED, out[-4000:]
    assert f"resuming from step {first_stop} " in out
    second_stop = max(committed_steps(url))
    assert first_stop < second_stop < STEPS
    notices = [(n["source"], n["action"]) for n in ledger_events(url, "notice_received")]
    assert notices == [("signal", "SIGTERM"), ("ec2", "terminate")]

    # 3. The newest checkpoint is damaged: the relaunch moves it aside, resumes from the
    #    one before, and ends bit for bit where the uninterrupted run ended.
    previous = committed_steps(url)[-2]
    payload = Path(url) / checkpoint_dir(second_stop) / "rank-00000.pt"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF
    payload.write_bytes(bytes(data))
    out = _run(url, warm)
    assert f"skipping damaged checkpoint at step {second_stop}" in out
    assert f"resuming from step {previous} " in out
    assert len(list_damaged(Storage(url))) == 1
    assert Storage(url).exists(DONE_MARKER)
    # spotrun check-resume's comparison: weights, optimizer, schedule, RNG, data position.
    step, differences = compare_checkpoints(Storage(reference), Storage(url))
    assert step == STEPS
    assert differences == []
    assert all(c.status == "committed" for c in list_checkpoints(Storage(url)))
    assert [r["reason"] for r in ledger_events(url, "segment_ended")] == ["interrupted", "interrupted", "finished"]


@pytest.mark.slow
def test_reference_run_commits_each_scheduled_save_and_finishes(reference):
    assert committed_steps(reference) == [STEPS - SAVE, STEPS]
    assert [r["step"] for r in ledger_events(reference, "checkpoint_committed")] == list(range(SAVE, STEPS + 1, SAVE))
    assert Storage(reference).list_dir(checkpoint_dir(STEPS)) == ["manifest.json", "rank-00000.pt"]
    (ended,) = ledger_events(reference, "segment_ended")
    assert ended["reason"] == "finished" and ended["steps_done"] == STEPS


@pytest.mark.slow
def test_s3_run_url_saves_and_resumes_through_spotrun_storage(tmp_path, s3_bucket):
    """In-process, against moto: SpotrunCheckpointIO writes each checkpoint to S3 with its
    manifest; ckpt_path() names the newest valid one and the next fit resumes from it; a fit
    not told to resume is refused."""
    import importlib.util

    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    import spotrun
    from spotrun.errors import ConfigError
    from spotrun.integrations.lightning import SpotrunCallback

    spec = importlib.util.spec_from_file_location("lightning_train_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    url = f"s3://{s3_bucket}/lightning-run"
    data = torch.utils.data.TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,)))

    def fit(steps: int, resume: bool) -> SpotrunCallback:
        spot = SpotrunCallback(url, handle_signals=False, watchers=[])
        trainer = Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          callbacks=[spot, ModelCheckpoint(every_n_train_steps=2, save_top_k=-1,
                                                           dirpath=str(tmp_path / "names"))])
        loader = spotrun.ResumableLoader(data, batch_size=16, seed=0)
        trainer.fit(example.Net(), train_dataloaders=loader, ckpt_path=spot.ckpt_path() if resume else None)
        return spot

    fit(4, resume=True)
    assert committed_steps(url) == [2, 4]
    assert Storage(url).list_dir(checkpoint_dir(4)) == ["manifest.json", "rank-00000.pt"]
    with pytest.raises(ConfigError, match="already has a checkpoint at step 4"):
        fit(6, resume=False)
    fit(6, resume=True)
    assert committed_steps(url) == [4, 6]
    assert [r["step"] for r in ledger_events(url, "training_resumed")] == [0, 4]
    assert not (tmp_path / "names").exists() or not any((tmp_path / "names").iterdir())
