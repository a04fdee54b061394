"""Hostile stores and inputs for spotrun.storage and the commit protocol (issue 20), against a
real moto server (through tests/faultproxy.py where S3 must misbehave) and real local disk.

* a multipart upload abandoned by a stop save that missed its deadline (a part hangs) is
  aborted by ``inflight.abort_all``: no open upload is left, and a completed or aborted
  upload leaves no entry behind;
* a lost CompleteMultipartUpload answer fails the save and removes the object it made;
* a ``manifest.json`` that is a directory is damage of that checkpoint, not a read failure;
* run URLs that no backend can hold (``http://``, a NUL byte) are refused with one line.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import boto3
import pytest

from spotrun.errors import SpotrunError
from spotrun.storage import Storage, inflight

MiB = 1 << 20
PART = 5 * MiB  # S3's minimum part size
PART_2 = {"method": "PUT", "path": r"[?&]partNumber=2(&|$)"}


def _client(moto_server: str):
    return boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")


def _opts(endpoint: str, **extra) -> dict:
    return {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True, **extra}


def _open_uploads(moto_server: str, bucket: str) -> list:
    return _client(moto_server).list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def _wait_for(predicate, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.05)


# -- an abandoned multipart upload is aborted (issue 20, S3 after a missed stop deadline) ----


def _aborts_answered(proxy) -> list[int | None]:
    """The statuses of the upload aborts sent: exactly one succeeded, and any before it was a
    server error that botocore retried (moto's abort can race a part still arriving and
    answer 500: ``dictionary changed size during iteration``), never a second abort."""
    statuses = [r.status for r in proxy.requests(method="DELETE", path=r"uploadId=")]
    assert statuses and statuses[-1] == 204, statuses
    assert all(s is not None and s >= 500 for s in statuses[:-1]), statuses
    return statuses


def test_abort_all_aborts_an_upload_whose_part_hangs(s3_bucket, moto_server, fault_proxy):
    st = Storage(f"s3://{s3_bucket}/run", _opts(fault_proxy.url), part_size=PART, concurrency=2)
    fault_proxy.add("hang", **PART_2)
    outcome: list[BaseException | None] = []

    def save() -> None:  # the stop save's writer thread, which the process gives up on
        try:
            with st.open_write("000000000006/rank-00000.pt") as f:
                f.write(os.urandom(3 * PART + 17))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    writer = threading.Thread(target=save, daemon=True)
    writer.start()
    _wait_for(lambda: fault_proxy.count(action="hang", **PART_2) == 1)
    assert len(_open_uploads(moto_server, s3_bucket)) == 1

    t0 = time.monotonic()
    assert inflight.abort_all(10.0) == 1  # what the missed-deadline path runs before _exit
    assert time.monotonic() - t0 < 10.0
    assert _open_uploads(moto_server, s3_bucket) == []
    aborts = _aborts_answered(fault_proxy)

    # The abandoned writer, once its part's connection drops, fails without retrying the
    # parts into an aborted upload, aborts nothing twice and leaves no object.
    fault_proxy.clear()
    writer.join(60)
    assert not writer.is_alive()
    assert isinstance(outcome[0], SpotrunError | OSError)
    assert _aborts_answered(fault_proxy) == aborts
    assert not _client(moto_server).list_objects_v2(Bucket=s3_bucket).get("Contents")
    assert inflight.abort_all(1.0) == 0


def test_finished_uploads_leave_nothing_to_abort(s3_bucket, moto_server):
    st = Storage(f"s3://{s3_bucket}/run", _opts(moto_server), part_size=PART, concurrency=2)
    data = os.urandom(2 * PART + 1)
    st.write_bytes("000000000001/rank-00000.pt", data)  # completed
    with pytest.raises(RuntimeError), st.open_write("000000000002/rank-00000.pt") as f:
        f.write(data)
        raise RuntimeError("the save failed")  # aborted by the writer itself
    assert inflight.abort_all(1.0) == 0
    assert _open_uploads(moto_server, s3_bucket) == []
    assert bytes(st.read_bytes("000000000001/rank-00000.pt")) == data


# -- a lost CompleteMultipartUpload answer (issue 20) -----------------------------------------


def test_a_lost_complete_answer_fails_the_save_and_leaves_no_object(
        s3_bucket, moto_server, fault_proxy, monkeypatch):
    monkeypatch.setenv("SPOTRUN_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("SPOTRUN_S3_RETRIES", "0")
    monkeypatch.setenv("SPOTRUN_S3_ATTEMPTS", "2")
    st = Storage(f"s3://{s3_bucket}/run", _opts(fault_proxy.url), part_size=PART, concurrency=2)
    previous = os.urandom(1000)
    st.write_bytes("000000000003/rank-00000.pt", previous)
    # S3 completes the upload, but no answer arrives (half of it, then silence), each time.
    fault_proxy.add("stall", method="POST", path=r"[?&]uploadId=")
    t0 = time.monotonic()
    with pytest.raises(SpotrunError):
        st.write_bytes("000000000006/rank-00000.pt", os.urandom(2 * PART + 5))
    assert time.monotonic() - t0 < 30
    fault_proxy.clear()
    keys = [o["Key"] for o in
            _client(moto_server).list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert keys == ["run/000000000003/rank-00000.pt"]
    assert _open_uploads(moto_server, s3_bucket) == []
    assert inflight.abort_all(1.0) == 0


def test_an_object_that_is_not_the_uploads_is_never_removed(s3_bucket, moto_server,
                                                            fault_proxy, monkeypatch):
    # The complete fails before S3 acts on it: the object already at that key (another
    # writer's) is not this upload's and stays.
    monkeypatch.setenv("SPOTRUN_S3_RETRIES", "0")
    st = Storage(f"s3://{s3_bucket}/run",
                 _opts(fault_proxy.url,
                       config_kwargs={"retries": {"mode": "standard", "total_max_attempts": 1}}),
                 part_size=PART, concurrency=2)
    theirs = os.urandom(2 * PART + 9)
    st.write_bytes("000000000006/rank-00000.pt", theirs)
    fault_proxy.add("error", status=500, method="POST", path=r"[?&]uploadId=")
    with pytest.raises(SpotrunError):
        st.write_bytes("000000000006/rank-00000.pt", os.urandom(2 * PART + 5))
    fault_proxy.clear()
    assert bytes(st.read_bytes("000000000006/rank-00000.pt")) == theirs
    assert _open_uploads(moto_server, s3_bucket) == []


# -- run URLs no store can hold (issue 20) ------------------------------------------------------


@pytest.mark.parametrize("url, says", [
    ("http://x/y", r"'http://x/y': http:// is read-only"),
    ("https://example.invalid/run", r"https:// is read-only"),
    ("/tmp/run\x00x", r"'/tmp/run\\x00x' contains a NUL byte"),
    ("file:///tmp/run\x00x", r"contains a NUL byte"),
    ("s3://bucket/r\x00n", r"contains a NUL byte"),
])
def test_run_urls_no_store_can_hold_are_refused_with_one_line(url, says):
    import spotrun
    from spotrun.errors import StorageURLError

    for make in (Storage, lambda u: spotrun.Checkpointer(u, handle_signals=False, watchers=[])):
        with pytest.raises(StorageURLError, match=says) as info:
            make(url)
        assert "\n" not in str(info.value)
        assert isinstance(info.value, spotrun.ConfigError) and info.value.exit_code == 2


def test_the_cli_refuses_them_with_exit_2_and_one_line(tmp_path, capsys):
    import subprocess
    import sys

    from helpers import REPO

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "spotrun", "ls", "http://x/y"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "http://x/y" in done.stderr
    # A NUL byte cannot pass through exec's argv: the CLI's entry point in-process.
    from spotrun.cli import main

    assert main(["ls", str(tmp_path / "run\x00x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NUL byte" in err[0]


# -- a killed writer's ledger temporary (issue 20) ---------------------------------------------


def _ledger_tmp(run, name: str, content: bytes) -> str:
    path = os.path.join(run, "ledger", f".{name}.json.tmp-{uuid.uuid4().hex}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return path


def test_a_killed_writers_ledger_temporary_goes_at_the_next_start(tmp_path):
    import json
    import signal
    import socket
    import subprocess
    import sys

    from spotrun.records.instance import InstanceInfo
    from spotrun.records.ledger import Ledger

    run = str(tmp_path / "run")
    # A real writer, kill -9ed while its record sat in a temporary (fresh, a second old).
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    record = {"event": "checkpoint_committed", "pid": victim.pid,
              "host": socket.gethostname(), "id": uuid.uuid4().hex, "time": time.time()}
    dead = _ledger_tmp(run, "0001-dead", json.dumps(record).encode())
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # Kept: a live writer's (this process), another host's, and an empty one (full disk).
    live = _ledger_tmp(run, "0002-live", json.dumps({**record, "pid": os.getpid()}).encode())
    other = _ledger_tmp(run, "0003-other", json.dumps({**record, "host": "elsewhere"}).encode())
    empty = _ledger_tmp(run, "0004-empty", b"")

    ledger = Ledger(Storage(run))
    ledger.segment_started(segment_id="seg-b", instance=InstanceInfo(),
                           started_at=time.time(), source="wrapper")
    assert not os.path.exists(dead)
    assert all(os.path.exists(p) for p in (live, other, empty))
    assert [r["event"] for r in ledger.records()] == ["segment_started"]


# -- a manifest.json that is a folder (issue 20) -----------------------------------------------


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_a_manifest_that_is_a_folder_is_damage_and_the_previous_checkpoint_restores(
        tmp_path, scheme):
    import torch

    import spotrun
    from spotrun.format.commit import list_checkpoints, list_damaged

    url = str(tmp_path / "run") if scheme == "local" else f"memory://{uuid.uuid4().hex}/run"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    with spotrun.Checkpointer(url, model=model, handle_signals=False, watchers=[],
                              async_save=False, keep_last=5) as ck:
        ck.restore()
        for step in (3, 6):
            if step == 6:
                saved = {k: v.clone() for k, v in model.state_dict().items()}
            with torch.no_grad():
                model.weight.add_(1.0)
            ck.steps_done = step
            ck.save()
    st = Storage(url)
    st.remove("000000000006/manifest.json")
    if scheme == "local":
        os.mkdir(os.path.join(url, "000000000006", "manifest.json"))  # an empty folder
    else:
        st.write_bytes("000000000006/manifest.json/stray", b"x")
    info = {c.step: c for c in list_checkpoints(st)}
    assert info[6].status == "invalid" and "is a folder" in info[6].problem
    assert info[3].status == "committed"

    model2 = torch.nn.Linear(4, 4)
    with spotrun.Checkpointer(url, model=model2, handle_signals=False, watchers=[]) as ck2:
        assert ck2.restore() == 3
    for name, tensor in saved.items():
        assert torch.equal(model2.state_dict()[name], tensor)
    assert "000000000006" not in st.list_dir()
    assert [d.split("-")[0] for d in list_damaged(st)] == ["000000000006"]
