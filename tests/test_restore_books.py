"""Issue 22 item 4, the recording side: a resumed process's ``training_resumed`` says what its
restore cost (start, seconds, bytes by source), for the Checkpointer (replicated and sharded)
and the trainers' RunSession. In-process; the real-process check (a resumed run with a local
copy) is in test_recovery_local.py."""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch

import spotrun
from spotrun.format.commit import read_manifest
from spotrun.integrations._session import RunSession
from spotrun.records.layout import checkpoint_dir
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage


def _resumes(url: str) -> list[dict]:
    return [r for r in Ledger(Storage(url)).records() if r["event"] == "training_resumed"]


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(url: str, steps: int, *, sharded: bool) -> None:
    model, opt = _model()
    with spotrun.Checkpointer(url, model=model, optimizer=opt, sharded=sharded, every_steps=2,
                              keep_last=5, watchers=[], handle_signals=False) as ck:
        for _ in ck.range(steps):
            model(torch.randn(4, 6)).square().mean().backward()
            opt.step()
            opt.zero_grad()


def _restore(url: str, *, sharded: bool) -> int:
    model, opt = _model()
    with spotrun.Checkpointer(url, model=model, optimizer=opt, sharded=sharded,
                              watchers=[], handle_signals=False) as ck:
        return ck.restore()


def test_a_fresh_start_records_no_restore(tmp_path):
    url = str(tmp_path / "run")
    _train(url, 2, sharded=False)
    (first,) = _resumes(url)
    assert first["step"] == 0
    assert not {"restore_started_at", "restore_s", "bytes_local", "bytes_peer", "bytes_url"} & set(first)


def test_a_sharded_restore_records_every_byte_it_read(tmp_path):
    # format/sharded.py reads each DCP file through the reader the restore hands it, which
    # counts it: .metadata, the shard files and rank 0's payload, all from the run URL here.
    url = str(tmp_path / "run")
    _train(url, 4, sharded=True)
    manifest = read_manifest(Storage(url), 4)
    assert manifest.sharded
    assert _restore(url, sharded=True) == 4
    resumed = _resumes(url)[-1]
    assert resumed["step"] == 4
    assert (resumed["bytes_local"], resumed["bytes_peer"], resumed["bytes_url"]) == (0, 0, manifest.total_bytes)
    assert resumed["process_started_at"] <= resumed["restore_started_at"] <= resumed["first_step_at"]
    assert 0 < resumed["restore_s"] <= resumed["first_step_at"] - resumed["restore_started_at"]


def test_a_damaged_newest_checkpoint_counts_what_was_read_before_the_fallback(tmp_path):
    url = str(tmp_path / "run")
    _train(url, 4, sharded=False)
    storage = Storage(url)
    older, newest = read_manifest(storage, 2), read_manifest(storage, 4)
    payload = Path(url) / checkpoint_dir(4) / "rank-00000.pt"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: found only when its bytes are read
    payload.write_bytes(bytes(data))
    assert _restore(url, sharded=False) == 2
    resumed = _resumes(url)[-1]
    read_first = newest.files["rank-00000.pt"].size
    assert resumed["bytes_url"] == read_first + older.total_bytes
    assert resumed["bytes_local"] == 0


def test_a_run_session_resume_records_the_run_url_bytes(tmp_path):
    url = str(tmp_path / "run")
    folder = tmp_path / "hf" / "checkpoint-5"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\1" * 3000)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    s = RunSession(url, handle_signals=False, watchers=[])
    s.start()
    s.commit_folder(5, str(folder))
    s.close("stopped")
    again = RunSession(url, handle_signals=False, watchers=[])
    assert again.resume_dir(str(tmp_path / "staging")) is not None
    again.training_started(5)
    again.close("stopped")
    resumed = _resumes(url)[-1]
    assert resumed["step"] == 5
    assert resumed["bytes_url"] == read_manifest(Storage(url), 5).total_bytes
    assert (resumed["bytes_local"], resumed["bytes_peer"]) == (0, 0)
    assert resumed["restore_s"] >= 0 and resumed["restore_started_at"] <= resumed["first_step_at"]


def test_a_sharded_restore_from_this_machines_copy_checks_each_byte_once(tmp_path, monkeypatch):
    """The nearest-copy reader checks a local file against the manifest before serving it;
    the shard reader then skipped nothing and checksummed the same bytes again (a second CRC
    pass over every shard: FSDP restores from copies took 0.24x a restore from S3, DDP 0.07x)."""
    from spotrun.format import checksum, sharded

    monkeypatch.setenv("SPOTRUN_LOCAL_DIR", str(tmp_path / "local"))
    url = str(tmp_path / "run")
    _train(url, 4, sharded=True)
    calls: list[int] = []  # the shard reader's own checks (the nearest-copy reader's are not counted)
    counting = types.SimpleNamespace(
        problem=lambda data, entry: calls.append(entry.size) or checksum.problem(data, entry))
    monkeypatch.setattr(sharded, "checksum", counting)
    assert _restore(url, sharded=True) == 4
    resumed = _resumes(url)[-1]
    assert resumed["bytes_url"] == 0 and resumed["bytes_local"] > 0, resumed
    assert calls == []
    # A copy that no longer matches is not served, and what the run URL gives is checked.
    for path in (tmp_path / "local").rglob("__0_0.distcp"):
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(bytes(raw))
    assert _restore(url, sharded=True) == 4
    assert calls and _resumes(url)[-1]["bytes_url"] > 0
