"""``spotrun status`` shows each node's heartbeat: how long ago it last beat, judged by the
controller's rule (``--node-silence``, or three of the node's own intervals), and a node
that has not beaten yet.

The records are real files (ages set with ``os.utime``) or real objects on the moto server
(ages by waiting: S3 stamps LastModified itself), read through the real ``status`` command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from spotrun.launch.status import format_status, run_status
from spotrun.records.heartbeat import Heartbeat, heartbeat_file
from spotrun.records.launch_state import LaunchState, Segment, save_state
from spotrun.storage import Storage

REPO = Path(__file__).resolve().parents[1]


def _state(storage: Storage, ids: list[str], *, mode: str = "ec2", alive: bool = True, **options: Any) -> None:
    started = time.time() - 600
    state = LaunchState(mode=mode, run_id="r1", created_at=started, status="running",
                        options={"nodes": len(ids), **options})
    for i, iid in enumerate(ids):
        state.segments.append(Segment(segment_id=iid, instance_id=iid, instance_type="g5.xlarge", market="spot",
                                      started_at=started, availability_zone="us-east-1a", region="us-east-1",
                                      group="a1", node=i))
    if alive:
        state.touch(15.0)
    save_state(storage, state)


def _beat(storage: Storage, iid: str, *, node_time: float | None = None, interval_s: float = 30.0,
          age_s: float = 0.0) -> None:
    """Node ``iid``'s record, stamped ``node_time`` by its (maybe wrong) clock; on local disk
    its file's mtime is set ``age_s`` back (the store's time of the write)."""
    hb = Heartbeat(iid, 7, time.time() if node_time is None else node_time, 4242, "host", "a1", interval_s)
    storage.write_bytes(heartbeat_file(iid), hb.to_bytes())
    if age_s:
        path = storage.local_path(heartbeat_file(iid))
        assert path is not None
        t = time.time() - age_s
        os.utime(path, (t, t))


def _beats(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["instance_id"]: n["heartbeat"] for n in st["attempt"]["nodes"]}


@pytest.fixture()
def four(tmp_path: Path) -> Storage:
    """An EC2 run of four nodes under --node-silence 120: one fresh (its own clock three
    hours behind), one silent for 200 s (its own clock says now), one beating every 90 s and
    200 s since (its limit is 270 s), one that has not beaten yet."""
    storage = Storage(str(tmp_path / "run"))
    _state(storage, ["i-fresh", "i-stale", "i-slow", "i-boot"], node_silence_s=120.0)
    _beat(storage, "i-fresh", node_time=time.time() - 3 * 3600)
    _beat(storage, "i-stale", age_s=200)
    _beat(storage, "i-slow", interval_s=90.0, age_s=200)
    return storage


def test_status_shows_fresh_silent_slow_and_missing_beats_by_the_stores_clock(four: Storage) -> None:
    st = run_status(four, live=False)
    hb = _beats(st)
    # The age is the store's (the file's mtime), not the node's clock in the record.
    assert hb["i-fresh"]["age_s"] < 30 and not hb["i-fresh"]["silent"], hb["i-fresh"]
    assert hb["i-fresh"]["text"].startswith("last beat ") and hb["i-fresh"]["seq"] == 7
    assert 199 <= hb["i-stale"]["age_s"] < 230 and hb["i-stale"]["silent"] and hb["i-stale"]["limit_s"] == 120
    assert hb["i-stale"]["text"].startswith("silent 2") and hb["i-stale"]["text"].endswith(
        "(limit 120s): the controller terminates it and starts one replacement in its slot"), hb["i-stale"]
    assert not hb["i-slow"]["silent"] and hb["i-slow"]["limit_s"] == 270, hb["i-slow"]
    assert hb["i-slow"]["text"].startswith("last beat 2")
    assert hb["i-boot"]["age_s"] is None and not hb["i-boot"]["silent"]
    assert hb["i-boot"]["text"] == "no heartbeat yet (booting or in --setup, not judged by it until its first)"
    text = format_status(st)
    assert f"node 1: i-stale (g5.xlarge spot in us-east-1a, us-east-1), EC2 state ?; {hb['i-stale']['text']}" in text
    assert "node 3: i-boot" in text and "no heartbeat yet" in text


def test_status_says_what_the_controller_will_do(four: Storage) -> None:
    # --recovery relaunch: every node again.
    _state(four, ["i-fresh", "i-stale"], node_silence_s=120.0, recovery="relaunch")
    assert _beats(run_status(four, live=False))["i-stale"]["text"].endswith(
        ": the controller terminates it and relaunches every node")
    # No live controller: nobody acts until one is resumed.
    _state(four, ["i-fresh", "i-stale"], node_silence_s=120.0, alive=False)
    assert _beats(run_status(four, live=False))["i-stale"]["text"].endswith(
        ": no live controller acts on it (spotrun launch --resume RUN_URL)")
    # Every node silent: the run URL, not the machines; the controller terminates none.
    _beat(four, "i-stale2", age_s=300)
    _state(four, ["i-stale", "i-stale2"], node_silence_s=60.0)
    hb = _beats(run_status(four, live=False))
    assert all(b["silent"] and "the controller terminates none" in b["text"] for b in hb.values()), hb
    # --node-silence 0: shown, not judged.
    _state(four, ["i-fresh", "i-stale"], node_silence_s=0.0)
    hb = _beats(run_status(four, live=False))
    assert not hb["i-stale"]["silent"] and hb["i-stale"]["text"].endswith("ago (--node-silence 0: not judged)")
    # Beats turned off for the nodes: not "yet".
    _state(four, ["i-fresh", "i-boot"], env={"SPOTRUN_HEARTBEAT_S": "0"})
    assert _beats(run_status(four, live=False))["i-boot"]["text"] == "no heartbeat (SPOTRUN_HEARTBEAT_S=0 in --env)"
    # A local run's agents beat too; its launcher watches processes, so a stale beat is a word only.
    _state(four, ["i-fresh", "i-stale"], mode="local")
    hb = _beats(run_status(four, live=False))
    assert not hb["i-stale"]["silent"] and hb["i-stale"]["limit_s"] is None
    assert "stale; the local launcher judges its nodes by their processes" in hb["i-stale"]["text"]
    assert hb["i-fresh"]["text"].startswith("last beat ") and "stale" not in hb["i-fresh"]["text"]


def test_the_status_command_prints_the_beats(four: Storage, child_env: dict) -> None:
    def status(*extra: str) -> str:
        out = subprocess.run([sys.executable, "-m", "spotrun", "status", four.url, "--no-aws", *extra],
                             env=child_env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    text = status()
    lines = {line.split(":")[0].strip(): line for line in text.splitlines() if line.startswith("  node ")}
    assert "; last beat " in lines["node 0"] and "silent" not in lines["node 0"], text
    assert "; silent 2" in lines["node 1"] and "the controller terminates it" in lines["node 1"], text
    assert "; last beat 2" in lines["node 2"], text
    assert "; no heartbeat yet (booting or in --setup" in lines["node 3"], text
    st = json.loads(status("--json"))
    hb = _beats(st)
    assert hb["i-stale"]["silent"] and not hb["i-fresh"]["silent"] and hb["i-boot"]["age_s"] is None


def test_status_reads_beat_ages_from_s3_last_modified(s3_bucket: str) -> None:
    """On the moto server: S3 stamps each write (LastModified, in whole seconds, so an age
    reads up to 1 s old); a record written 3.2 s ago is silent under --node-silence 3 with
    0.2 s beats, one just written is not, a node without one is booting."""
    storage = Storage(f"s3://{s3_bucket}/runs/beats")
    _state(storage, ["i-old", "i-new", "i-none"], node_silence_s=3.0)
    _beat(storage, "i-old", interval_s=0.2)
    time.sleep(3.2)
    _beat(storage, "i-new", interval_s=0.2, node_time=0.0)  # a node clock at 1970: not used
    hb = _beats(run_status(storage, live=False))
    assert hb["i-old"]["silent"] and 3.2 <= hb["i-old"]["age_s"] < 20, hb["i-old"]
    assert hb["i-old"]["text"].startswith("silent ") and hb["i-old"]["limit_s"] == 3.0
    assert not hb["i-new"]["silent"] and hb["i-new"]["age_s"] < 3, hb["i-new"]
    assert hb["i-none"]["age_s"] is None and hb["i-none"]["text"].startswith("no heartbeat yet")
