"""The wrapper core shared by the Checkpointer and the trainer integrations (issue 21):
the same knobs are refused the same way by both, before anything is held."""

from __future__ import annotations

import signal

import pytest
import torch

import spotrun
from spotrun.errors import ConfigError
from spotrun.integrations._session import RunSession


def _checkpointer(url: str) -> None:
    with spotrun.Checkpointer(url, model=torch.nn.Linear(2, 2), watchers=[]):
        pass


def _session(url: str) -> None:
    session = RunSession(url, watchers=[])
    session.start()
    session.close("stopped")


@pytest.mark.parametrize("wrapper", [_checkpointer, _session], ids=["checkpointer", "session"])
@pytest.mark.parametrize(("name", "value"), [
    ("SPOTRUN_STOP_TIMEOUT", "-1"),
    ("SPOTRUN_STOP_MARGIN", "-0.5"),
    ("SPOTRUN_STOP_TIMEOUT", "soon"),
    ("SPOTRUN_LEDGER_FLUSH_S", "nan"),
])
def test_bad_stop_knobs_are_refused_at_the_start_by_every_wrapper(tmp_path, monkeypatch, wrapper,
                                                                  name, value):
    monkeypatch.setenv(name, value)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ConfigError, match=name) as info:
        wrapper(str(tmp_path / "run"))
    assert "\n" not in str(info.value)
    # Refused before anything was taken: no handler left behind, no lease held.
    assert signal.getsignal(signal.SIGTERM) == before
    monkeypatch.delenv(name)
    wrapper(str(tmp_path / "run"))  # the run starts once the value is fixed


@pytest.mark.parametrize("wrapper", [_checkpointer, _session], ids=["checkpointer", "session"])
def test_zero_stop_knobs_are_accepted(tmp_path, monkeypatch, wrapper):
    monkeypatch.setenv("SPOTRUN_STOP_TIMEOUT", "0")
    monkeypatch.setenv("SPOTRUN_STOP_MARGIN", "0")
    wrapper(str(tmp_path / "run"))


def test_all_damaged_policy_is_checked_by_both_wrappers(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTRUN_IF_ALL_DAMAGED", "sure")
    with pytest.raises(ConfigError, match="SPOTRUN_IF_ALL_DAMAGED"):
        spotrun.Checkpointer(str(tmp_path / "a"), model=torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="SPOTRUN_IF_ALL_DAMAGED"):
        RunSession(str(tmp_path / "b"))


def test_a_missed_deadline_still_gives_open_uploads_time_to_be_aborted(tmp_path, monkeypatch):
    """At the deadline itself (SPOTRUN_STOP_MARGIN=0: no time left) the uploads the abandoned
    save opened still get a bounded chance to be aborted before the process leaves 143."""
    import time

    from spotrun.checkpoint import segment as segment_mod
    from spotrun.notices import Notice
    from spotrun.records.layout import EXIT_STOP_UNSAVED
    from spotrun.storage import Storage

    seg = segment_mod.RunSegment(Storage(str(tmp_path / "run")), handle_signals=False, watchers=[])
    seg.interrupts.stop_notice = Notice(source="ec2", action="terminate", stop=True,
                                        detected_at=time.time() - 120, deadline=time.time() - 1)
    budgets: list[float] = []
    exits: list[int] = []
    monkeypatch.setattr(segment_mod.inflight, "abort_all", budgets.append)
    monkeypatch.setattr(segment_mod, "_exit_now", exits.append)
    seg.leave_abandoned()
    assert exits == [EXIT_STOP_UNSAVED]
    assert budgets and budgets[0] >= segment_mod.ABORT_MIN_S > 0  # was 0 s: nothing went out
