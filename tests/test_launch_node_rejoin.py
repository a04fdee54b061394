"""The node agent's rejoin loop (``python -m spotrun.launch.node --rejoin-timeout S``), in
process: after an interrupted attempt a node whose machine stays waits, bounded, for a
cluster file of a later attempt naming it; anything else and it exits with torchrun's code.
The survivors rejoining a real 2-node job is tests/test_launch_local_nodes.py's e2e."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from spotrun.launch import node
from spotrun.launch.node import (
    ClusterSpec,
    attempt_exit_file,
    node_argv,
    read_attempt_exit,
    wait_for_next_cluster,
    write_attempt_exit,
    write_cluster,
)
from spotrun.notices.fake_server import FakeMetadataServer
from spotrun.storage import Storage


def _spec(segment: str, attempt: int, ids=("a", "b", "c"), host: int = 0) -> ClusterSpec:
    return ClusterSpec(segment=segment, nodes=[{"instance_id": i, "address": "127.0.0.1"} for i in ids],
                       nproc_per_node=1, rdzv_id=f"run-{segment}", port=29500, host=host, attempt=attempt)


def test_waits_for_a_later_attempt_and_never_goes_back(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    first = _spec("a1", 1)
    write_cluster(storage, first)
    # Its own attempt again (a controller rewriting it) or an older one: not joined.
    assert wait_for_next_cluster(storage, "b", first, timeout_s=0.3, poll_s=0.05) is None
    write_cluster(storage, _spec("a0", 0))
    assert wait_for_next_cluster(storage, "b", first, timeout_s=0.3, poll_s=0.05) is None
    # A later one written while it waits: joined at once, with a survivor hosting the store.
    later = _spec("a2", 2, ids=("a", "x", "c"), host=2)
    threading.Timer(0.3, write_cluster, (storage, later)).start()
    t0 = time.monotonic()
    got = wait_for_next_cluster(storage, "c", first, timeout_s=10, poll_s=0.05)
    assert got == later and time.monotonic() - t0 < 5
    argv = node_argv(got, "c", ["python", "t.py"])
    assert "is_host=1,spotrun_slot=2" in argv and argv[argv.index("--rdzv-endpoint") + 1] == "127.0.0.1:29500"
    assert "is_host=0,spotrun_slot=0" in node_argv(got, "a", ["python", "t.py"])


def test_exit_notes_per_attempt(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    assert read_attempt_exit(storage, "a1", "b") is None
    write_attempt_exit(storage, "a1", "b", 75)
    assert read_attempt_exit(storage, "a1", "b") == 75 and read_attempt_exit(storage, "a2", "b") is None
    assert json.loads((tmp_path / attempt_exit_file("a1", "b")).read_text())["exit_code"] == 75
    (tmp_path / attempt_exit_file("a1", "c")).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / attempt_exit_file("a1", "c")).write_text('{"exit_code": true}')  # no code
    assert read_attempt_exit(storage, "a1", "c") is None
    with pytest.raises(Exception, match="segment '../x'"):
        attempt_exit_file("../x", "b")


@pytest.mark.parametrize("code, signalled", [(0, False), (3, False), (130, True), (143, True)])
def test_no_rejoin_after_a_finish_a_failure_or_a_signal(tmp_path: Path, code: int, signalled: bool) -> None:
    storage = Storage(str(tmp_path))
    write_cluster(storage, _spec("a2", 2))
    assert node._rejoin(storage, "b", _spec("a1", 1), code, timeout_s=5, poll_s=0.05,
                        signalled=signalled) == (None, code)


@pytest.mark.parametrize("code", [130, 143])
def test_rejoin_when_only_the_workers_were_signalled(tmp_path: Path, code: int) -> None:
    """143: the workers' stop checkpoint missed its deadline (a peer's notice stopped them);
    the agent itself got no signal, so its machine stays and joins the next attempt."""
    storage = Storage(str(tmp_path))
    write_cluster(storage, _spec("a2", 2))
    assert node._rejoin(storage, "b", _spec("a1", 1), code, timeout_s=5, poll_s=0.05) == (_spec("a2", 2), 75)


def test_no_rejoin_without_a_timeout_or_when_the_wait_runs_out(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    first = _spec("a1", 1)
    write_cluster(storage, first)
    assert node._rejoin(storage, "b", first, 1, timeout_s=0, poll_s=0.05) == (None, 1)  # today's behaviour
    t0 = time.monotonic()
    # Gave up waiting after a peer's loss: interrupted (75), not the command failing (1).
    assert node._rejoin(storage, "b", first, 1, timeout_s=0.4, poll_s=0.05) == (None, 75)
    assert 0.3 < time.monotonic() - t0 < 5


def test_a_machine_with_its_own_notice_does_not_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Storage(str(tmp_path))
    write_cluster(storage, _spec("a2", 2))
    with FakeMetadataServer("ec2") as imds:
        monkeypatch.setenv("SPOTRUN_NOTICE_SOURCE", "ec2")
        monkeypatch.setenv("SPOTRUN_IMDS_ENDPOINT", imds.url)
        # No notice here: it rejoins the later attempt.
        assert node._rejoin(storage, "b", _spec("a1", 1), 1, timeout_s=5, poll_s=0.05) == (_spec("a2", 2), 75)
        imds.post_interruption("terminate", in_seconds=120)
        assert node._rejoin(storage, "b", _spec("a1", 1), 1, timeout_s=5, poll_s=0.05) == (None, 1)


def test_a_signal_while_waiting_ends_the_wait(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    first = _spec("a1", 1)
    write_cluster(storage, first)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    before = signal.getsignal(signal.SIGTERM)
    t0 = time.monotonic()
    assert node._rejoin(storage, "b", first, 1, timeout_s=30, poll_s=0.05) == (None, 75)
    assert time.monotonic() - t0 < 10 and signal.getsignal(signal.SIGTERM) is before


def _stub_torchrun(monkeypatch: pytest.MonkeyPatch, fake, agent_signal=None) -> None:
    """spotrun.distributed without importing torch (seconds on a loaded box)."""
    import spotrun

    module = types.ModuleType("spotrun.distributed")
    module.torchrun = fake  # type: ignore[attr-defined]
    if agent_signal is not None:
        module.last_agent_signal = agent_signal  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "spotrun.distributed", module)
    monkeypatch.setattr(spotrun, "distributed", module, raising=False)


def test_main_loops_once_per_attempt_and_notes_each_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """main() with torchrun stubbed: attempt a1 interrupted (75), the launcher writes a2
    naming this node, a2 finishes (0): two runs, two notes, exit 0."""
    storage = Storage(str(tmp_path))
    write_cluster(storage, _spec("a1", 1))
    runs: list[list[str]] = []

    def fake_torchrun(argv: list[str]) -> int:
        runs.append(argv)
        if len(runs) == 1:
            write_cluster(storage, _spec("a2", 2, ids=("a", "b", "z")))
            return 75
        return 0

    _stub_torchrun(monkeypatch, fake_torchrun)
    monkeypatch.setenv("SPOTRUN_URL", str(tmp_path))
    monkeypatch.setenv("SPOTRUN_INSTANCE_ID", "b")
    assert node.main(["--poll", "0.05", "--rejoin-timeout", "5", "--", "python", "t.py"]) == 0
    assert [r[r.index("--rdzv-id") + 1] for r in runs] == ["run-a1", "run-a2"]
    assert read_attempt_exit(storage, "a1", "b") == 75 and read_attempt_exit(storage, "a2", "b") == 0
    # Without --rejoin-timeout (today's behaviour): one run, torchrun's code.
    runs.clear()
    write_cluster(storage, _spec("a3", 3))
    _stub_torchrun(monkeypatch, lambda argv: runs.append(argv) or 75)
    assert node.main(["--poll", "0.05", "--", "python", "t.py"]) == 75 and len(runs) == 1


def test_a_signal_right_after_torchrun_is_heard_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun leaves its own SIGTERM handler (raising its SignalException, an Exception)
    installed after it returns. The launcher's SIGTERM to a lost machine's agent arrived while
    it asked the metadata service for a notice, inside a broad except: swallowed, and the
    agent waited out its whole rejoin timeout (the launcher its whole grace period)."""

    class SignalException(Exception):  # torch.distributed.elastic's, in shape
        pass

    def torchrun_like(argv: list[str]) -> int:
        def handler(signum, frame):
            raise SignalException(f"Process {os.getpid()} got signal: {signum}")

        signal.signal(signal.SIGTERM, handler)
        return 75

    def watchers_signalled(**_kw):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        return []

    import spotrun.notices.detect as detect

    before = signal.getsignal(signal.SIGTERM)
    storage = Storage(str(tmp_path))
    write_cluster(storage, _spec("a1", 1))
    _stub_torchrun(monkeypatch, torchrun_like)
    monkeypatch.setattr(detect, "watchers_from_env", watchers_signalled)
    monkeypatch.setenv("SPOTRUN_URL", str(tmp_path))
    monkeypatch.setenv("SPOTRUN_INSTANCE_ID", "b")
    t0 = time.monotonic()
    try:
        assert node.main(["--poll", "0.05", "--rejoin-timeout", "30", "--", "python", "t.py"]) == 75
    finally:
        signal.signal(signal.SIGTERM, before)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("bad", ["nan", "inf", "-1", "soon"])
def test_a_bad_rejoin_timeout_is_refused_at_parse(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        node.main(["--rejoin-timeout", bad, "--", "python", "t.py"])
    assert exc.value.code == 2 and "--rejoin-timeout" in capsys.readouterr().err


@pytest.mark.parametrize("agent_signal, runs_expected, code_expected", [(None, 2, 0), (15, 1, 143)])
def test_main_rejoins_after_143_only_when_the_agent_was_not_signalled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, agent_signal, runs_expected: int, code_expected: int) -> None:
    """torchrun returns 143 both when its workers alone missed the stop deadline and when the
    agent itself was signalled (the machine shutting down); the node asks which."""
    storage = Storage(str(tmp_path))
    write_cluster(storage, _spec("a1", 1))
    runs: list[list[str]] = []

    def fake_torchrun(argv: list[str]) -> int:
        runs.append(argv)
        if len(runs) == 1:
            write_cluster(storage, _spec("a2", 2))
            return 143
        return 0

    _stub_torchrun(monkeypatch, fake_torchrun, agent_signal=lambda: agent_signal)
    monkeypatch.setenv("SPOTRUN_URL", str(tmp_path))
    monkeypatch.setenv("SPOTRUN_INSTANCE_ID", "b")
    assert node.main(["--poll", "0.05", "--rejoin-timeout", "5", "--", "python", "t.py"]) == code_expected
    assert len(runs) == runs_expected and read_attempt_exit(storage, "a1", "b") == 143
