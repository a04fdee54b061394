"""Helpers shared by several test files: processes (real training runs), EC2 fakes."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = str(REPO / "examples" / "train.py")
DDP_SCRIPT = str(REPO / "tests" / "scripts" / "ddp_train.py")
# The 2-rank DDP run every multi-rank and multi-node test of ddp_train.py resumes and compares
# against (see ``ddp_reference`` in conftest.py): one length for all, so one reference serves.
DDP_STEPS, DDP_EVERY = 120, 10
#: ``python WARMFORK SOCKET SCRIPT ARGS``: ``python SCRIPT ARGS`` as a fork of a warm server.
WARMFORK = str(REPO / "tests" / "warmfork.py")


def free_port(following: int = 0) -> int:
    """A port (and ``following`` more after it) for a process the test starts to bind:
    spotrun's own pick, outside the kernel's ephemeral range, so no client socket of
    the busy suite takes it meanwhile (spotrun/launch/ports.py)."""
    from spotrun.launch.ports import free_port as pick

    return pick(following)


def env_for(url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["SPOTRUN_URL"] = url
    env.update(extra)
    return env


def cli(*args: str) -> subprocess.CompletedProcess:
    """``spotrun ARGS`` through the CLI's entry point in this process: the exit code and
    output a ``python -m spotrun.cli ARGS`` child would give, without that child's
    interpreter start and imports (a second or more each on a loaded 2-core box). For
    commands that read a run folder or signal another process (logs, cost, status, stop);
    a test of the process itself (one-line errors, a closed pipe) starts one."""
    from spotrun.cli import main

    raw = {"out": io.BytesIO(), "err": io.BytesIO()}
    streams = {k: io.TextIOWrapper(b, encoding="utf-8", write_through=True) for k, b in raw.items()}
    with contextlib.redirect_stdout(streams["out"]), contextlib.redirect_stderr(streams["err"]):
        code = main(list(args))
    for stream in streams.values():
        stream.flush()
    # Read back as ``text=True`` would (universal newlines).
    text = {k: io.TextIOWrapper(io.BytesIO(b.getvalue()), encoding="utf-8").read() for k, b in raw.items()}
    return subprocess.CompletedProcess(["spotrun", *args], code, text["out"], text["err"])


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 60.0) -> str:
    """Read the child's output until a line contains ``needle``; fail on exit or timeout."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    # A warm child's pipe is polled, so its deadline holds while it prints nothing (a Popen's
    # readline blocks until a line or the end).
    readline_by = getattr(proc.stdout, "readline_by", None)
    while time.monotonic() < deadline:
        line = proc.stdout.readline() if readline_by is None else readline_by(deadline)
        if line is None:
            break
        if not line:
            raise AssertionError(f"process exited ({proc.wait()}) before printing {needle!r}")
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} within {timeout}s")


def run_to_end(args: list[str], env: dict[str, str], timeout: float = 300) -> str:
    """Run a training script (``python ARGS``) to its end; its output. The test fails, showing
    the output's tail, unless it exits 0 (finished, done.json written)."""
    from spotrun.records.layout import EXIT_FINISHED

    proc = spawn(args, env)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == EXIT_FINISHED, out[-4000:]
    return out


def finish(proc: subprocess.Popen, timeout: float = 120.0) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out or ""


def finish_session(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for a torchrun-style launcher started with ``start_new_session=True``; on timeout
    kill its whole session (the launcher and every worker) and fail, showing its output."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Every descendant, not only the session: torchrun starts each worker in a session of
        # its own, and one left alive (a warm fork's client) holds the output pipe, so the
        # communicate() below waited forever (a rank deadlocked at its end hung a whole CI run).
        from spotrun.launch.proctree import kill_tree

        kill_tree(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            out = "(output not read: something still holds the pipe)"
        pytest.fail(f"torchrun did not finish within {timeout}s (deadlock?)\n{out[-4000:]}")
    return proc.returncode, out


#: What torchrun puts in every worker's environment that a warm fork cannot take (read at
#: start; see ``warm_ranks`` in conftest.py): set for the launcher too, so its workers inherit it.
RANK_AT_START = {"OMP_NUM_THREADS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def torchrun(script: str, nproc: int, *args: str, env: dict[str, str], wrapper: bool = True,
             warm: Any = None) -> subprocess.Popen:
    """``python -m spotrun.distributed`` (or, with ``wrapper=False``, plain torchrun) running
    ``script`` on ``nproc`` CPU workers, its store on a free 127.0.0.1 port. The launcher gets a
    session of its own, so :func:`finish_session` can kill it and every worker on a hang.

    With ``warm`` (the ``warm_ranks`` fixture, a :class:`warmfork.WarmExec`) the launcher is
    ``python warmfork.py SOCKET -m RUNNER ...`` and each worker it starts ``python -u warmfork.py
    SOCKET SCRIPT ARGS``: clients of stdlib imports whose program runs as a fork of an
    interpreter that imported torch, torch.distributed and spotrun (a real process, signalled,
    killed and exiting for real; a rank's pid is the one the script prints). The returned
    Popen is the launcher's client: its signals reach the launcher, its exit is the launcher's.
    On one torch thread, as torchrun gives every worker of two or more anyway."""
    runner = "spotrun.distributed" if wrapper else "torch.distributed.run"
    python = [sys.executable]
    if warm is not None:
        env = {**env, **RANK_AT_START}
        script, args = WARMFORK, (warm.socket, script, *args)
        python = [sys.executable, WARMFORK, warm.socket]  # the launcher a fork too
    cmd = [*python, "-m", runner, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), script, *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=REPO)


@contextlib.contextmanager
def warm_server(imports: str = "", **env: str) -> Iterator[Any]:
    """A :class:`warmfork.WarmExec` started with a test child's environment (:func:`env_for`,
    less the URL) plus ``env``, its forks sharing ``imports`` too (Python run once: a file's
    heavy libraries, Lightning's or transformers' seconds of imports). A client's environment
    must hold what the server read at its start (``server.at_start``). ``python WARMFORK
    SOCKET SCRIPT ARGS`` is then a real process, signalled and exiting for real; a bit-exact
    comparison is between forks of one server (test_integrations_hf, _lightning: their
    example runs, the reference included)."""
    import tempfile

    from warmfork import WarmExec

    full = {**env_for(""), **env}
    del full["SPOTRUN_URL"]
    # Short: a socket's path has a limit of about 100 bytes, which pytest's folders can pass.
    with tempfile.TemporaryDirectory(prefix="spotrun-warm-") as folder, \
            WarmExec(full, folder, imports=imports) as server:
        yield server


def shared_run(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A run folder built once per test session and shared by every pytest-xdist worker.

    Uninterrupted reference runs cost a process start (torch's import, seconds on a loaded
    machine) each; several modules compare against the same one. Session fixtures are per
    worker, so the workers meet in the session's common temporary folder (the parent of each
    worker's own) and take turns on a file lock: the first builds ``name``, the others wait
    and reuse it. A failed build is remembered, so the other workers fail at once, not after
    building it again.
    """
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-runs"
    root.mkdir(exist_ok=True)
    folder, ok, failed = root / name, root / f"{name}.ok", root / f"{name}.failed"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if failed.exists():
            pytest.fail(f"the shared run {name!r} failed to build in another worker:\n{failed.read_text()}")
        if not ok.exists():
            shutil.rmtree(folder, ignore_errors=True)
            try:
                build(folder)
            except BaseException as exc:
                failed.write_text(f"{type(exc).__name__}: {str(exc)[-4000:]}")
                raise
            ok.touch()
    return folder


def moto_ami(ec2: Any) -> str:
    """An AMI that moto's EC2 (in this process: ``mock_aws`` or the session's moto server)
    holds, asked for by id through ``ec2``. ``describe_images()`` of all 1366 bundled ones
    took 1.5 s per call quiet and 5-15 s at load 10 (moto serializing them to XML), in every
    EC2 test's set-up."""
    from moto.backends import get_backend
    from moto.core import DEFAULT_ACCOUNT_ID

    ami = next(iter(get_backend("ec2")[DEFAULT_ACCOUNT_ID][ec2.meta.region_name].amis))
    return ec2.describe_images(ImageIds=[ami])["Images"][0]["ImageId"]


def committed_steps(url: str) -> list[int]:
    """The steps of the committed checkpoints under ``url``, oldest first."""
    from spotrun.format.commit import list_checkpoints
    from spotrun.storage import Storage

    return [c.step for c in list_checkpoints(Storage(url)) if c.status == "committed"]


def wait_child(proc: subprocess.Popen, ready: Callable[[], Any], what: str, timeout: float = 240.0) -> None:
    """Poll ``ready`` until it is true; fail (with the child's output) if the child exits or
    ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"child exited {proc.returncode} before {what}:\n{proc.communicate()[0][-4000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.05)


def ledger_events(url: str, event: str) -> list[dict]:
    """The run ledger's records of one kind, in ledger order."""
    from spotrun.records.ledger import Ledger
    from spotrun.storage import Storage

    return [r for r in Ledger(Storage(url)).records() if r["event"] == event]


class Inbox:
    """An ``on_notice`` callback that collects notices from a watcher's thread."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.arrived = threading.Event()
        self.arrival_times: list[float] = []

    def __call__(self, notice: Any) -> None:
        self.arrival_times.append(time.monotonic())
        self.items.append(notice)
        self.arrived.set()


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``pred`` every 50 ms until it returns something truthy, and return that; an
    AssertionError naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def wait_until(pred: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll ``pred`` until it holds or ``timeout`` passes; its final answer."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


class FakePlacementGroups:
    """CreatePlacementGroup / DeletePlacementGroup as EC2 answers them (moto has neither)."""

    def __init__(self, client: Any) -> None:
        self.groups: dict[str, dict] = {}
        self.requests: list[tuple[str, dict]] = []
        self.in_use = 0  # how many more deletes answer InvalidPlacementGroup.InUse
        self.deny = False
        for op in ("CreatePlacementGroup", "DeletePlacementGroup"):
            client.meta.events.register(f"provide-client-params.ec2.{op}",
                                        lambda params, _op=op, **_: self.requests.append((_op, dict(params))))
            client.meta.events.register(f"before-call.ec2.{op}", getattr(self, f"_{op}"))

    @staticmethod
    def _answer(status: int, body: dict) -> tuple[Any, dict]:
        class Http:
            status_code = status
            headers: ClassVar[dict] = {}
        return Http(), body

    def _error(self, code: str) -> tuple[Any, dict]:
        return self._answer(400, {"Error": {"Code": code, "Message": f"{code} (fake)"}})

    def _CreatePlacementGroup(self, model: Any, params: dict, **_: Any) -> tuple[Any, dict]:
        _, req = self.requests[-1]
        if self.deny:
            return self._error("UnauthorizedOperation")
        if req["GroupName"] in self.groups:
            return self._error("InvalidPlacementGroup.Duplicate")
        self.groups[req["GroupName"]] = req
        return self._answer(200, {"PlacementGroup": {"GroupName": req["GroupName"], "Strategy": req["Strategy"],
                                                     "State": "available"}})

    def _DeletePlacementGroup(self, model: Any, params: dict, **_: Any) -> tuple[Any, dict]:
        _, req = self.requests[-1]
        if req["GroupName"] not in self.groups:
            return self._error("InvalidPlacementGroup.Unknown")
        if self.in_use:
            self.in_use -= 1
            return self._error("InvalidPlacementGroup.InUse")
        del self.groups[req["GroupName"]]
        return self._answer(200, {})


def tiny_hf_trainer(output_dir: str, steps: int, callback):
    """A 2-layer GPT-2 Trainer on the HF example's token data: saves every 2 steps, no noise."""
    import importlib.util

    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainingArguments,
        set_seed,
    )
    spec = importlib.util.spec_from_file_location("hf_train_example", str(REPO / "examples" / "hf_train.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    args = TrainingArguments(output_dir=output_dir, max_steps=steps, save_strategy="steps", save_steps=2,
                             per_device_train_batch_size=8, seed=0, use_cpu=True, report_to=[],
                             disable_tqdm=True, logging_strategy="no")
    return Trainer(model=model, args=args, train_dataset=example._Tokens(32, 16, 64), callbacks=[callback])
