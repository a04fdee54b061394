"""The user data script, executed for real in bash with ``curl`` and ``shutdown`` shimmed.

No metadata address is contacted: a ``curl`` on PATH answers the two IMDSv2 calls the
script makes (and records them, so the test checks a token is fetched first).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from spotrun.errors import ConfigError
from spotrun.launch.userdata import MAX_USER_DATA_BYTES, build_user_data, check_no_secrets

CURL = """#!/bin/bash
echo "$*" >> "$SHIM_LOG/curl.log"
case "$*" in
  *"-X PUT"*api/token*) echo -n TOKEN123 ;;
  *"X-aws-ec2-metadata-token: TOKEN123"*instance-id*) echo -n i-0123456789abcdef0 ;;
  *) exit 22 ;;
esac
"""
SHUTDOWN = """#!/bin/bash
echo "$*" >> "$SHIM_LOG/shutdown.log"
"""


def run_script(tmp_path: Path, child_env: dict, script: str) -> tuple[Path, subprocess.CompletedProcess]:
    shims = tmp_path / "shims"
    shims.mkdir()
    for name, body in (("curl", CURL), ("shutdown", SHUTDOWN)):
        p = shims / name
        p.write_text(body)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "user-data.sh").write_text(script)
    env = dict(child_env)
    # The instance's python3 is the one the setup installed spotrun into: here, this venv's.
    venv_bin = os.path.dirname(sys.executable)
    env.update(PATH=os.pathsep.join([str(shims), venv_bin, env["PATH"]]), SHIM_LOG=str(tmp_path),
               SPOTRUN_LOG=str(tmp_path / "spotrun.log"))
    proc = subprocess.run(["bash", str(tmp_path / "user-data.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    return tmp_path, proc


def probe_command(out: Path, code: int) -> list[str]:
    return ["python3", "-c",
            "import json, os, sys; json.dump({k: os.environ.get(k) for k in "
            "('SPOTRUN_URL', 'SPOTRUN_SEGMENT_ID', 'SPOTRUN_RUN_ID', 'MY_FLAG')}, "
            f"open({str(out)!r}, 'w')); sys.exit({code})"]


@pytest.mark.parametrize("code", [0, 75, 3])
def test_script_runs_command_records_exit_and_shuts_down(tmp_path: Path, child_env: dict, code: int) -> None:
    run = tmp_path / "run"
    script = build_user_data(run_url=str(run), run_id="r123", command=probe_command(tmp_path / "env.json", code),
                             setup=[f"echo setup-ran > {tmp_path / 'setup.txt'}"], env={"MY_FLAG": "a b'c"})
    d, proc = run_script(tmp_path, child_env, script)
    assert proc.returncode == 0, (d / "spotrun.log").read_text()
    assert (tmp_path / "setup.txt").read_text().strip() == "setup-ran"
    assert json.loads((tmp_path / "env.json").read_text()) == {
        "SPOTRUN_URL": str(run), "SPOTRUN_SEGMENT_ID": "i-0123456789abcdef0",
        "SPOTRUN_RUN_ID": "r123", "MY_FLAG": "a b'c"}
    record = json.loads((run / "launch" / "exit-i-0123456789abcdef0.json").read_text())
    assert record["exit_code"] == code and record["stage"] == "command"
    assert (d / "shutdown.log").read_text().split() == ["-h", "now"]
    calls = (d / "curl.log").read_text().splitlines()
    assert "-X PUT" in calls[0] and "api/token" in calls[0]  # IMDSv2: token first
    assert "X-aws-ec2-metadata-token: TOKEN123" in calls[1]


def test_setup_environment_carries_over_to_the_command(tmp_path: Path, child_env: dict) -> None:
    venv = tmp_path / "venv-activate"
    venv.write_text("export MY_FLAG=from-setup\n")
    script = build_user_data(run_url=str(tmp_path / "run"), run_id="r1",
                             command=probe_command(tmp_path / "env.json", 0), setup=[f"source {venv}"])
    run_script(tmp_path, child_env, script)
    assert json.loads((tmp_path / "env.json").read_text())["MY_FLAG"] == "from-setup"


def test_failed_setup_is_recorded_and_skips_the_command(tmp_path: Path, child_env: dict) -> None:
    run = tmp_path / "run"
    script = build_user_data(run_url=str(run), run_id="r1", command=probe_command(tmp_path / "env.json", 0),
                             setup=["true", "false", "echo never > /dev/null"])
    d, proc = run_script(tmp_path, child_env, script)
    assert not (tmp_path / "env.json").exists()
    record = json.loads((run / "launch" / "exit-i-0123456789abcdef0.json").read_text())
    assert record["exit_code"] == 1 and record["stage"] == "setup"
    assert (d / "shutdown.log").exists()


def test_no_credentials_in_script_even_with_them_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzzzSECRET")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FQoGZXIvYXdzEXAMPLETOKEN")
    script = build_user_data(run_url="s3://b/r", run_id="r", command=["python", "t.py"])
    assert "wJalrXUtnFEMI" not in script and "FQoGZXIv" not in script
    assert "AWS_SECRET_ACCESS_KEY" not in script and "AWS_SESSION_TOKEN" not in script


def test_secret_detection_allows_ordinary_values() -> None:
    # A git sha (40 hex chars), a path, a URL: not credentials.
    check_no_secrets(setup=["pip install git+https://github.com/me/pkg@" + "a" * 40],
                     env={"SHA": "0123456789abcdef0123456789abcdef01234567", "DATA": "s3://b/datasets/v1"},
                     command=["python", "train.py", "--lr", "3e-4"])
    with pytest.raises(ConfigError):
        check_no_secrets(setup=[], env={"X": "ASIAQWERTYUIOPASDFGH"}, command=[])


def test_user_data_size_limit() -> None:
    with pytest.raises(ConfigError, match="16384"):
        build_user_data(run_url="s3://b/r", run_id="r", command=["true"], setup=["echo " + "x" * MAX_USER_DATA_BYTES])
