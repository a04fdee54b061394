"""What a restart waits for that is only idle: torch's c10d rendezvous polls (issue 22).

torch's dynamic rendezvous makes every node that joined a round poll the store once a second
(``_delay(seconds=1)``) until the round closes, so all nodes but the last to join start their
workers up to 1 s late. :func:`spotrun.distributed.quick_rendezvous_polls` shortens that one
delay. A real c10d rendezvous of three handlers (TCPStore on 127.0.0.1, threads of this
process) checks that the installed torch really waits through the patched function and with
the shortened poll, not the second: the test that fails when torch's private rendezvous
changes under the patch. Timing itself is measured in scripts/bench_recovery.py, not here.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time

import pytest

from spotrun import distributed as sd


@pytest.fixture
def delays(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every delay torch's rendezvous asks the real ``_delay`` for, once patched (recorded);
    the poll is torch's again after the test (other tests rendezvous in this process)."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr

    torch_delay = getattr(dr._delay, "_spotrun_original", dr._delay)
    seen: list[object] = []

    def recording(seconds: float | tuple[float, float]) -> None:
        seen.append(seconds)
        torch_delay(seconds)

    monkeypatch.setattr(dr, "_delay", recording)  # put back after the test
    monkeypatch.setattr(sd, "_rdzv_poll", [None])
    return seen


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When the rendezvous state was read from the store (each real poll is one read)."""
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

    seen: list[float] = []
    real = C10dRendezvousBackend.get_state

    def get_state(self: object) -> object:
        seen.append(time.monotonic())
        return real(self)  # type: ignore[arg-type]

    monkeypatch.setattr(C10dRendezvousBackend, "get_state", get_state)
    return seen


def _rendezvous(n: int, run_id: str, late_s: float) -> dict[int, float]:
    """A real c10d rendezvous of ``n`` handlers; the last joins ``late_s`` after the others.
    When each handler's ``next_rendezvous`` returned (monotonic), by handler index, and under
    -1 when the late one was started."""
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        DynamicRendezvousHandler,
        RendezvousTimeout,
    )

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    handlers = []
    for _ in range(n):
        store = TCPStore("127.0.0.1", server.port, is_master=False, timeout=datetime.timedelta(seconds=60))
        handlers.append(DynamicRendezvousHandler.from_backend(
            run_id, store, C10dRendezvousBackend(store, run_id), n, n, local_addr="127.0.0.1",
            timeout=RendezvousTimeout(join=datetime.timedelta(seconds=60))))
    done: dict[int, float] = {}
    errors: list[BaseException] = []

    def join(i: int) -> None:
        try:
            handlers[i].next_rendezvous()
            done[i] = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=join, args=(i,), daemon=True) for i in range(n)]
    for t in threads[:-1]:
        t.start()
    time.sleep(late_s)
    done[-1] = time.monotonic()
    threads[-1].start()
    for t in threads:
        t.join(timeout=90)
    assert not errors, errors
    assert len(done) == n + 1, "a rendezvous handler never returned"
    for h in handlers:  # stop the keep-alive threads
        h.shutdown()
    return done


def test_a_waiting_node_reads_the_rendezvous_state_at_the_short_interval(delays, reads):
    # Fails without the patch: torch's executor sleeps 1 s between polls and its state holder
    # serves a poll from its cache for 1 s, so two nodes waiting 1.5 s read the store a few
    # times, not dozens.
    assert sd.quick_rendezvous_polls(0.05)
    done = _rendezvous(3, "quick-polls", late_s=1.5)
    polls = [d for d in delays if not isinstance(d, tuple)]
    assert polls and set(polls) == {0.05}, delays
    waiting = [t for t in reads if t < done[-1]]  # reads while the late node had not started
    assert len(waiting) >= 20, f"{len(waiting)} reads of the rendezvous state in 1.5 s"


def test_torchs_pace_comes_back_with_one_second_and_a_second_call_takes_effect(delays, reads):
    assert sd.quick_rendezvous_polls(0.05)
    assert sd.quick_rendezvous_polls(1.0)  # an agent runs torchrun once per attempt
    done = _rendezvous(3, "torch-pace", late_s=1.5)
    assert {d for d in delays if not isinstance(d, tuple)} <= {1}
    assert any(isinstance(d, tuple) for d in delays)  # the first round's random skew, as torch
    waiting = [t for t in reads if t < done[-1]]
    assert len(waiting) <= 12, f"{len(waiting)} reads of the rendezvous state in 1.5 s"


def test_a_bad_poll_setting_is_named_and_the_default_used(monkeypatch, caplog):
    monkeypatch.setenv(sd.RDZV_POLL_ENV, "fast")
    with caplog.at_level(logging.WARNING, logger="spotrun.distributed"):
        assert sd._rdzv_poll_s() == sd.RDZV_POLL_S
    assert sd.RDZV_POLL_ENV in caplog.text and "0.01-1" in caplog.text
    monkeypatch.setenv(sd.RDZV_POLL_ENV, "0.25")
    assert sd._rdzv_poll_s() == 0.25


def test_a_torch_that_does_not_poll_so_keeps_its_pace(monkeypatch, caplog):
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr

    class Other:  # a rendezvous executor that waits some other way
        def run(self) -> None:
            return None

    monkeypatch.setattr(dr, "_DistributedRendezvousOpExecutor", Other)
    monkeypatch.setattr(sd, "_rdzv_poll", [None])
    before = dr._delay
    with caplog.at_level(logging.INFO, logger="spotrun.distributed"):
        assert not sd.quick_rendezvous_polls()
    assert dr._delay is before and "keeping its own pace" in caplog.text


def test_the_poll_grows_with_the_nodes_and_the_setting_wins(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.delenv(sd.RDZV_POLL_ENV, raising=False)
    assert sd._scaled_poll(SimpleNamespace(nnodes="3")) == sd.RDZV_POLL_S
    assert sd._scaled_poll(SimpleNamespace(nnodes="2:16")) == sd.RDZV_POLL_S
    assert sd._scaled_poll(SimpleNamespace(nnodes="64")) == pytest.approx(0.4)
    assert sd._scaled_poll(SimpleNamespace(nnodes="8:1000")) == 1.0  # never slower than torch
    monkeypatch.setenv(sd.RDZV_POLL_ENV, "0.2")
    assert sd._scaled_poll(SimpleNamespace(nnodes="64")) is None  # quick_rendezvous_polls reads it
