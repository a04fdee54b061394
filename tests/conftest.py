"""Shared fixtures. No test reaches beyond 127.0.0.1: AWS traffic goes to moto, metadata
traffic to fake servers on loopback, and the real metadata address is switched off."""

from __future__ import annotations

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
    committed_steps,
    env_for,
    finish_session,
    free_port,  # re-exported: tests import it from here
    shared_run,
    torchrun,
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
def ddp_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One uninterrupted 2-rank run of tests/scripts/ddp_train.py (``DDP_STEPS`` steps, a
    checkpoint every ``DDP_EVERY``), built once per session for every worker: the yardstick of
    the torchrun tests (test_distributed) and the 2-node tests (test_launch_node_e2e,
    test_launch_local_nodes). Two ranks on one machine or two nodes of one rank each train
    the same: ranks, shards, seeds and the gloo all-reduce of two are the same."""
    import re

    from spotrun.format.commit import list_checkpoints
    from spotrun.records.layout import EXIT_FINISHED
    from spotrun.storage import Storage

    def build(folder: Path) -> None:
        url = str(folder)
        proc = torchrun(DDP_SCRIPT, 2, "--url", url, "--steps", str(DDP_STEPS), "--every-steps",
                        str(DDP_EVERY), env=env_for(url))
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



# Weights for the schedule below: a test marked slow (a real multi-process run, often a
# minute on a loaded box) against one that is not (mostly well under a second each).
_SLOW_WEIGHT, _TEST_WEIGHT = 40, 1


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Two halves of about equal weight, each with its heaviest test files first.

    ``--dist worksteal`` hands the first worker ``items[:n // 2]`` and the second the rest, and
    an idle worker takes the back half of the other's queue. In file-name order the slow
    files bunch up (one worker got most of them) and a one-minute chain could start last and
    run alone while the other worker sat idle. Here the files are dealt heaviest first to
    whichever half weighs less; each half runs its heavy files first, so the tails, and what
    is stolen, are short tests. The half with more tests goes first, so the cut at ``n // 2``
    falls among its light files. A file stays whole, so a module-scoped shared run is not
    split across the workers by the layout. (After pytest's own fixture-scope ordering.)
    """
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)

    def weight(tests: list[pytest.Item]) -> int:
        return sum(_SLOW_WEIGHT if t.get_closest_marker("slow") else _TEST_WEIGHT for t in tests)

    halves: list[list[list[pytest.Item]]] = [[], []]
    loads = [0, 0]
    for tests in sorted(modules.values(), key=weight, reverse=True):  # stable: ties in file order
        lighter = loads.index(min(loads))
        halves[lighter].append(tests)
        loads[lighter] += weight(tests)
    halves.sort(key=lambda half: sum(len(t) for t in half), reverse=True)
    items[:] = [item for half in halves for tests in half for item in tests]


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
