"""``spotrun status`` shows each node's heartbeat: how long ago it last beat, judged by the
controller's rule (``--node-silence``, or three of the node's own intervals), and a node
that has not beaten yet.

The records are real files (ages set with ``os.utime``) or real objects on the moto server
(ages by waiting: S3 stamps LastModified itself), read through the real ``status`` command.

Then the silent node end to end (one module-scoped run, about 15 s): the real ``spotrun
launch`` against EC2 and S3 on the moto server, real node agent processes beating into the
run, one of them SIGSTOPped; the controller terminates it and replaces it, and ``status``
taken meanwhile shows the survivor beating and the replacement booting.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spotrun.launch.status import format_status, run_status
from spotrun.records.heartbeat import Heartbeat, heartbeat_file
from spotrun.records.launch_state import LaunchState, Segment, save_state
from spotrun.records.ledger import Ledger
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
    assert hb["i-slow"]["text"].startswith("last beat 2") and hb["i-slow"]["text"].endswith(
        "s ago (beats every 90s: silent after 270s)")
    assert hb["i-boot"]["age_s"] is None and not hb["i-boot"]["silent"]
    assert hb["i-boot"]["text"] == "no heartbeat yet (booting or in --setup; judged from its first beat)"
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
    0.2 s beats, one just written is not (its 10 s beats: limit 30 s, however slow the
    machine), a node without one is booting."""
    storage = Storage(f"s3://{s3_bucket}/runs/beats")
    _state(storage, ["i-old", "i-new", "i-none"], node_silence_s=3.0)
    _beat(storage, "i-old", interval_s=0.2)
    time.sleep(3.2)
    _beat(storage, "i-new", interval_s=10.0, node_time=0.0)  # a node clock at 1970: not used
    hb = _beats(run_status(storage, live=False))
    assert hb["i-old"]["silent"] and 3.2 <= hb["i-old"]["age_s"] < 20, hb["i-old"]
    assert hb["i-old"]["text"].startswith("silent ") and hb["i-old"]["limit_s"] == 3.0
    assert not hb["i-new"]["silent"] and hb["i-new"]["limit_s"] == 30, hb["i-new"]
    assert hb["i-new"]["age_s"] <= hb["i-old"]["age_s"] - 2, hb  # 3.2 s apart, give or take S3's second
    assert hb["i-none"]["age_s"] is None and hb["i-none"]["text"].startswith("no heartbeat yet")


# -- the silent node end to end: the real controller and node agents on the moto server ----

REGION = "us-east-1"
# Above a loaded machine's worst stall of the survivor's 0.2 s beat (it too would be judged
# silent), yet a short wait.
SILENCE_S = 3.0

# A node agent (python -m spotrun.launch.node) with torchrun stood in for (no torch import):
# it "trains" until killed; its heartbeat thread is the real one, beating every 0.2 s.
AGENT = textwrap.dedent(
    """
    import sys, time, types
    import spotrun
    module = types.ModuleType("spotrun.distributed")
    module.torchrun = lambda argv: time.sleep(120) or 0
    sys.modules["spotrun.distributed"] = module
    spotrun.distributed = module
    import spotrun.launch.node as node
    sys.exit(node.main(["--timeout", "60", "--poll", "0.05", "--", "python", "t.py"]))
    """
)


@pytest.fixture(scope="module")
def silent_run(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``spotrun launch --nodes 2 --node-silence 3 --poll 0.05`` (the real CLI, in a thread)
    against EC2 and S3 on the moto server; a real node agent process per node, beating into
    the run on S3; node 1's agent SIGSTOPped (a hung machine EC2 still calls running). Runs
    until the controller has replaced it, takes ``spotrun status --json`` then, and finishes
    the run. What happened, for the tests below."""
    import boto3
    from helpers import moto_ami, wait_for
    from moto.backends import get_backend
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models.instances import StateReason

    from spotrun.cli import main
    from spotrun.records.heartbeat import read_heartbeat
    from spotrun.records.launch_state import load_state

    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ENDPOINT_URL", moto_server)
    agents: list[subprocess.Popen] = []
    out: dict[str, Any] = {}
    thread: threading.Thread | None = None
    url = ""
    try:
        ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_server)
        s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto_server)
        bucket = f"spotrun-silent-{uuid.uuid4().hex[:10]}"
        s3.create_bucket(Bucket=bucket)
        vpc = ec2.create_vpc(CidrBlock="10.2.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.2.1.0/24",
                                   AvailabilityZone="us-east-1b")["Subnet"]["SubnetId"]
        url = f"s3://{bucket}/runs/silent"
        storage = Storage(url)
        result: dict[str, Any] = {}

        def launch() -> None:
            result["code"] = main([
                "launch", "--run-url", url, "--instance-types", "g5.xlarge", "--region", REGION,
                "--subnets", subnet, "--ami", moto_ami(ec2), "--nodes", "2", "--nproc-per-node", "1",
                "--poll", "0.05", "--node-silence", f"{SILENCE_S:g}", "--offline-prices",
                "--on-ctrl-c", "terminate", "--", "python", "train.py"])

        thread = threading.Thread(target=launch, daemon=True)
        thread.start()
        first = wait_for(lambda: (s := load_state(storage)) and len(s.running) == 2 and s.running,
                         what="the first attempt's two nodes")
        ids = [s.instance_id for s in first]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   SPOTRUN_URL=url, SPOTRUN_HEARTBEAT_S="0.2")
        for iid in ids:
            agents.append(subprocess.Popen([sys.executable, "-c", AGENT], env={**env, "SPOTRUN_INSTANCE_ID": iid},
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # Both beat (each record changes: the controller has seen them as alive).
        seen = [wait_for(lambda i=i: read_heartbeat(storage, i), what=f"{i}'s first beat") for i in ids]
        wait_for(lambda: all(read_heartbeat(storage, i) != b for i, b in zip(ids, seen, strict=True)),
                 what="a second beat of each")
        os.kill(agents[1].pid, signal.SIGSTOP)
        out["stopped_at"] = time.time()
        inst = get_backend("ec2")[DEFAULT_ACCOUNT_ID][REGION].get_instance
        wait_for(lambda: inst(ids[1]).state == "terminated", timeout=60, what="the silent node terminated")
        out["terminated_at"] = time.time()
        second = wait_for(lambda: (s := load_state(storage)) and len(s.running) == 2
                          and ids[1] not in [r.instance_id for r in s.running] and s.running,
                          timeout=60, what="the replacement attempt")
        # What spotrun status shows (EC2's live state too) while the survivor beats and the
        # replacement boots (the command itself: test_the_status_command_prints_the_beats).
        out["status"] = json.loads(json.dumps(run_status(storage), default=str))
        out["terminated_state"] = inst(ids[1]).state
        # What the nodes do when the command finishes: done.json, then their own shutdown.
        storage.write_bytes("done.json", b"{}")
        for seg in second:
            node = inst(seg.instance_id)
            node.terminate()
            node.state_reason = StateReason("Client.InstanceInitiatedShutdown: x", "Client.InstanceInitiatedShutdown")
        thread.join(60)
        assert not thread.is_alive(), "the controller did not finish"
        out.update(code=result.get("code"), first=ids, second=[s.instance_id for s in second],
                   state=load_state(storage), records=[r for r in Ledger(storage).records()
                                                       if r.get("source") == "launcher"])
    finally:
        if thread is not None and thread.is_alive():  # a failed step: leave no controller polling
            with contextlib.suppress(Exception):
                main(["stop", url, "--wait", "5"])
            thread.join(30)
        for proc in agents:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait()
        mp.undo()
    yield out


def test_a_silent_node_is_terminated_and_replaced_end_to_end(silent_run: dict[str, Any]) -> None:
    r = silent_run
    node0, lost = r["first"]
    assert r["code"] == 0 and r["terminated_state"] == "terminated"
    # Not before --node-silence after its last beat (at most one 0.2 s beat before the stop),
    # and well within the test's patience after it.
    assert SILENCE_S - 0.5 <= r["terminated_at"] - r["stopped_at"] < 30, r
    # --recovery replace: the survivor kept in slot 0, one new instance in slot 1.
    assert r["second"][0] == node0 and r["second"][1] not in r["first"]
    (seg,) = [s for s in r["state"].segments if s.segment_id == lost]
    assert seg.end_reason == "interrupted" and "silent for" in (seg.detail or "")
    assert f"--node-silence {SILENCE_S:g}" in seg.detail and "terminated by spotrun" in seg.detail
    (end,) = [x for x in r["records"] if x["event"] == "segment_ended" and x["segment_id"] == lost]
    assert end["reason"] == "interrupted"
    (rec,) = [x for x in r["records"] if x["event"] == "recovery_started"]
    assert (rec["mode"], rec["lost"], rec["kept"], rec["instances_started"]) == ("replace", [lost], [node0], 1)
    assert "silent for" in rec["detail"] and lost in rec["detail"]
    assert r["state"].interruptions == 1 and r["state"].status == "finished"


def test_status_during_the_replacement_shows_the_survivors_beat_and_the_new_node_booting(
        silent_run: dict[str, Any]) -> None:
    st = silent_run["status"]
    nodes = {n["instance_id"]: n for n in st["attempt"]["nodes"]}
    survivor, new = silent_run["second"]
    assert set(nodes) == {survivor, new} and nodes[survivor]["state"] == "running"
    hb = nodes[survivor]["heartbeat"]
    assert hb["age_s"] < SILENCE_S and not hb["silent"] and hb["interval_s"] == 0.2, hb
    assert nodes[new]["heartbeat"]["text"].startswith("no heartbeat yet"), nodes[new]
