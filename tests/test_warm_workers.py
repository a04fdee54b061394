"""Warm workers (SPOTRUN_WARM_WORKERS=1): torchrun's workers are forks of a forkserver that
imported torch, and each must still look, to the script, like ``python -u script args``.

Real processes throughout: one agent process (a driver that does what the node agent does:
forkserver started first, environment changed after, then several torchrun attempts in the
same process, as a survivor runs them) against one with warm workers off, both running the
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

# Line 1 must come before any import: it says whether torch was in the process already.
PROBE = '''\
import sys; PRELOADED = "torch" in sys.modules; EXTRA = {"torch.distributed.fsdp", "colorsys"} & set(sys.modules)
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
        "threads": torch.get_num_threads(), "cuda_initialized": torch.cuda.is_initialized(),
        "sigint": str(__import__("signal").getsignal(2)), "sigterm": str(__import__("signal").getsignal(15)),
        "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LATE_VAR",
                "EARLY_GONE", "SPOTRUN_EXIT_NOTES", "OMP_NUM_THREADS", "TORCHELASTIC_RUN_ID")},
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

# What the node agent does (spotrun.launch.node): forkserver first, the environment of the
# attempt set after it, then spotrun's torchrun, once per attempt, in one process.
DRIVER = '''\
import json, os, sys


def main():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from spotrun.launch import warm
    import spotrun.distributed as sd
    from torch.distributed.run import parse_args
    out, probe, modes = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    if warm.enabled():
        assert warm.start_forkserver()
    os.environ["LATE_VAR"] = "late"      # set after the forkserver started, as peer addresses are
    os.environ.pop("EARLY_GONE", None)   # gone since, as a previous attempt's variables are
    results = {}
    for i, mode in enumerate(modes):
        if mode == "killfs":  # the forkserver dies between attempts: the next one starts it again
            from multiprocessing import forkserver
            import signal, time
            pid = forkserver._forkserver._forkserver_pid
            if pid:  # none when warm workers are off
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            results[mode] = pid
            continue
        n = 2 if mode in ("probe", "probe2") else 1
        target = ["--module", "sub.probe"] if mode == "probe-m" else [probe]
        argv = ["--nnodes", "1", "--nproc-per-node", str(n), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", f"t{i}", "--max-restarts", "0",
                "--monitor-interval", "0.1", *target, out, mode]
        if mode.startswith("probe") or mode == "sleep":
            results[mode] = sd.torchrun(argv)
            continue
        try:  # the workers' own codes, as torchrun reports them
            if not sd._run_warm(parse_args(argv)):
                from torch.distributed.run import run
                run(parse_args(argv))
            results[mode] = [0]
        except ChildFailedError as exc:
            results[mode] = sorted(f.exitcode for f in exc.failures.values())
    results["dynamo"] = "torch._dynamo" in sys.modules  # see test_a_worker_failure_log...
    print("RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":  # workers import this file as __mp_main__
    main()
'''

MODES = "probe,probe-m,exit75,osexit75,osexit0,raise,kill,killfs,probe2"


def _agent(tmp_path: Path, name: str, warm_on: bool, modes: str = MODES,
           **popen: object) -> tuple[subprocess.Popen[str], Path]:
    out = tmp_path / name
    out.mkdir()
    work = tmp_path / f"{name}-cwd"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "probe.py").write_text(PROBE)
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RANK")}
    env.update(EARLY_GONE="early", PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               SPOTRUN_WARM_PRELOAD="colorsys, numpy.random, no_such_module_x")  # a missing one is skipped
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


def test_a_warm_worker_is_a_fork_with_torch_imported_and_a_cold_one_is_not(runs):
    # Fails with the feature off: the worker's parent is then torchrun's agent, torch not loaded.
    for rank in (0, 1):
        warm, cold = _probe(runs["warm_out"], rank), _probe(runs["cold_out"], rank)
        assert warm["preloaded"] and "forkserver" in warm["parent"], warm
        assert warm["extra"] == ["colorsys", "torch.distributed.fsdp"]  # SPOTRUN_WARM_PRELOAD too
        assert not cold["preloaded"] and "forkserver" not in cold["parent"], cold
        assert warm["cuda_initialized"] is False


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
        # the attempt's environment, not the forkserver's: set / removed after it started
        assert env_w["LATE_VAR"] == env_c["LATE_VAR"] == "late"
        assert env_w["EARLY_GONE"] is None and env_c["EARLY_GONE"] is None
        assert env_w.pop("SPOTRUN_EXIT_NOTES") and env_c.pop("SPOTRUN_EXIT_NOTES")
        env_w.pop("TORCHELASTIC_RUN_ID"), env_c.pop("TORCHELASTIC_RUN_ID")
        assert env_w == env_c and env_w["RANK"] == str(rank) and env_w["OMP_NUM_THREADS"] == "1"
        assert warm["threads"] == 1
    assert runs["warm"]["probe"] == runs["cold"]["probe"] == 0
    for text in (runs["warm_text"], runs["cold_text"]):
        assert "probe-stdout-0" in text and "probe-stdout-1" in text


@pytest.mark.parametrize("draw", ["torch_draw", "np_draw"])
def test_unseeded_random_draws_are_fresh_in_every_warm_worker(runs, draw):
    # torch seeds its generator at import, numpy.random too (preloaded here through
    # SPOTRUN_WARM_PRELOAD): without the reseed every fork starts from the forkserver's state,
    # so both ranks, and the next attempt's worker (probe-m, same forkserver), draw the same.
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


def test_a_dead_forkserver_is_started_again_for_the_next_attempt(runs):
    assert runs["warm"]["probe2"] == 0
    for rank in (0, 1):
        again = json.loads((runs["warm_out"] / f"probe2-{rank}.json").read_text())
        assert again["preloaded"] and "forkserver" in again["parent"]
        first = json.loads((runs["warm_out"] / f"probe-{rank}.json").read_text())
        assert first["ppid"] == runs["warm"]["killfs"] != again["ppid"]
        assert again["own_session"] and again["env"]["LATE_VAR"] == "late"


def test_exit_codes_are_those_of_python_u_script(runs, tmp_path):
    expected = {}
    for mode in ("exit75", "osexit75", "osexit0", "raise", "kill"):
        p = subprocess.run([PY, "-u", "-c", PROBE, str(tmp_path), mode], capture_output=True)
        expected[mode] = [p.returncode]
    assert expected == {"exit75": [75], "osexit75": [75], "osexit0": [0], "raise": [1], "kill": [-9]}
    # os._exit(0): torchrun counts a function worker finished only once its return value is
    # in torchrun's queue; without warm.run_worker putting it, the agent polled forever.
    got = {m: runs["warm"][m] for m in expected}
    assert got == expected
    assert "RuntimeError: boom" in runs["warm_text"]


def test_a_worker_failure_is_logged_with_its_traceback_without_importing_dynamo(runs):
    # torch's log formatter imports torch._dynamo (3-7 s of CPU here) to format a record with
    # exc_info; torchrun logs each failed warm worker so, and every survivor's agent paid it
    # between its workers' exit 75 and torchrun returning (the 39 s DDP notice in BENCHMARKS).
    assert "ProcessExitedException: process 0 terminated with exit code 75" in runs["warm_text"]
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


def test_off_by_default_and_spelled_as_documented():
    from spotrun.launch import warm

    assert not warm.enabled({})
    assert warm.enabled({"SPOTRUN_WARM_WORKERS": "1"})
    assert not warm.enabled({"SPOTRUN_WARM_WORKERS": "0"})


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
