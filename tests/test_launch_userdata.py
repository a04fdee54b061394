"""The user data script, executed for real in bash with ``curl`` and ``shutdown`` shimmed.

No metadata address is contacted: a ``curl`` on PATH answers the two IMDSv2 calls the
script makes (and records them, so the test checks a token is fetched first).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from spotrun.errors import ConfigError
from spotrun.launch.node import ClusterSpec, write_cluster
from spotrun.launch.userdata import MAX_USER_DATA_BYTES, build_user_data, check_no_secrets
from spotrun.storage import Storage

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


def run_script(tmp_path: Path, child_env: dict, script: str,
               extra_env: dict | None = None) -> tuple[Path, subprocess.CompletedProcess]:
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
               SPOTRUN_LOG=str(tmp_path / "spotrun.log"), **(extra_env or {}))
    proc = subprocess.run(["bash", str(tmp_path / "user-data.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    return tmp_path, proc


def probe_command(out: Path, code: int) -> list[str]:
    return ["python3", "-c",
            "import json, os, sys; json.dump({k: os.environ.get(k) for k in "
            "('SPOTRUN_URL', 'SPOTRUN_SEGMENT_ID', 'SPOTRUN_RUN_ID', 'MY_FLAG')}, "
            f"open({str(out)!r}, 'w')); print('probe-output', flush=True); sys.exit({code})"]


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
    # The output is shipped to the run URL (spotrun logs) and kept in the instance's log.
    assert (run / "logs" / "i-0123456789abcdef0" / "node-0" / "000000.log").read_bytes() == b"probe-output\n"
    assert "probe-output" in (d / "spotrun.log").read_text()
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
    d, _proc = run_script(tmp_path, child_env, script)
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


def test_single_node_script_is_unchanged() -> None:
    """Multi-node support left the one-instance boot script byte for byte as it was."""
    kw: dict = {"run_url": "s3://bucket/runs/r1", "run_id": "r1",
                "command": ["python", "train.py", "--epochs", "3"], "setup": ["pip install spotrun mypkg"],
                "env": {"WANDB_MODE": "offline"}, "secrets": {"HF_TOKEN": "ssm:/hf/token"}}
    script = build_user_data(**kw)
    # sha256 of the script as multi-node left it (log shipping, issue 14, was the last
    # deliberate change); update it only for a deliberate change of the boot script.
    assert hashlib.sha256(script.encode()).hexdigest() == (
        "b73ce9db9dcdbca636033039a91c593f7f2cc18fe0964a7965222d02e264ea71")
    assert "--cluster-instance" not in script
    assert build_user_data(**kw, nodes=1, nproc_per_node=None) == script
    assert "spotrun.launch.node" not in script and "SPOTRUN_INSTANCE_ID" not in script


# The instance's Python, faked: `-m spotrun.launch.node` records its argv and environment
# and exits with $NODE_RC; anything else (the exit record) runs in the real interpreter.
FAKE_PYTHON = """#!/bin/bash
if [ "$1" = -m ] && [ "$2" = spotrun.launch.node ]; then
  printf '%s\\n' "$@" > "$SHIM_LOG/node-argv.txt"
  printf '%s\\n' "$SPOTRUN_INSTANCE_ID" "$SPOTRUN_SEGMENT_ID" "$SPOTRUN_URL" > "$SHIM_LOG/node-env.txt"
  echo "node-says-hi"
  exit "$NODE_RC"
fi
exec {real} "$@"
"""


@pytest.mark.parametrize(("nodes", "nproc"), [(2, None), (1, 4)])
def test_node_of_a_multi_node_job_runs_the_node_launcher(tmp_path: Path, child_env: dict, nodes: int,
                                                         nproc: int | None) -> None:
    run = tmp_path / "run"
    command = ["python", "train.py", "--name", "a b'c", "--lr=3e-4"]
    script = build_user_data(run_url=str(run), run_id="r9", command=command, nodes=nodes, nproc_per_node=nproc)
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON.format(real=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    # This node is node 1 of attempt a3: its output is shipped there once the file is read.
    write_cluster(Storage(str(run)), ClusterSpec(
        segment="a3", nodes=[{"instance_id": "i-0aaa", "address": "10.0.0.5"},
                             {"instance_id": "i-0123456789abcdef0", "address": "10.0.0.6"}],
        nproc_per_node=nproc or 1, rdzv_id="r9-a3"))
    d, proc = run_script(tmp_path, child_env, script, {"SPOTRUN_PYTHON": str(fake), "NODE_RC": "75"})
    assert proc.returncode == 0, (d / "spotrun.log").read_text()
    argv = (d / "node-argv.txt").read_text().splitlines()
    assert argv == ["-m", "spotrun.launch.node", "--", *command]
    assert (d / "node-env.txt").read_text().splitlines() == ["i-0123456789abcdef0", "i-0123456789abcdef0", str(run)]
    # The launcher's exit code is the segment's: recorded, then the instance shuts down.
    record = json.loads((run / "launch" / "exit-i-0123456789abcdef0.json").read_text())
    assert record["exit_code"] == 75 and record["stage"] == "command"
    assert (d / "shutdown.log").read_text().split() == ["-h", "now"]
    assert "command exited with code 75" in (d / "spotrun.log").read_text()
    assert (run / "logs" / "a3" / "node-1" / "000000.log").read_bytes() == b"node-says-hi\n"


def test_node_counts_are_checked() -> None:
    with pytest.raises(ConfigError, match="--nodes 0"):
        build_user_data(run_url="s3://b/r", run_id="r", command=["true"], nodes=0)
    with pytest.raises(ConfigError, match="--nproc-per-node 0"):
        build_user_data(run_url="s3://b/r", run_id="r", command=["true"], nproc_per_node=0)
