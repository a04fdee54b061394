"""Growing a ``--min-nodes`` job back to N (issue 22 item 3): the node agent's planned stop
(spotrun/launch/grow.py) and the EC2 controller's re-ask (spotrun/launch/ec2_grow.py).

- in process, torchrun stubbed: a node running an attempt sees a newer cluster file that
  grows, SIGTERMs its own torchrun once torchrun's handler is in place, and joins that
  attempt whatever the code; a newer file that does not grow is left for the rejoin wait;
- real processes: 143 from workers that missed their stop deadline rejoins, 143 from an agent
  that got the signal itself does not (``spotrun.distributed.last_agent_signal``); a real
  2-node job on ``tests/scripts/ddp_train.py`` stops at a step on a grow file and finishes in
  the grown attempt, bit-exact against the uninterrupted reference;
- moto EC2: a 3-node job shrunk to 2 re-asks for the missing node with a backoff, and on
  capacity writes the grown attempt (3 nodes, survivors kept in their slots, ``grow``) and a
  ``recovery_started`` record of mode ``grow``; ``spotrun status``/``cost`` count it.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from spotrun.launch import node
from spotrun.launch.node import ClusterSpec, read_attempt_exit, write_cluster
from spotrun.storage import Storage


def _spec(segment: str, attempt: int, ids=("a", "b"), *, grow: bool = False, port: int = 29500) -> ClusterSpec:
    return ClusterSpec(segment=segment, nodes=[{"instance_id": i, "address": "127.0.0.1"} for i in ids],
                       nproc_per_node=1, rdzv_id=f"run-{segment}", port=port, attempt=attempt, grow=grow)


def _stub_torchrun(monkeypatch: pytest.MonkeyPatch, fake, agent_signal=lambda: None) -> None:
    """spotrun.distributed without importing torch (seconds on a loaded box)."""
    import spotrun

    module = types.ModuleType("spotrun.distributed")
    module.torchrun = fake  # type: ignore[attr-defined]
    module.last_agent_signal = agent_signal  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "spotrun.distributed", module)
    monkeypatch.setattr(spotrun, "distributed", module, raising=False)


class _Signalled(Exception):
    """torch.distributed.elastic's SignalException, in shape."""


def test_a_grow_file_stops_the_running_attempt_and_the_node_joins_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attempt a2 (the survivor alone) runs; the controller writes a3 (grow, 2 nodes): the
    agent's SIGTERM reaches torchrun's handler (installed a moment after torchrun starts, as
    torch's PContext does), torchrun returns 75, the node runs a3, which finishes."""
    storage = Storage(str(tmp_path))
    write_cluster(storage, _spec("a2", 2, ids=("a",)))
    runs: list[str] = []
    got: list[float] = []

    def torchrun_like(argv: list[str]) -> int:
        runs.append(argv[argv.index("--rdzv-id") + 1])
        if len(runs) > 1:
            return 0
        signalled: list[int] = []
        time.sleep(0.3)  # the rendezvous: no handler of torchrun's yet (a SIGTERM would kill)
        signal.signal(signal.SIGTERM, lambda signum, _f: signalled.append(signum))
        threading_write = _later(0.2, lambda: write_cluster(storage, _spec("a3", 3, ids=("a", "z"), grow=True)))
        t0 = time.monotonic()
        while not signalled:
            assert time.monotonic() - t0 < 20, "no planned stop"
            time.sleep(0.01)
        got.append(time.monotonic() - t0)
        threading_write.join()
        return 75  # the ranks committed at one step

    before = signal.getsignal(signal.SIGTERM)
    _stub_torchrun(monkeypatch, torchrun_like)
    monkeypatch.setenv("SPOTRUN_URL", str(tmp_path))
    monkeypatch.setenv("SPOTRUN_INSTANCE_ID", "a")
    try:
        assert node.main(["--poll", "0.05", "--rejoin-timeout", "5", "--", "python", "t.py"]) == 0
    finally:
        signal.signal(signal.SIGTERM, before)
    assert runs == ["run-a2", "run-a3"] and got and got[0] < 10
    assert read_attempt_exit(storage, "a2", "a") == 75 and read_attempt_exit(storage, "a3", "a") == 0


def test_a_newer_file_that_does_not_grow_sends_no_signal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replacement's file (no grow) while the attempt runs is not a planned stop: the
    attempt runs to its end; the node then joins it through the usual rejoin wait (75)."""
    storage = Storage(str(tmp_path))
    write_cluster(storage, _spec("a1", 1))
    runs: list[str] = []
    signalled: list[int] = []

    def torchrun_like(argv: list[str]) -> int:
        runs.append(argv[argv.index("--rdzv-id") + 1])
        if len(runs) > 1:
            return 0
        signal.signal(signal.SIGTERM, lambda signum, _f: signalled.append(signum))
        write_cluster(storage, _spec("a2", 2, ids=("a", "b", "c")))
        time.sleep(1.0)  # twenty looks of the watch
        return 75

    before = signal.getsignal(signal.SIGTERM)
    _stub_torchrun(monkeypatch, torchrun_like)
    monkeypatch.setenv("SPOTRUN_URL", str(tmp_path))
    monkeypatch.setenv("SPOTRUN_INSTANCE_ID", "b")
    try:
        assert node.main(["--poll", "0.05", "--rejoin-timeout", "5", "--", "python", "t.py"]) == 0
    finally:
        signal.signal(signal.SIGTERM, before)
    assert runs == ["run-a1", "run-a2"] and signalled == []


def test_the_planned_stop_raised_outside_torchruns_handling_still_joins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's handler stays installed after it returns; the watch's SIGTERM that lands as
    torchrun is starting (its old handler raising) ends the call with an exception: that is
    the planned stop, the node joins the grown attempt (and does not crash)."""
    storage = Storage(str(tmp_path))
    write_cluster(storage, _spec("a2", 2, ids=("a",)))
    runs: list[str] = []

    def raising(signum, _frame):
        raise _Signalled(f"got signal {signum}")

    def torchrun_like(argv: list[str]) -> int:
        runs.append(argv[argv.index("--rdzv-id") + 1])
        if len(runs) > 1:
            return 0
        write_cluster(storage, _spec("a3", 3, ids=("z", "a"), grow=True))
        time.sleep(20)  # interrupted by the handler's exception
        return 0

    before = signal.signal(signal.SIGTERM, raising)  # a previous attempt's torchrun handler
    _stub_torchrun(monkeypatch, torchrun_like)
    monkeypatch.setenv("SPOTRUN_URL", str(tmp_path))
    monkeypatch.setenv("SPOTRUN_INSTANCE_ID", "a")
    t0 = time.monotonic()
    try:
        assert node.main(["--poll", "0.05", "--rejoin-timeout", "5", "--", "python", "t.py"]) == 0
    finally:
        signal.signal(signal.SIGTERM, before)
    assert runs == ["run-a2", "run-a3"] and time.monotonic() - t0 < 15
    assert read_attempt_exit(storage, "a2", "a") == 1


def _later(delay: float, fn) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), fn()), daemon=True)
    thread.start()
    return thread
