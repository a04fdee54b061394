"""S3 that misbehaves (through tests/faultproxy.py in front of moto): nothing waits forever.

* the stop checkpoint respects its bound (a signal's SPOTRUN_STOP_TIMEOUT, a notice's
  deadline minus SPOTRUN_STOP_MARGIN) when S3 stops answering, and the process exits with
  EXIT_STOP_UNSAVED, leaving the previous checkpoint the latest and restorable;
* throttled (503 SlowDown) reads give up within bounded retries and time with
  StorageUnavailableError, and no retry layer multiplies another;
* every request has connect/read timeouts;
* a 403 on checkpoint reads fails the start and changes nothing.
"""

from __future__ import annotations

import re
import signal
import time
import uuid

import boto3
import pytest
import torch
from helpers import REPO, env_for, wait_for_line

import spotrun
from spotrun.errors import StorageError, StorageUnavailableError
from spotrun.format.commit import find_latest_valid, list_checkpoints
from spotrun.notices import Notice, Watcher
from spotrun.records.layout import EXIT_INTERRUPTED, EXIT_STOP_UNSAVED
from spotrun.storage import Storage

SCRIPT = str(REPO / "tests" / "scripts" / "s3_stop_train.py")
# Writes into checkpoint folders (PUT object, multipart POST/PUT), not ledger records: the
# ledger's own bound is a separate item (issue 9, item 8).
CHECKPOINT_WRITES = {"method": "PUT|POST", "path": r"/\d{12}/"}


def _moto(moto_server: str):
    return boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")


def _objects(moto_server: str, bucket: str, prefix: str) -> dict[str, str]:
    """key -> ETag of every object under ``prefix`` except ledger records."""
    s3 = _moto(moto_server)
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if "/ledger/" not in obj["Key"]:
                out[obj["Key"]] = obj["ETag"]
    return out


def _opts(endpoint: str) -> dict:
    return {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True}


def _committed_run(moto_server: str, bucket: str, steps: tuple[int, ...]) -> tuple[str, dict]:
    """A run with committed checkpoints at ``steps`` (written straight to moto)."""
    url = f"s3://{bucket}/runs/{uuid.uuid4().hex[:8]}"
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    with spotrun.Checkpointer(url, model=model, handle_signals=False, watchers=[],
                              async_save=False, keep_last=10,
                              storage_options=_opts(moto_server)) as ck:
        ck.restore()
        for step in steps:
            with torch.no_grad():
                model.weight.add_(1.0)
            ck.steps_done = step
            ck.save()
    return url, {k: v.clone() for k, v in model.state_dict().items()}


# -- item 6: the stop checkpoint is bounded -----------------------------------------------


def test_sigterm_while_s3_hangs_exits_within_the_bound(s3_bucket, moto_server, fault_proxy, warm_python):
    bound = 8.0
    url = f"s3://{s3_bucket}/run"
    env = env_for(url, AWS_ENDPOINT_URL=fault_proxy.url, SPOTRUN_STOP_TIMEOUT=str(bound))
    proc = warm_python.spawn([SCRIPT], env)
    try:
        wait_for_line(proc, "committed 3", timeout=120)
        # From now on S3 accepts checkpoint writes and never answers them.
        fault_proxy.add("hang", **CHECKPOINT_WRITES)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=bound + 60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_STOP_UNSAVED, out
    # It gave the save its time (the bound counts from the signal), then no longer.
    assert bound - 1 <= elapsed < bound + 30, (elapsed, out)
    assert fault_proxy.count(action="hang", **CHECKPOINT_WRITES) >= 1  # the save did try
    assert "did not commit within" in out and "checkpoint at step 3 is intact" in out, out
    assert "SPOTRUN_STOP_TIMEOUT=8s" in out, out
    # The previous checkpoint is the latest, whole, and restorable.
    fault_proxy.clear()
    storage = Storage(url, _opts(moto_server))
    assert [c.step for c in list_checkpoints(storage)] == [3]
    info = find_latest_valid(storage, deep=True)
    assert info is not None and info.step == 3
    model = torch.nn.Linear(8, 8)
    with spotrun.Checkpointer(url, model=model, handle_signals=False, watchers=[],
                              storage_options=_opts(moto_server)) as ck:
        assert ck.restore() == 3
    torch.manual_seed(0)
    expected = torch.nn.Linear(8, 8).weight + 0.003
    assert torch.allclose(model.weight, expected)
    assert not _moto(moto_server).list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_sigterm_with_s3_answering_still_exits_75(s3_bucket, fault_proxy, warm_python):
    url = f"s3://{s3_bucket}/run"
    proc = warm_python.spawn([SCRIPT], env_for(url, AWS_ENDPOINT_URL=fault_proxy.url,
                                   SPOTRUN_STOP_TIMEOUT="60"))
    try:
        wait_for_line(proc, "committed 3", timeout=120)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_INTERRUPTED, out
    steps = [c.step for c in list_checkpoints(Storage(url, _opts(fault_proxy.url)))]
    assert len(steps) == 2 and steps[0] == 3 and steps[1] > 3


class _Manual(Watcher):
    """A notice source the test fires by hand."""

    name = "manual"

    def start(self, on_notice) -> None:  # type: ignore[override]
        self.fire = on_notice

    def stop(self, timeout: float = 2.0) -> None:
        pass

    def instance_info(self, timeout: float = 1.0):
        return None


def test_notice_deadline_bounds_the_stop_checkpoint(s3_bucket, moto_server, fault_proxy,
                                                    monkeypatch):
    monkeypatch.setenv("SPOTRUN_STOP_MARGIN", "4")
    monkeypatch.setenv("SPOTRUN_STOP_TIMEOUT", "600")  # not used: the notice has a deadline

    def exit_now(code: int) -> None:  # in a real process: os._exit (this is pytest's process)
        raise SystemExit(code)

    monkeypatch.setattr("spotrun.checkpoint.segment._exit_now", exit_now)
    url = f"s3://{s3_bucket}/run"
    watcher = _Manual()
    model = torch.nn.Linear(8, 8)
    with spotrun.Checkpointer(url, model=model, handle_signals=False, watchers=[watcher],
                              every_seconds=10_000, storage_options=_opts(fault_proxy.url)) as ck:
        ck.restore()
        ck.step(2)
        ck.save()
        ck.wait()
        fault_proxy.add("hang", **CHECKPOINT_WRITES)
        now = time.time()
        watcher.fire(Notice(source="ec2", action="terminate", stop=True, detected_at=now,
                            notice_time=now, deadline=now + 10))
        t0 = time.monotonic()
        with pytest.raises(SystemExit) as exited:
            ck.step(3)
        elapsed = time.monotonic() - t0
    assert exited.value.code == EXIT_STOP_UNSAVED
    assert 4 <= elapsed < 6 + 20, elapsed  # deadline 10 s minus the 4 s margin
    # Looked at while S3 still hangs (in a real process the abandoned save dies with it).
    storage = Storage(url, _opts(moto_server))
    assert [c.step for c in list_checkpoints(storage)] == [2]


# -- item 7: bounded retries, then a clear error ------------------------------------------


def test_restore_throttled_on_every_get_fails_within_the_bound(s3_bucket, moto_server,
                                                             fault_proxy):
    url, _ = _committed_run(moto_server, s3_bucket, (3, 6))
    prefix = url.split("/", 3)[3]
    before = _objects(moto_server, s3_bucket, prefix)
    fault_proxy.add("error", status=503, method="GET")
    model = torch.nn.Linear(8, 8)
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError) as info, spotrun.Checkpointer(
        url, model=model, handle_signals=False, watchers=[], every_steps=1,
        storage_options=_opts(fault_proxy.url),
    ) as ck:
        for _ in ck.range(10):
            pass
    elapsed = time.monotonic() - t0
    message = str(info.value)
    assert url.split("://")[1] in message and "SlowDown (HTTP 503)" in message, message
    assert "still failing after" in message and "SPOTRUN_S3_RETR" in message, message
    # botocore's 3 attempts with backoff (about 3 s at most), not minutes.
    assert elapsed < 60, elapsed
    throttled = fault_proxy.count(method="GET", action="error")
    assert 2 <= throttled <= 40, throttled  # it retried, within bounds (ledger reads too)
    fault_proxy.clear()
    assert _objects(moto_server, s3_bucket, prefix) == before  # nothing changed
    assert "\n" not in message


def test_throttled_read_makes_a_bounded_number_of_requests(s3_bucket, moto_server, fault_proxy):
    """botocore's attempts x spotrun's rounds, nothing more: s3fs's loop is off."""
    _moto(moto_server).put_object(Bucket=s3_bucket, Key="run/blob", Body=b"x" * 1000)
    fault_proxy.add("error", status=503, method="GET", path="/run/blob")
    st = Storage(f"s3://{s3_bucket}/run", _opts(fault_proxy.url))
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=r"get s3://.*/run/blob still failing "
                                                      r"after 4 attempts.*SlowDown"):
        st.read_bytes("blob")
    assert fault_proxy.count(method="GET", path="/run/blob") == 3 * 4  # was 5 x 5 x 4
    assert time.monotonic() - t0 < 60


def test_retry_rounds_stop_at_the_time_limit(s3_bucket, moto_server, fault_proxy, monkeypatch):
    monkeypatch.setenv("SPOTRUN_S3_RETRIES", "1000")
    monkeypatch.setenv("SPOTRUN_S3_RETRY_SECONDS", "3")
    _moto(moto_server).put_object(Bucket=s3_bucket, Key="run/blob", Body=b"x" * 1000)
    fault_proxy.add("error", status=503, method="GET", path="/run/blob")
    st = Storage(f"s3://{s3_bucket}/run", _opts(fault_proxy.url))
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="the 3s retry time limit"):
        st.read_bytes("blob")
    elapsed = time.monotonic() - t0
    # 3 s of rounds plus at most one running attempt (cut at the limit), with CPU slack.
    assert elapsed < 3 + 20, elapsed
    assert fault_proxy.count(method="GET", path="/run/blob") < 3 * 1000


def test_silent_endpoint_times_out(s3_bucket, moto_server, fault_proxy, monkeypatch):
    monkeypatch.setenv("SPOTRUN_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("SPOTRUN_S3_ATTEMPTS", "2")
    monkeypatch.setenv("SPOTRUN_S3_RETRIES", "1")
    _moto(moto_server).put_object(Bucket=s3_bucket, Key="run/blob", Body=b"x" * 1000)
    fault_proxy.add("hang", method="GET", path="/run/blob")
    st = Storage(f"s3://{s3_bucket}/run", _opts(fault_proxy.url))
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="still failing"):
        st.read_bytes("blob")
    elapsed = time.monotonic() - t0
    assert 2 <= elapsed < 30, elapsed  # 2 attempts x 1 s, twice, plus backoff
    assert fault_proxy.count(method="GET", path="/run/blob", action="hang") == 4


def test_silent_listing_times_out_with_a_clear_error(s3_bucket, fault_proxy, monkeypatch):
    monkeypatch.setenv("SPOTRUN_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("SPOTRUN_S3_ATTEMPTS", "2")
    fault_proxy.add("hang", method="GET", path="list-type")
    st = Storage(f"s3://{s3_bucket}/run", _opts(fault_proxy.url))
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=r"listing: s3://.*/run still failing"):
        st.list_dir()
    assert time.monotonic() - t0 < 30


def test_client_timeouts_and_retries_are_set_unless_given(monkeypatch):
    monkeypatch.setenv("SPOTRUN_S3_READ_TIMEOUT", "7")
    st = Storage("s3://bucket/run", {"skip_instance_cache": True})
    config = st.fs.config_kwargs
    assert config["connect_timeout"] == 10 and config["read_timeout"] == 7
    assert config["retries"] == {"mode": "standard", "total_max_attempts": 3}
    assert st.fs.retries == 1
    mine = {"read_timeout": 300, "retries": {"max_attempts": 9}}
    st = Storage("s3://bucket/run", {"skip_instance_cache": True, "config_kwargs": mine})
    config = st.fs.config_kwargs
    assert config["read_timeout"] == 300 and config["retries"] == {"max_attempts": 9}
    assert config["connect_timeout"] == 10
    assert st.storage_options == {"skip_instance_cache": True, "config_kwargs": mine}
    monkeypatch.setenv("SPOTRUN_S3_ATTEMPTS", "0")
    with pytest.raises(spotrun.ConfigError, match="SPOTRUN_S3_ATTEMPTS"):
        Storage("s3://bucket/run")


# -- item 3's S3 case: an access error fails the start, changes nothing -------------------


def _checkpoint_objects(endpoint: str, bucket: str, prefix: str) -> dict[str, str]:
    return {k: v for k, v in _objects(endpoint, bucket, prefix).items() if re.search(r"/\d{12}/", k)}


def test_forbidden_checkpoint_reads_fail_the_start_and_change_nothing(s3_bucket, moto_server,
                                                                      fault_proxy):
    url, _ = _committed_run(moto_server, s3_bucket, (3, 6))
    prefix = url.split("/", 3)[3]
    before = _checkpoint_objects(moto_server, s3_bucket, prefix)
    # Every read of an object in a checkpoint folder is denied (an IAM mistake); listing works.
    fault_proxy.add("error", status=403, method="GET", path=r"/\d{12}/")
    model = torch.nn.Linear(8, 8)
    with pytest.raises(StorageError, match="(?i)denied|forbidden|permission"), spotrun.Checkpointer(
        url, model=model, handle_signals=False, watchers=[], every_steps=2,
        storage_options=_opts(fault_proxy.url),
    ) as ck:
        for _ in ck.range(10):
            pass
    fault_proxy.clear()
    # No fresh start, no new or moved folders (the lease and ledger records are not checkpoints).
    assert _checkpoint_objects(moto_server, s3_bucket, prefix) == before
    assert fault_proxy.count(method="PUT|POST", path=r"/\d{12}/") == 0


# -- issue 20: a stop save that misses its deadline leaves no open multipart upload -------


@pytest.mark.slow
def test_missed_stop_deadline_with_a_hung_part_leaves_no_open_upload(s3_bucket, moto_server,
                                                                      fault_proxy, warm_python):
    bound = 6.0
    url = f"s3://{s3_bucket}/run"
    env = env_for(url, AWS_ENDPOINT_URL=fault_proxy.url, SPOTRUN_STOP_TIMEOUT=str(bound),
                  SPOTRUN_S3_PART_MIB="5", S3_STOP_WIDTH="1300")  # a two-part payload
    proc = warm_python.spawn([SCRIPT], env)
    try:
        wait_for_line(proc, "committed 3", timeout=120)
        # From now on every part 2 is accepted and never answered: the stop save's
        # multipart upload is open (created, part 1 in) when the deadline passes.
        fault_proxy.add("hang", method="PUT", path=r"[?&]partNumber=2(&|$)")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=bound + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_STOP_UNSAVED, out
    assert fault_proxy.count(action="hang", method="PUT", path=r"partNumber=2") == 1, out
    assert fault_proxy.count(method="DELETE", path=r"uploadId=") >= 1, out  # the abort
    fault_proxy.clear()
    assert not _moto(moto_server).list_multipart_uploads(Bucket=s3_bucket).get("Uploads"), out
    assert [c.step for c in list_checkpoints(Storage(url, _opts(moto_server)))] == [3]
