"""RunSession, the part every trainer integration shares: a trainer's checkpoint folder
committed under spotrun's protocol, the newest valid one found again, damage skipped.
In-process, no trainer needed (the trainers' own tests run them end to end)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spotrun.errors import SaveError
from spotrun.format.commit import (
    list_checkpoints,
    list_damaged,
    read_manifest,
    verify_checkpoint,
)
from spotrun.integrations._session import RunSession
from spotrun.records.layout import EXIT_INTERRUPTED, MANIFEST, checkpoint_dir
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage


def _folder(root: Path, step: int) -> str:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(bytes([step]) * 1000)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return str(d)


def _session(url: str) -> RunSession:
    return RunSession(url, handle_signals=False, watchers=[])


def test_folder_commit_lists_every_file_and_the_newest_valid_is_resumed(tmp_path):
    url = str(tmp_path / "run")
    s = _session(url)
    s.start()
    s.commit_folder(5, _folder(tmp_path / "hf", 5))
    s.commit_folder(7, _folder(tmp_path / "hf", 7))
    s.close("stopped")
    storage = Storage(url)
    manifest = read_manifest(storage, 7)
    assert sorted(manifest.files) == ["model.safetensors", "trainer_state.json"]
    assert manifest.files["model.safetensors"].size == 1000
    assert verify_checkpoint(storage, manifest) == []
    assert [r["step"] for r in Ledger(storage).records() if r["event"] == "checkpoint_committed"] == [5, 7]

    # The newest is damaged (same size, other bytes): moved aside, the one before resumed.
    weights = tmp_path / "run" / checkpoint_dir(7) / "model.safetensors"
    weights.write_bytes(b"\0" * 1000)
    again = _session(url)
    path = again.resume_dir(str(tmp_path / "staging"))
    again.close("stopped")
    assert path == str(tmp_path / "run" / checkpoint_dir(5))
    assert [c.step for c in list_checkpoints(storage)] == [5]
    assert len(list_damaged(storage)) == 1


def test_a_folder_with_no_files_is_refused_and_nothing_is_committed(tmp_path):
    # Subfolders are committed since issue 23 item 11 (tests/test_integrations_nested.py);
    # a folder holding no file at any depth is still refused.
    url = str(tmp_path / "run")
    folder = tmp_path / "hf" / "checkpoint-3"
    (folder / "global_step3").mkdir(parents=True)
    s = _session(url)
    s.start()
    with pytest.raises(SaveError, match="wrote no checkpoint"):
        s.commit_folder(3, str(folder))
    s.close("stopped")
    assert list_checkpoints(Storage(url)) == []


def test_stop_commits_then_exits_75_and_the_ledger_says_interrupted(tmp_path):
    url = str(tmp_path / "run")
    s = _session(url)
    s.start()
    s.request_stop()
    assert s.poll(4) == (True, False)
    with pytest.raises(SystemExit) as stopped:
        s.stop(4, _folder(tmp_path / "hf", 4))
    assert stopped.value.code == EXIT_INTERRUPTED
    storage = Storage(url)
    assert storage.exists(f"{checkpoint_dir(4)}/{MANIFEST}")
    ended = [r for r in Ledger(storage).records() if r["event"] == "segment_ended"]
    assert [(r["reason"], r["steps_done"]) for r in ended] == [("interrupted", 4)]


@pytest.mark.slow
def test_s3_resume_downloads_and_verifies_the_copy(tmp_path, s3_bucket):
    url = f"s3://{s3_bucket}/run"
    s = _session(url)
    s.start()
    s.commit_folder(2, _folder(tmp_path / "hf", 2))
    s.close("stopped")
    again = _session(url)
    path = again.resume_dir(str(tmp_path / "out"))
    again.close("stopped")
    assert path == str(tmp_path / "out" / "spotrun-resume" / checkpoint_dir(2))
    assert (Path(path) / "model.safetensors").read_bytes() == bytes([2]) * 1000
    assert again.last_committed == 2


def test_the_same_step_saved_twice_is_committed_once(tmp_path):
    """The Trainer can save one step twice (the final step, then the epoch's end): the
    committed folder is not rewritten, so its manifest still matches its files."""
    url = str(tmp_path / "run")
    s = _session(url)
    s.start()
    folder = _folder(tmp_path / "hf", 6)
    s.commit_folder(6, folder)
    (Path(folder) / "trainer_state.json").write_text(json.dumps({"global_step": 6, "epoch": 2}))
    s.commit_folder(6, folder)
    s.close("stopped")
    storage = Storage(url)
    assert verify_checkpoint(storage, read_manifest(storage, 6)) == []
    assert [r["step"] for r in Ledger(storage).records() if r["event"] == "checkpoint_committed"] == [6]


def test_compare_runs_names_the_tensor_that_differs(tmp_path):
    """The all-files comparison used for trainer checkpoints (check-resume reads only .pt)."""
    import torch
    from safetensors.torch import save_file

    from spotrun.integrations.compare import compare_runs

    def run(name: str, w: torch.Tensor, rng: bytes) -> str:
        folder = tmp_path / name / "checkpoint-3"
        folder.mkdir(parents=True)
        save_file({"w": w, "b": torch.zeros(2)}, str(folder / "model.safetensors"))
        torch.save({"state": {0: {"exp_avg": w * 2}}}, folder / "optimizer.pt")
        (folder / "random_states_0.pkl").write_bytes(rng)  # not a safe load: checksum only
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": [name]}))
        s = _session(str(tmp_path / f"{name}-run"))
        s.start()
        s.commit_folder(3, str(folder))
        s.close("stopped")
        return str(tmp_path / f"{name}-run")

    a = run("a", torch.ones(3), b"same")
    assert compare_runs(a, run("b", torch.ones(3), b"same")) == (3, [])
    step, differences = compare_runs(a, run("c", torch.tensor([1.0, 1.0, 1.5]), b"other"))
    assert step == 3
    assert differences == ["model.safetensors.w: values differ (max abs diff 0.5)",
                           "optimizer.pt.state.0.exp_avg: values differ (max abs diff 1)",
                           "random_states_0.pkl: bytes differ"]
