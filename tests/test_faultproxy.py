"""The fault-injecting proxy itself (tests/faultproxy.py), driven by a plain boto3 client."""

from __future__ import annotations

import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
)


def _client(url: str, read_timeout: float = 30):
    # No retries: each call is one request, so the proxy's log can be counted exactly.
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                        config=Config(retries={"total_max_attempts": 1, "mode": "standard"},
                                      connect_timeout=5, read_timeout=read_timeout))


def test_forwards_and_logs(fault_proxy, s3_bucket):
    s3 = _client(fault_proxy.url)
    s3.put_object(Bucket=s3_bucket, Key="a/b.txt", Body=b"hello")
    assert s3.get_object(Bucket=s3_bucket, Key="a/b.txt")["Body"].read() == b"hello"
    puts = fault_proxy.requests(method="PUT", path=r"/a/b\.txt")
    gets = fault_proxy.requests(method="GET", path=r"/a/b\.txt")
    assert [(r.action, r.status) for r in puts] == [("forward", 200)]
    assert [(r.action, r.status) for r in gets] == [("forward", 200)]


@pytest.mark.parametrize("status,code", [(403, "AccessDenied"), (500, "InternalError"),
                                         (503, "SlowDown")])
def test_error_rule_answers_s3_xml_for_the_next_n(fault_proxy, s3_bucket, status, code):
    s3 = _client(fault_proxy.url)
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"x")
    rule = fault_proxy.add("error", method="GET", path=r"/k$", times=2, status=status)
    for _ in range(2):
        with pytest.raises(ClientError) as info:
            s3.get_object(Bucket=s3_bucket, Key="k")
        assert info.value.response["Error"]["Code"] == code
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert s3.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"x"  # rule used up
    assert rule.hits == 2
    assert [r.action for r in fault_proxy.requests(method="GET")] == ["error", "error", "forward"]
    # Only GETs matched: the PUT went through untouched.
    assert fault_proxy.count(method="PUT", action="forward") == 1


def test_hang_until_cleared_and_rules_change_while_running(fault_proxy, s3_bucket):
    s3 = _client(fault_proxy.url, read_timeout=1)
    fault_proxy.add("hang", method="PUT")
    t0 = time.monotonic()
    with pytest.raises((ReadTimeoutError, ConnectionClosedError)):
        s3.put_object(Bucket=s3_bucket, Key="hung", Body=b"x")
    assert time.monotonic() - t0 >= 0.9  # it waited for the read timeout: no answer came
    assert fault_proxy.count(method="PUT", action="hang") == 1
    fault_proxy.clear()
    s3.put_object(Bucket=s3_bucket, Key="hung", Body=b"x")
    assert _client(fault_proxy.upstream.geturl()).head_object(Bucket=s3_bucket, Key="hung")


def test_stall_sends_half_the_body_then_nothing(fault_proxy, s3_bucket):
    s3 = _client(fault_proxy.url, read_timeout=1)
    s3.put_object(Bucket=s3_bucket, Key="big", Body=b"z" * 100_000)
    fault_proxy.add("stall", method="GET", path="/big")
    response = s3.get_object(Bucket=s3_bucket, Key="big")  # headers arrive
    assert response["ContentLength"] == 100_000
    with pytest.raises(Exception) as info:
        response["Body"].read()
    assert "timeout" in repr(info.value).lower() or "read" in repr(info.value).lower()


def test_reset_drops_the_connection(fault_proxy, s3_bucket):
    s3 = _client(fault_proxy.url)
    fault_proxy.add("reset", method="HEAD", times=1)
    with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
        s3.head_bucket(Bucket=s3_bucket)
    s3.head_bucket(Bucket=s3_bucket)  # the next one goes through
    assert [r.action for r in fault_proxy.requests(method="HEAD")] == ["reset", "forward"]


def test_close_releases_held_connections(moto_server, s3_bucket):
    from faultproxy import FaultProxy

    proxy = FaultProxy(moto_server)
    proxy.add("hang")
    s3 = _client(proxy.url, read_timeout=30)
    import threading

    errors: list[BaseException] = []

    def call() -> None:
        try:
            s3.head_bucket(Bucket=s3_bucket)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 10
    while proxy.count(action="hang") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    t0 = time.monotonic()
    proxy.close()
    t.join(15)
    assert not t.is_alive() and errors  # the client saw the connection end, well before 30 s
    assert time.monotonic() - t0 < 10
