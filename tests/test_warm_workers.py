"""Warm workers (SPOTRUN_WARM_WORKERS=1): torchrun's workers run in standby interpreters that
imported torch ahead, and each must still look, to the script, like ``python -u script args``.

Real processes throughout: one agent process (a driver that does what the node agent does:
standbys started first, spotrun's variables changed after, then several torchrun attempts in
the same process, as a survivor runs them) against one with warm workers off, both running the
same probe script; the probe's view of its interpreter is compared field by field.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import shared_run

PY = sys.executable

# Lines 1-3 must come before any import: they say what was in the process already.
PROBE = '''\
import sys; PRELOADED = "torch" in sys.modules
EXTRA = {"torch.distributed.fsdp", "colorsys", "torch._dynamo", "torch.distributed.checkpoint",
         "fsspec.implementations.local"} & set(sys.modules)
import atexit, json, os, threading
out, mode = sys.argv[1], sys.argv[2]
rank = os.environ.get("RANK", "x")
def note(name):
    with open(os.path.join(out, f"{name}-{rank}"), "w") as f:
        f.write("1")
atexit.register(note, "atexit")
threading._register_atexit(note, "threading_atexit")
def late():  # a non-daemon thread the interpreter joins before atexit
    import time; time.sleep(0.3); note("thread")
threading.Thread(target=late).start()
if mode.startswith("probe"):
    import torch
    ppid = os.getppid()
    with open(f"/proc/{ppid}/cmdline", "rb") as f:
        parent = f.read().replace(b"\\0", b" ").decode()
    info = {
        "preloaded": PRELOADED, "extra": sorted(EXTRA), "parent": parent, "ppid": ppid,
        "own_session": os.getsid(0) == os.getpid(),
        "argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "file": __file__,
        "name": __name__, "main_is_me": sys.modules["__main__"].__dict__ is globals(),
        "write_through": sys.stdout.write_through, "line_buffering": sys.stdout.line_buffering,
        "stderr_write_through": sys.stderr.write_through,
        "np_draw": float(__import__("numpy.random").random.rand()), "torch_draw": torch.rand(1).item(),
        "hash": hash("spotrun"), "orig_argv": sys.orig_argv,
        "cmdline": open("/proc/self/cmdline", "rb").read().replace(b"\\0", b" ").decode(),
        "threads": torch.get_num_threads(), "cuda_initialized": torch.cuda.is_initialized(),
        "sigint": str(__import__("signal").getsignal(2)), "sigterm": str(__import__("signal").getsignal(15)),
        "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SPOTRUN_LATE_VAR",
                "SPOTRUN_EARLY_GONE", "SPOTRUN_EXIT_NOTES", "OMP_NUM_THREADS", "TORCHELASTIC_RUN_ID",
                "PLAIN_LATE", "PLAIN_NEW")},
    }
    print(f"probe-stdout-{rank}")
    with open(os.path.join(out, f"{mode}-{rank}.json"), "w") as f:
        json.dump(info, f)
elif mode == "exit75":
    sys.exit(75)
elif mode == "osexit75":
    os._exit(75)
elif mode == "osexit0":  # as spotrun's examples end (no gloo teardown)
    os._exit(0)
elif mode == "raise":
    raise RuntimeError("boom")
elif mode == "kill":
    os.kill(os.getpid(), 9)
elif mode == "sleep":
    with open(os.path.join(out, f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    import time; time.sleep(120)
'''

# What the node agent does (spotrun.launch.node): standbys first, the attempt's spotrun
# variables set after them, then spotrun's torchrun, once per attempt, in one process.
DRIVER = '''\
import json, os, signal, sys, time


def main():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from spotrun.launch import warm
    import spotrun.distributed as sd
    out, probe, modes = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    results = {}
    for i, mode in enumerate(modes):
        mode, _, twist = mode.partition(":")
        n = 2 if mode in ("probe", "probe2") else 1
        mode += twist  # the probe's name for its files
        target = ["--module", "sub.probe"] if mode == "probe-m" else [probe]
        if warm.enabled():  # ahead of torchrun, as the agent starts them at its start
            warm.pool().fill(n, warm.worker_tail([*target, out, mode]))
            assert all(s.wait_ready(120) for s in warm.pool()._idle)
        if i == 0:
            os.environ["SPOTRUN_LATE_VAR"] = "late"   # set after the standbys started, as peer addresses are
            os.environ.pop("SPOTRUN_EARLY_GONE", None)  # gone since, as a previous attempt's variables are
        if twist == "killsb":  # the standbys die before torchrun takes them
            for sb in warm.pool()._idle:
                os.kill(sb.proc.pid, signal.SIGKILL)
                results.setdefault("killed", []).append(sb.proc.pid)
            time.sleep(0.5)
        if twist == "plain":  # a variable an interpreter could read at start, set after the standbys
            os.environ["PLAIN_LATE"] = "1"
        if twist == "newenv":  # set before the agent's fill for the attempt: new standbys under it
            os.environ["PLAIN_NEW"] = "1"
            warm.pool().fill(n, warm.worker_tail([*target, out, mode]))
        argv = ["--nnodes", "1", "--nproc-per-node", str(n), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", f"t{i}", "--max-restarts", "0",
                "--monitor-interval", "0.1", *target, out, mode]
        if mode.startswith("probe") or mode == "sleep":
            results[mode] = sd.torchrun(argv)
            os.environ.pop("PLAIN_LATE", None)
            os.environ.pop("PLAIN_NEW", None)
            continue
        try:  # the workers' own codes, as torchrun reports them
            sd._warm_workers(out)
            from torch.distributed.run import run
            run(parse_args(argv))
            results[mode] = [0]
        except ChildFailedError as exc:
            results[mode] = sorted(f.exitcode for f in exc.failures.values())
    results["dynamo"] = "torch._dynamo" in sys.modules  # see test_a_worker_failure_log...
    print("RESULTS " + json.dumps(results), flush=True)


from torch.distributed.run import parse_args

if __name__ == "__main__":
    main()
'''

MODES = "probe,probe-m,exit75,osexit75,osexit0,raise,kill,probe2:killsb,probe2:plain,probe2:newenv"


def _agent(tmp_path: Path, name: str, warm_on: bool, modes: str = MODES,
           **popen: object) -> tuple[subprocess.Popen[str], Path]:
    out = tmp_path / name
    out.mkdir()
    work = tmp_path / f"{name}-cwd"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "probe.py").write_text(PROBE)
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RANK")}
    env.update(SPOTRUN_EARLY_GONE="early", PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               SPOTRUN_WARM_PRELOAD="colorsys, numpy.random, no_such_module_x",  # a missing one is skipped
               SPOTRUN_URL=str(tmp_path / "url"))  # a run URL on local disk: its storage code is preloaded
    env["SPOTRUN_WARM_WORKERS"] = "1" if warm_on else "0"
    proc = subprocess.Popen([PY, str(tmp_path / "driver.py"), str(out), "sub/probe.py", modes],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)  # type: ignore[call-overload]
    return proc, out


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[dict, str]:
    try:
        text = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        text = proc.communicate()[0]
        pytest.fail(f"agent did not finish:\n{text[-4000:]}")
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, text[-4000:]
    return json.loads(lines[-1][len("RESULTS "):]), text


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One agent with warm workers, one without (only the probe: its codes are the reference).

    Built once per session through ``shared_run`` (helpers.py): worksteal can hand this
    file's tests to both workers, and each would otherwise run both agents again."""

    def build(tmp: Path) -> None:
        tmp.mkdir()
        for name, warm_on, modes in (("warm", True, MODES), ("cold", False, "probe")):
            results, text = _finish(_agent(tmp, name, warm_on, modes=modes)[0])
            (tmp / f"{name}-results.json").write_text(json.dumps(results))
            (tmp / f"{name}-text.log").write_text(text)

    tmp = shared_run(tmp_path_factory, "warm-workers", build)
    return {name + key: value for name in ("warm", "cold") for key, value in (
        ("", json.loads((tmp / f"{name}-results.json").read_text())),
        ("_text", (tmp / f"{name}-text.log").read_text()), ("_out", tmp / name))}


def _probe(out: Path, rank: int) -> dict:
    return json.loads((out / f"probe-{rank}.json").read_text())


def test_a_warm_worker_is_a_standby_with_torch_imported_and_a_cold_one_is_not(runs):
    # Fails with the feature off: torch is then not loaded before the script's first line.
    for rank in (0, 1):
        warm, cold = _probe(runs["warm_out"], rank), _probe(runs["cold_out"], rank)
        # What FSDP2's fully_shard and the checkpointer's first restore import (dynamo, DCP)
        # and the run URL's storage code (a local disk's fsspec filesystem) come imported too.
        assert warm["preloaded"] and warm["extra"] == [
            "colorsys", "fsspec.implementations.local", "torch._dynamo", "torch.distributed.checkpoint",
            "torch.distributed.fsdp"], warm
        assert not cold["preloaded"] and not cold["extra"], cold
        # both are children of the agent (torchrun's), each in a session of its own
        assert "driver.py" in warm["parent"] and "driver.py" in cold["parent"]
        assert warm["own_session"] and cold["own_session"]
        assert warm["cuda_initialized"] is False
        # ps and pgrep -f see the script and its arguments
        assert "sub/probe.py " in warm["cmdline"] and warm["cmdline"].endswith(" probe ")
        assert "-c" in warm["orig_argv"] and "-c" not in cold["orig_argv"]  # documented


def test_a_warm_worker_sees_what_python_u_script_sees(runs):
    for rank in (0, 1):
        warm, cold = _probe(runs["warm_out"], rank), _probe(runs["cold_out"], rank)
        for key in ("own_session", "name", "main_is_me", "write_through", "line_buffering",
                    "stderr_write_through", "threads", "sigint", "sigterm"):
            assert warm[key] == cold[key], (key, warm[key], cold[key])
        # argv, path and cwd name each run's own folder: compare them relative to it
        for key in ("argv", "path0", "cwd", "file"):
            w = json.dumps(warm[key]).replace(str(runs["warm_out"]), "OUT").replace("warm-cwd", "CWD")
            c = json.dumps(cold[key]).replace(str(runs["cold_out"]), "OUT").replace("cold-cwd", "CWD")
            assert w == c, (key, w, c)
        assert warm["path0"].endswith("/sub") and warm["argv"][0] == "sub/probe.py"
        env_w, env_c = dict(warm["env"]), dict(cold["env"])
        # the attempt's spotrun variables, not the standby's: set / removed after it started
        assert env_w["SPOTRUN_LATE_VAR"] == env_c["SPOTRUN_LATE_VAR"] == "late"
        assert env_w["SPOTRUN_EARLY_GONE"] is None and env_c["SPOTRUN_EARLY_GONE"] is None
        assert env_w.pop("SPOTRUN_EXIT_NOTES") and env_c.pop("SPOTRUN_EXIT_NOTES")
        env_w.pop("TORCHELASTIC_RUN_ID"), env_c.pop("TORCHELASTIC_RUN_ID")
        assert env_w == env_c and env_w["RANK"] == str(rank) and env_w["OMP_NUM_THREADS"] == "1"
        assert warm["threads"] == 1  # started before torchrun set OMP_NUM_THREADS=1: set for it
    assert runs["warm"]["probe"] == runs["cold"]["probe"] == 0
    for text in (runs["warm_text"], runs["cold_text"]):
        assert "probe-stdout-0" in text and "probe-stdout-1" in text


@pytest.mark.parametrize("draw", ["torch_draw", "np_draw", "hash"])
def test_random_draws_and_str_hashes_are_each_workers_own(runs, draw):
    # Each standby is an interpreter of its own: unseeded torch and numpy draws and the str
    # hash seed differ between ranks and attempts, as for subprocess workers (forks of one
    # forkserver, the first design, shared the hash seed, which nothing could reset).
    draws = [_probe(runs["warm_out"], rank)[draw] for rank in (0, 1)]
    draws.append(json.loads((runs["warm_out"] / "probe-m-0.json").read_text())[draw])
    assert len(set(draws)) == 3, draws
    cold = [_probe(runs["cold_out"], rank)[draw] for rank in (0, 1)]
    assert len(set(cold)) == 2, cold  # subprocess workers: independent, as the reference


def test_a_module_runs_as_python_u_m_module_runs_it(runs, tmp_path):
    """``python -m sub.probe`` (torchrun --module): compared with that command run directly."""
    warm = json.loads((runs["warm_out"] / "probe-m-0.json").read_text())
    work = runs["warm_out"].parent / "warm-cwd"
    env = {**os.environ, "RANK": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([PY, "-u", "-m", "sub.probe", str(tmp_path), "probe-m"], cwd=work, env=env,
                   check=True, capture_output=True, timeout=120)
    plain = json.loads((tmp_path / "probe-m-0.json").read_text())
    for key in ("path0", "cwd", "file", "name", "main_is_me", "write_through"):
        assert warm[key] == plain[key], (key, warm[key], plain[key])
    assert warm["own_session"]
    assert warm["argv"][0] == plain["argv"][0] == str(work / "sub" / "probe.py")
    assert warm["path0"] == str(work) and warm["preloaded"]


def test_a_dead_standby_or_a_changed_variable_starts_the_worker_as_usual(runs):
    assert runs["warm"]["probe2killsb"] == runs["warm"]["probe2plain"] == runs["warm"]["probe2newenv"] == 0
    assert len(runs["warm"]["killed"]) == 2
    for rank in (0, 1):
        dead = json.loads((runs["warm_out"] / f"probe2killsb-{rank}.json").read_text())
        assert not dead["preloaded"] and dead["env"]["SPOTRUN_LATE_VAR"] == "late"
        plain = json.loads((runs["warm_out"] / f"probe2plain-{rank}.json").read_text())
        assert not plain["preloaded"] and plain["env"]["PLAIN_LATE"] == "1"
        # changed before the agent's fill: it ended the old standbys and started new ones under it
        new = json.loads((runs["warm_out"] / f"probe2newenv-{rank}.json").read_text())
        assert new["preloaded"] and new["env"]["PLAIN_NEW"] == "1" and new["env"]["PLAIN_LATE"] is None
    assert "PLAIN_LATE differs from when the standby started" in runs["warm_text"]
    assert "a standby ended before it was used (exit -9)" in runs["warm_text"]


def test_exit_codes_are_those_of_python_u_script(runs, tmp_path):
    expected = {}
    for mode in ("exit75", "osexit75", "osexit0", "raise", "kill"):
        p = subprocess.run([PY, "-u", "-c", PROBE, str(tmp_path), mode], capture_output=True)
        expected[mode] = [p.returncode]
    assert expected == {"exit75": [75], "osexit75": [75], "osexit0": [0], "raise": [1], "kill": [-9]}
    got = {m: runs["warm"][m] for m in expected}
    assert got == expected
    assert "RuntimeError: boom" in runs["warm_text"]


def test_a_worker_failure_is_logged_with_its_traceback_without_importing_dynamo(runs):
    # torch's log formatter imports torch._dynamo (3-7 s of CPU here) to format a record with
    # exc_info; the agent never needs it, whatever its workers did.
    assert 'raise RuntimeError("boom")' in runs["warm_text"]
    assert runs["warm"]["dynamo"] is False


def test_exit_hooks_and_non_daemon_threads_run_as_in_a_fresh_interpreter(runs):
    out = runs["warm_out"]
    # probe (2 ranks), sys.exit(75) and an exception run them: spotrun's ledger flush is an
    # atexit hook, the checkpointer's close a threading exit hook.
    # os._exit and SIGKILL skip them, as they do for python itself.
    for name in ("atexit", "threading_atexit", "thread"):
        assert (out / f"{name}-0").exists() and (out / f"{name}-1").exists(), name
    cold = runs["cold_out"]
    for name in ("atexit", "threading_atexit", "thread"):
        assert (cold / f"{name}-0").exists(), name


def test_the_agents_whole_tree_killed_leaves_no_worker(tmp_path):
    from spotrun.launch.proctree import kill_tree

    proc, out = _agent(tmp_path, "kill", True, modes="sleep", start_new_session=True)
    pid_file = out / "pid-0"
    deadline = time.monotonic() + 120
    while not pid_file.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert pid_file.exists(), proc.communicate()[0][-3000:] if proc.poll() is not None else "no worker"
    worker = int(pid_file.read_text())
    kill_tree(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.1)
    assert not _alive(worker), "a warm worker outlived its agent's tree"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_on_by_default_and_spelled_as_documented():
    from spotrun.launch import warm

    assert warm.enabled({}) and warm.enabled({"SPOTRUN_WARM_WORKERS": ""})
    for on in ("1", "true", "Yes", " on "):
        assert warm.enabled({"SPOTRUN_WARM_WORKERS": on})
    for off in ("0", "false", "No", " off "):
        assert not warm.enabled({"SPOTRUN_WARM_WORKERS": off})


def test_torchrun_run_by_hand_starts_no_standby(tmp_path):
    # Standbys help only where an agent started them ahead; python -m spotrun.distributed
    # alone starts its workers as torchrun does (nothing started, no hook needed).
    env = {**os.environ, "SPOTRUN_WARM_WORKERS": "1"}
    env.pop("SPOTRUN_URL", None)
    script = tmp_path / "p.py"
    script.write_text('import sys; print("torch" in sys.modules, flush=True)\n')
    out = subprocess.run([PY, "-m", "spotrun.distributed", "--nproc-per-node", "1", "--standalone",
                          "--monitor-interval", "0.1", str(script)], env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False" and "standby" not in out.stderr


def test_ec2_user_data_passes_the_switch_on_when_the_launcher_has_it(monkeypatch):
    from spotrun.launch.userdata import build_user_data

    kw = dict(run_url="s3://b/r", run_id="r", command=["python", "train.py"], nodes=2)
    monkeypatch.delenv("SPOTRUN_WARM_WORKERS", raising=False)
    assert "SPOTRUN_WARM_WORKERS" not in build_user_data(**kw)
    monkeypatch.setenv("SPOTRUN_WARM_WORKERS", "1")
    script = build_user_data(**kw)
    assert "export SPOTRUN_WARM_WORKERS=1" in script
    assert script.index("export SPOTRUN_WARM_WORKERS=1") < script.index("-m spotrun.launch.node")
    # an explicit --env wins over the launcher's environment
    assert "export SPOTRUN_WARM_WORKERS=0" in build_user_data(**kw, env={"SPOTRUN_WARM_WORKERS": "0"})


def test_an_agent_that_runs_again_starts_its_next_standby_after_the_first_step(tmp_path):
    # A survivor's next attempt starts warm only if new standbys wait by then; started while
    # this attempt restarts, their imports would slow it: they start once a worker noted its
    # first training step (REFILL_DELAY_S at the latest).
    from spotrun.launch import warm

    script = tmp_path / "quick.py"
    script.write_text("import sys; sys.exit(3)\n")
    tail = (str(script),)
    pool = warm.Pool()
    stepped = [False]
    pool.first_step = lambda: stepped[0]
    try:
        pool.keep(1, tail)
        pool.fill(1, tail)
        proc = pool.take(tail, dict(os.environ), str(tmp_path))
        assert proc is not None and proc.wait(timeout=120) == 3  # the script's own exit code
        time.sleep(1.0)
        assert pool._idle == []  # no refill before the first step
        stepped[0] = True
        deadline = time.monotonic() + 10
        while not pool._idle and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(pool._idle) == 1 and pool._idle[0].wait_ready(120)
        assert pool._idle[0].proc.pid != proc.pid
    finally:
        pool.close()


def test_a_dead_attempts_stop_kills_its_warm_workers_and_spares_the_idle_standbys(tmp_path):
    # A standby made into a worker was started before the attempt (so before the dead-attempt
    # watch noted the sessions that were there): the stop must still reach it; an idle one
    # waits for the next attempt and must not be killed.
    from spotrun.launch import warm
    from spotrun.launch.grow import GrowWatch

    script = tmp_path / "w.py"
    script.write_text("import time; time.sleep(120)\n")
    tail = (str(script),)
    pool = warm.pool()
    try:
        pool.fill(1, tail)
        worker = pool.take(tail, dict(os.environ), str(tmp_path))
        assert worker is not None
        pool.fill(1, tail)
        (idle,) = warm.idle_pids()
        spec = type("Spec", (), {"grow": False, "segment": "sim-2", "nodes": ()})()
        stuck: list = []
        watch = GrowWatch(lambda: spec, 0.05, name="t", dead_grace_s=0.5, stuck_s=lambda s: 0.3,
                          on_stuck=stuck.append)
        assert worker.wait(timeout=30) in (-signal.SIGTERM, -signal.SIGKILL)
        end = time.monotonic() + 30
        while not stuck and time.monotonic() < end:
            time.sleep(0.05)
        assert stuck == [spec] and _alive(idle) and warm.idle_pids() == {idle}
        watch.stop()
    finally:
        warm.close()
    end = time.monotonic() + 10
    while _alive(idle) and time.monotonic() < end:
        time.sleep(0.1)
    assert not _alive(idle)  # closing the pool ends its idle standbys


def test_retiring_a_standby_never_holds_the_pool(tmp_path, monkeypatch):
    # A retire waits (up to 10 s) for its process to be reaped; under the pool's lock that
    # wait would stall the agent's main thread taking a standby for its next attempt.
    import threading

    from spotrun.launch import warm

    slow_retire = warm._Standby.retire

    def retire(self):
        time.sleep(2.0)
        slow_retire(self)

    monkeypatch.setattr(warm._Standby, "retire", retire)
    old, new = tmp_path / "old.py", tmp_path / "new.py"
    for script in (old, new):
        script.write_text("pass\n")
    pool = warm.Pool()
    try:
        pool.fill(1, (str(old),))
        filling = threading.Thread(target=pool.fill, args=(1, (str(new),)))
        filling.start()  # ends the standby for old.py (2 s), starts one for new.py
        time.sleep(0.3)
        t = time.monotonic()
        pool.idle_pids()
        assert time.monotonic() - t < 1.0  # not behind the retire
        filling.join(timeout=30)
        assert [s.tail for s in pool._idle] == [(str(new),)]
    finally:
        pool.close()
