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
from spotrun.records.layout import MANIFEST, checkpoint_dir
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


# -- issue 13, items 12 and 13: one line, exit 2, codes from the exception classes ----------


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("spotrun: warning:")]
    assert len(lines) == 1 and lines[0].startswith("spotrun: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_check_resume_of_a_missing_program(tmp_path, capsys):
    code = cli_main(["check-resume", "--workdir", str(tmp_path / "w"), "--", "/nonexistent"])
    assert code == 2
    assert "/nonexistent" in _one_error_line(capsys.readouterr().err)


def test_storage_options_a_backend_rejects(s3_bucket, capsys):
    code = cli_main(["ls", f"s3://{s3_bucket}/run", "--storage-options", '{"nonsense": 1}'])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "nonsense" in line and "--storage-options" in line


@pytest.mark.parametrize("cmd", [["ls"], ["verify"], ["status"], ["cost"]])
def test_http_run_url_refused(cmd, capsys):
    assert cli_main([*cmd, "http://127.0.0.1:9/run"]) == 2
    assert "s3://" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv", [["ls", "/tmp/a\x00b"],
                                  ["launch", "--local", "--run-url", "/tmp/r\x00", "--", "true"]])
def test_nul_byte_in_a_path(argv, capsys):
    assert cli_main(argv) == 2
    assert "NUL" in _one_error_line(capsys.readouterr().err)


def test_exit_codes_come_from_the_exception_classes(monkeypatch, capsys):
    from spotrun import errors
    from spotrun.cli import checkpoints

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert isinstance(cls.exit_code, int) and cls.__doc__, name

    class Custom(errors.SpotrunError):
        """A subclass with its own code."""

        exit_code = 7

    for exc, code in ((errors.ConfigError("bad"), 2), (errors.CapacityError("none"), 1),
                      (errors.EndpointUnreachableError("down"), 2), (Custom("x"), 7)):
        def boom(args, exc=exc):
            raise exc

        monkeypatch.setattr(checkpoints, "cmd_ls", boom)
        assert cli_main(["ls", "/tmp"]) == code
        _one_error_line(capsys.readouterr().err)


def test_unreachable_ec2_endpoint_is_one_line(tmp_path, monkeypatch, capsys):
    from conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    code = cli_main(["launch", "--run-url", str(tmp_path / "run"), "--instance-types", "g5.xlarge",
                     "--region", "us-east-1", "--ami", "ami-12345678", "--", "python", "t.py"])
    assert code == 2
    assert "cannot reach the EC2 API" in _one_error_line(capsys.readouterr().err)
