"""``spotrun ls``, ``spotrun verify`` and ``spotrun check-resume``."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from .. import validate


def _storage_options(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    from ..errors import ConfigError

    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"--storage-options is not JSON ({exc}); e.g. '{{\"anon\": false}}'") from None
    if not isinstance(value, dict):
        raise ConfigError("--storage-options must be a JSON object")
    return value


def _add_url(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="URL", help="run URL: a path, s3://bucket/prefix, memory://...")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options as a JSON object")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list the checkpoints of a run",
                       description="List each checkpoint folder: step, time, size, status.")
    _add_url(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser(
        "verify", help="re-hash every checkpoint of a run",
        description="Re-hash every file of every committed checkpoint against its manifest. "
        "Exit 0 when all are intact, 1 naming each damaged file otherwise.",
    )
    _add_url(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "check-resume", help="prove a training command resumes bit-for-bit",
        description="Run CMD once uninterrupted and once interrupted K times with real "
        "SIGTERMs (resuming after each), then compare the two final checkpoints entry by "
        "entry. An interruption counts when the signalled attempt exited 75 with a new "
        "checkpoint. PASS (exit 0); FAIL naming every differing entry, the first step where "
        "the runs diverge and the likely cause (exit 1); INCOMPLETE when fewer than K "
        "interruptions were delivered (exit 1). Both runs keep every checkpoint; in a "
        "temporary folder (the default) they are removed on PASS and kept, with their path "
        "printed, otherwise. CMD must take its run URL from $SPOTRUN_URL.",
    )
    p.add_argument("--interruptions", "-k", type=validate.argparse_type(validate.count, "--interruptions"),
                   default=3, metavar="K", help="how many times to interrupt the second run (default 3)")
    p.add_argument("--seed", type=int, default=None, help="seed for the interruption times")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="where both runs go, kept afterwards (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder after a PASS too")
    p.add_argument("--timeout", type=validate.argparse_type(validate.duration, "--timeout", allow_minimum=False),
                   default=3600.0, metavar="DURATION", help="the most one attempt may take (default 1h)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the training command")
    p.set_defaults(func=cmd_check_resume)


def cmd_ls(args: argparse.Namespace) -> int:
    from ..format.commit import list_checkpoints
    from ..records.layout import DONE_MARKER
    from ..records.lease import read_lease
    from ..storage import Storage
    from ..units import format_bytes

    storage = Storage(args.url, _storage_options(args.storage_options))
    storage.ensure_root(create=False)
    lease = read_lease(storage)
    rows = []
    for info in list_checkpoints(storage):
        m = info.manifest
        rows.append({
            "step": info.step,
            "status": info.status,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.created_at)) if m else None,
            "bytes": m.total_bytes if m else None,
            "world_size": m.world_size if m else None,
            "problem": info.problem,
        })
    done = storage.exists(DONE_MARKER)
    if args.json:
        print(json.dumps({"url": storage.display(), "done": done, "checkpoints": rows,
                          "writer": lease.to_dict() if lease else None}, indent=2))
        return 0
    writer = f"writer: {lease.state_text()}" if lease else "writer: none (no lease)"
    if not rows:
        print(f"no checkpoints at {storage.display()}")
        print(writer)
        return 0
    print(f"{'STEP':>12}  {'TIME (UTC)':20}  {'SIZE':>10}  STATUS")
    for r in rows:
        size = format_bytes(r["bytes"]) if r["bytes"] is not None else "-"
        status = r["status"] + (f" ({r['problem']})" if r["problem"] else "")
        print(f"{r['step']:>12}  {r['time'] or '-':20}  {size:>10}  {status}")
    if done:
        print("run finished (done marker present)")
    print(writer)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..format.commit import DAMAGED_DIR, list_checkpoints, list_damaged, verify_checkpoint
    from ..storage import Storage
    from .runs import require_run

    storage = Storage(args.url, _storage_options(args.storage_options))
    storage.ensure_root(create=False)
    # "0 of 0 intact", exit 0, on a folder that is not a run would read as a clean bill.
    require_run(storage)
    results = []
    # A file that cannot be read (access denied, network) raises: exit 2 naming it, since
    # nothing is known about that checkpoint either way.
    for info in list_checkpoints(storage):
        if info.status == "committed" and info.manifest is not None:
            problems = verify_checkpoint(storage, info.manifest, deep=True)
        elif info.status == "invalid":
            problems = [info.problem or f"{storage.display(info.name)}: invalid manifest"]
        else:
            problems = []  # an uncommitted folder is not a checkpoint: nothing to verify
        results.append({"step": info.step, "status": info.status, "problems": problems})
    damaged = [r for r in results if r["problems"]]
    set_aside = list_damaged(storage)
    if args.json:
        print(json.dumps({"url": storage.display(), "ok": not damaged, "checkpoints": results,
                          "set_aside": set_aside}, indent=2))
    else:
        for r in results:
            if r["status"] == "incomplete":
                print(f"step {r['step']}: not committed (ignored; a save that never finished)")
            elif r["problems"]:
                for problem in r["problems"]:
                    print(f"step {r['step']}: DAMAGED: {problem}")
            else:
                print(f"step {r['step']}: ok")
        committed = sum(r["status"] != "incomplete" for r in results)
        print(f"{committed - len(damaged)} of {committed} committed checkpoints intact"
              + (f", {len(damaged)} damaged" if damaged else ""))
        if set_aside:
            print(f"{len(set_aside)} damaged checkpoint folder(s) kept as evidence under "
                  f"{storage.display(DAMAGED_DIR)}/ (moved aside by a restore; delete when done)")
    return 1 if damaged else 0


def cmd_check_resume(args: argparse.Namespace) -> int:
    from ..proof.resume_check import check_resume

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    result = check_resume(cmd, interruptions=args.interruptions, workdir=args.workdir,
                          seed=args.seed, timeout=args.timeout, keep=args.keep)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0 if result.passed else 1
    print(f"uninterrupted run: {result.uninterrupted_seconds:.1f}s; interrupted run: "
          f"{result.interruptions} of {result.requested} interruptions delivered, "
          f"{result.interrupted_seconds:.1f}s in all; final step {result.final_step}")
    for i in result.delivered:
        print(f"  interruption {i.attempt}: signalled {i.after_seconds:.2f}s into training, "
              f"resumed from step {i.from_step}, stopped at step {i.to_step}")
    for line in result.not_counted:
        print(f"  not counted: {line}")
    for d in result.ignored:
        print(f"  ignored (never drawn from in either run): {d}")
    if result.differences:
        print(f"FAIL: {len(result.differences)} state entries differ:")
        for d in result.differences:
            print(f"  {d}")
        if result.divergence is not None:
            for line in result.divergence.lines():
                print(line)
    if not result.complete:
        print(f"{'' if result.differences else 'INCOMPLETE: '}only {result.interruptions} of "
              f"{result.requested} interruptions were delivered, so the resume is not proven; "
              "run longer (more steps), with fewer --interruptions, or checkpoint more often")
    elif result.passed:
        print("PASS: the interrupted run ends bit-for-bit equal to the uninterrupted one")
    if result.kept:
        print(f"runs kept in {result.run_dirs[0]} and {result.run_dirs[1]}")
    else:
        print(f"removed the working folder {os.path.dirname(result.run_dirs[0])} "
              "(--keep or --workdir DIR keeps it)")
    return 0 if result.passed else 1
