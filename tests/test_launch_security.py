"""Issue 13, items 7, 8, 10, 11: no secret in user data or logs, safe run names, a boot
script that survives a slow metadata service and never runs with an empty segment id.

The boot script runs for real in bash with the real ``curl`` against
:class:`~spotrun.notices.fake_server.FakeMetadataServer` on 127.0.0.1 (through the script's
``SPOTRUN_IMDS_ENDPOINT`` override; 169.254.169.254 is never contacted), and reads its
``--secret`` from an SSM SecureString on the moto server.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from conftest import free_port

from spotrun.cli import main as cli_main
from spotrun.launch.userdata import build_user_data
from spotrun.notices.fake_server import FakeMetadataServer

INSTANCE_ID = "i-0fa4e5c0ffee12345"  # what FakeMetadataServer("ec2") serves
SHUTDOWN = '#!/bin/bash\necho "$*" >> "$SHIM_LOG/shutdown.log"\n'


def boot(tmp_path: Path, child_env: dict, script: str, imds: str, **extra: str) -> subprocess.CompletedProcess:
    """Run ``script`` as an instance would: no ``aws`` CLI, this venv's python3, shutdown shimmed."""
    shims = tmp_path / "shims"
    shims.mkdir(exist_ok=True)
    p = shims / "shutdown"
    p.write_text(SHUTDOWN)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "user-data.sh").write_text(script)
    env = dict(child_env)
    # Only system dirs besides the shims and the venv: no 'aws' on PATH, so the python3 path
    # of the secret fetch is the one under test.
    env.update(PATH=os.pathsep.join([str(shims), os.path.dirname(sys.executable), "/usr/bin", "/bin"]),
               SHIM_LOG=str(tmp_path), SPOTRUN_LOG=str(tmp_path / "spotrun.log"),
               SPOTRUN_IMDS_ENDPOINT=imds, SPOTRUN_IMDS_BACKOFF="0.02", **extra)
    return subprocess.run(["bash", str(tmp_path / "user-data.sh")], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def probe(out: Path) -> list[str]:
    code = ("import json, os; json.dump({k: os.environ.get(k) for k in "
            f"('SPOTRUN_SEGMENT_ID', 'HF_TOKEN')}}, open({str(out)!r}, 'w'))")
    return ["python3", "-c", code]


# -- item 11: IMDS retries with backoff, fails loudly -------------------------------------


def test_boot_retries_a_failing_metadata_service(tmp_path: Path, child_env: dict) -> None:
    run = tmp_path / "run"
    script = build_user_data(run_url=str(run), run_id="r1", command=probe(tmp_path / "env.json"))
    with FakeMetadataServer("ec2") as imds:
        imds.fail_next(4, status=503)  # token and id requests fail for two whole tries
        proc = boot(tmp_path, child_env, script, imds.url)
    log = (tmp_path / "spotrun.log").read_text()
    assert proc.returncode == 0, log
    assert json.loads((tmp_path / "env.json").read_text())["SPOTRUN_SEGMENT_ID"] == INSTANCE_ID
    assert (run / "launch" / f"exit-{INSTANCE_ID}.json").exists()
    assert "try 1 failed" in log and "try 2 failed" in log


def test_boot_without_metadata_fails_loudly_and_never_runs_the_command(tmp_path: Path, child_env: dict) -> None:
    run = tmp_path / "run"
    script = build_user_data(run_url=str(run), run_id="r1", command=probe(tmp_path / "env.json"))
    proc = boot(tmp_path, child_env, script, f"http://127.0.0.1:{free_port()}")  # nothing listens
    log = (tmp_path / "spotrun.log").read_text()
    assert proc.returncode != 0
    assert not (tmp_path / "env.json").exists()  # the command never ran
    assert not (run / "launch" / "exit-.json").exists()
    assert "FATAL" in log and "instance id" in log and "after 10 tries" in log
    assert (tmp_path / "shutdown.log").read_text().split() == ["-h", "now"]


# -- item 7: secrets read at boot, never in user data -------------------------------------


@pytest.mark.slow
def test_secret_is_read_at_boot_and_never_in_user_data(tmp_path: Path, child_env: dict, moto_server: str) -> None:
    value = "hf_" + "Zq7" * 12
    ssm = boto3.client("ssm", endpoint_url=moto_server, region_name="us-east-1")
    ssm.put_parameter(Name="/ml/hf-token", Value=value, Type="SecureString", Overwrite=True)
    run = tmp_path / "run"
    script = build_user_data(run_url=str(run), run_id="r1", command=probe(tmp_path / "env.json"),
                             secrets={"HF_TOKEN": "ssm:/ml/hf-token"})
    assert value not in script and "/ml/hf-token" in script
    with FakeMetadataServer("ec2") as imds:  # serves placement/region us-east-1
        proc = boot(tmp_path, child_env, script, imds.url, AWS_ENDPOINT_URL=moto_server)
    log = (tmp_path / "spotrun.log").read_text()
    assert proc.returncode == 0, log
    assert json.loads((tmp_path / "env.json").read_text()) == {"SPOTRUN_SEGMENT_ID": INSTANCE_ID, "HF_TOKEN": value}
    assert value not in log


def test_unreadable_secret_fails_the_segment_before_setup(tmp_path: Path, child_env: dict, moto_server: str) -> None:
    run = tmp_path / "run"
    script = build_user_data(run_url=str(run), run_id="r1", command=probe(tmp_path / "env.json"),
                             setup=[f"touch {tmp_path / 'setup-ran'}"],
                             secrets={"HF_TOKEN": "ssm:/ml/no-such-parameter"})
    with FakeMetadataServer("ec2") as imds:
        boot(tmp_path, child_env, script, imds.url, AWS_ENDPOINT_URL=moto_server)
    assert not (tmp_path / "env.json").exists() and not (tmp_path / "setup-ran").exists()
    record = json.loads((run / "launch" / f"exit-{INSTANCE_ID}.json").read_text())
    assert record["stage"] == "secrets" and record["exit_code"] == 1
    assert "could not read secret HF_TOKEN" in (tmp_path / "spotrun.log").read_text()


SECRET_SHAPES = [
    ["--env", "HF_TOKEN=abc"],
    ["--env", "WANDB_API_KEY=0123456789abcdef0123456789abcdef01234567"],
    ["--env", "GH=ghp_" + "A1b2" * 9],
    ["--env", "REPO=github_pat_" + "x" * 40],
    ["--env", "DB_PASSWORD=hunter2"],
    ["--setup", "pip install --index-url https://me:s3cret@pypi.example.com/simple mypkg"],
    ["--setup", "export OPENAI_API_KEY=sk-abc && true"],
]


def test_secret_shapes_refused_before_anything_contacts_aws(tmp_path: Path, fault_proxy, monkeypatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    # Every SDK client (S3 state, EC2, SSM) would go through the proxy: its log must stay empty.
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    for extra in SECRET_SHAPES:
        code = cli_main(["launch", "--run-url", "s3://bucket/run", "--instance-types", "g5.xlarge",
                         "--region", "us-east-1", "--ami", "ami-12345678", *extra, "--", "python", "t.py"])
        err = capsys.readouterr().err
        assert code == 2, extra
        assert err.count("\n") == 1 and "--secret" in err, err
    assert fault_proxy.log == []


def test_bad_secret_source_refused(capsys: pytest.CaptureFixture) -> None:
    code = cli_main(["launch", "--run-url", "s3://bucket/run", "--instance-types", "g5.xlarge",
                     "--secret", "HF_TOKEN=hf_plainvalue", "--", "python", "t.py"])
    assert code == 2 and "ssm:/path" in capsys.readouterr().err


# -- item 10: run names stay under ./runs --------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "/abs", ""])
def test_local_name_cannot_escape_runs(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture, name: str) -> None:
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    code = cli_main(["launch", "--local", "--name", name, "--", sys.executable, "-c", "pass"])
    assert code == 2 and "--name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b"]  # nothing created anywhere


# -- item 8: -vv prints no credential ------------------------------------------------------

FAKE_KEY_ID = "AKIAFAKE0123456789AB"
FAKE_SECRET = "fAkEsEcReT/0123456789+abcdefghijklmnopqrs"
FAKE_TOKEN = "FwoGZXIvYXdzEFAKESESSIONTOKEN0123456789abcdefghijklmnopqrstuvwxyz"


@pytest.mark.slow
def test_vv_never_prints_credentials(tmp_path: Path, child_env: dict, s3_bucket: str, moto_server: str) -> None:
    """``-vv`` on S3 (aiobotocore) and EC2 (boto3) calls: debug output, no key id, token or
    secret. The EC2 endpoint is unreachable, which is also item 12's one-line exit 2."""
    env = dict(child_env, AWS_ACCESS_KEY_ID=FAKE_KEY_ID, AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
               AWS_SESSION_TOKEN=FAKE_TOKEN, AWS_ENDPOINT_URL=moto_server,
               AWS_ENDPOINT_URL_EC2=f"http://127.0.0.1:{free_port()}", AWS_MAX_ATTEMPTS="1",
               AWS_DEFAULT_REGION="us-east-1")
    spotrun = [sys.executable, "-m", "spotrun.cli", "-vv"]
    ls = subprocess.run([*spotrun, "ls", f"s3://{s3_bucket}/run"], env=env, capture_output=True,
                        text=True, timeout=120, check=False)
    launch = subprocess.run([*spotrun, "launch", "--run-url", f"s3://{s3_bucket}/run", "--instance-types",
                             "g5.xlarge", "--ami", "ami-12345678", "--", "python", "t.py"],
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    # SDK debug let through on purpose: the redacting filter is the second layer.
    sdk = subprocess.run([*spotrun, "ls", f"s3://{s3_bucket}/run"], env=dict(env, SPOTRUN_SDK_DEBUG="1"),
                         capture_output=True, text=True, timeout=120, check=False)
    out = ls.stdout + ls.stderr + launch.stdout + launch.stderr + sdk.stdout + sdk.stderr
    assert ls.returncode == 0 and sdk.returncode == 0, out
    assert "DEBUG" in out  # -vv really is debug logging
    assert "Credential=<redacted>" in sdk.stderr  # the signing lines were there, redacted
    for secret in (FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN, FAKE_TOKEN[:20]):
        assert secret not in out
    assert launch.returncode == 2, launch.stderr
    errors = [line for line in launch.stderr.splitlines() if line.startswith("spotrun: error:")]
    assert len(errors) == 1 and "cannot reach the EC2 API" in errors[0]
    assert "Traceback" not in launch.stderr
