"""The boot script of an EC2 instance: set up, run the command once, report, shut down.

User data is readable by anyone who can call ``ec2:DescribeInstanceAttribute`` and by every
process on the instance (it is served by the metadata service), so it must never carry a
secret. Credentials come from the instance profile; :func:`check_no_secrets` refuses anything
that looks like an AWS secret before a script is even built.

What the script does, in order:

1. asks IMDSv2 (a token first: the instances require it) for the instance id, which becomes
   ``SPOTRUN_SEGMENT_ID`` so the wrapper's ledger records join the launcher's segment;
2. exports ``SPOTRUN_URL``, ``SPOTRUN_RUN_ID``, ``SPOTRUN_SEGMENT_ID`` and the user's ``--env``;
3. runs the setup lines in the same shell (so an activated environment carries over to the
   command); the first failing line (a failed ``pip install``) fails the segment;
4. runs the command and records its exit code under ``RUN_URL/launch/exit-<segment>.json``
   (through spotrun itself, which the setup installed, so no AWS CLI is needed; the Python
   is ``$SPOTRUN_PYTHON`` when set, else ``python3`` on PATH);
5. shuts the instance down, which terminates it (the launch template sets
   ``InstanceInitiatedShutdownBehavior=terminate``), so an idle instance never bills: on exit 0
   the run is done; on 75 it was interrupted and the controller relaunches elsewhere; on
   anything else the controller reads the exit record and counts a failure.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence

from ..errors import ConfigError

__all__ = ["MAX_USER_DATA_BYTES", "build_user_data", "check_no_secrets"]

#: EC2's limit on user data before base64.
MAX_USER_DATA_BYTES = 16 * 1024

_SECRET_NAMES = re.compile(
    r"(AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|AWS_SECURITY_TOKEN|AWS_ACCESS_KEY_ID"
    r"|aws_secret_access_key|aws_session_token)"
)
# Access key ids have a fixed shape; long-term (AKIA) and temporary (ASIA) alike.
_ACCESS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
# A 40-character secret access key: base64-ish, with at least one '/' or '+' or mixed case
# and digits. Matched only as a whole word so hashes and paths rarely trip it.
_SECRET_KEY = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")


def _looks_like_secret_key(token: str) -> bool:
    for m in _SECRET_KEY.finditer(token):
        s = m.group(0)
        # A hex digest (sha1 is 40 hex chars) is not a secret key.
        if re.fullmatch(r"[0-9a-f]{40}", s):
            continue
        if any(c.isupper() for c in s) and any(c.islower() for c in s) and any(c.isdigit() for c in s):
            return True
    return False


def check_no_secrets(*, setup: Sequence[str], env: Mapping[str, str], command: Sequence[str]) -> None:
    """Raise ConfigError if the setup, the environment or the command carry AWS credentials.

    Names (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ...) are refused outright; values
    are checked for the shapes of access key ids and secret keys.
    """
    fix = (
        "user data is readable through the EC2 API and the metadata service; remove it and "
        "grant access through --iam-instance-profile instead"
    )
    for name, value in env.items():
        if _SECRET_NAMES.search(name):
            raise ConfigError(f"--env {name}: AWS credentials may not go into user data; {fix}")
        if _ACCESS_KEY_ID.search(value) or _looks_like_secret_key(value):
            raise ConfigError(f"--env {name}: the value looks like an AWS credential; {fix}")
    for where, items in (("--setup", setup), ("the command", command)):
        for item in items:
            if _SECRET_NAMES.search(item):
                raise ConfigError(
                    f"{where} mentions AWS credentials ({_SECRET_NAMES.search(item).group(0)}); {fix}"  # type: ignore[union-attr]
                )
            if _ACCESS_KEY_ID.search(item) or _looks_like_secret_key(item):
                raise ConfigError(f"{where} contains what looks like an AWS credential; {fix}")


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_TEMPLATE = """#!/bin/bash
# spotrun user data for run {run_id}. It holds no credentials: the instance profile does.
set -o pipefail
exec >>"${{SPOTRUN_LOG:-/var/log/spotrun.log}}" 2>&1
echo "spotrun: boot $(date -u +%FT%TZ)"
export HOME="${{HOME:-/root}}"
IMDS=http://169.254.169.254
TOKEN=$(curl -fsS -X PUT "$IMDS/latest/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 21600")
INSTANCE_ID=$(curl -fsS -H "X-aws-ec2-metadata-token: $TOKEN" "$IMDS/latest/meta-data/instance-id")
export SPOTRUN_URL={run_url}
export SPOTRUN_RUN_ID={run_id}
export SPOTRUN_SEGMENT_ID="$INSTANCE_ID"
{env_lines}
spotrun_report() {{
  # Best effort: if spotrun is not importable the controller still sees the shutdown.
  "${{SPOTRUN_PYTHON:-$(command -v python3 || command -v python)}}" -c 'import json, sys, time
from spotrun.storage import Storage
Storage(sys.argv[1]).write_bytes(sys.argv[2], json.dumps({{"exit_code": int(sys.argv[3]), "stage": sys.argv[4], "time": time.time()}}).encode())' \
    "$SPOTRUN_URL" "launch/exit-$SPOTRUN_SEGMENT_ID.json" "$1" "$2" || true
}}
spotrun_setup_failed() {{
  rc=$?
  echo "spotrun: setup failed with exit code $rc"
  spotrun_report "$rc" setup
  shutdown -h now
  exit "$rc"
}}
# Setup runs in this shell (so 'source venv/bin/activate' carries over to the command);
# the first failing line fails the segment.
{setup_lines}
{command}
rc=$?
echo "spotrun: command exited with code $rc"
spotrun_report "$rc" command
shutdown -h now
"""


def build_user_data(
    *,
    run_url: str,
    run_id: str,
    command: Sequence[str],
    setup: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> str:
    """The bash boot script for one instance of the run (see the module docstring).

    ``command`` is an argv list (quoted here); each ``setup`` entry is a shell line, run as
    written. Raises ConfigError on credentials, bad variable names or a script over 16 KiB.
    """
    env = dict(env or {})
    if not command:
        raise ConfigError("no command to run; put it after --, e.g. spotrun launch ... -- python train.py")
    check_no_secrets(setup=setup, env=env, command=command)
    for name in env:
        if not _ENV_NAME.match(name):
            raise ConfigError(f"--env {name!r} is not a valid variable name; use NAME=VALUE")
    env_lines = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    setup_lines = "\n".join(f"{line} || spotrun_setup_failed" for line in setup)
    script = _TEMPLATE.format(
        run_id=shlex.quote(run_id),
        run_url=shlex.quote(run_url),
        env_lines=env_lines,
        setup_lines=setup_lines,
        command=shlex.join(list(command)),
    )
    size = len(script.encode())
    if size > MAX_USER_DATA_BYTES:
        raise ConfigError(
            f"user data is {size} bytes, over EC2's {MAX_USER_DATA_BYTES}; move long setup "
            "steps into a script in your package or a custom AMI"
        )
    return script
