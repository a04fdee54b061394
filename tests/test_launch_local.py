"""``spotrun launch --local`` end to end: real child processes, real signals, a real fake
metadata service, the real wrapper; results checked against an independent computation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import cli

from spotrun.launch.common import last_checkpoint
from spotrun.records.launch_state import load_state
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

# A tiny training loop on the wrapper's API. Its "weights" are a running hash of a random
# stream, so any replayed, skipped or re-seeded step changes the final value.
TRAIN = textwrap.dedent(
    """
    import json, os, random, sys, time
    import spotrun

    steps, every, sleep = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    random.seed(1234)

    class Model:
        def __init__(self):
            self.w = 0
        def state_dict(self):
            return {"w": self.w}
        def load_state_dict(self, d):
            self.w = int(d["w"])

    model = Model()
    with spotrun.Checkpointer(objects={"model": model}, every_steps=every) as ckpt:
        for step in ckpt.range(steps):
            model.w = (model.w * 1_000_003 + random.getrandbits(32) + step) % (1 << 61)
            time.sleep(sleep)
    with open(os.path.join(os.environ["SPOTRUN_URL"], "final.json"), "w") as f:
        json.dump({"w": model.w}, f)
    """
)


def expected_weight(steps: int) -> int:
    import random

    rng = random.Random(1234)
    w = 0
    for step in range(steps):
        w = (w * 1_000_003 + rng.getrandbits(32) + step) % (1 << 61)
    return w


@pytest.fixture()
def script(tmp_path: Path) -> Path:
    p = tmp_path / "train_tiny.py"
    p.write_text(TRAIN)
    return p


def launcher(child_env: dict, run: Path, *args: str, cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "spotrun.cli", "launch", "--local", "--run-url", str(run), *args, "--", *cmd],
        env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def launcher_segments(run: Path) -> list[tuple[str, str | None]]:
    recs = Ledger(Storage(str(run))).records()
    ended = {r["segment_id"]: r["reason"] for r in recs
             if r["event"] == "segment_ended" and r["source"] == "launcher"}
    return [(r["segment_id"], ended.get(r["segment_id"])) for r in recs
            if r["event"] == "segment_started" and r["source"] == "launcher"]


@pytest.mark.slow
def test_k_interruptions_then_finish_bit_for_bit(tmp_path: Path, script: Path, child_env: dict) -> None:
    run = tmp_path / "run"
    steps = 60
    proc = launcher(child_env, run, "--interruptions", "2", "--grace", "1", "--seed", "3",
                    "--instance-type", "g5.xlarge",
                    cmd=[sys.executable, str(script), str(steps), "5", "0.05"])
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert json.loads((run / "final.json").read_text()) == {"w": expected_weight(steps)}
    assert (run / "done.json").exists()
    assert launcher_segments(run) == [("sim-1", "interrupted"), ("sim-2", "interrupted"), ("sim-3", "finished")]
    starts = [r for r in Ledger(Storage(str(run))).records()
              if r["event"] == "segment_started" and r["source"] == "launcher"]
    assert {(r["instance"]["cloud"], r["instance"]["instance_type"], r["instance"]["market"],
             r["instance"]["region"], r["instance"]["availability_zone"]) for r in starts} == {
        ("simulated", "g5.xlarge", "spot", "us-east-1", "us-east-1a")}
    # The wrapper in each child saw the simulated notice through the fake EC2 metadata.
    notices = [r for r in Ledger(Storage(str(run))).records() if r["event"] == "notice_received"]
    assert [r["segment_id"] for r in notices] == ["sim-1", "sim-2"]
    assert "interruptions" in out and "spotrun: run finished" in out
    state = load_state(Storage(str(run)))
    assert state.status == "finished" and state.interruptions == 2

    # status reads the same story back.
    st = cli("status", str(run), "--json")
    assert st.returncode == 0, st.stderr
    data = json.loads(st.stdout)
    assert data["status"] == "finished" and data["interruptions"] == 2
    assert data["last_checkpoint"] == steps and len(data["segments"]) == 3
    assert data["cost"]["totals"]["interruptions"] == 2


def test_failing_command_is_reported(tmp_path: Path, child_env: dict) -> None:
    run = tmp_path / "run"
    proc = launcher(child_env, run, cmd=[sys.executable, "-c", "import sys; sys.exit(3)"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "exit code 3" in out
    assert launcher_segments(run) == [("sim-1", "failed")]
    assert load_state(Storage(str(run))).status == "failed"


def test_exit_0_without_done_marker_is_a_failure(tmp_path: Path, child_env: dict) -> None:
    run = tmp_path / "run"
    proc = launcher(child_env, run, cmd=[sys.executable, "-c", "pass"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "without writing done.json" in out


def test_child_sees_the_simulated_instance(tmp_path: Path, child_env: dict) -> None:
    """The child's environment points its EC2 watcher at the launcher's fake metadata."""
    run = tmp_path / "run"
    probe = textwrap.dedent(
        """
        import json, os, urllib.request
        base = os.environ["SPOTRUN_IMDS_ENDPOINT"]
        req = urllib.request.Request(base + "/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        tok = urllib.request.urlopen(req, timeout=5).read().decode()
        get = lambda p: urllib.request.urlopen(urllib.request.Request(
            base + "/latest/meta-data/" + p, headers={"X-aws-ec2-metadata-token": tok}), timeout=5).read().decode()
        url = os.environ["SPOTRUN_URL"]
        info = {k: os.environ[k] for k in ("SPOTRUN_SEGMENT_ID", "SPOTRUN_NOTICE_SOURCE", "SPOTRUN_POLL_INTERVAL")}
        info.update(instance_type=get("instance-type"), instance_id=get("instance-id"))
        open(os.path.join(url, "probe.json"), "w").write(json.dumps(info))
        open(os.path.join(url, "done.json"), "w").write("{}")
        """
    )
    proc = launcher(child_env, run, "--instance-type", "g6.xlarge", cmd=[sys.executable, "-c", probe])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    info = json.loads((run / "probe.json").read_text())
    assert info == {"SPOTRUN_SEGMENT_ID": "sim-1", "SPOTRUN_NOTICE_SOURCE": "ec2",
                    "SPOTRUN_POLL_INTERVAL": "0.2", "instance_type": "g6.xlarge", "instance_id": "sim-1"}


def _final_objects(run: Path, steps: int) -> dict:
    from spotrun.format.commit import read_manifest
    from spotrun.format.snapshot import read_payload

    storage = Storage(str(run))
    manifest = read_manifest(storage, steps)
    (name, entry), = manifest.files.items()
    return read_payload(storage, steps, name, entry)["objects"]


def _assert_same(a: object, b: object, path: str = "") -> None:
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.slow
def test_example_survives_interruptions_bit_for_bit(tmp_path: Path, child_env: dict) -> None:
    """The README's main job: the example under --local equals an uninterrupted run."""
    repo = Path(__file__).resolve().parents[1]
    steps = 120
    args = [sys.executable, str(repo / "examples" / "train.py"), "--steps", str(steps),
            "--every-steps", "10", "--step-sleep", "0.02"]
    plain = tmp_path / "plain"
    subprocess.run(args, env={**child_env, "SPOTRUN_URL": str(plain)}, check=True,
                   capture_output=True, timeout=120)
    run = tmp_path / "spot"
    proc = launcher(child_env, run, "--interruptions", "2", "--grace", "1", "--seed", "7", cmd=args)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert [r for _, r in launcher_segments(run)] == ["interrupted", "interrupted", "finished"]
    _assert_same(_final_objects(plain, steps), _final_objects(run, steps))


@pytest.mark.slow
def test_spotrun_stop_then_same_command_continues(tmp_path: Path, script: Path, child_env: dict) -> None:
    run = tmp_path / "run"
    steps = 150
    cmd = [sys.executable, str(script), str(steps), "10", "0.02"]
    proc = launcher(child_env, run, "--interruptions", "0", cmd=cmd)
    storage = Storage(str(run))
    wait_until = time.time() + 60
    while time.time() < wait_until and (last_checkpoint(storage) or 0) < 20:
        time.sleep(0.05)
    stop = cli("stop", str(run))
    assert stop.returncode == 0 and f"pid {proc.pid}" in stop.stdout, stop.stdout + stop.stderr
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    stopped_at = last_checkpoint(storage)
    assert stopped_at is not None and 20 <= stopped_at < steps
    # What a Ctrl-C does (spotrun stop sends the launcher the same SIGINT; this was also
    # test_ctrl_c_stops_cleanly_with_a_committed_checkpoint, folded here): the stop
    # checkpoint is a real commit that loads (manifest present), and no child lingers.
    assert (run / f"{stopped_at:012d}" / "manifest.json").exists()
    assert not (run / "done.json").exists()
    assert launcher_segments(run) == [("sim-1", "stopped")]
    assert "Continue with" in out
    wrapper_end = [r for r in Ledger(storage).records()
                   if r["event"] == "segment_ended" and r["source"] == "wrapper"]
    assert wrapper_end and wrapper_end[-1]["reason"] == "interrupted"  # committed, exit 75

    again = launcher(child_env, run, "--interruptions", "0", cmd=cmd)
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0, out
    assert f"resuming after step {stopped_at}" in out
    assert json.loads((run / "final.json").read_text()) == {"w": expected_weight(steps)}
    assert launcher_segments(run) == [("sim-1", "stopped"), ("sim-2", "finished")]


@pytest.mark.slow
def test_max_cost_stops_the_run_keeping_its_checkpoint(tmp_path: Path, script: Path, child_env: dict) -> None:
    """--max-cost: the simulator prices the run as it goes and stops it like Ctrl-C (one SIGINT,
    the command commits) once the ledger's spend reaches the limit; exit 1 names the limit."""
    run = tmp_path / "run"
    # p4d.24xlarge spot in the shipped snapshot is about $6.6/h: $0.03 is about 16 s of
    # compute, time enough for the child to start (slowly, on a loaded box) and commit.
    proc = launcher(child_env, run, "--interruptions", "0", "--instance-type", "p4d.24xlarge",
                    "--max-cost", "0.03",
                    cmd=[sys.executable, str(script), "100000", "20", "0.01"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "of --max-cost" in out and "higher --max-cost" in out, out
    state = load_state(Storage(str(run)))
    assert state.status == "stopped" and state.segments[-1].end_reason == "stopped"
    step = last_checkpoint(Storage(str(run)))
    assert step is not None and step < 100000  # the stop checkpoint, not a finished run
    assert not (run / "done.json").exists()
    assert f"checkpoint at step {step} kept" in out  # the message says where to go on from
