"""The launch house: one RunBook for segments, backends reached by the mode a run recorded,
and launchers that report events instead of printing."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spotrun.errors import LaunchError
from spotrun.launch import Backend, RunBook, backend_for, load_state, stop_run
from spotrun.launch.base import BACKENDS
from spotrun.records.instance import InstanceInfo
from spotrun.records.launch_state import LaunchState, Segment
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage


def test_every_registered_backend_imports_and_has_the_shape() -> None:
    for mode in BACKENDS:
        backend = backend_for(mode)
        assert isinstance(backend, Backend) and backend.mode == mode


def test_unknown_mode_names_the_fix() -> None:
    with pytest.raises(LaunchError, match=r"'k8s'.*upgrade spotrun"):
        backend_for("k8s")


def _launcher_records(storage: Storage) -> list[tuple[str, str, str | None]]:
    return [(r["event"], r["segment_id"], r.get("reason")) for r in Ledger(storage).records()
            if r.get("source") == "launcher"]


def test_run_book_writes_state_then_ledger_and_closes_open_segments(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "run"))
    storage.ensure_root(create=True)
    state = LaunchState(mode="local", run_id="r1", created_at=time.time())
    book = RunBook(storage, state, heartbeat_s=1.0)
    info = InstanceInfo(cloud="simulated", instance_id="sim-1", instance_type="g5.xlarge",
                        region="us-east-1", availability_zone="us-east-1a", market="spot")
    now = time.time()
    # Distinct times: the ledger orders records by time (ties by a random id).
    for i, sid in enumerate(("sim-1", "sim-2")):
        book.begin(Segment(segment_id=sid, instance_id=sid, instance_type="g5.xlarge", market="spot",
                           started_at=now + i), info)
    book.end(state.segments[0], "interrupted", ended_at=now + 2, exit_code=75, detail="notice")
    saved = load_state(storage)
    assert [s.segment_id for s in saved.segments] == ["sim-1", "sim-2"]
    assert saved.segments[0].end_reason == "interrupted" and saved.segments[0].exit_code == 75
    assert saved.heartbeat_at is not None  # a launcher's book stamps its heartbeat

    # A later writer that is not a launcher (spotrun stop) closes what is still open.
    later = RunBook(storage, load_state(storage))
    closed = later.close_open("stopped", "spotrun stop", ended_at=now + 3)
    assert [s.segment_id for s in closed] == ["sim-2"]
    assert load_state(storage).current is None
    assert _launcher_records(storage) == [
        ("segment_started", "sim-1", None), ("segment_started", "sim-2", None),
        ("segment_ended", "sim-1", "interrupted"), ("segment_ended", "sim-2", "stopped"),
    ]


def test_stop_reaches_the_local_backend_recorded_in_the_state(tmp_path: Path) -> None:
    """``stop`` dispatches on the recorded mode: a local run's launcher on this host gets SIGINT."""
    import socket

    storage = Storage(str(tmp_path / "run"))
    storage.ensure_root(create=True)
    # A stand-in launcher: a process that reports how it was stopped.
    proc = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                             "signal.signal(signal.SIGINT, lambda *a: sys.exit(42))\n"
                             "print('ready', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        state = LaunchState(mode="local", run_id="r2", created_at=time.time())
        RunBook(storage, state, heartbeat_s=0.1).save()
        state = load_state(storage)
        state.controller_pid, state.controller_host = proc.pid, socket.gethostname()
        RunBook(storage, state).save()
        result = stop_run(storage, wait_s=0)
        assert result["mode"] == "local" and result["signalled"] == proc.pid
        assert proc.wait(timeout=30) == 42
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
