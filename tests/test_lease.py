"""One writer per run (the lease) and stale temporaries: real processes on one run URL,
locally and on S3 (moto)."""

from __future__ import annotations

import io
import os
import signal
import socket
import threading
import time
import uuid
from contextlib import redirect_stdout

import pytest
from helpers import REPO, env_for, finish, spawn, wait_for_line, wait_until
from warmfork import WarmPython

from spotrun.cli import main as cli_main
from spotrun.format.commit import list_checkpoints
from spotrun.launch.status import format_status, run_status
from spotrun.records.layout import EXIT_FINISHED, EXIT_INTERRUPTED, LEASE
from spotrun.records.lease import STALE_TMP_S, Lease, LeaseInfo, read_lease
from spotrun.storage import Storage

SCRIPT = str(REPO / "tests" / "scripts" / "lease_train.py")


@pytest.fixture(params=["local", "s3"])
def url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/{uuid.uuid4().hex[:8]}"


def _trainer(url: str, segment: str, *args: str, warm: WarmPython | None = None, **env: str):
    """The trainer as a process of its own, or with ``warm`` a fork of the warm interpreter
    (conftest.py's ``warm_python``: no torch import, seconds each on a loaded box). A fork is
    a real process with a pid of its own, which is all the lease knows of a writer; but one
    runs at a time, so of two trainers alive together the first is a process of its own."""
    argv, child_env = [SCRIPT, *args], env_for(url, SPOTRUN_SEGMENT_ID=segment, **env)
    return spawn(argv, child_env) if warm is None else warm.spawn(argv, child_env)


def _fake_owner(**over) -> LeaseInfo:
    """A lease as a trainer on another machine would write it."""
    now = time.time()
    fields = dict(token=uuid.uuid4().hex, segment_id="elsewhere-1", host="other-host.example",
                  pid=4242, boot_id="", pid_started=None, world_size=1, acquired_at=now,
                  renewed_at=now, expires_at=now + 600, ttl_s=600.0)
    fields.update(over)
    return LeaseInfo(**fields)


def _refused(out: str, owner_segment: str, owner_pid: int | None = None) -> None:
    line = next((ln for ln in out.splitlines() if ln.startswith("spotrun.errors.LeaseHeldError")), None)
    assert line is not None, out
    assert "already has a writer" in line and f"segment {owner_segment}" in line, line
    assert "expires" in line and "stop that one" in line, line
    if owner_pid is not None:
        assert f"pid {owner_pid} on host {socket.gethostname()}" in line, line


def test_simultaneous_writers_one_trains(url, warm_python):
    a = _trainer(url, "seg-a", "100000")
    b = _trainer(url, "seg-b", "100000", warm=warm_python)
    procs = {"seg-a": a, "seg-b": b}
    # Exactly one of them exits (refused) while the other keeps training.
    assert wait_until(lambda: (a.poll() is None) != (b.poll() is None), timeout=90), "neither refused"
    loser_seg = "seg-a" if a.poll() is not None else "seg-b"
    winner_seg = "seg-b" if loser_seg == "seg-a" else "seg-a"
    loser, winner = procs[loser_seg], procs[winner_seg]
    code, out = finish(loser)
    assert code not in (0, EXIT_INTERRUPTED)
    _refused(out, winner_seg, winner.pid)
    assert "ready" not in out.splitlines()
    wait_for_line(winner, "ready", timeout=90)
    winner.send_signal(signal.SIGTERM)
    code, _ = finish(winner)
    assert code == EXIT_INTERRUPTED


def test_staggered_writer_refused_then_clean_exit_releases(url, warm_python):
    a = _trainer(url, "seg-a", "100000")
    wait_for_line(a, "ready", timeout=90)
    # ls and status name the owner while it runs.
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli_main(["ls", url]) == 0
    assert f"writer: held by segment seg-a, pid {a.pid} on host {socket.gethostname()}" in buf.getvalue()
    st = run_status(Storage(url), live=False)
    assert st["writer"]["segment_id"] == "seg-a" and st["writer"]["state"] == "held"
    assert "held by segment seg-a" in format_status(st)

    t0 = time.monotonic()
    code, out = finish(_trainer(url, "seg-b", "100000", warm=warm_python))
    assert code not in (0, EXIT_INTERRUPTED)
    _refused(out, "seg-a", a.pid)
    assert time.monotonic() - t0 < 60  # a live owner on this host: refused at once, no wait
    assert a.poll() is None  # the owner keeps training

    a.send_signal(signal.SIGTERM)
    code, _ = finish(a)
    assert code == EXIT_INTERRUPTED
    lease = read_lease(Storage(url))
    assert lease is not None and lease.released_at is not None and lease.segment_id == "seg-a"
    # Released: the next trainer starts at once even with a long TTL.
    t0 = time.monotonic()
    code, out = finish(_trainer(url, "seg-c", "40", "0.01", "20", warm=warm_python, SPOTRUN_LEASE_TTL="600"))
    assert code == EXIT_FINISHED, out
    assert "finished" in out and "released at" in out
    assert time.monotonic() - t0 < 120


def test_kill9_owner_relaunch_not_blocked(url, warm_python):
    a = _trainer(url, "seg-a", "100000", "0.05", "5", warm=warm_python, SPOTRUN_LEASE_TTL="600")
    wait_for_line(a, "step 6", timeout=90)
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=30)
    held = read_lease(Storage(url))
    assert held is not None and held.released_at is None and held.expires_at > time.time() + 300
    # Its pid is gone on this host: taken over at once, not after the 600 s TTL.
    t0 = time.monotonic()
    code, out = finish(_trainer(url, "seg-b", "20", "0.01", "10", warm=warm_python, SPOTRUN_LEASE_TTL="600"),
                       timeout=180)
    assert code == EXIT_FINISHED, out
    assert f"(pid {a.pid} on this host) is gone" in out
    assert time.monotonic() - t0 < 150


def test_other_host_owner_expiry_launcher_word_and_renewals(tmp_path, monkeypatch, warm_python):
    url = str(tmp_path / "run")
    st = Storage(url)
    st.ensure_root(create=True)
    # Held by a live-looking writer elsewhere, no waiting allowed: refused, naming it.
    owner = _fake_owner()
    tag = st.create_tagged(LEASE, owner.to_json())
    code, out = finish(_trainer(url, "seg-b", "5", "0.01", warm=warm_python, SPOTRUN_LEASE_WAIT="0"))
    assert code not in (0, EXIT_INTERRUPTED)
    assert "segment elsewhere-1, pid 4242 on host other-host.example" in out
    # The launcher says that segment's process ended: taken over at once.
    code, out = finish(_trainer(url, "seg-c", "5", "0.01", warm=warm_python,
                                SPOTRUN_LEASE_TAKEOVER="sim-0,elsewhere-1"))
    assert code == EXIT_FINISHED, out
    assert "the launcher saw segment elsewhere-1 end" in out

    # Not renewed and expiring in 3 s: the next writer waits it out, then takes over.
    found = st.read_tagged(LEASE)
    assert found is not None
    now = time.time()
    stale = _fake_owner(segment_id="elsewhere-2", renewed_at=now - 27, expires_at=now + 3, ttl_s=30.0)
    assert st.replace_tagged(LEASE, stale.to_json(), found[1]) is not None
    t0 = time.monotonic()
    code, out = finish(_trainer(url, "seg-d", "8", "0.01", warm=warm_python))
    assert code == EXIT_FINISHED, out
    assert "it expired at" in out and time.monotonic() - t0 >= 2.0

    # A writer elsewhere that keeps renewing is alive: refused before its lease expires.
    monkeypatch.setattr(socket, "gethostname", lambda: "other-host.example")
    lease = Lease(st, segment_id="elsewhere-3", ttl_s=20.0, heartbeat_s=0.5)
    lease.acquire()
    lease.start_heartbeat()
    try:
        t0 = time.monotonic()
        code, out = finish(_trainer(url, "seg-e", "8", "0.01", warm=warm_python))
        assert code not in (0, EXIT_INTERRUPTED)
        assert "already has a writer" in out and "renewed" in out and "other-host.example" in out
        assert time.monotonic() - t0 < 20  # seen renewing: refused before its expiry
    finally:
        lease.release()
    assert tag is not None


def test_stolen_lease_stops_commits(url, warm_python):
    a = _trainer(url, "seg-a", "100000", "0.05", "10", warm=warm_python,
                 SPOTRUN_LEASE_TTL="5", SPOTRUN_LEASE_HEARTBEAT="0.5")
    wait_for_line(a, "step 25", timeout=90)
    st = Storage(url)
    # Another writer takes the lease over (as one would after a stall past its expiry). The
    # owner renews every 0.5 s, so on a loaded box a renewal can land between the read and
    # the replace (the replace then loses, as it must): read again, as a real thief would.
    # (Failed so in a whole-suite run at load 10.)
    for _ in range(20):
        found = st.read_tagged(LEASE)
        assert found is not None
        if st.replace_tagged(LEASE, _fake_owner(segment_id="thief").to_json(), found[1]) is not None:
            break
    else:
        pytest.fail("the lease could not be taken over in 20 tries")
    stolen_at = time.time()
    code, out = finish(a, timeout=120)
    assert code not in (0, EXIT_INTERRUPTED), out
    assert "LeaseLostError" in out and "taken over by segment thief" in out
    assert "will not write another checkpoint" in out
    late = [c.step for c in list_checkpoints(st)
            if c.manifest is not None and c.manifest.created_at > stolen_at + 1.0]
    assert late == [], f"committed after the lease was stolen: {late}"
    lease = read_lease(st)
    assert lease is not None and lease.segment_id == "thief"  # never released by the loser


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_conditional_writes_have_one_winner(backend, tmp_path, request):
    if backend == "local":
        url = str(tmp_path / "run")
    else:
        url = f"s3://{request.getfixturevalue('s3_bucket')}/cas-{uuid.uuid4().hex[:6]}"
    st = Storage(url)
    st.ensure_root(create=True)
    assert st.read_tagged(LEASE) is None
    results: list[str | None] = []
    barrier = threading.Barrier(6)

    def race(fn, *args):
        barrier.wait()
        results.append(fn(*args))

    def run_all(fn, *args):
        results.clear()
        threads = [threading.Thread(target=race, args=(fn, *args)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [r for r in results if r is not None]

    assert len(run_all(st.create_tagged, LEASE, b'{"n": 1}')) == 1
    _, tag = st.read_tagged(LEASE)
    assert len(run_all(st.replace_tagged, LEASE, b'{"n": 2}', tag)) == 1
    assert st.replace_tagged(LEASE, b'{"n": 3}', tag) is None  # stale tag
    for _ in range(4):  # old versions are pruned, and a long-stale tag still loses
        _, cur = st.read_tagged(LEASE)
        assert st.replace_tagged(LEASE, b'{"n": 4}', cur) is not None
    assert st.replace_tagged(LEASE, b'{"n": 5}', tag) is None
    assert st.read_tagged(LEASE)[0] == b'{"n": 4}'


def _tmp(path, age: float, size: int = 0) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x" * size)
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def test_stale_temporaries_removed_live_ones_kept(tmp_path, warm_python):
    run = tmp_path / "run"
    folder = run / "000000099999"  # beyond the run: retention never touches it
    old_payload = _tmp(str(folder / ".rank-00000.pt.tmp-0123456789ab"), STALE_TMP_S + 60, 1 << 20)
    old_ledger = _tmp(str(run / "ledger" / f".0001-abc.json.tmp-{'a' * 32}"), STALE_TMP_S + 60)
    fresh_payload = _tmp(str(folder / ".rank-00001.pt.tmp-ba9876543210"), 1.0)
    fresh_ledger = _tmp(str(run / "ledger" / f".0002-def.json.tmp-{'b' * 32}"), 1.0)
    not_tmp = _tmp(str(folder / "rank-00000.pt"), STALE_TMP_S + 60)
    # A fresh run (no previous writer known to be gone): only old temporaries go.
    code, out = finish(_trainer(str(run), "seg-a", "4", "0.01", warm=warm_python))
    assert code == EXIT_FINISHED, out
    assert not os.path.exists(old_payload) and not os.path.exists(old_ledger)
    assert os.path.exists(fresh_payload) and os.path.exists(fresh_ledger) and os.path.exists(not_tmp)
    assert "stale temporary file(s)" in out

    # seg-a released the lease (it ran alone): its temporaries in checkpoint folders are
    # provably dead and go at once; the ledger's fresh one may be the launcher's: kept.
    os.utime(fresh_payload)
    os.utime(fresh_ledger)
    code, out = finish(_trainer(str(run), "seg-b", "8", "0.01", warm=warm_python))
    assert code == EXIT_FINISHED, out
    assert not os.path.exists(fresh_payload)
    assert os.path.exists(fresh_ledger) and os.path.exists(not_tmp)


def test_launch_local_hands_the_lease_to_the_next_segment(tmp_path, child_env):
    import subprocess
    import sys

    run = tmp_path / "run"
    env = {**child_env, "SPOTRUN_LEASE_TTL": "600"}  # nothing may wait out the TTL
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "spotrun.cli", "launch", "--local", "--run-url", str(run),
         "--interruptions", "1", "--grace", "1", "--seed", "1", "--",
         sys.executable, SCRIPT, "80", "0.05", "5"],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # The first segment starts with no word from the launcher; the next one may take over
    # the lease of the one the launcher saw end.
    assert "takeover: None" in out and "takeover: sim-1" in out
    assert time.monotonic() - t0 < 240
    lease = read_lease(Storage(str(run)))
    assert lease is not None and lease.segment_id == "sim-2" and lease.released_at is not None


@pytest.mark.slow
def test_torchrun_refused_on_every_rank_without_hanging(tmp_path, warm_ranks):
    """Rank 0 is refused; the other rank must hear of it rather than wait in a collective."""
    from helpers import DDP_SCRIPT, finish_session, torchrun

    url = str(tmp_path / "run")
    st = Storage(url)
    st.ensure_root(create=True)
    holder = Lease(st, segment_id="holder")  # this live process, on this host
    holder.acquire()
    try:
        # The ranks are forks of ``warm_ranks`` (children of its server, not of this process).
        proc = torchrun(DDP_SCRIPT, 2, "--url", url, "--steps", "20", "--every-steps", "5",
                        env=env_for(url), warm=warm_ranks)
        code, out = finish_session(proc, 180)
        assert code not in (0, EXIT_INTERRUPTED), out
        assert "segment holder" in out and "already has a writer" in out
        assert "rank 0 could not take the run's lease" in out  # the other rank was told
        assert list_checkpoints(st) == []
    finally:
        holder.release()
