"""Issue 23 item 3: the "stop after ..." line is truthful. A notice posted with a short lead
(the local simulator's 5 s grace) is not reported as posted two minutes before its deadline,
and a signal is reported as a signal, not as a notice "posted ?"."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
from helpers import Inbox, wait_until

from spotrun.notices import Ec2Watcher
from spotrun.notices.ec2 import ACTION_PATH, NOTICE_LEAD_S
from spotrun.notices.fake_server import FakeMetadataServer

POLL = 0.1


def test_a_short_lead_notice_is_posted_after_the_last_empty_poll() -> None:
    inbox = Inbox()
    with FakeMetadataServer("ec2") as imds:
        w = Ec2Watcher(imds.url, poll_interval=POLL)
        w.start(inbox)
        try:
            assert wait_until(lambda: sum(p == ACTION_PATH for _, p, _ in imds.requests) >= 2, timeout=10)
            before = time.time()
            deadline = imds.post_interruption("terminate", in_seconds=5)
            assert inbox.arrived.wait(10)
        finally:
            w.stop()
    (n,) = inbox.items
    # Not deadline - 120 s (what a 2-minute lead would mean), but between the last poll that
    # found nothing and the poll that found it.
    assert n.notice_time is not None and n.notice_time > deadline - NOTICE_LEAD_S + 60
    assert before - POLL * 20 <= n.notice_time <= n.detected_at


def test_a_two_minute_notice_keeps_ec2s_rule() -> None:
    inbox = Inbox()
    with FakeMetadataServer("ec2") as imds:
        w = Ec2Watcher(imds.url, poll_interval=POLL)
        w.start(inbox)
        try:
            assert wait_until(lambda: any(p == ACTION_PATH for _, p, _ in imds.requests), timeout=10)
            deadline = imds.post_interruption("terminate", in_seconds=NOTICE_LEAD_S)
            assert inbox.arrived.wait(10)
        finally:
            w.stop()
    (n,) = inbox.items
    assert n.notice_time == pytest.approx(deadline - NOTICE_LEAD_S, abs=1.0)


def test_a_signal_is_logged_as_a_signal(tmp_path, caplog) -> None:
    import torch

    from spotrun.checkpoint import Checkpointer

    model = torch.nn.Linear(2, 1)
    with caplog.at_level(logging.INFO, logger="spotrun"):
        with pytest.raises(SystemExit) as stopped:
            with Checkpointer(str(tmp_path / "run"), model=model, every_steps=100,
                              async_save=False, watchers=[]) as ck:
                ck.step()
                os.kill(os.getpid(), signal.SIGTERM)  # handled: a stop request, not a death
                for _ in range(100):
                    ck.step()
    assert stopped.value.code == 75
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "stop after SIGTERM: received " in text and "committed" in text, text
    assert "posted ?" not in text and "stop after notice" not in text
