"""A replacement asked for at the loss, and a node agent that imports torch while it waits.

With ``--recovery replace`` the local simulator starts a lost node's replacement the moment
the loss is known (at the notice, or when the node vanishes), as EC2 would be asked for one,
instead of once the attempt has stopped: its machine (ledger segment, metadata service, local
directory) is up and its node agent (``--segment`` of the next attempt) imports torch while it
waits for the next attempt's cluster file. Real processes, real signals:

- one 2-node DDP run with two interruptions (a notice and a node vanishing; the order drawn
  by ``--seed``): the first replacement's agent exists (seen in /proc) before the attempt it
  replaces a node of has ended, the books say when its machine was up (``capacity_at``, before
  the survivor's exit) and that exactly 1 instance was started; the second replacement is
  SIGKILLed while it waits: the launcher ends its machine (failed) and starts another in its
  slot (2 instances for that loss); the run ends bit-exact against an uninterrupted one;
- a replacement started at a notice that no attempt needs (the run finishes first) is stopped
  and its segment ended, its local directory gone;
- the agent's background import: it happens during the wait, and a broken torch fails after
  the wait with the message today's import gives.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers import DDP_EVERY, DDP_SCRIPT, DDP_STEPS, REPO

from spotrun.launch.node import ClusterSpec, read_attempt_exit, write_cluster
from spotrun.proof.resume_check import compare_checkpoints
from spotrun.records.launch_state import load_state
from spotrun.records.ledger import Ledger
from spotrun.storage import Storage

TIMEOUT = 480  # three 2-node attempts on a loaded 2-core box; a hang would be forever


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _records(run: Path, event: str, source: str | None = "launcher") -> list[dict]:
    return [r for r in Ledger(Storage(str(run))).records()
            if r["event"] == event and (source is None or r.get("source") == source)]


def _started_at(pid: int) -> float:
    """When ``pid`` started (epoch seconds, to the kernel's 10 ms tick), or now if unreadable:
    the poll below sees a process up to 50 ms after its start, and the launcher's line can
    come between (a run was failed by 28 ms so)."""
    now = time.time()
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return now
    return min(now, now - (uptime - ticks / os.sysconf("SC_CLK_TCK")))


class _Agents:
    """Watches /proc for node agents (``python -m spotrun.launch.node``): when each was first
    seen, with its ``--segment`` and instance id; SIGKILLs (its whole group: it leads its own
    session) the first agent of segment ``kill_segment`` that the launcher said it started at
    a loss (``early``), if ``said`` has no line yet saying that attempt started."""

    def __init__(self, url: str, said: dict[str, float], kill_segment: str | None = None) -> None:
        self.url = f"SPOTRUN_URL={url}".encode()
        self.seen: dict[int, tuple[float, str, str]] = {}
        self.killed: list[tuple[int, str]] = []
        self.said, self.kill_segment = said, kill_segment
        self.early: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name in os.listdir("/proc"):
                if not name.isdigit() or int(name) in self.seen:
                    continue
                try:
                    argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
                    if b"spotrun.launch.node" not in argv or b"--segment" not in argv:
                        continue
                    env = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if self.url not in env:  # another run's agent (other tests on this machine)
                    continue
                segment = argv[argv.index(b"--segment") + 1].decode()
                iid = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"SPOTRUN_INSTANCE_ID=")), "")
                self.seen[int(name)] = (_started_at(int(name)), segment, iid)
            for pid, (_t, segment, iid) in list(self.seen.items()):
                if (segment == self.kill_segment and iid in self.early and not self.killed
                        and segment not in self.said):
                    os.killpg(pid, signal.SIGKILL)
                    self.killed.append((pid, iid))
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def first_seen(self, iid: str) -> float:
        return min(t for t, _seg, i in self.seen.values() if i == iid)


def _launch(run: Path, args: list[str], command: list[str], agents_kill: str | None = None,
            **env: str) -> tuple[int, str, dict[str, float], _Agents]:
    """``spotrun launch --local --nodes 2`` to its end: (exit code, output, when the launcher
    said each attempt started, the agents seen)."""
    argv = [sys.executable, "-m", "spotrun.cli", "launch", "--local", "--run-url", str(run), "--nodes", "2",
            "--nproc-per-node", "1", *args, "--", *command]
    said: dict[str, float] = {}
    agents = _Agents(str(run), said, agents_kill)
    lines: list[str] = []
    proc = subprocess.Popen(argv, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, start_new_session=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + TIMEOUT
        for line in proc.stdout:
            lines.append(line)
            found = re.match(r"spotrun: segment (\d+) \(", line)
            if found:
                said.setdefault(f"sim-{found.group(1)}", time.time())
            early = re.match(r"spotrun: (\S+): replacement for \S+ started at the loss", line)
            if early:
                agents.early.add(early.group(1))
            assert time.monotonic() < deadline, "".join(lines)[-8000:]
        code = proc.wait(timeout=60)
    finally:
        agents.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=90)
    return code, "".join(lines), said, agents


@pytest.fixture(scope="module")
def two_losses(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The shared 2-node DDP run: two interruptions, the second replacement killed while it waits."""
    base = tmp_path_factory.mktemp("warm")
    run = base / "run"
    t0 = time.monotonic()
    code, out, said, agents = _launch(
        # --seed 4: the joining node vanishes, then the joining node (the replacement) gets a
        # notice (a vanished rendezvous host makes the survivor's agent exit: no replace).
        run, ["--interruptions", "2", "--node-losses", "1", "--seed", "4", "--grace", "30"],
        [sys.executable, DDP_SCRIPT, "--url", str(run), "--steps", str(DDP_STEPS), "--every-steps",
         str(DDP_EVERY), "--step-sleep", "0.05"],
        agents_kill="sim-3", SPOTRUN_LOCAL_DIR=str(base / "local"))
    print(f"2-node launch, two losses: {time.monotonic() - t0:.1f}s")
    return {"run": run, "code": code, "out": out, "said": said, "agents": agents}


@pytest.mark.slow
def test_the_replacement_starts_at_the_loss_and_the_books_say_so(two_losses: dict) -> None:
    run, out, said, agents = two_losses["run"], two_losses["out"], two_losses["said"], two_losses["agents"]
    assert two_losses["code"] == 0, out[-8000:]
    recoveries = _records(run, "recovery_started")
    assert [r["segment_id"] for r in recoveries] == ["sim-2", "sim-3"], (recoveries, out[-8000:])
    first = recoveries[0]
    started = {r["segment_id"]: r for r in _records(run, "segment_started")}
    ended = {r["segment_id"]: r for r in _records(run, "segment_ended")}
    # sim-2: exactly one machine started, the survivor kept; the machine started at the loss.
    (lost,), (kept,) = first["lost"], first["kept"]
    replacement = f"sim-2-n{lost[-1]}"
    assert first["mode"] == "replace" and first["instances_started"] == 1, first
    assert f"{replacement}: replacement for {lost} started at the loss" in out, out[-8000:]
    assert started[replacement]["group"] == "sim-2"
    assert first["capacity_at"] == pytest.approx(started[replacement]["started_at"], abs=0.01)
    assert first["lost_at"] <= first["capacity_at"]
    # ... before the attempt it replaces a node of had ended: the lost node's end and the
    # survivor's exit note (its torchrun returned) both come after the replacement was up.
    survivor_exit = json.loads((run / "launch" / "nodes" / "exits" / "sim-1" / f"{kept}.json").read_text())
    assert read_attempt_exit(Storage(str(run)), "sim-1", kept) in (1, 75)
    assert first["capacity_at"] < survivor_exit["time"] and first["capacity_at"] < ended[lost]["ended_at"]
    # Its agent process existed then (seen in /proc before the launcher said sim-2 started).
    assert agents.first_seen(replacement) < said["sim-2"]
    assert agents.first_seen(replacement) < survivor_exit["time"]
    assert ended[replacement]["reason"] in ("finished", "interrupted")  # sim-2's loss may take it


@pytest.mark.slow
def test_a_replacement_that_dies_while_waiting_is_started_again(two_losses: dict) -> None:
    run, out, agents = two_losses["run"], two_losses["out"], two_losses["agents"]
    assert two_losses["code"] == 0, out[-8000:]
    assert len(agents.killed) == 1, agents.seen
    (_pid, dead), = agents.killed
    second = _records(run, "recovery_started")[1]
    (lost,) = second["lost"]
    assert dead == f"sim-3-n{lost[-1]}"
    assert f"{dead}: the replacement started at the loss exited -9 before its attempt started" in out, out[-8000:]
    ended = {r["segment_id"]: r for r in _records(run, "segment_ended")}
    machines = {s.segment_id: s for s in load_state(Storage(str(run))).segments}
    assert ended[dead]["reason"] == "failed" and "exited before its attempt" in machines[dead].detail
    assert machines[dead].exit_code == -9
    # Two machines for that loss: the dead one and the one started in its slot.
    assert second["instances_started"] == 2, second
    spec = json.loads((run / "launch" / "nodes" / f"{dead}-2.json").read_text())
    assert spec["segment"] == "sim-3" and f"{dead}-2" in [n["instance_id"] for n in spec["nodes"]]
    assert ended[f"{dead}-2"]["reason"] == "finished"
    # Every machine's segment ended; the run finished.
    assert {r["segment_id"] for r in _records(run, "segment_started")} == set(ended)
    assert load_state(Storage(str(run))).status == "finished"


@pytest.mark.slow
def test_the_run_with_early_replacements_is_bit_exact(two_losses: dict, ddp_reference: str) -> None:
    assert two_losses["code"] == 0, two_losses["out"][-8000:]
    step, differences = compare_checkpoints(Storage(ddp_reference), Storage(str(two_losses["run"])))
    assert step == DDP_STEPS and differences == []


# Under torchrun on each node: ignores notices, sleeps, rank 0 writes done.json, all exit 0.
FINISHER = textwrap.dedent(
    """
    import os, sys, time
    time.sleep(float(sys.argv[1]))
    if os.environ["RANK"] == "0":
        with open(os.path.join(os.environ["SPOTRUN_URL"], "done.json"), "w") as f:
            f.write("{}")
    """
)


@pytest.mark.slow
def test_a_replacement_no_attempt_needs_is_stopped(tmp_path: Path) -> None:
    """A notice comes, the replacement starts, but the attempt finishes: its machine stops."""
    script = tmp_path / "finisher.py"
    script.write_text(FINISHER)
    run, local = tmp_path / "run", tmp_path / "local"
    code, out, said, agents = _launch(run, ["--interruptions", "1", "--mean-interval", "1", "--grace", "120"],
                                      [sys.executable, str(script), "8"], SPOTRUN_LOCAL_DIR=str(local))
    assert code == 0, out[-8000:]
    (early,) = re.findall(r"(sim-2-n\d): replacement for sim-1-n\d started at the loss", out) or [None]
    assert early is not None, out[-8000:]
    assert f"{early}: the replacement started at the loss is not needed (finish)" in out, out[-8000:]
    started = {r["segment_id"]: r for r in _records(run, "segment_started")}
    ended = {r["segment_id"]: r for r in _records(run, "segment_ended")}
    machine = {s.segment_id: s for s in load_state(Storage(str(run))).segments}[early]
    assert ended[early]["reason"] == "stopped" and "not needed (finish)" in machine.detail
    # Billed for the time it ran: started during sim-1, ended once sim-1 had.
    assert started[early]["started_at"] < min(ended[f"sim-1-n{i}"]["ended_at"] for i in (0, 1))
    assert ended[early]["ended_at"] > started[early]["started_at"]
    assert _records(run, "recovery_started") == [] and "sim-2" not in said
    # Its process and its machine's local directory are gone.
    # (More than one pid when the watch caught a child the agent forked, a standby with warm
    # workers on, before its exec: /proc shows the agent's command line until then.)
    pids = [p for p, (_t, _s, iid) in agents.seen.items() if iid == early]
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pids and not any(Path(f"/proc/{p}").exists() for p in pids)
    assert not (local / early).exists()
    state = load_state(Storage(str(run)))
    assert state.status == "finished" and all(not s.open for s in state.segments)


# -- the node agent's background import ----------------------------------------------------------


def _spec() -> ClusterSpec:
    return ClusterSpec(segment="a1", nodes=[{"instance_id": "a", "address": "127.0.0.1"},
                                            {"instance_id": "b", "address": "127.0.0.1"}],
                       nproc_per_node=1, rdzv_id="run-a1")


# The agent with torchrun's start replaced: the cluster file comes only once torchrun's
# machinery is imported (never, without the background import: the wait times out, exit 3).
IMPORTS_WHILE_WAITING = textwrap.dedent(
    """
    import os, sys, time
    import spotrun.launch.node as node
    real_wait = node.wait_for_cluster
    def wait(storage, *args, **kw):
        deadline = time.monotonic() + 60
        while "torch.distributed.run" not in sys.modules and time.monotonic() < deadline:
            time.sleep(0.05)
        print("imported while waiting:", "torch.distributed.run" in sys.modules, flush=True)
        node.write_cluster(storage, node.ClusterSpec.from_json(__import__("json").loads(os.environ["SPEC"])))
        return real_wait(storage, *args, **kw)
    def serve(spec, index):
        print("torchrun ready", flush=True)
        os._exit(0)
    node.wait_for_cluster, node.serve_attempt = wait, serve
    sys.exit(node.main(["--timeout", "5", "--poll", "0.1", "--", "python", "t.py"]))
    """
)


def test_the_agent_imports_torchrun_while_it_waits(tmp_path: Path) -> None:
    env = _env(SPOTRUN_URL=str(tmp_path), SPOTRUN_INSTANCE_ID="b", SPEC=json.dumps(_spec().to_json()))
    proc = subprocess.run([sys.executable, "-c", IMPORTS_WHILE_WAITING], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "imported while waiting: True" in proc.stdout and "torchrun ready" in proc.stdout


def test_a_broken_torch_fails_after_the_wait_with_todays_message(tmp_path: Path) -> None:
    """torch that cannot be imported: the agent still waits for its cluster file first (as
    before the background import), then fails with the very exception the import raises."""
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('this torch is broken (a test)')\n")
    run = tmp_path / "run"
    run.mkdir()
    env = _env(SPOTRUN_URL=str(run), SPOTRUN_INSTANCE_ID="b")
    env["PYTHONPATH"] = str(tmp_path / "fake") + os.pathsep + env["PYTHONPATH"]
    today = subprocess.run([sys.executable, "-c", "from spotrun.distributed import torchrun"], env=env,
                           capture_output=True, text=True, timeout=60)
    expected = today.stderr.strip().splitlines()[-1]
    assert today.returncode == 1 and expected == "ImportError: this torch is broken (a test)", today.stderr
    agent = subprocess.Popen([sys.executable, "-m", "spotrun.launch.node", "--timeout", "60", "--poll", "0.1",
                              "--", "python", "t.py"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        assert agent.poll() is None, agent.communicate()  # waiting, not failed early
        write_cluster(Storage(str(run)), _spec())
        _out, err = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 1, err
    assert err.strip().splitlines()[-1] == expected and "Traceback" in err, err
