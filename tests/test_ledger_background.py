"""Ledger writes never block training (issue 9, item 8).

``hangmem://`` is in-memory storage (fsspec's memory filesystem) whose ledger writes hang
until the test releases them, like an S3 endpoint that accepts a connection and never answers.
Checkpoints themselves go through the same storage untouched, so the run really trains and
commits while its ledger is stuck.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import ClassVar

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

import spotrun
from spotrun.format.commit import find_latest_valid
from spotrun.records.events import TrainingResumed
from spotrun.records.layout import LEDGER_DIR
from spotrun.records.ledger import BackgroundLedger, Ledger
from spotrun.storage import Storage


class HangMemFS(MemoryFileSystem):
    """Memory storage whose ledger writes block while ``HangMemFS.hang`` is clear."""

    protocol = ("hangmem",)
    store: ClassVar[dict] = {}
    pseudo_dirs: ClassVar[list] = [""]
    release = threading.Event()
    entered = threading.Event()  # set once a ledger write is stuck

    @classmethod
    def _is_ledger(cls, path: str) -> bool:
        return f"/{LEDGER_DIR}/" in "/" + str(path).lstrip("/")

    def _open(self, path, mode="rb", *args, **kwargs):
        if "w" in mode and self._is_ledger(path):
            HangMemFS.entered.set()
            HangMemFS.release.wait()
        return super()._open(path, mode, *args, **kwargs)

    def exists(self, path, **kwargs):
        if self._is_ledger(path):
            HangMemFS.entered.set()
            HangMemFS.release.wait()
        return super().exists(path, **kwargs)


fsspec.register_implementation("hangmem", HangMemFS, clobber=True)


@pytest.fixture()
def hanging(monkeypatch):
    monkeypatch.setenv("SPOTRUN_NOTICE_SOURCE", "none")
    HangMemFS.store.clear()
    HangMemFS.pseudo_dirs[:] = [""]
    HangMemFS.release.clear()
    HangMemFS.entered.clear()
    yield
    HangMemFS.release.set()  # let the abandoned writer threads finish


def _events(url: str) -> list[str]:
    return [r["event"] for r in Ledger(Storage(url)).records()]


def test_hanging_ledger_does_not_block_enter_or_steps(hanging, monkeypatch, caplog):
    monkeypatch.setenv("SPOTRUN_LEDGER_FLUSH_S", "0.5")
    url = "hangmem://run"
    model = torch.nn.Linear(4, 4)
    with caplog.at_level(logging.WARNING, logger="spotrun"):
        t0 = time.monotonic()
        with spotrun.Checkpointer(url, model=model, every_steps=2, async_save=False,
                                  handle_signals=False) as ck:
            entered = time.monotonic() - t0
            for _ in ck.range(6):
                pass
        took = time.monotonic() - t0
    # The first ledger write (segment_started) really was stuck the whole time.
    assert HangMemFS.entered.is_set()
    assert entered < 3.0, entered
    # 6 steps, 3 commits + the final one, then a flush bounded at 0.5 s.
    assert took < 10.0, took
    info = find_latest_valid(Storage(url))
    assert info is not None and info.step == 6
    assert ck.finished
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("spotrun")]
    assert any("not written within" in m and "SPOTRUN_LEDGER_FLUSH_S" in m for m in messages), \
        messages


def _tick(i: int) -> TrainingResumed:
    """A small event whose record carries ``step=i`` at time 1000 + i (so order is checkable)."""
    return TrainingResumed(segment_id="s", step=i, process_started_at=1000.0 + i,
                           first_step_at=1000.0 + i)


def test_records_beyond_the_queue_are_dropped_with_one_warning(hanging, caplog):
    storage = Storage("hangmem://drops")
    writer = BackgroundLedger(Ledger(storage), max_pending=3, slow_after=0.2)
    with caplog.at_level(logging.WARNING, logger="spotrun"):
        t0 = time.monotonic()
        accepted = [writer.submit(_tick(i)) for i in range(10)]
        assert HangMemFS.entered.wait(5)
        time.sleep(0.3)
        writer.submit(_tick(10))  # notices the hanging write
        took = time.monotonic() - t0
        assert took < 2.0
        assert writer.flush(0.2) is False  # bounded, and says it did not finish
    # One in the writer's hands, three waiting; the rest dropped.
    assert accepted.count(True) in (3, 4) and writer.dropped >= 6
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("spotrun")]
    assert len([m for m in messages if "not keeping up" in m]) == 1, messages
    assert len([m for m in messages if "has been running for" in m]) == 1, messages
    HangMemFS.release.set()
    assert writer.close(10.0)
    seqs = [r["step"] for r in Ledger(storage).records()]
    assert seqs == [i for i, ok in enumerate(accepted) if ok]  # the accepted ones, in order


def test_normal_run_writes_every_record_with_event_times(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTRUN_NOTICE_SOURCE", "none")
    url = str(tmp_path / "run")
    before = time.time()
    with spotrun.Checkpointer(url, model=torch.nn.Linear(2, 2), every_steps=2,
                              handle_signals=False) as ck:
        for _ in ck.range(4):
            pass
    # Nothing left behind: every record is on disk when the with-block returns.
    records = Ledger(Storage(url)).records()
    events = [r["event"] for r in records]
    assert events[0] == "segment_started" and events[-1] == "segment_ended"
    assert "training_resumed" in events and events.count("checkpoint_committed") >= 2
    (end,) = [r for r in records if r["event"] == "segment_ended"]
    assert end["reason"] == "finished" and end["time"] == end["ended_at"]
    (start,) = [r for r in records if r["event"] == "segment_started"]
    assert start["time"] == start["started_at"] <= before + 1
    for r in records:
        if r["event"] == "checkpoint_committed":
            assert r["time"] == r["committed_at"]


def test_slow_but_working_storage_still_gets_every_record(tmp_path):
    # A writer slower than the producer: nothing dropped while the queue has room, and the
    # flush waits for all of them.
    storage = Storage(str(tmp_path / "slow"))
    ledger = Ledger(storage)
    real_append = ledger.append

    def slow_append(*a, **k):
        time.sleep(0.02)
        return real_append(*a, **k)

    ledger.append = slow_append  # type: ignore[method-assign]
    writer = BackgroundLedger(ledger)
    t0 = time.monotonic()
    for i in range(40):
        assert writer.submit(_tick(i))
    assert time.monotonic() - t0 < 0.5  # submitting 40 took no write time
    assert writer.close(30.0)
    records = Ledger(storage).records()
    assert [r["step"] for r in records] == list(range(40))
    assert [r["time"] for r in records] == [1000.0 + i for i in range(40)]
