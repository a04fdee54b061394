"""Each user error gets one clear line naming the problem and the fix."""

from __future__ import annotations

import json

import pytest
import torch

import spotrun
from spotrun.cli import main as cli_main
from spotrun.errors import (
    CredentialsError,
    IncompatibleCheckpointError,
    StorageNotFoundError,
    StorageURLError,
    UnsupportedFormatError,
)
from spotrun.layout import MANIFEST, checkpoint_dir
from spotrun.storage import Storage


def _ck(url, **kw):
    return spotrun.Checkpointer(url, handle_signals=False, watchers=[], **kw)


@pytest.mark.parametrize("url", ["", "   ", "s3://", "nosuchproto://bucket/x"])
def test_malformed_url(url):
    with pytest.raises(StorageURLError) as e:
        Storage(url)
    assert "\n" not in str(e.value)


def test_no_url_and_no_env(monkeypatch):
    monkeypatch.delenv("SPOTRUN_URL", raising=False)
    with pytest.raises(StorageURLError, match="SPOTRUN_URL"):
        spotrun.Checkpointer()


def test_missing_bucket(s3_bucket):
    with pytest.raises(StorageNotFoundError, match="bucket 'no-such-bucket-x1' .* does not exist"):
        with _ck("s3://no-such-bucket-x1/run", model=torch.nn.Linear(2, 2)):
            pass


def test_missing_directory_cli(tmp_path, capsys):
    assert cli_main(["ls", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1


def test_missing_credentials(moto_server, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    st = Storage("s3://some-bucket/run", {"skip_instance_cache": True})
    with pytest.raises(CredentialsError, match="no cloud credentials"):
        st.ensure_root(create=True)


def test_tensors_that_do_not_fit_name_key_and_shapes(tmp_path):
    url = str(tmp_path / "run")
    with _ck(url, model=torch.nn.Linear(8, 16), every_steps=1) as ck:
        ck.restore()
        ck.step(1)
    with pytest.raises(IncompatibleCheckpointError) as e:
        with _ck(url, model=torch.nn.Linear(8, 32)) as ck:
            ck.restore()
    msg = str(e.value)
    assert "model.weight" in msg and "(16, 8)" in msg and "(32, 8)" in msg


def test_newer_manifest_format(tmp_path, capsys):
    url = str(tmp_path / "run")
    with _ck(url, model=torch.nn.Linear(2, 2), every_steps=1) as ck:
        ck.restore()
        ck.step(1)
    st = Storage(url)
    rel = f"{checkpoint_dir(1)}/{MANIFEST}"
    data = json.loads(st.read_bytes(rel))
    data["format_version"] = 99
    st.write_bytes(rel, json.dumps(data).encode())
    with pytest.raises(UnsupportedFormatError, match="upgrade spotrun"):
        with _ck(url, model=torch.nn.Linear(2, 2)) as ck:
            ck.restore()
    assert cli_main(["ls", url]) == 2
    assert "newer than this spotrun" in capsys.readouterr().err


def test_unsafe_value_refused_at_save_not_at_resume(tmp_path):
    with _ck(str(tmp_path / "run"), model=torch.nn.Linear(2, 2), values={"cfg": object()}) as ck:
        ck.restore()
        with pytest.raises(spotrun.ConfigError, match="'cfg' is a object"):
            ck.save()


def test_not_stateful_object():
    with pytest.raises(spotrun.ConfigError, match="no state_dict"):
        spotrun.Checkpointer("/tmp/x", objects={"thing": 3})


def test_bucket_head_denied_is_not_fatal(s3_bucket, monkeypatch):
    """A least-privilege role may list only the run's prefix, so HeadBucket answers 403:
    the run must still start (S3 says 404, not 403, for a bucket that does not exist)."""
    st = Storage(f"s3://{s3_bucket}/run")

    def denied(path, **kw):
        raise PermissionError("Forbidden")

    monkeypatch.setattr(st.fs, "info", denied)
    st.ensure_root(create=True)
    st.write_bytes("x", b"1")
    assert st.read_bytes("x") == b"1"
