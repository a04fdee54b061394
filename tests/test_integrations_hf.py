"""Hugging Face Trainer under spotrun (spotrun.integrations.hf): real processes, real signals,
a fake metadata service, moto-served S3.

The child is examples/hf_train.py: a 2-layer GPT-2 built from a config (no download), with
dropout, AdamW, warmup + cosine, on CPU. The extras (``spotrun[hf]``) are installed in CI, so
nothing here is skipped when transformers is missing: the import fails loudly instead.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import REPO, committed_steps, env_for, ledger_events, run_to_end, spawn, tiny_hf_trainer, wait_child
from safetensors.torch import load_file
from warmfork import WarmExec

from spotrun.format.commit import list_checkpoints, list_damaged
from spotrun.notices.fake_server import FakeMetadataServer
from spotrun.proof.resume_check import compare_checkpoints, diff_state
from spotrun.records.layout import DONE_MARKER, EXIT_INTERRUPTED, checkpoint_dir
from spotrun.storage import Storage

EXAMPLE = str(REPO / "examples" / "hf_train.py")
STEPS, SAVE = 40, 10
ARGS = [EXAMPLE, "--steps", str(STEPS), "--save-steps", str(SAVE)]
SLEEP = ["--step-sleep", "0.15"]
# One thread per child: bit-exact comparisons between processes, and less contention.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _env(url: str, **extra: str) -> dict[str, str]:
    return env_for(url, **ONE_THREAD, **extra)


def _run(url: str, warm: WarmExec, *extra: str, timeout: float = 300, **env: str) -> str:
    return run_to_end(warm.args(*ARGS, *extra), _env(url, **env), timeout)


def _final(url: str) -> dict:
    """The final committed checkpoint's model weights and optimizer state."""
    step = max(committed_steps(url))
    folder = Path(url) / checkpoint_dir(step)
    return {"step": step, "model": load_file(str(folder / "model.safetensors")),
            "optimizer": torch.load(folder / "optimizer.pt", weights_only=True)}


@pytest.fixture(scope="module")
def warm() -> Iterator[WarmExec]:
    """What every example run here forks from (transformers imported once)."""
    from helpers import warm_server

    with warm_server("import transformers, transformers.trainer, spotrun.integrations.hf", **ONE_THREAD) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tmp_path_factory, warm) -> str:
    url = str(tmp_path_factory.mktemp("hf") / "reference")
    out = _run(url, warm)
    Path(url + ".out").write_text(out)  # for the noise check below
    return url


@pytest.mark.slow
def test_sigterm_notice_and_damage_resume_to_the_uninterrupted_result(tmp_path, reference, warm):
    url = str(tmp_path / "run")
    # 1. SIGTERM mid-run (after the first scheduled commit): the Trainer saves at the
    #    current step, spotrun commits it, the process exits 75.
    proc = spawn(warm.args(*ARGS, *SLEEP), _env(url))
    wait_child(proc, lambda: committed_steps(url), "a first checkpoint")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out[-4000:]
    first_stop = max(committed_steps(url))
    assert SAVE <= first_stop < STEPS
    assert not Storage(url).exists(DONE_MARKER)
    (ended,) = ledger_events(url, "segment_ended")
    assert ended["reason"] == "interrupted"
    assert any(r["step"] == first_stop for r in ledger_events(url, "checkpoint_committed"))

    # 2. The relaunch resumes from that step; a spot notice from the fake metadata
    #    service stops it again (exit 75, checkpoint committed, notice in the ledger).
    with FakeMetadataServer("ec2") as imds:
        proc = spawn(warm.args(*ARGS, *SLEEP), _env(url, SPOTRUN_NOTICE_SOURCE="ec2",
                                           SPOTRUN_IMDS_ENDPOINT=imds.url, SPOTRUN_POLL_INTERVAL="0.2"))
        wait_child(proc, lambda: max(committed_steps(url)) > first_stop, "a checkpoint after the resume")
        imds.post_interruption("terminate", in_seconds=120)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out[-4000:]
    assert f"resuming from step {first_stop} " in out
    second_stop = max(committed_steps(url))
    assert first_stop < second_stop < STEPS
    notices = [(n["source"], n["action"]) for n in ledger_events(url, "notice_received")]
    assert notices == [("signal", "SIGTERM"), ("ec2", "terminate")]
    assert [r["step"] for r in ledger_events(url, "training_resumed")] == [0, first_stop]

    # 3. The newest checkpoint is damaged (same size, other bytes): the relaunch skips it,
    #    moves it aside, resumes from the one before and still ends where the
    #    uninterrupted run ended, bit for bit.
    previous = committed_steps(url)[-2]
    weights = Path(url) / checkpoint_dir(second_stop) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)
    weights.write_bytes(bytes(data))
    out = _run(url, warm)
    assert f"skipping damaged checkpoint at step {second_stop}" in out
    assert f"resuming from step {previous} " in out
    assert len(list_damaged(Storage(url))) == 1
    assert Storage(url).exists(DONE_MARKER)
    final, expected = _final(url), _final(reference)
    assert final["step"] == expected["step"] == STEPS
    assert diff_state(expected, final) == []
    # spotrun check-resume's own comparison (the .pt files: optimizer, scheduler) agrees.
    assert compare_checkpoints(Storage(reference), Storage(url)) == (STEPS, [])
    # Every checkpoint left is committed; the ledger has the three segments' ends.
    assert all(c.status == "committed" for c in list_checkpoints(Storage(url)))
    assert [r["reason"] for r in ledger_events(url, "segment_ended")] == ["interrupted", "interrupted", "finished"]


@pytest.mark.slow
def test_reference_run_commits_every_trainer_save_and_finishes(reference):
    """The uninterrupted run: one commit per Trainer save, keep_last=2, done.json, the
    Trainer's own checkpoint-N folders removed once committed."""
    assert committed_steps(reference) == [STEPS - SAVE, STEPS]
    commits = [r["step"] for r in ledger_events(reference, "checkpoint_committed")]
    assert commits == list(range(SAVE, STEPS + 1, SAVE))
    files = Storage(reference).list_dir(checkpoint_dir(STEPS))
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json", "manifest.json"} <= set(files)
    assert not list((Path(reference) / "trainer").glob("checkpoint-*"))
    (ended,) = ledger_events(reference, "segment_ended")
    assert ended["reason"] == "finished" and ended["steps_done"] == STEPS


@pytest.mark.slow
def test_s3_run_url_commits_remotely_resumes_from_a_verified_download(tmp_path, s3_bucket):
    """In-process, against moto: each Trainer save lands in S3 with its manifest; the next
    process downloads the newest valid one (verified) and resumes; a train() that was not
    told to resume is refused instead of starting over on top of the checkpoints."""
    from spotrun.errors import ConfigError
    from spotrun.integrations.hf import SpotrunCallback, train

    url = f"s3://{s3_bucket}/hf-run"
    first = SpotrunCallback(url, handle_signals=False, watchers=[])
    train(tiny_hf_trainer(str(tmp_path / "a"), 4, first))
    assert committed_steps(url) == [2, 4]
    assert Storage(url).exists(DONE_MARKER)

    # A second train() on the same URL, not told to resume: refused, nothing written.
    plain = tiny_hf_trainer(str(tmp_path / "b"), 6, SpotrunCallback(url, handle_signals=False, watchers=[]))
    with pytest.raises(ConfigError, match="already has a checkpoint at step 4"):
        plain.train()
    assert committed_steps(url) == [2, 4]

    # Resumed properly: the newest checkpoint is downloaded under output_dir, verified, loaded.
    again = SpotrunCallback(url, handle_signals=False, watchers=[])
    trainer = tiny_hf_trainer(str(tmp_path / "c"), 6, again)
    path = again.resume_path(trainer)
    assert path == str(tmp_path / "c" / "spotrun-resume" / checkpoint_dir(4))
    trainer.train(resume_from_checkpoint=path)
    assert committed_steps(url) == [4, 6]
    resumed = [r["step"] for r in ledger_events(url, "training_resumed")]
    assert resumed == [0, 4]


@pytest.mark.slow
def test_example_prints_none_of_its_own_noise(reference):
    """Issue 23 item 9: no warning about the example's own config (bos/eos ids outside its
    vocabulary) and no progress bar per save (spotrun logs each commit instead)."""
    out = Path(reference + ".out").read_text()
    assert "committed" in out
    assert "bos_token_id" not in out and "eos_token_id" not in out
    assert "Writing model shards" not in out
