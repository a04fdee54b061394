"""S3 multipart uploads from the part thread pool (spotrun/storage/s3.py, s3client.py),
against the moto server through tests/faultproxy.py, which records every request.

* parts carry spotrun's CRC32C as S3's native ``ChecksumCRC32C`` (and botocore adds no
  checksum of its own), the object round-trips byte-exact and S3 stores its composite
  CRC32C;
* the upload threads sign with the credentials s3fs was given, not the environment's;
* a part that keeps failing aborts the upload: no object, no incomplete upload, and the
  previous checkpoint still restores.
"""

from __future__ import annotations

import base64
import os
import re
import uuid

import boto3
import crc32c
import pytest
import torch

import spotrun
from spotrun.errors import SpotrunError
from spotrun.storage import Storage

MiB = 1 << 20
PART = 5 * MiB  # S3's minimum part size
PART_PUT = {"method": "PUT", "path": r"[?&]partNumber=\d+"}


def _client(moto_server: str):
    return boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")


def _b64crc(data: bytes) -> str:
    return base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()


def _opts(endpoint: str, **extra) -> dict:
    return {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True, **extra}


def test_parts_carry_their_crc32c_and_the_object_round_trips(s3_bucket, moto_server,
                                                              fault_proxy, monkeypatch):
    # The environment's keys differ from the ones given to s3fs: the part threads must sign
    # with s3fs's (moto accepts any key, so the Authorization header is what tells).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-the-environment")
    st = Storage(f"s3://{s3_bucket}/run",
                 _opts(fault_proxy.url, key="GIVENTOS3FS", secret="s3fs-secret"),
                 part_size=PART, concurrency=3)
    data = os.urandom(2 * PART + 4321)
    with st.open_write("000000000001/rank-00000.pt") as f:
        for lo in range(0, len(data), 3 * MiB + 5):
            f.write(data[lo : lo + 3 * MiB + 5])

    key = "run/000000000001/rank-00000.pt"
    s3 = _client(moto_server)
    assert s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == data
    assert not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")

    creates = fault_proxy.requests(method="POST", path=r"\?uploads")
    assert len(creates) == 1
    assert creates[0].headers.get("x-amz-checksum-algorithm") == "CRC32C"
    parts = fault_proxy.requests(**PART_PUT)
    assert len(parts) == 3
    pieces = [data[lo : lo + PART] for lo in range(0, len(data), PART)]
    for req in parts:
        number = int(re.search(r"partNumber=(\d+)", req.target).group(1))
        assert req.headers.get("x-amz-checksum-crc32c") == _b64crc(pieces[number - 1])
        # spotrun's checksum only: botocore's default (a CRC32 of every part) is off.
        assert "x-amz-checksum-crc32" not in req.headers
        assert "x-amz-sdk-checksum-algorithm" not in req.headers
        assert "Credential=GIVENTOS3FS/" in req.headers.get("authorization", "")
    # S3 keeps the composite checksum: the CRC32C of the parts' CRC32Cs, "-<parts>".
    composite = b"".join(crc32c.crc32c(p).to_bytes(4, "big") for p in pieces)
    head = s3.head_object(Bucket=s3_bucket, Key=key, ChecksumMode="ENABLED")
    # (moto's HEAD leaves out the "-3" that S3 and moto's GET add)
    assert head["ChecksumCRC32C"] in (_b64crc(composite), f"{_b64crc(composite)}-3")
    assert head["ETag"].strip('"').endswith("-3")


def test_a_failing_part_leaves_nothing_and_the_previous_checkpoint_restores(
        s3_bucket, moto_server, fault_proxy, monkeypatch):
    monkeypatch.setenv("SPOTRUN_S3_PART_MIB", "5")
    monkeypatch.setenv("SPOTRUN_S3_CONCURRENCY", "2")
    monkeypatch.setenv("SPOTRUN_S3_RETRIES", "1")
    url = f"s3://{s3_bucket}/runs/{uuid.uuid4().hex[:8]}"
    prefix = url.split("/", 3)[3]
    # botocore's own attempts off: spotrun's retry round is the one that must give up.
    opts = _opts(fault_proxy.url,
                 config_kwargs={"retries": {"mode": "standard", "total_max_attempts": 1}})
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1536)  # about 6 MiB of weights: two parts
    with spotrun.Checkpointer(url, model=model, handle_signals=False, watchers=[],
                              async_save=False, storage_options=opts) as ck:
        ck.restore()
        ck.steps_done = 1
        ck.save()
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        # From now on every part 2 is answered with a dropped connection.
        fault_proxy.add("reset", method="PUT", path=r"[?&]partNumber=2(&|$)")
        with torch.no_grad():
            model.weight.add_(1.0)
        ck.steps_done = 2
        with pytest.raises(SpotrunError, match="part 2 of s3://.*still failing"):
            ck.save()
    fault_proxy.clear()

    assert len(fault_proxy.requests(method="PUT", path=r"[?&]partNumber=2(&|$)",
                                    action="reset")) == 2  # the try and one retry
    assert fault_proxy.count(method="DELETE", path=r"uploadId=") == 1  # the abort
    s3 = _client(moto_server)
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"{prefix}/000000000002/")
    assert not listed.get("Contents")
    assert not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")

    model2 = torch.nn.Linear(1024, 1536)
    with spotrun.Checkpointer(url, model=model2, handle_signals=False, watchers=[],
                              storage_options=_opts(moto_server)) as ck2:
        assert ck2.restore() == 1
    for name, tensor in saved.items():
        assert torch.equal(model2.state_dict()[name], tensor)


@pytest.mark.parametrize("scheme, signed", [("https", False), ("http", True)])
def test_parts_skip_the_payload_hash_only_over_tls(scheme, signed):
    """With a checksum header on the part, botocore's own rule (TLS + checksum: no SHA-256
    of the payload) applies to spotrun's CRC32C too; plain HTTP keeps the signed payload.
    In process, nothing is sent: the request is answered before it leaves."""
    from botocore.awsrequest import AWSResponse

    from spotrun.storage.s3client import threaded_client

    st = Storage("s3://some-bucket/run",
                 {"client_kwargs": {"endpoint_url": f"{scheme}://127.0.0.1:9"},
                  "key": "AKEY", "secret": "asecret", "skip_instance_cache": True})
    client = threaded_client(st.fs, "some-bucket", 2)
    seen = {}

    def answer(request, **_):
        seen.update({k.lower(): v for k, v in request.headers.items()})
        response = AWSResponse(request.url, 200, {"ETag": '"e"'}, None)
        response._content = b""
        return response

    client.meta.events.register("before-send.s3.UploadPart", answer)
    body = bytearray(os.urandom(1000))
    client.upload_part(Bucket="some-bucket", Key="k", UploadId="u", PartNumber=1, Body=body,
                       ChecksumCRC32C=_b64crc(bytes(body)))
    sha = seen["x-amz-content-sha256"]
    sha = sha.decode() if isinstance(sha, bytes) else sha
    assert (sha != "UNSIGNED-PAYLOAD") is signed
    assert "Credential=AKEY/" in str(seen["authorization"])
    assert "x-amz-checksum-crc32" not in seen and "x-amz-checksum-crc32c" in seen
