"""Shared fixtures. No test reaches beyond 127.0.0.1: AWS traffic goes to moto, metadata
traffic to fake servers on loopback, and the real metadata address is switched off."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Set before anything imports boto3/s3fs, and inherited by every child process a test starts.
_SAFE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # botocore must never ask 169.254.169.254 for credentials or a region.
    "AWS_EC2_METADATA_DISABLED": "true",
    # No notice watcher probes a real metadata address unless a test points it at a fake.
    "SPOTRUN_NOTICE_SOURCE": "none",
    "SPOTRUN_IMDS_ENDPOINT": "http://127.0.0.1:9",
    "SPOTRUN_GCP_METADATA_ENDPOINT": "http://127.0.0.1:9",
    "SPOTRUN_AZURE_METADATA_ENDPOINT": "http://127.0.0.1:9",
}
for _k, _v in _SAFE_ENV.items():
    os.environ[_k] = _v
# No node-local checkpoint copies (spotrun/recovery/local.py) unless a test asks for one:
# most tests are about what the run URL holds (damage there must be found, not read around),
# and the machine's /dev/shm is not the suite's to fill. tests/test_recovery_local.py sets it.
os.environ["SPOTRUN_LOCAL_DIR"] = "off"
for _k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "SPOTRUN_URL"):
    os.environ.pop(_k, None)


from helpers import (  # noqa: E402 (the environment above comes first)
    DDP_EVERY,
    DDP_SCRIPT,
    DDP_STEPS,
    RANK_AT_START,
    committed_steps,
    env_for,
    finish_session,
    free_port,  # re-exported: tests import it from here
    shared_run,
    torchrun,
    warm_server,
)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto server on 127.0.0.1 for the whole session; yields its endpoint URL.

    s3fs talks through aiobotocore, which moto's in-process mock does not intercept, so S3
    tests need a real HTTP server.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3_bucket(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on the moto server; yields its name.

    ``AWS_ENDPOINT_URL`` is set for the test (and its child processes), so boto3, s3fs and
    spotrun all reach moto without extra options.
    """
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    bucket = f"spotrun-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    yield bucket


@pytest.fixture()
def s3_storage_options(moto_server: str) -> dict:
    """fsspec options that reach the moto server (for code given options explicitly)."""
    return {"client_kwargs": {"endpoint_url": moto_server}, "skip_instance_cache": True}


@pytest.fixture()
def child_env() -> dict:
    """The environment for a child process: this one's, plus the repo on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable


@pytest.fixture()
def fault_proxy(moto_server: str) -> Iterator:
    """A :class:`faultproxy.FaultProxy` in front of the moto server, closed after the test.

    Point S3 clients at ``fault_proxy.url``; add rules (hang, stall, reset, error) at any
    time; ``fault_proxy.log`` records every request and what was done to it.
    """
    from faultproxy import FaultProxy

    proxy = FaultProxy(moto_server)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(scope="session")
def warm_python() -> Iterator:
    """One :class:`warmfork.WarmPython` per worker: forks of an interpreter that imported torch
    and spotrun, for tests that start a single-process training script and signal or kill it
    (each ``spawn`` saves a torch import; tests/warmfork.py says what a fork keeps)."""
    from warmfork import WarmPython

    env = env_for("")  # what a test's child gets (PYTHONPATH, PYTHONUNBUFFERED), less the URL
    del env["SPOTRUN_URL"]
    with WarmPython(env) as warm:
        yield warm


@pytest.fixture(scope="session")
def warm_exec() -> Iterator:
    """One :class:`warmfork.WarmExec` per worker: a command line (``warm_exec.command(SCRIPT,
    ARGS)``) that runs ``python SCRIPT ARGS`` as a fork of an interpreter that imported torch
    and spotrun, for a program that starts the script itself, signals it and reads its exit
    (``spotrun check-resume``: four or five starts a check, each a torch import saved).

    Its forks run torch on one thread (``OMP_NUM_THREADS=1``; a client's environment must
    hold ``warm_exec.at_start``, what the server read at its start): on a 2-core machine at
    load 10 the example's 240 steps took 22-40 s with torch's default two threads and 9-22 s
    with one. Every run a check compares is such a fork."""
    with warm_server(OMP_NUM_THREADS="1") as warm:
        yield warm


@pytest.fixture(scope="session")
def warm_ranks() -> Iterator:
    """One :class:`warmfork.WarmExec` per worker for torchrun: ``torchrun(..., warm=warm_ranks)``
    (tests/helpers.py) has the launcher and each worker run as a fork of an interpreter that
    imported torch, torch.distributed (DDP, FSDP2, DCP, torchrun) and spotrun, side by side. A
    rank's start was 2-3 s of CPU (torch and its distributed modules), 2 to 4 of them at once
    on 2 cores, in every torchrun start of the suite. Its environment holds what torchrun
    puts in every worker's (``helpers.RANK_AT_START``: one torch thread)."""
    imports = ("import torch.distributed, torch.distributed.checkpoint, torch.distributed.checkpoint.state_dict, "
               "torch.distributed.fsdp, torch.distributed.device_mesh, torch.nn.parallel, torch.utils.data, "
               "torch.distributed.run")
    with warm_server(imports, **RANK_AT_START) as warm:
        yield warm


@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> str:
    """One uninterrupted 2-rank run of tests/scripts/ddp_train.py (``DDP_STEPS`` steps, a
    checkpoint every ``DDP_EVERY``), built once per session for every worker: the yardstick of
    the torchrun tests (test_distributed) and the 2-node tests (test_launch_node_e2e,
    test_launch_local_nodes). Two ranks on one machine or two nodes of one rank each train
    the same: ranks, shards, seeds and the gloo all-reduce of two are the same. Its ranks are
    forks of ``warm_ranks``, started only in the worker that builds it."""
    import re

    from spotrun.format.commit import list_checkpoints
    from spotrun.records.layout import EXIT_FINISHED
    from spotrun.storage import Storage

    def build(folder: Path) -> None:
        url = str(folder)
        proc = torchrun(DDP_SCRIPT, 2, "--url", url, "--steps", str(DDP_STEPS), "--every-steps",
                        str(DDP_EVERY), env=env_for(url), warm=request.getfixturevalue("warm_ranks"))
        code, out = finish_session(proc, 300)
        assert code == EXIT_FINISHED, out[-4000:]
        exits = sorted(re.findall(r"^rank (\d) exit (\d+) at step (\d+)$", out, re.MULTILINE))
        assert exits == [("0", "0", str(DDP_STEPS)), ("1", "0", str(DDP_STEPS))], out[-4000:]
        assert (folder / "done.json").exists()
        assert committed_steps(url) == list(range(DDP_EVERY, DDP_STEPS + 1, DDP_EVERY))
        manifest = {c.step: c for c in list_checkpoints(Storage(url))}[DDP_STEPS].manifest
        assert manifest is not None and manifest.world_size == 2
        assert sorted(manifest.files) == ["rank-00000.pt", "rank-00001.pt"]

    return str(shared_run(tmp_path_factory, "ddp-reference", build))



# What each test file costs, for the schedule below: seconds measured in a whole run of the
# suite (tests/durations.json; ``SPOTRUN_TEST_DURATIONS=tests/durations.json make test``
# writes it again), with a guess from the markers for what that run did not have. The markers
# alone were a poor guide: a file of ten plain tests can start two torchruns (test_warm_workers,
# 100 s loaded) and one slow test can take a second; the halves came out minutes apart.
_DURATIONS = Path(__file__).with_name("durations.json")
_DURATIONS_OUT = "SPOTRUN_TEST_DURATIONS"
# The guess, in seconds: a test marked slow (a real multi-process run) against one that is not.
_SLOW_S, _TEST_S = 21.0, 0.2  # fitted to tests/durations.json (least squares; a whole run at load 2-4)


def _guess(slow_tests: int, tests: int) -> float:
    return slow_tests * _SLOW_S + (tests - slow_tests) * _TEST_S


def _measured() -> dict[str, dict]:
    try:
        return json.loads(_DURATIONS.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return {}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Two halves of about equal cost, each with its heaviest test files first.

    ``--dist worksteal`` hands the first worker ``items[:n // 2]`` and the second the rest, and
    an idle worker takes the back half of the other's queue. In file-name order the slow
    files bunch up (one worker got most of them) and a one-minute chain could start last and
    run alone while the other worker sat idle. Here the files are dealt heaviest first to
    whichever half costs less; each half runs its heavy files first, so the tails, and what
    is stolen, are short tests. The half with more tests goes first, so the cut at ``n // 2``
    falls among its light files. A file stays whole, so a module-scoped shared run is not
    split across the workers by the layout. (After pytest's own fixture-scope ordering.)

    A file's cost is its measured seconds plus the guess for the slow and plain tests it has
    gained since (a file measured before it got a new chain still weighs that chain).
    """
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    measured = _measured()

    def cost(path: str, tests: list[pytest.Item]) -> float:
        slow = sum(1 for t in tests if t.get_closest_marker("slow"))
        then = measured.get(path)
        if then is None:
            return _guess(slow, len(tests))
        return then["seconds"] + max(0.0, _guess(slow, len(tests)) - _guess(then["slow"], then["tests"]))

    costs = {path: cost(path, tests) for path, tests in modules.items()}
    halves: list[list[list[pytest.Item]]] = [[], []]
    loads = [0.0, 0.0]
    # Heaviest first; ties in file order (a stable sort).
    for path in sorted(modules, key=lambda p: costs[p], reverse=True):
        lighter = loads.index(min(loads))
        halves[lighter].append(modules[path])
        loads[lighter] += costs[path]
    halves.sort(key=lambda half: sum(len(t) for t in half), reverse=True)
    items[:] = [item for half in halves for tests in half for item in tests]


class _DurationsRecorder:
    """Sums each test file's setup, call and teardown seconds over a run (in the xdist
    controller, which gets every worker's reports) and writes them where
    ``SPOTRUN_TEST_DURATIONS`` says, with the counts the guess above needs."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.files: dict[str, dict] = {}
        self.failed = False

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.files.setdefault(report.nodeid.split("::", 1)[0],
                                      {"seconds": 0.0, "tests": 0, "slow": 0})
        entry["seconds"] += report.duration
        if report.when == "setup":
            entry["tests"] += 1
            entry["slow"] += "slow" in report.keywords
        self.failed |= report.failed

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.failed or session.testsfailed:  # a failed run's seconds are not the suite's
            print(f"\n{_DURATIONS_OUT}: a test failed; {self.out} not written", file=sys.stderr)
            return
        files = {path: {**e, "seconds": round(e["seconds"], 1)} for path, e in sorted(self.files.items())}
        Path(self.out).write_text(json.dumps({"files": files}, indent=1) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    out = os.environ.get(_DURATIONS_OUT)
    if out and not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        config.pluginmanager.register(_DurationsRecorder(out), "spotrun-durations")


_HELD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@pytest.fixture(autouse=True)
def _signal_dispositions_kept() -> Iterator[None]:
    """Each test leaves this process's signal dispositions as it found them. A test that runs
    the wrapper in-process can end with SIGTERM at SIG_IGN (an interrupted stop holds it so
    until exit, by design), and every child a later test starts in this worker inherits an
    ignored SIGTERM: a signal test then fails or not depending on the order the tests ran in."""
    saved = {sig: signal.getsignal(sig) for sig in _HELD_SIGNALS}
    yield
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in saved.items():
        if handler is not None and signal.getsignal(sig) != handler:
            signal.signal(sig, handler)
