"""The fake metadata server answers like the real services: checked with plain HTTP."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import pytest
import requests

from spotrun.errors import ConfigError
from spotrun.notices.fake_server import FakeMetadataServer, control
from spotrun.records.instance import InstanceInfo

TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"


@pytest.fixture()
def http() -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    return s


def put_token(http: requests.Session, url: str, ttl: str | None = "60", **headers: str):
    h = dict(headers)
    if ttl is not None:
        h[TTL] = ttl
    return http.put(url + "/latest/api/token", headers=h, timeout=2)


@pytest.mark.parametrize("ttl", [None, "0", "21601", "-5", "abc", ""])
def test_ec2_token_ttl_header_out_of_range_is_400(http, ttl):
    with FakeMetadataServer("ec2") as imds:
        assert put_token(http, imds.url, ttl).status_code == 400
        assert imds.requests == [("PUT", "/latest/api/token", 400)]


@pytest.mark.parametrize("ttl", ["1", "21600"])
def test_ec2_token_ttl_bounds_accepted(http, ttl):
    with FakeMetadataServer("ec2") as imds:
        resp = put_token(http, imds.url, ttl)
        assert resp.status_code == 200 and len(resp.text) > 20
        assert resp.headers[TTL] == ttl


def test_ec2_max_token_ttl_is_configurable(http):
    with FakeMetadataServer("ec2", max_token_ttl=10) as imds:
        assert put_token(http, imds.url, "11").status_code == 400
        assert put_token(http, imds.url, "10").status_code == 200


def test_ec2_token_put_through_a_proxy_is_403(http):
    with FakeMetadataServer("ec2") as imds:
        assert put_token(http, imds.url, "60", **{"X-Forwarded-For": "10.0.0.1"}).status_code == 403


def test_ec2_get_needs_a_live_token(http):
    with FakeMetadataServer("ec2") as imds:
        path = imds.url + "/latest/meta-data/instance-id"
        assert http.get(path, timeout=2).status_code == 401
        assert http.get(path, headers={TOKEN: "forged"}, timeout=2).status_code == 401
        token = put_token(http, imds.url, "1").text
        ok = http.get(path, headers={TOKEN: token}, timeout=2)
        assert ok.status_code == 200 and ok.text == imds.instance.instance_id
        time.sleep(1.1)  # the TTL was one second
        assert http.get(path, headers={TOKEN: token}, timeout=2).status_code == 401


def test_ec2_expire_tokens_revokes_every_token(http):
    with FakeMetadataServer("ec2") as imds:
        tokens = [put_token(http, imds.url, "600").text for _ in range(2)]
        imds.expire_tokens()
        for t in tokens:
            r = http.get(imds.url + "/latest/meta-data/instance-id", headers={TOKEN: t}, timeout=2)
            assert r.status_code == 401
        fresh = put_token(http, imds.url, "600").text
        r = http.get(imds.url + "/latest/meta-data/instance-id", headers={TOKEN: fresh}, timeout=2)
        assert r.status_code == 200


def test_ec2_notices_404_until_posted_then_json_then_cleared(http):
    with FakeMetadataServer("ec2") as imds:
        h = {TOKEN: put_token(http, imds.url).text}
        action = imds.url + "/latest/meta-data/spot/instance-action"
        rebalance = imds.url + "/latest/meta-data/events/recommendations/rebalance"
        assert http.get(action, headers=h, timeout=2).status_code == 404
        assert http.get(rebalance, headers=h, timeout=2).status_code == 404

        before = time.time()
        deadline = imds.post_interruption("hibernate", in_seconds=90)
        doc = http.get(action, headers=h, timeout=2).json()
        assert doc["action"] == "hibernate"
        posted = datetime.strptime(doc["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        assert posted.timestamp() == deadline
        assert before + 89 <= deadline <= before + 91

        notice_time = imds.post_rebalance()
        doc = http.get(rebalance, headers=h, timeout=2).json()
        stamp = datetime.strptime(doc["noticeTime"], "%Y-%m-%dT%H:%M:%SZ")
        assert stamp.replace(tzinfo=timezone.utc).timestamp() == notice_time

        imds.clear()
        assert http.get(action, headers=h, timeout=2).status_code == 404
        assert http.get(rebalance, headers=h, timeout=2).status_code == 404


def test_ec2_rejects_unknown_action_and_non_ec2_rebalance():
    with FakeMetadataServer("ec2") as imds:
        with pytest.raises(ConfigError):
            imds.post_interruption("explode")
    with FakeMetadataServer("gcp") as gcp, pytest.raises(ConfigError):
        gcp.post_rebalance()
    with pytest.raises(ConfigError):
        FakeMetadataServer("aws")


def test_ec2_instance_metadata_paths(http):
    info = InstanceInfo(cloud="aws", instance_id="i-abc", instance_type="g5.xlarge",
                        region=None, availability_zone="eu-west-1b", market="on-demand")
    with FakeMetadataServer("ec2", instance=info) as imds:
        h = {TOKEN: put_token(http, imds.url).text}
        base = imds.url + "/latest/meta-data/"

        def get(leaf):
            return http.get(base + leaf, headers=h, timeout=2)

        assert get("instance-type").text == "g5.xlarge"
        assert get("placement/availability-zone").text == "eu-west-1b"
        assert get("placement/region").status_code == 404  # region=None: not served
        assert get("instance-life-cycle").text == "on-demand"
        assert get("no/such/leaf").status_code == 404


def test_fail_next_then_recovers(http):
    with FakeMetadataServer("gcp") as gcp:
        gcp.fail_next(2, status=503)
        url = gcp.url + "/computeMetadata/v1/instance/preempted"
        h = {"Metadata-Flavor": "Google"}
        assert [http.get(url, headers=h, timeout=2).status_code for _ in range(3)] == [503, 503, 200]


def test_gcp_needs_metadata_flavor_header(http):
    with FakeMetadataServer("gcp") as gcp:
        url = gcp.url + "/computeMetadata/v1/instance/preempted"
        assert http.get(url, timeout=2).status_code == 403
        assert http.get(url, headers={"Metadata-Flavor": "google"}, timeout=2).status_code == 403
        ok = http.get(url, headers={"Metadata-Flavor": "Google"}, timeout=2)
        assert (ok.status_code, ok.text, ok.headers["Metadata-Flavor"]) == (200, "FALSE", "Google")
        gcp.post_interruption()
        assert http.get(url, headers={"Metadata-Flavor": "Google"}, timeout=2).text == "TRUE"
        gcp.clear()
        assert http.get(url, headers={"Metadata-Flavor": "Google"}, timeout=2).text == "FALSE"


def test_azure_needs_metadata_header_and_api_version(http):
    with FakeMetadataServer("azure") as az:
        events = az.url + "/metadata/scheduledevents?api-version=2020-07-01"
        assert http.get(events, timeout=2).status_code == 400
        assert http.get(az.url + "/metadata/scheduledevents", headers={"Metadata": "true"},
                        timeout=2).status_code == 400
        empty = http.get(events, headers={"Metadata": "true"}, timeout=2).json()
        assert empty["Events"] == []

        before = time.time()
        deadline = az.post_interruption(in_seconds=45)
        doc = http.get(events, headers={"Metadata": "true"}, timeout=2).json()
        assert doc["DocumentIncarnation"] > empty["DocumentIncarnation"]
        (event,) = doc["Events"]
        assert event["EventType"] == "Preempt"
        assert parsedate_to_datetime(event["NotBefore"]).timestamp() == deadline
        assert before + 44 <= deadline <= before + 46


def test_request_log_records_method_path_status(http):
    with FakeMetadataServer("azure") as az:
        http.get(az.url + "/metadata/instance?api-version=2021-02-01",
                 headers={"Metadata": "true"}, timeout=2)
        http.get(az.url + "/nope?api-version=1", headers={"Metadata": "true"}, timeout=2)
        assert az.requests == [
            ("GET", "/metadata/instance?api-version=2021-02-01", 200),
            ("GET", "/nope?api-version=1", 404),
        ]


def test_stop_frees_the_port(http):
    imds = FakeMetadataServer("ec2").start()
    url = imds.url
    imds.stop()
    with pytest.raises(requests.ConnectionError):
        put_token(http, url)


def test_runs_as_a_process_and_is_driven_by_control(tmp_path, child_env, http):
    port_file = tmp_path / "imds.url"
    proc = subprocess.Popen(
        [sys.executable, "-m", "spotrun.notices.fake_server", "--flavor", "ec2",
         "--instance-type", "p4d.24xlarge", "--port-file", str(port_file)],
        env=child_env, stdout=subprocess.PIPE, text=True,
    )
    try:
        printed = proc.stdout.readline().strip()
        assert port_file.read_text().strip() == printed
        assert printed.startswith("http://127.0.0.1:")
        h = {TOKEN: put_token(http, printed).text}
        r = http.get(printed + "/latest/meta-data/instance-type", headers=h, timeout=2)
        assert r.text == "p4d.24xlarge"

        deadline = control(printed, "interrupt", action="stop", in_seconds=30)
        doc = http.get(printed + "/latest/meta-data/spot/instance-action", headers=h,
                       timeout=2).json()
        assert doc["action"] == "stop"
        assert abs(deadline - (time.time() + 30)) < 3
        control(printed, "expire-tokens")
        r = http.get(printed + "/latest/meta-data/instance-type", headers=h, timeout=2)
        assert r.status_code == 401
        with pytest.raises(urllib.error.HTTPError):
            control(printed, "no-such-op")
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
