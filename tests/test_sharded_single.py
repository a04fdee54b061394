"""`sharded=True` in one process: DCP files through the Checkpointer without torchrun, and
check-resume's comparison seeing the sharded model and optimizer (fast; the multi-rank cases
are in test_sharded_checkpointer.py)."""

from __future__ import annotations

import torch

import spotrun
from spotrun.format.commit import find_latest_valid
from spotrun.proof.resume_check import compare_checkpoints
from spotrun.storage import Storage


def _train(url: str, steps: int, lr: float = 1e-2) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    with spotrun.Checkpointer(url, model=model, optimizer=opt, sharded=True, every_steps=2,
                              watchers=[], handle_signals=False) as ck:
        assert ck.sharded
        for _ in ck.range(steps):
            model(torch.randn(4, 6)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    return model


def test_sharded_true_writes_dcp_files_and_restores(tmp_path):
    url = str(tmp_path / "run")
    trained = _train(url, 4)
    info = find_latest_valid(Storage(url))
    assert info is not None and info.manifest is not None and info.manifest.sharded
    assert {".metadata", "__0_0.distcp", "rank-00000.pt"} <= set(info.manifest.files)
    # A fresh model restores the weights from the DCP files, not from rank-00000.pt.
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with spotrun.Checkpointer(url, model=model, optimizer=opt, sharded=True,
                              watchers=[], handle_signals=False) as ck:
        assert ck.restore() == 4
    for a, b in zip(trained.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.state_dict()["state"][0]["step"] == 4


def test_compare_checkpoints_sees_sharded_weights(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    _train(a, 4)
    _train(b, 4)
    _train(c, 4, lr=2e-2)
    step, diffs = compare_checkpoints(Storage(a), Storage(b))
    assert step == 4 and diffs == []
    _, diffs = compare_checkpoints(Storage(a), Storage(c))
    assert any(d.startswith("sharded.model.") for d in diffs), diffs
    assert any(d.startswith("sharded.optim.") for d in diffs), diffs


def _save_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "spotrun-save" and t.is_alive()]


def test_saves_share_one_writer_thread_that_ends_when_idle(tmp_path, monkeypatch):
    """Async saves run on one kept thread (no thread started per save, part of the stall);
    it ends after WRITER_IDLE_S without work, and the next save starts another."""
    from spotrun.checkpoint import saver

    monkeypatch.setattr(saver, "WRITER_IDLE_S", 0.5)
    url = str(tmp_path / "run")
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = set(_save_threads())
    with spotrun.Checkpointer(url, model=model, optimizer=opt, sharded=True, every_steps=10**9,
                              keep_last=5, watchers=[], handle_signals=False) as ck:
        seen = []
        for step in (1, 2, 3):
            ck.steps_done = step
            ck.save()
            ck.wait()
            seen.append(set(_save_threads()) - before)
        assert len(seen[0]) == 1 and seen[0] == seen[1] == seen[2], seen
        (thread,) = seen[0]
        thread.join(timeout=10)
        assert not thread.is_alive(), "the idle writer thread did not end"
        ck.steps_done = 4
        ck.save()
        ck.wait()
        assert len(set(_save_threads()) - before - {thread}) == 1
    info = find_latest_valid(Storage(url))
    assert info is not None and info.step == 4
