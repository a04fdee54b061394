"""``spotrun launch``, ``spotrun status`` and ``spotrun stop``.

Exit codes of ``launch``: 0 the run finished (or ``stop`` stopped it), 1 it failed (the
command's failure limit, or a launch rule said stop), 2 bad usage, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, TextIO

from ..errors import ConfigError
from ..storage import Storage

if TYPE_CHECKING:
    from ..launch.base import Launcher, LaunchEvent

__all__ = ["ask_ctrl_c", "event_printer", "parse_deadline", "register"]


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_deadline(value: str, now: float | None = None) -> float:
    """``2025-06-01T12:00Z`` (ISO 8601, UTC when no zone) or a duration from now: 90m, 6h, 2d."""
    from ..launch.limits import duration_seconds

    now = time.time() if now is None else now
    seconds = duration_seconds(value)
    if seconds is not None:
        return now + seconds
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--deadline {value!r}: use a time like 2025-06-01T12:00Z or a duration like 6h") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _count(flag: str, *, minimum: int = 1, maximum: int | None = None, example: str = "2") -> Callable[[str], int]:
    """A whole-number flag, checked by :func:`spotrun.validate.count` (exit 2 when bad)."""
    from ..validate import argparse_type, count

    return argparse_type(count, flag, minimum=minimum, maximum=maximum, example=example)


def _cluster_count(flag: str, bound: str, example: str) -> Callable[[str], int]:
    """:func:`_count` up to ``spotrun.launch.common.<bound>``, imported only when the flag is
    given (building the parser must not import the launch package)."""

    def parse(value: str) -> int:
        from ..launch import common

        return _count(flag, maximum=getattr(common, bound), example=example)(value)

    parse.__name__ = flag
    return parse


def _number(flag: str, *, example: str, allow_zero: bool = False) -> Callable[[str], float]:
    """A finite number > 0 (>= 0 with ``allow_zero``), checked by :func:`spotrun.validate.number`:
    ``nan``, ``inf`` and negatives are refused at parse, in one line (exit 2)."""
    from ..validate import argparse_type, number

    return argparse_type(number, flag, minimum=0.0, allow_minimum=allow_zero, example=example)


def _usd(value: str) -> float:
    try:
        usd = float(value.lstrip("$"))
    except ValueError:
        usd = -1.0
    if not usd > 0 or usd == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of USD (e.g. --max-cost 25)")
    return usd


def _wait(value: str) -> float:
    from ..launch.limits import parse_duration

    try:
        return parse_duration(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_amis(value: str | None, regions: list[str]) -> tuple[str | None, dict[str, str]]:
    """``--ami``: one id (``ami-..``) or one per region (``us-east-1=ami-..,us-west-2=ami-..``)."""
    if not value:
        return None, {}
    if "=" not in value:
        return value, {}
    amis: dict[str, str] = {}
    for item in _csv(value):
        region, sep, ami = item.partition("=")
        if not sep or not region.strip() or not ami.strip():
            raise ConfigError(f"--ami {value!r}: use ami-... or REGION=ami-...,REGION=ami-...")
        amis[region.strip()] = ami.strip()
    del regions  # checked against the run's regions by Ec2Options.validate
    return None, amis


def _env_pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--env {item!r}: use NAME=VALUE")
        out[name] = value
    return out


def _secret_pairs(items: list[str]) -> dict[str, str]:
    from ..launch.userdata import parse_secret

    return dict(parse_secret(item) for item in items)


# A run name is one folder under ./runs: no separators, no "..", nothing a shell would mangle.
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_name(name: str) -> str:
    """``name`` if it is a safe folder name under ./runs, else ConfigError."""
    if not _RUN_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"--name {name!r}: use letters, digits, '.', '_' and '-' only (no '/' or '..'), "
            "up to 128 characters; to put the run elsewhere pass --run-url"
        )
    return name


def check_run_id(run_id: str) -> str:
    """``run_id`` if it can be a tag value and a launch template name part, else ConfigError."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", run_id):
        raise ConfigError(f"--run-id {run_id!r}: use letters, digits, '_' and '-' only, up to 64 characters")
    return run_id


def event_printer(stream: TextIO | None = None) -> Callable[[LaunchEvent], None]:
    """The CLI's sink for a launcher's events: one ``spotrun: ...`` line each, on ``stream``
    (default: stdout as it is now; bound once, so a launcher running in a thread keeps
    writing where it started even if another part of the program swaps sys.stdout)."""
    out = stream if stream is not None else sys.stdout

    def print_event(event: LaunchEvent) -> None:
        print(f"spotrun: {event.message}", file=out, flush=True)

    return print_event


def ask_ctrl_c(description: str) -> str:
    """Ask whether to terminate what still runs after Ctrl-C; "terminate" unless told no."""
    try:
        answer = input(f"\nspotrun: still running: {description}. Terminate it? [Y/n] ").strip().lower()
    except (EOFError, KeyboardInterrupt):
        answer = "y"
    return "leave" if answer in ("n", "no") else "terminate"


def print_cost_report(storage: Storage, *, offline: bool) -> None:
    """The run's cost report on stdout, or one line saying why there is none."""
    from ..cost.render import report_text
    from ..launch.common import cost_report

    report = cost_report(storage, offline=offline)
    if report is None:
        print("spotrun: no cost report (see the warning above)")
        return
    print(report_text(report))


def _run_launcher(launcher: Launcher, storage: Storage, *, offline: bool) -> int:
    outcome = launcher.run()
    if outcome.status != "detached":  # after Ctrl-C that left compute running: no bill yet
        print_cost_report(storage, offline=offline)
    return outcome.exit_code


def _command(args: argparse.Namespace) -> list[str]:
    cmd = list(args.cmd or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return cmd


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="keep a training command running on spot until it finishes (EC2 or --local)",
        description=(
            "Run CMD until the run is done: on EC2 spot instances, relaunching after "
            "interruptions and falling back to on-demand when the rules say so; or with "
            "--local, on this machine with simulated spot interruptions. See docs/launch.md."
        ),
        usage="spotrun launch [--local | --run-url URL --instance-types T1,T2 ... | --resume URL] -- CMD ...",
    )
    p.add_argument("--run-url", help="where the run lives (EC2: s3://bucket/prefix; --local default: ./runs/NAME)")
    p.add_argument("--resume", metavar="RUN_URL", help="pick up an EC2 launch whose controller stopped")
    p.add_argument("--max-failures", type=_count("--max-failures", minimum=0, example="3"), default=0,
                   help="relaunch after this many command failures before giving up (default 0)")
    # Both modes: one segment (attempt) is N nodes meeting through torchrun's c10d rendezvous.
    p.add_argument("--nodes", type=_cluster_count("--nodes", "MAX_NODES", "2"), default=1, metavar="N",
                   help="nodes per attempt, each running CMD under torchrun (python -m "
                   "spotrun.launch.node); with --local, N process groups on this machine (default 1)")
    p.add_argument("--nproc-per-node", type=_cluster_count("--nproc-per-node", "MAX_NPROC_PER_NODE", "8"),
                   metavar="G",
                   help="torchrun processes per node (default 1 with --nodes > 1; with one node and "
                   "no --nproc-per-node, CMD runs as is, without torchrun)")
    p.add_argument("--recovery", choices=("replace", "relaunch"), default="replace",
                   help="when some nodes of an attempt are lost: keep the others and start only "
                   "replacements (replace, default) or start every node again (relaunch)")

    loc = p.add_argument_group("local mode")
    loc.add_argument("--local", action="store_true", help="run CMD here, playing spot")
    loc.add_argument("--name", help="run folder name under ./runs (default: script name and time)")
    loc.add_argument("--interruptions", type=_count("--interruptions", minimum=0), default=2,
                     help="spot interruptions to play (default 2)")
    loc.add_argument("--instance-type", default="g5.xlarge",
                     help="instance type the fake metadata serves and the cost report prices (default g5.xlarge)")
    loc.add_argument("--grace", type=_number("--grace", example="5"), default=5.0,
                     help="seconds from notice to SIGTERM (AWS gives 120; default 5)")
    loc.add_argument("--seed", type=int, help="seed for the interruption times")
    loc.add_argument("--mean-interval", type=_number("--mean-interval", example="30"),
                     help="interrupt about this many seconds into each segment "
                          "(default: after its first new checkpoint)")
    loc.add_argument("--node-losses", type=_count("--node-losses", minimum=0, example="1"), default=0,
                     metavar="M",
                     help="of the --interruptions, M are a node vanishing without notice (SIGKILL of "
                     "all its processes) instead of a notice; which ones and which node: --seed (default 0)")
    loc.add_argument("--loss-mode", choices=("kill", "silent"), default="kill",
                     help="how --node-losses plays a loss: kill (SIGKILL: its sockets close, the survivors "
                     "fail at once; default) or silent (SIGSTOP: its sockets stay open and nothing answers, "
                     "as an EC2 machine that drops off the network; SIGKILL at the run's end)")

    ec2 = p.add_argument_group("EC2 mode")
    ec2.add_argument("--instance-types", type=_csv, help="comma-separated, e.g. g5.xlarge,g6.xlarge,g4dn.xlarge")
    ec2.add_argument("--region", help="AWS region (default: the SDK's, e.g. AWS_DEFAULT_REGION)")
    ec2.add_argument("--subnets", type=_csv, default=[], help="comma-separated subnet ids (one pool per type x subnet)")
    ec2.add_argument("--ami", help="AMI id (default: the latest AWS Deep Learning base GPU AMI, via SSM)")
    ec2.add_argument("--setup", action="append", default=[], metavar="CMD",
                     help="a shell line run before CMD, e.g. 'pip install mypkg spotrun' (repeatable)")
    ec2.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                     help="exported for CMD (repeatable; never credentials or tokens: use --secret)")
    ec2.add_argument("--secret", action="append", default=[], metavar="NAME=SOURCE",
                     help="exported for CMD, read at boot with the instance profile from ssm:/path "
                     "(SSM SecureString) or a Secrets Manager ARN; user data holds only the source (repeatable)")
    ec2.add_argument("--run-id", help="the run's spotrun:run-id tag value (default: random); fix it to "
                     "scope the controller's TerminateInstances to this run (docs/launch.md, IAM)")
    ec2.add_argument("--iam-instance-profile", help="instance profile name or ARN (S3 access to the run URL)")
    ec2.add_argument("--security-group-ids", type=_csv, default=[], help="comma-separated security group ids")
    ec2.add_argument("--key-name", help="EC2 key pair for SSH (optional)")
    ec2.add_argument("--max-interruptions", type=_count("--max-interruptions", minimum=0, example="3"),
                     help="after K spot interruptions, use on-demand (or stop with --fallback none)")
    ec2.add_argument("--fallback", choices=("on-demand", "none"), default="on-demand",
                     help="what to do when spot will not do (default on-demand)")
    ec2.add_argument("--max-price", type=_number("--max-price", example="0.5"),
                     help="highest spot price, USD per instance-hour")
    ec2.add_argument("--deadline", help="finish by: ISO time (UTC) or a duration (6h); on-demand when it is near")
    ec2.add_argument("--poll", type=_number("--poll", example="15"), default=15.0,
                     help="seconds between checks on the instance (default 15)")
    ec2.add_argument("--node-silence", type=_number("--node-silence", example="120", allow_zero=True),
                     default=None, metavar="SECONDS",
                     help="terminate and replace a node that EC2 still calls running but that wrote no "
                     "heartbeat for this long or failed its status checks (default 120; 0: off; with "
                     "--resume: the new value)")
    ec2.add_argument("--spot-wait", type=_number("--spot-wait", example="600", allow_zero=True),
                     default=600.0,
                     help="seconds to wait for spot capacity before falling back (default 600)")
    ec2.add_argument("--on-ctrl-c", choices=("ask", "terminate", "leave"), default="ask",
                     help="what Ctrl-C does to a running instance (default: ask; terminate when not interactive)")
    ec2.add_argument("--offline-prices", action="store_true", help="price the report from the shipped snapshot")
    ec2.add_argument("--min-nodes", type=_cluster_count("--min-nodes", "MAX_NODES", "2"), default=None,
                     help="start an attempt with as few as M of --nodes (checkpoints resume on the new "
                     "world size), or go on with M survivors when no replacement comes; with --recovery replace "
                     "an attempt on fewer nodes asks for the missing ones again with a backoff and grows "
                     "back to --nodes at a planned stop (checkpoint committed at a step) (default: --nodes)")
    ec2.add_argument("--placement-group", action="store_true",
                     help="put each attempt's nodes in a cluster placement group (low-latency network)")
    ec2.add_argument("--regions", type=_csv, default=None, metavar="R1,R2",
                     help="regions in order of preference, home first: when no pool of one has spot "
                     "capacity, try the next before on-demand (--subnets apply to the home region)")
    p.add_argument("--max-cost", type=_usd, default=None, metavar="USD",
                   help="stop (keeping the checkpoint, exit 1) once the run's ledger says it spent this "
                   "much (--local: priced as --instance-type); with --resume: the new limit")
    ec2.add_argument("--max-wait", type=_wait, default=None, metavar="DURATION",
                     help="give up after this long without capacity anywhere (90m, 6h, 2d); with "
                     "--resume: the new limit")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the training command, after --")
    p.set_defaults(func=_launch)

    s = sub.add_parser("status", help="a launched run: segments, current instance, last checkpoint, cost so far")
    s.add_argument("run_url", metavar="RUN_URL")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--no-aws", action="store_true", help="do not ask EC2 for the instance's live state")
    s.set_defaults(func=_status)

    t = sub.add_parser("stop", help="terminate a run's instances (or local command); keep its checkpoints")
    t.add_argument("run_url", metavar="RUN_URL")
    t.add_argument("--json", action="store_true", help="machine-readable output")
    t.add_argument("--wait", type=_number("--wait", example="60", allow_zero=True), default=None,
                   help="seconds to wait for a live controller to acknowledge "
                        "(default: three of its polls, at least 30)")
    t.set_defaults(func=_stop)


def _launch(args: argparse.Namespace) -> int:
    cmd = _command(args)
    if args.local:
        from ..launch.local import LocalLauncher, LocalOptions, default_run_url

        if args.resume:
            raise ConfigError("--resume is for EC2 runs; for --local, run the same command with --run-url again")
        if not cmd:
            raise ConfigError("no command; usage: spotrun launch --local -- python train.py")
        if args.name is not None:
            check_run_name(args.name)
        if args.max_wait is not None:
            raise ConfigError("--max-wait is for EC2 runs (local mode never waits for capacity); drop it")
        url = args.run_url or default_run_url(cmd, args.name)
        opts = LocalOptions(
            run_url=url, command=cmd, interruptions=args.interruptions,
            instance_type=args.instance_type, grace_s=args.grace, seed=args.seed,
            mean_interval=args.mean_interval, max_failures=args.max_failures,
            nodes=args.nodes, nproc_per_node=args.nproc_per_node, node_losses=args.node_losses,
            loss_mode=args.loss_mode,
            max_cost_usd=args.max_cost, recovery=args.recovery,
        )
        storage = Storage(url)
        return _run_launcher(LocalLauncher(storage, opts, on_event=event_printer()), storage, offline=True)

    from ..launch.controller import Ec2Controller, Ec2Options, Timing
    from ..launch.ec2 import Ec2Api

    timing = Timing(poll_s=args.poll, spot_wait_s=args.spot_wait)
    on_ctrl_c = args.on_ctrl_c
    if on_ctrl_c == "ask":
        # Only a person at a terminal can answer; anywhere else never leave compute running.
        on_ctrl_c = ask_ctrl_c if sys.stdin is not None and sys.stdin.isatty() else "terminate"
    kwargs = dict(timing=timing, on_ctrl_c=on_ctrl_c, on_event=event_printer())
    if args.resume:
        if cmd:
            raise ConfigError("--resume takes no command: the run's own is used")
        storage = Storage(args.resume)
        ctl = Ec2Controller.resume(storage, max_cost_usd=args.max_cost, max_wait_s=args.max_wait,
                                   node_silence_s=args.node_silence, **kwargs)
    else:
        if not args.run_url:
            raise ConfigError("EC2 mode needs --run-url s3://bucket/prefix (or use --local)")
        if not args.instance_types:
            raise ConfigError("EC2 mode needs --instance-types, e.g. g5.xlarge,g6.xlarge")
        if not cmd:
            raise ConfigError("no command; usage: spotrun launch --run-url URL --instance-types T -- python train.py")
        if args.run_id:
            check_run_id(args.run_id)
        regions = _regions(args)
        ami, amis = parse_amis(args.ami, regions)
        nodes = args.nodes or 1
        if args.min_nodes is not None and args.min_nodes > nodes:
            raise ConfigError(f"--min-nodes {args.min_nodes} is more than --nodes {nodes}; "
                              f"give --min-nodes between 1 and {nodes}")
        # Secrets first: nothing (not even the run URL's state) is read from AWS before
        # what would go into user data is known to be clean.
        from ..launch.userdata import build_user_data

        env, secrets = _env_pairs(args.env), _secret_pairs(args.secret)
        build_user_data(run_url=args.run_url, run_id="check", command=cmd, setup=args.setup,
                        env=env, secrets=secrets, nodes=nodes, nproc_per_node=args.nproc_per_node)
        storage = Storage(args.run_url)
        if storage.is_local:
            print("spotrun: warning: a local --run-url is not reachable from EC2 instances; use s3://",
                  file=sys.stderr)
        opts = Ec2Options(
            run_url=storage.display(), command=cmd, instance_types=args.instance_types,
            region=regions[0] if regions else None, subnets=args.subnets, ami=ami, amis=amis,
            regions=regions if args.regions is not None else [], setup=args.setup,
            iam_instance_profile=args.iam_instance_profile,
            security_group_ids=args.security_group_ids, key_name=args.key_name,
            env=env, secrets=secrets, max_interruptions=args.max_interruptions,
            max_failures=args.max_failures, fallback=args.fallback, max_price=args.max_price,
            deadline=parse_deadline(args.deadline) if args.deadline else None,
            nodes=nodes, nproc_per_node=args.nproc_per_node, min_nodes=args.min_nodes,
            placement_group=args.placement_group, max_cost_usd=args.max_cost, max_wait_s=args.max_wait,
            recovery=args.recovery,
        )
        if args.node_silence is not None:
            opts.node_silence_s = args.node_silence
        opts.validate()
        ctl = Ec2Controller.start(storage, Ec2Api.for_region(opts.region), opts,
                                  run_id=check_run_id(args.run_id) if args.run_id else None, **kwargs)
    # A LaunchError (no capacity, a refused call) reaches main(), which exits with its
    # exit_code: 1 for a launch that ran and could not go on.
    return _run_launcher(ctl, storage, offline=args.offline_prices)


def _regions(args: argparse.Namespace) -> list[str]:
    """The run's regions, home first: ``--regions``, else ``--region`` alone ([] if neither)."""
    if args.regions is None:
        return [args.region] if args.region else []
    if not args.regions:
        raise ConfigError("--regions is empty; give regions like --regions us-east-1,us-west-2")
    if args.region and args.region != args.regions[0]:
        raise ConfigError(f"--region {args.region} and --regions {','.join(args.regions)} disagree: the "
                          "first of --regions is the home region; drop --region or put it first")
    if len(set(args.regions)) != len(args.regions):
        raise ConfigError(f"--regions {','.join(args.regions)} names a region twice; list each once")
    return list(args.regions)


def _status(args: argparse.Namespace) -> int:
    from ..launch.status import format_status, run_status
    from .runs import require_run

    storage = Storage(args.run_url)
    require_run(storage)
    st = run_status(storage, live=not args.no_aws)
    print(json.dumps(st, indent=1, sort_keys=True, default=str) if args.json else format_status(st))
    return 0


def _stop(args: argparse.Namespace) -> int:
    from ..launch.status import stop_run

    result = stop_run(Storage(args.run_url), wait_s=args.wait)
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
    elif result["mode"] == "local":
        if result["signalled"]:
            print(f"spotrun: sent SIGINT to the local launcher (pid {result['signalled']}); "
                  "it waits for the command's checkpoint, then stops")
        else:
            print(f"spotrun: stop requested in {result['run_url']}; a launcher watching it stops at its next check")
    else:
        ids = result["terminated"]
        print(f"spotrun: terminated {', '.join(ids) if ids else 'nothing (no instance was running)'}; "
              f"checkpoints kept at {result['run_url']}. Continue with: spotrun launch --resume {result['run_url']}")
    return 0
