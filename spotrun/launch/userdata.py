"""The boot script of an EC2 instance: set up, run the command once, report, shut down.

User data is readable by anyone who can call ``ec2:DescribeInstanceAttribute`` and by every
process on the instance (it is served by the metadata service), so it must never carry a
secret. Credentials come from the instance profile; :func:`check_no_secrets` refuses anything
that looks like a secret (AWS keys, Hugging Face / GitHub / W&B / OpenAI tokens, passwords,
``*TOKEN*``/``*SECRET*``/``*API_KEY*`` variables) before a script is even built. Secrets the
command needs go through ``--secret NAME=ssm:/path`` or ``NAME=arn:aws:secretsmanager:...``:
only the parameter's name is in user data, and the script reads the value at boot with the
instance profile (AWS CLI when present, else python3 with boto3/botocore).

What the script does, in order:

1. asks IMDSv2 (a token first: the instances require it) for the instance id, which becomes
   ``SPOTRUN_SEGMENT_ID`` so the wrapper's ledger records join the launcher's segment. IMDS
   can be slow right after boot, so each request retries with backoff (about 95 s in all);
   if it never answers, the script says so in its log and shuts down without running the
   command: never a segment with an empty id (``$SPOTRUN_IMDS_ENDPOINT`` overrides the
   address, for tests);
2. exports ``SPOTRUN_URL``, ``SPOTRUN_RUN_ID``, ``SPOTRUN_SEGMENT_ID``, the user's ``--env``
   and the ``--secret`` values it reads (a secret that cannot be read fails the segment);
3. runs the setup lines in the same shell (so an activated environment carries over to the
   command); the first failing line (a failed ``pip install``) fails the segment;
4. runs the command (for a node of an N-node job, through ``python -m spotrun.launch.node --
   CMD`` with ``SPOTRUN_INSTANCE_ID`` set: it finds the node's rank and the head's address in
   the run's cluster file and starts torchrun; with ``--recovery replace`` it is started with
   ``--rejoin-timeout``, so after an interrupted attempt it waits, bounded, to join the next
   one on this same instance, which stays up meanwhile), its output piped through
   ``python -m spotrun.launch.logs ship`` to ``RUN_URL/logs/`` (``spotrun logs``) and the
   instance's log, and records its exit code under ``RUN_URL/launch/exit-<segment>.json``
   (through spotrun itself, which the setup installed, so no AWS CLI is needed; the Python
   is ``$SPOTRUN_PYTHON`` when set, else ``python3`` on PATH);
5. shuts the instance down, which terminates it (the launch template sets
   ``InstanceInitiatedShutdownBehavior=terminate``), so an idle instance never bills: on exit 0
   the run is done; on 75 it was interrupted and the controller relaunches elsewhere; on
   anything else the controller reads the exit record and counts a failure.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence

from ..errors import ConfigError
from ..secret_shapes import TOKEN_SHAPES
from .warm import WARM_ENV

__all__ = ["MAX_USER_DATA_BYTES", "build_user_data", "check_no_secrets", "is_secret_name", "parse_secret"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

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


# Token shapes live in one module shared with the CLI's log redaction.
_TOKEN_SHAPES = TOKEN_SHAPES
# Variable names that hold secrets: a whole _-separated word (so TOKENIZERS_PARALLELISM and
# MAX_TOKENS pass) or one of the compound names.
_SECRET_WORDS = {"TOKEN", "SECRET", "SECRETS", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIALS",
                 "APIKEY", "PAT"}
_SECRET_COMPOUNDS = ("API_KEY", "ACCESS_KEY", "PRIVATE_KEY", "SECRET_KEY", "AUTH_KEY")
# NAME=value assignments and --token/--password style flags inside shell lines.
_ASSIGNMENT = re.compile(r"(?<![A-Za-z0-9_])([A-Za-z_][A-Za-z0-9_]*)=(?=\S)")
_SECRET_FLAG = re.compile(r"--(?:token|password|passwd|api[-_]?key|secret|hf[-_]token)(?:[=\s]|$)", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret (``HF_TOKEN``,
    ``WANDB_API_KEY``, ``DB_PASSWORD``, ``GITHUB_TOKEN``...)."""
    upper = name.upper()
    return (bool(_SECRET_NAMES.search(name)) or any(c in upper for c in _SECRET_COMPOUNDS)
            or any(w in _SECRET_WORDS for w in upper.split("_")))


def _secret_value(value: str) -> str | None:
    """What kind of secret ``value`` looks like, or None."""
    if _ACCESS_KEY_ID.search(value) or _looks_like_secret_key(value):
        return "an AWS credential"
    if _TOKEN_SHAPES.search(value):
        return "an access token, private key or password"
    return None


def _use_secret(name: str) -> str:
    return (f"pass it with --secret {name}=ssm:/path/to/parameter (or a Secrets Manager ARN), "
            "which user data names but never holds; the instance reads it at boot with its profile "
            "(see docs/launch.md)")


_WHY = "user data is readable through the EC2 API and the metadata service"


def check_no_secrets(*, setup: Sequence[str], env: Mapping[str, str], command: Sequence[str]) -> None:
    """Raise ConfigError if the setup, the environment or the command carry a secret.

    AWS credential names are refused outright (the instance profile is the way); other
    secret-shaped names (``HF_TOKEN``, ``WANDB_API_KEY``, ``*PASSWORD*``...) and values (AWS
    keys, ``hf_``/``ghp_``/``github_pat_``/``sk-`` tokens, private keys, ``user:pass@`` URLs)
    are refused with a pointer to ``--secret``. Runs before anything contacts AWS.
    """
    aws_fix = "remove it and grant access through --iam-instance-profile instead"
    for name, value in env.items():
        if _SECRET_NAMES.search(name):
            raise ConfigError(f"--env {name}: AWS credentials may not go into user data ({_WHY}); {aws_fix}")
        kind = _secret_value(value)
        if kind == "an AWS credential":
            raise ConfigError(f"--env {name}: the value looks like {kind}, and {_WHY}; {aws_fix}")
        if is_secret_name(name):
            raise ConfigError(f"--env {name}: its name says it is a secret, and {_WHY}; {_use_secret(name)}")
        if kind:
            raise ConfigError(f"--env {name}: the value looks like {kind}, and {_WHY}; {_use_secret(name)}")
    for where, items in (("--setup", setup), ("the command", command)):
        for item in items:
            aws = _SECRET_NAMES.search(item)
            if aws:
                raise ConfigError(f"{where} mentions AWS credentials ({aws.group(0)}), and {_WHY}; {aws_fix}")
            kind = _secret_value(item)
            if kind:
                fix = aws_fix if kind == "an AWS credential" else f"{_use_secret('NAME')} and use $NAME"
                raise ConfigError(f"{where} contains what looks like {kind}, and {_WHY}; {fix}")
            for m in _ASSIGNMENT.finditer(item):
                if is_secret_name(m.group(1)):
                    raise ConfigError(f"{where} sets {m.group(1)}, and {_WHY}; {_use_secret(m.group(1))}")
            flag = _SECRET_FLAG.search(item)
            if flag and "$" not in item[flag.end():flag.end() + 2]:
                raise ConfigError(f"{where} passes {flag.group(0).strip().rstrip('=')} with a value, and "
                                  f"{_WHY}; {_use_secret('NAME')} and pass \"$NAME\"")


# --secret NAME=ssm:/path, NAME=ssm:name, or NAME=arn:aws:secretsmanager:REGION:ACCOUNT:secret:ID
_SSM_SOURCE = re.compile(r"ssm:(/?[A-Za-z0-9_.\-/]+)")
_SM_ARN = re.compile(r"arn:aws[a-z-]*:secretsmanager:([a-z0-9-]+):\d{12}:secret:[A-Za-z0-9/_+=.@\-]+")


def parse_secret(item: str) -> tuple[str, str]:
    """``NAME=SOURCE`` from ``--secret``, checked; returns ``(name, source)``."""
    name, sep, source = item.partition("=")
    if not sep or not _ENV_NAME.match(name):
        raise ConfigError(f"--secret {item!r}: use NAME=ssm:/path/to/parameter or "
                          "NAME=arn:aws:secretsmanager:REGION:ACCOUNT:secret:ID")
    if not (_SSM_SOURCE.fullmatch(source) or _SM_ARN.fullmatch(source)):
        raise ConfigError(f"--secret {name}={source!r}: the source must be ssm:/path/to/parameter "
                          "(an SSM SecureString) or a Secrets Manager ARN arn:aws:secretsmanager:...")
    return name, source


def _secret_lines(secrets: Mapping[str, str]) -> str:
    lines = []
    for name, source in sorted(secrets.items()):
        parse_secret(f"{name}={source}")
        ssm = _SSM_SOURCE.fullmatch(source)
        if ssm:
            kind, ident, region = "ssm", ssm.group(1), '"$SPOTRUN_REGION"'
        else:
            kind, ident = "sm", source
            region = shlex.quote(_SM_ARN.fullmatch(source).group(1))  # type: ignore[union-attr]
        q = shlex.quote
        lines.append(
            f"{name}=$(spotrun_secret {kind} {q(ident)} {region}) && [ -n \"${name}\" ] || "
            f"spotrun_secret_failed {q(name)} {q(source)}\nexport {name}"
        )
    return "\n".join(lines)



_TEMPLATE = """#!/bin/bash
# spotrun user data for run {run_id}. It holds no credentials: the instance profile does.
set -o pipefail
exec >>"${{SPOTRUN_LOG:-/var/log/spotrun.log}}" 2>&1
echo "spotrun: boot $(date -u +%FT%TZ)"
export HOME="${{HOME:-/root}}"
IMDS="${{SPOTRUN_IMDS_ENDPOINT:-http://169.254.169.254}}"
spotrun_imds() {{
  # IMDS can be slow or briefly failing at boot: retry with backoff (1+2+4+8+16x5 s);
  # a fresh token every try, so an expired or refused one never sticks.
  local try=0 delay token value
  for delay in 1 2 4 8 16 16 16 16 16 0; do
    try=$((try + 1))
    token=$(curl -fsS --connect-timeout 2 --max-time 5 -X PUT "$IMDS/latest/api/token" \\
      -H "X-aws-ec2-metadata-token-ttl-seconds: 21600") && [ -n "$token" ] &&
    value=$(curl -fsS --connect-timeout 2 --max-time 5 -H "X-aws-ec2-metadata-token: $token" \\
      "$IMDS/latest/meta-data/$1") && [[ "$value" =~ ^[A-Za-z0-9._-]+$ ]] && {{ printf '%s' "$value"; return 0; }}
    [ "$delay" = 0 ] && break
    echo "spotrun: IMDS $1: try $try failed; again in ${{delay}}s" >&2
    sleep "$(awk -v d="$delay" -v s="${{SPOTRUN_IMDS_BACKOFF:-1}}" 'BEGIN {{ print d * s }}')"
  done
  echo "spotrun: FATAL: no answer from IMDSv2 ($IMDS) for $1 after $try tries" >&2
  return 1
}}
spotrun_boot_failed() {{
  # No instance id means no segment id: the command must not run (its records and exit
  # record would be unnamed). Shutting down ends the billing; the controller sees a failure.
  echo "spotrun: FATAL: $1; shutting down without running the command"
  shutdown -h now
  exit 1
}}
INSTANCE_ID=$(spotrun_imds instance-id) || spotrun_boot_failed "could not read the instance id"
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
spotrun_secret() {{
  # $1 ssm|sm, $2 parameter name or secret ARN, $3 region. The value goes to stdout only.
  if command -v aws >/dev/null 2>&1; then
    if [ "$1" = ssm ]; then
      aws ssm get-parameter --region "$3" --name "$2" --with-decryption --query Parameter.Value --output text
    else
      aws secretsmanager get-secret-value --region "$3" --secret-id "$2" --query SecretString --output text
    fi
  else
    "${{SPOTRUN_PYTHON:-$(command -v python3 || command -v python)}}" -c 'import sys
import botocore.session
kind, ident, region = sys.argv[1:4]
client = botocore.session.get_session().create_client("ssm" if kind == "ssm" else "secretsmanager", region_name=region)
if kind == "ssm":
    value = client.get_parameter(Name=ident, WithDecryption=True)["Parameter"]["Value"]
else:
    value = client.get_secret_value(SecretId=ident)["SecretString"]
sys.stdout.write(value)' "$1" "$2" "$3"
  fi
}}
spotrun_secret_failed() {{
  echo "spotrun: could not read secret $1 from $2 (does the instance profile allow it? see docs/launch.md)"
  spotrun_report 1 secrets
  shutdown -h now
  exit 1
}}
spotrun_setup_failed() {{
  rc=$?
  echo "spotrun: setup failed with exit code $rc"
  spotrun_report "$rc" setup
  shutdown -h now
  exit "$rc"
}}
{secret_lines}
# Setup runs in this shell (so 'source venv/bin/activate' carries over to the command);
# the first failing line fails the segment.
{setup_lines}
spotrun_command() {{
{command}
}}
# The output goes to RUN_URL/logs/ too (spotrun logs RUN_URL), through a shipper that reads
# to the end whatever signals come; pipefail keeps the command's exit code. Without an
# importable spotrun (the setup did not install it) the command runs unshipped.
SPOTRUN_PY="${{SPOTRUN_PYTHON:-$(command -v python3 || command -v python)}}"
if "$SPOTRUN_PY" -c 'import spotrun.launch.logs' 2>/dev/null; then
  spotrun_command 2>&1 | "$SPOTRUN_PY" -m spotrun.launch.logs ship --segment "$SPOTRUN_SEGMENT_ID"{ship_args}
else
  spotrun_command
fi
rc=$?
echo "spotrun: command exited with code $rc"
spotrun_report "$rc" command
shutdown -h now
"""


def _command_line(command: Sequence[str], *, distributed: bool, rejoin_timeout_s: float = 0.0) -> str:
    line = shlex.join(list(command))
    if not distributed:
        return line
    # With --recovery replace the node agent waits, after an interrupted attempt, for the
    # next one's cluster file: the instance stays up (and bills) only while it waits.
    rejoin = f"--rejoin-timeout {rejoin_timeout_s:g} " if rejoin_timeout_s > 0 else ""
    # The node launcher keys its entry in the cluster file by the instance id; it runs
    # spotrun.distributed (torchrun) with the rendezvous options and returns the job's code.
    return ('export SPOTRUN_INSTANCE_ID="$INSTANCE_ID"\n'
            '"${SPOTRUN_PYTHON:-$(command -v python3 || command -v python)}" -m spotrun.launch.node '
            + rejoin + "-- " + line)


def build_user_data(
    *,
    run_url: str,
    run_id: str,
    command: Sequence[str],
    setup: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    secrets: Mapping[str, str] | None = None,
    nodes: int = 1,
    nproc_per_node: int | None = None,
    rejoin_timeout_s: float = 0.0,
) -> str:
    """The bash boot script for one instance of the run (see the module docstring).

    ``command`` is an argv list (quoted here); each ``setup`` entry is a shell line, run as
    written. ``secrets`` maps a variable name to an ``ssm:/path`` or Secrets Manager ARN read
    at boot (only the name is in the script). With ``nodes > 1`` or ``nproc_per_node`` set,
    the instance is one node of a torchrun job: the command runs through
    ``python -m spotrun.launch.node --`` (which reads the node count, rank and head address
    from the run's cluster file, so the script is the same for every node). Raises
    ConfigError on secrets, bad variable names or a script over 16 KiB.
    """
    if nodes < 1:
        raise ConfigError(f"--nodes {nodes}: a job needs at least 1 node")
    if nproc_per_node is not None and nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node {nproc_per_node}: a node runs at least 1 process")
    env = dict(env or {})
    if WARM_ENV not in env and os.environ.get(WARM_ENV):
        # Warm workers (docs/launch.md, Recovery) set where the launcher runs: the node
        # agents on the instances read it, as the local launcher's nodes inherit it.
        env[WARM_ENV] = os.environ[WARM_ENV]
    secrets = dict(secrets or {})
    both = sorted(set(env) & set(secrets))
    if both:
        raise ConfigError(f"{both[0]} is both --env and --secret; keep the --secret")
    if not command:
        raise ConfigError("no command to run; put it after --, e.g. spotrun launch ... -- python train.py")
    check_no_secrets(setup=setup, env=env, command=command)
    for name in env:
        if not _ENV_NAME.match(name):
            raise ConfigError(f"--env {name!r} is not a valid variable name; use NAME=VALUE")
    env_lines = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    setup_lines = "\n".join(f"{line} || spotrun_setup_failed" for line in setup)
    secret_lines = ""
    if secrets:
        # SSM parameters are read in the instance's own region.
        secret_lines = ('SPOTRUN_REGION=$(spotrun_imds placement/region) || '
                        'spotrun_boot_failed "could not read the region"\n' + _secret_lines(secrets))
    distributed = nodes > 1 or nproc_per_node is not None
    script = _TEMPLATE.format(
        run_id=shlex.quote(run_id),
        run_url=shlex.quote(run_url),
        env_lines=env_lines,
        setup_lines=setup_lines,
        secret_lines=secret_lines,
        command=_command_line(command, distributed=distributed, rejoin_timeout_s=rejoin_timeout_s),
        # A node learns its attempt and index from its cluster file: its logs go there.
        ship_args=' --cluster-instance "$INSTANCE_ID"' if distributed else "",
    )
    size = len(script.encode())
    if size > MAX_USER_DATA_BYTES:
        raise ConfigError(
            f"user data is {size} bytes, over EC2's {MAX_USER_DATA_BYTES}; move long setup "
            "steps into a script in your package or a custom AMI"
        )
    return script
