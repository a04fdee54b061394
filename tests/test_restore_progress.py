"""Restores say what they do (issue 23 items 7 and 9): progress lines (what, bytes, rate) while
a slow restore reads, and a "resumed" line with the size and time, in KiB/MiB/GiB as fits."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from slowfs import Slowed

import spotrun
from spotrun.integrations._session import RunSession
from spotrun.units import format_bytes


class SlowReadFS(LocalFileSystem):
    """``slowread://``: local disk seen as a remote store whose checkpoint reads are slow."""

    protocol = ("slowread",)
    delay = 0.0

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("slowread://"):
            path = path[len("slowread://"):]
        return super()._strip_protocol(path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        if "/00000" in path and not path.endswith(".json"):
            time.sleep(self.delay)
        return super().cat_file(path, start=start, end=end, **kwargs)

    def _open(self, path, mode="rb", *args, **kwargs):
        f = super()._open(path, mode, *args, **kwargs)
        if "r" in mode and "/00000" in path and not path.endswith(".json"):
            return Slowed(f, self.delay)
        return f


@pytest.fixture
def slow_reads(monkeypatch):
    fsspec.register_implementation("slowread", SlowReadFS, clobber=True)
    monkeypatch.setattr(SlowReadFS, "delay", 0.0)
    monkeypatch.setenv("SPOTRUN_RESTORE_PROGRESS_S", "0.2")
    # Every read must come from the (slow) run URL, not this machine's copy of the newest
    # checkpoint (spotrun.recovery.local), which would make the restore instant.
    monkeypatch.setenv("SPOTRUN_LOCAL_DIR", "off")
    return SlowReadFS


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_checkpointer_restore_shows_progress_and_the_resumed_size(tmp_path, slow_reads, caplog):
    caplog.set_level(logging.INFO, logger="spotrun")
    url = f"slowread://{tmp_path / 'run'}"
    model = torch.nn.Linear(64, 64)
    with spotrun.Checkpointer(url, model=model, watchers=[], handle_signals=False,
                              async_save=False) as ck:
        ck.restore()
        ck.step(3)
        ck.save()
    committed = [m for m in _messages(caplog) if m.startswith("checkpoint at step 3 committed")]
    assert committed and re.search(r"\(\d+(\.\d+)? KiB,", committed[0]), committed  # not "0.0 MB"
    caplog.clear()
    slow_reads.delay = 1.0  # each checkpoint file read takes a second: five progress ticks
    with spotrun.Checkpointer(url, model=torch.nn.Linear(64, 64), watchers=[],
                              handle_signals=False) as ck:
        assert ck.restore() == 3
    messages = _messages(caplog)
    progress = [m for m in messages if m.startswith("restoring from slowread://")]
    assert any("reading step 3: rank-00000.pt" in m for m in progress), messages
    assert all(re.search(r"read in \d+s \(.+/s\)$", m) for m in progress), progress
    resumed = [m for m in messages if m.startswith("resumed from step 3 at ")]
    assert resumed and re.search(r"\(\d+(\.\d+)? KiB, restored in \d+\.\d\ds[;)]", resumed[0]), resumed


def test_trainer_download_shows_progress_bytes_and_the_resumed_size(tmp_path, slow_reads, caplog):
    caplog.set_level(logging.INFO, logger="spotrun")
    url = f"slowread://{tmp_path / 'run'}"
    folder = tmp_path / "trainer-out"
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"x" * 300_000)
    (folder / "state.json").write_text("{}")
    session = RunSession(url, watchers=[], handle_signals=False)
    session.start()
    session.training_started(0)
    session.commit_folder(7, str(folder))
    session.close("stopped")
    caplog.clear()
    slow_reads.delay = 0.5
    session = RunSession(url, watchers=[], handle_signals=False)
    local = session.resume_dir(str(tmp_path / "local"))
    session.close("stopped")
    assert local is not None and Path(local, "model.bin").read_bytes() == b"x" * 300_000
    messages = _messages(caplog)
    progress = [m for m in messages if m.startswith("restoring from slowread://")]
    assert any("downloading step 7: model.bin" in m for m in progress), messages
    # Bytes are counted as they arrive: a line after the big file shows them, with a rate.
    assert any(f"{format_bytes(300_000)} of" in m and "/s)" in m for m in progress), progress
    resumed = [m for m in messages if m.startswith("resuming from step 7 at ")]
    assert resumed and re.search(r"\(\d+ KiB, read and verified in \d+\.\d\ds\)$", resumed[0]), resumed


def test_no_progress_lines_when_turned_off(tmp_path, slow_reads, caplog, monkeypatch):
    monkeypatch.setenv("SPOTRUN_RESTORE_PROGRESS_S", "0")
    caplog.set_level(logging.INFO, logger="spotrun")
    url = f"slowread://{tmp_path / 'run'}"
    with spotrun.Checkpointer(url, model=torch.nn.Linear(4, 4), watchers=[],
                              handle_signals=False, async_save=False) as ck:
        ck.restore()
        ck.step(1)
        ck.save()
    slow_reads.delay = 0.5
    with spotrun.Checkpointer(url, model=torch.nn.Linear(4, 4), watchers=[],
                              handle_signals=False) as ck:
        assert ck.restore() == 1
    assert not [m for m in _messages(caplog) if m.startswith("restoring from")]
