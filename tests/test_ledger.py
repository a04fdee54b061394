"""The run ledger: concurrent writers from real processes, killed writers, local disk and S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from spotrun.records.instance import InstanceInfo
from spotrun.records.layout import LEDGER_DIR
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

WRITER = textwrap.dedent(
    """
    import sys
    from spotrun.records.ledger import Ledger
    from spotrun.storage import Storage
    url, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ledger = Ledger(Storage(url))
    for i in range(n):
        ledger.append("tick", writer=tag, seq=i, payload="x" * 200)
    """
)

FOREVER = textwrap.dedent(
    """
    import sys
    from spotrun.records.ledger import Ledger
    from spotrun.storage import Storage
    ledger = Ledger(Storage(sys.argv[1]))
    i = 0
    while True:
        ledger.append("tick", writer=sys.argv[2], seq=i, payload="y" * 5000)
        i += 1
    """
)


def _spawn(script: str, args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env)


def _check_complete(records: list[dict], writers: dict[str, int]) -> None:
    seen: dict[str, list[int]] = {}
    for r in records:
        if r["event"] == "tick":
            seen.setdefault(r["writer"], []).append(r["seq"])
    for tag, n in writers.items():
        assert sorted(seen.get(tag, [])) == list(range(n)), f"writer {tag} lost records"
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    keys = [(r["time"], r["id"]) for r in records]
    assert keys == sorted(keys)


def _concurrent(url: str, env: dict, n_proc: int, n_each: int) -> None:
    procs = [_spawn(WRITER, [url, f"w{i}", str(n_each)], env) for i in range(n_proc)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    records = Ledger(Storage(url)).records()
    _check_complete(records, {f"w{i}": n_each for i in range(n_proc)})
    assert len(records) == n_proc * n_each
    hosts_pids = {(r["host"], r["pid"]) for r in records}
    assert len(hosts_pids) == n_proc


def test_concurrent_appends_local(tmp_path, child_env):
    _concurrent(str(tmp_path / "run"), child_env, n_proc=4, n_each=40)


def test_concurrent_appends_s3(s3_bucket, child_env):
    _concurrent(f"s3://{s3_bucket}/run", child_env, n_proc=3, n_each=10)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_killed_writer_then_relaunch_loses_nothing(backend, tmp_path, child_env, request):
    if backend == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        child_env = dict(child_env, AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"])
        url = f"s3://{bucket}/run"
    else:
        url = str(tmp_path / "run")
    storage = Storage(url)
    proc = _spawn(FOREVER, [url, "killed"], child_env)
    deadline = time.time() + 60
    # Count committed records only: a dot name is a write still under way.
    while len([n for n in storage.list_dir(LEDGER_DIR) if not n.startswith(".")]) < 5 \
            and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-write, most likely
    proc.wait(timeout=30)
    # The relaunch appends to the same ledger.
    relaunch = _spawn(WRITER, [url, "relaunch", "5"], child_env)
    assert relaunch.wait(timeout=120) == 0
    names = [n for n in storage.list_dir(LEDGER_DIR) if not n.startswith(".")]
    # Every visible record parses in full: a kill leaves a stray temp file at worst.
    for name in names:
        json.loads(storage.read_bytes(f"{LEDGER_DIR}/{name}"))
    records = Ledger(storage).records()
    assert len(records) == len(names)
    killed = sorted(r["seq"] for r in records if r["writer"] == "killed")
    assert killed == list(range(len(killed))) and len(killed) >= 5
    _check_complete(records, {"relaunch": 5})


def test_conveniences_and_order(tmp_path):
    ledger = Ledger(Storage(str(tmp_path)))
    inst = InstanceInfo(cloud="aws", instance_id="i-1", instance_type="g5.xlarge",
                        region="us-east-1", availability_zone="us-east-1a", market="spot")
    # Written out of order: records() sorts by event time.
    ledger.segment_ended(segment_id="s", reason="interrupted", ended_at=300.0, source="wrapper")
    ledger.checkpoint_committed(segment_id="s", step=10, committed_at=200.0, stall_s=1.5,
                                save_s=4.0, nbytes=123)
    ledger.training_resumed(segment_id="s", step=0, process_started_at=100.0, first_step_at=110.0)
    ledger.notice_received(segment_id="s", source="ec2", action="terminate", notice_time=None,
                           detected_at=250.0, deadline=370.0)
    ledger.segment_started(segment_id="s", instance=inst, started_at=90.0, source="launcher")
    recs = ledger.records()
    assert [r["event"] for r in recs] == [
        "segment_started", "training_resumed", "checkpoint_committed", "notice_received",
        "segment_ended",
    ]
    assert [r["time"] for r in recs] == [90.0, 110.0, 200.0, 250.0, 300.0]
    assert InstanceInfo.from_dict(recs[0]["instance"]) == inst
    assert recs[2]["nbytes"] == 123 and recs[3]["notice_time"] is None
    with pytest.raises(ValueError):
        ledger.segment_ended(segment_id="s", reason="exploded", ended_at=1.0, source="wrapper")
    with pytest.raises(ValueError):
        ledger.append("x", id="mine")


def test_unreadable_record_is_skipped_with_warning(tmp_path, caplog):
    storage = Storage(str(tmp_path))
    ledger = Ledger(storage)
    ledger.append("a", time=1.0)
    ledger.append("b", time=2.0)
    storage.write_bytes(f"{LEDGER_DIR}/00000000001500000000-edited.json", b"{not json")
    with caplog.at_level("WARNING", logger="spotrun"):
        recs = ledger.records()
    assert [r["event"] for r in recs] == ["a", "b"]
    assert sum("unreadable ledger record" in m for m in caplog.messages) == 1


def test_empty_ledger(tmp_path):
    assert Ledger(Storage(str(tmp_path / "nothing"))).records() == []


def test_a_segment_that_ends_at_its_start_time_lists_start_first(tmp_path) -> None:
    """The launcher may end a segment at its start time (EC2's whole-second transition time,
    clamped); random record ids must not put the end before the start."""
    from spotrun.records.instance import InstanceInfo
    from spotrun.records.ledger import Ledger
    from spotrun.storage import Storage

    ledger = Ledger(Storage(str(tmp_path)))
    for i in range(20):  # each pair gets fresh random ids: a coin flip each without the rule
        t = 1_000_000.0 + i
        ledger.segment_ended(segment_id=f"s{i}", reason="interrupted", ended_at=t, source="launcher")
        ledger.segment_started(segment_id=f"s{i}", instance=InstanceInfo(), started_at=t,
                               source="launcher")
    events = [(r["segment_id"], r["event"]) for r in ledger.records()]
    assert events == [(f"s{i}", e) for i in range(20) for e in ("segment_started", "segment_ended")]
