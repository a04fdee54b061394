#!/usr/bin/env python
"""Recovery after losing one node of three: today's full relaunch against replacing the lost node.

    python scripts/bench_recovery.py [--state-mib 256] [--repeats 3] [--cases fsdp,ddp]
                                     [--paths relaunch,replace,warm] [--s3] [--quick] [--no-exact]
                                     [--json out.json] [--dir DIR] [--keep] [--rdzv-poll S]
    python scripts/bench_recovery.py --report out.json   # the table and targets again

Each run is ``spotrun launch --local --nodes 3 --nproc-per-node 1`` of
``examples/recovery_train.py`` (about ``--state-mib`` MiB of weights and AdamW moments per
rank: FSDP2 ``fully_shard`` over gloo, or DDP replicated), with two interruptions (one spot
notice to one node, one node vanishing: SIGKILL of its agent and workers; which comes first
and which node is hit are drawn by the launcher's ``--seed``, the same for both paths of a
repeat). Three recovery paths, interleaved in the same run (A B C, then C B A, ...):

* ``relaunch`` (today): ``--recovery relaunch`` (where the launcher has it) and
  ``SPOTRUN_LOCAL_DIR=off``: every attempt is started whole and restores from the run URL;
* ``replace`` (issue 22): ``--recovery replace`` with a local directory per simulated
  machine (under one base in /dev/shm) and peer copies: the survivors stay, one node is
  started in the lost one's slot, ranks restore from their own or their buddy's copy.
  Only where ``spotrun launch --help`` lists ``--recovery``; else "replace path not
  available in this build" and only the relaunch path is measured.

``--rdzv-poll S`` sets ``SPOTRUN_RDZV_POLL_S`` for every path (``1``: torch's own once-a-second
rendezvous polls; spotrun's torchrun wrapper polls every 0.1 s by default), so two runs show what
the shorter poll saves in start+rdzv.

``warm`` is ``replace`` with warm workers (``SPOTRUN_WARM_WORKERS=1``, what users get by
default; 0 on the other two paths, so ``relaunch`` stays today's full relaunch as issue 22
measured it and ``replace`` the replace path with cold workers): torchrun's workers run in
standby interpreters each node agent started ahead with torch imported (docs/launch.md,
"Recovery"), and a survivor's next attempt skips each worker's ``import torch``. Ratios
``warm/rel`` and ``warm/rep`` compare it with the relaunch and the cold replace path. The
targets are judged on ``warm`` where it ran (else ``replace``). After a notice, "loss" is
the noticed machine gone (``gone..step``): its stop checkpoint comes first in every path
(the same step, the same bytes) and issue 22's split of a recovery has no part for it; the
total from the notice itself is printed beside it, with the share the stop alone takes.

Every figure comes from the run's ledger (``RUN_URL/ledger``). For each loss, with
t0 = the loss (``recovery_started.lost_at``; without that record: when the launcher printed
the notice or the vanishing), t1 = every machine of the next attempt running
(``capacity_at``: with ``--recovery replace`` the replacement is started at the loss), t2 =
the next attempt started (the launcher's "segment K (" line: its cluster file written, its
other new nodes started; else its last launcher ``segment_started``), t3 = restore began (``restore_started_at``), t4 =
t3 + ``restore_s``, t5 = the first training step (``training_resumed.first_step_at``):

    total = t5 - t0, to capacity = t1 - t0, boot/wait = t2 - t1 (locally: no boot; a replacement started
    at the loss waits here for the attempt before to stop),
    start + rendezvous = t3 - t2, restore = t4 - t3, restore -> step = t5 - t4,
    gone..step = t5 - tg, tg = the lost machine gone (its launcher ``segment_ended``: after a
    notice, once its stop checkpoint committed and it exited; the stop is the same in both
    paths and paid inside the notice's two minutes, so this is what recovery itself costs)

and the bytes the restore read from the local copy, a peer and the run URL
(``bytes_local/peer/url``). Records a build does not write yet show as "-" (then
"start..step" = t5 - t2 is printed instead of its three parts). Medians over ``--repeats``,
ratios replace / relaunch of those medians (same run), and each target of issue 22.

Exactness: one uninterrupted run per case on the same 3 nodes gives the reference sha256 of
the final state (every rank's weights and optimizer state); every interrupted run must end
with the same digest.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

EXAMPLE = os.path.join(REPO, "examples", "recovery_train.py")
NODES = 3
BUCKET = "bench-recovery"
PATHS = ("relaunch", "replace", "warm")
KINDS = ("notice", "loss")
# The launcher's own lines that say where a loss happened (spotrun/launch/local.py).
NOTICE_LINE = re.compile(r"spot interruption notice for (\S+)")
LOSS_LINE = re.compile(r"(\S+?)(?: \(node \d+\))? vanished without notice")
# The launcher's line when an attempt starts (its cluster file written, its new nodes started).
ATTEMPT_LINE = re.compile(r"^spotrun: segment (\d+) \(")
PARTS = ("to_capacity", "boot", "start_rdzv", "restore", "restore_to_step")


# -- running the launcher -----------------------------------------------------------------


def spotrun_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "spotrun.cli", *args]


def replace_available(env: dict[str, str]) -> bool:
    """Whether this build's ``spotrun launch`` has ``--recovery {replace,relaunch}``."""
    out = subprocess.run(spotrun_cmd("launch", "--help"), env=env, capture_output=True, text=True,
                         timeout=120)
    return "--recovery" in out.stdout and "replace" in out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(env: dict[str, str]) -> subprocess.Popen:
    """A moto S3 server on 127.0.0.1 in its own process; sets AWS_* in ``env`` and here."""
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        env[k] = os.environ[k] = v
    port = _free_port()
    code = ("import time; from moto.server import ThreadedMotoServer; "
            f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False); "
            "s.start(); print('ready', flush=True); time.sleep(10**6)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit("the moto server did not start")
    env["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket=BUCKET)
    return proc


def launch(args: argparse.Namespace, env: dict[str, str], *, case: str, path: str, url: str,
           interruptions: int, seed: int, has_recovery: bool, local_base: str | None,
           log_path: str) -> dict[str, Any]:
    """One ``spotrun launch --local`` run to the end; its output lines with the time each
    was read, its exit code, the final digest and the ledger's records."""
    env = dict(env)
    replacing = path in ("replace", "warm")
    env["SPOTRUN_LOCAL_DIR"] = local_base if (replacing and local_base) else "off"
    # Warm workers (standby interpreters with torch imported; on by default) pay off where
    # an agent survives its attempt: the "warm" path is the replace path with them on; the
    # other two keep them off (relaunch: today's path as issue 22 measured it).
    env["SPOTRUN_WARM_WORKERS"] = "1" if path == "warm" else "0"
    digest_file = log_path + ".sha256"
    cmd = spotrun_cmd("launch", "--local", "--nodes", str(NODES), "--nproc-per-node", "1",
                      "--run-url", url, "--interruptions", str(interruptions),
                      "--node-losses", "1" if interruptions == 2 else "0",
                      "--seed", str(seed), "--grace", f"{args.grace:g}")
    if has_recovery:
        cmd += ["--recovery", "replace" if replacing else path]
    cmd += ["--", "python", EXAMPLE, "--parallel", case, "--state-mib", f"{args.state_mib:g}",
            "--steps", str(args.steps), "--every-steps", str(args.every_steps),
            "--step-sleep", f"{args.step_sleep:g}", "--digest-file", digest_file]
    lines: list[tuple[float, str]] = []
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, errors="replace", cwd=REPO,
                                start_new_session=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append((time.time(), line.rstrip("\n")))
                log.write(line)
                log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc = None
        except BaseException:  # Ctrl-C or SIGTERM of the benchmark: leave no node behind
            _stop(proc)
            raise
        reader.join(30)
    with open(log_path + ".lines.json", "w") as f:  # to recompute the figures later (--keep)
        json.dump(lines, f)
    digest = None
    if os.path.exists(digest_file):
        with open(digest_file) as f:
            digest = f.read().strip() or None
    return {"case": case, "path": path, "rc": rc, "wall_s": time.time() - started, "lines": lines,
            "digest": digest, "records": read_ledger(url), "log": log_path}


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to the launcher: it forwards it to every node and waits for them (each node is
    in a session of its own: killing only the launcher would leave them running)."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=90)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def read_ledger(url: str) -> list[dict]:
    from spotrun.records.events import parse_records
    from spotrun.records.ledger import Ledger
    from spotrun.storage import open_storage

    records, _warnings = parse_records(Ledger(open_storage(url)).records())
    return records


# -- reading the ledger ----------------------------------------------------------------------


def _max(xs: list[float]) -> float | None:
    return max(xs) if xs else None


def _min(xs: list[float]) -> float | None:
    return min(xs) if xs else None


def recoveries(records: list[dict], lines: list[tuple[float, str]]) -> list[dict[str, Any]]:
    """One entry per loss in a run: its kind, times t0..t5 (see the module docstring), the
    split, bytes by source and what the launcher recorded about the replacement."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if r["event"] == "segment_started" and r.get("source") == "launcher" and r.get("group"):
            groups.setdefault(r["group"], []).append(r)
    # When each attempt started: the launcher's "segment K (" line, else its first machine's
    # start (a replacement asked for at the loss starts its machine during the attempt before).
    said = {}
    for t, line in lines:
        m = ATTEMPT_LINE.search(line)
        if m and f"sim-{m.group(1)}" in groups:
            said.setdefault(f"sim-{m.group(1)}", t)
    start_of = {g: said.get(g, min(s["started_at"] for s in groups[g])) for g in groups}
    order = sorted(groups, key=lambda g: start_of[g])

    def group_at(t: float) -> str | None:
        """The attempt running at time t: the latest one started by then."""
        live = [g for g in order if start_of[g] <= t]
        return live[-1] if live else None

    losses: dict[str, tuple[str, float]] = {}  # attempt -> (kind, when the launcher said so)
    for t, line in lines:
        for kind, pattern in (("notice", NOTICE_LINE), ("loss", LOSS_LINE)):
            if pattern.search(line):
                g = group_at(t)
                if g is not None and g not in losses:
                    losses[g] = (kind, t)
    started_rec = {r["segment_id"]: r for r in records if r["event"] == "recovery_started"}
    # When each machine was gone, as the launcher booked it (a noticed node: once its stop
    # checkpoint committed and it exited).
    ended_at: dict[str, float] = {}
    for r in records:
        if r["event"] == "segment_ended" and r.get("source") == "launcher":
            ended_at.setdefault(r["segment_id"], r["ended_at"])
    resumed = [r for r in records if r["event"] == "training_resumed"]

    out: list[dict[str, Any]] = []
    for prev, nxt in itertools.pairwise(order):
        rs = started_rec.get(nxt)
        if prev not in losses and rs is None:
            continue  # not a loss (a failure restart, a stop)
        kind, seen_at = losses.get(prev, ("?", None))
        # By time, not by segment id: with --recovery replace a survivor keeps its machine's
        # segment (rank 0 may be one), and only the replacement records a new segment_started.
        mine = [r for r in resumed if group_at(r["first_step_at"]) == nxt]
        t0 = rs["lost_at"] if rs is not None else seen_at
        nodes_at = _max([s["started_at"] for s in groups[nxt]])
        t1 = rs.get("capacity_at") if rs is not None else None
        t1 = t1 if t1 is not None else nodes_at
        t2 = max(nodes_at, t1) if nodes_at is not None else t1
        if nxt in said and t1 is not None:  # the attempt itself started (after the one before stopped)
            t2 = max(said[nxt], t1)
        t3 = _min([r["restore_started_at"] for r in mine if r.get("restore_started_at") is not None])
        ends = [r["restore_started_at"] + r["restore_s"] for r in mine
                if r.get("restore_started_at") is not None and r.get("restore_s") is not None]
        t4 = _max(ends)
        t5 = _max([r["first_step_at"] for r in mine])
        entry: dict[str, Any] = {"from": prev, "to": nxt, "kind": kind, "recorded": rs is not None,
                                 "t0": t0, "t5": t5, "resumed_records": len(mine)}
        if t0 is None or t5 is None:
            entry["total"] = None
        else:
            entry["total"] = t5 - t0
        entry["to_capacity"] = None if t0 is None or t1 is None else t1 - t0
        entry["boot"] = None if t1 is None or t2 is None else t2 - t1
        entry["start_rdzv"] = None if t3 is None or t2 is None else t3 - t2
        entry["restore"] = None if t3 is None or t4 is None else t4 - t3
        entry["restore_to_step"] = None if t4 is None or t5 is None else t5 - t4
        entry["start_to_step"] = None if t2 is None or t5 is None else t5 - t2
        # From the lost machine gone (after a notice: its stop checkpoint committed; the same
        # in both paths, paid inside the notice's two minutes) to the first step.
        gone = _max([ended_at[i] for i in (rs or {}).get("lost", []) if i in ended_at])
        entry["gone_to_step"] = None if gone is None or t5 is None else t5 - max(gone, t0 or gone)
        for src in ("local", "peer", "url"):
            vals = [r[f"bytes_{src}"] for r in mine if r.get(f"bytes_{src}") is not None]
            entry[f"bytes_{src}"] = sum(vals) if vals else None
        if rs is not None:
            entry.update(mode=rs.get("mode"), lost=list(rs.get("lost", [])), kept=list(rs.get("kept", [])),
                         instances_started=rs.get("instances_started"))
        out.append(entry)
    return out


# -- the report ------------------------------------------------------------------------------


def _med(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / (1 << 20):.0f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def summarise(runs: list[dict], cases: list[str], paths: list[str]) -> dict[tuple[str, str, str], dict]:
    """Medians per (case, kind, path) over every recovery of that kind in every repeat."""
    table: dict[tuple[str, str, str], dict] = {}
    for case in cases:
        for kind in KINDS:
            for path in paths:
                recs = [rec for run in runs if run["case"] == case and run["path"] == path
                        for rec in run["recoveries"] if rec["kind"] == kind]
                if not recs:
                    continue
                row = {k: _med([r[k] for r in recs]) for k in
                       ("total", *PARTS, "start_to_step", "gone_to_step", "bytes_local", "bytes_peer",
                        "bytes_url")}
                row["n"] = len(recs)
                # "0 bytes from the run URL" is a promise per recovery, not per median: the
                # largest any recovery read (a median of 0 hid 3 of 10 repeats reading 64 MiB).
                url_reads = [r["bytes_url"] for r in recs if r.get("bytes_url") is not None]
                row["bytes_url_max"] = max(url_reads) if url_reads else None
                row["instances_started"] = [r.get("instances_started") for r in recs]
                row["kept"] = [len(r["kept"]) if r.get("kept") is not None else None for r in recs]
                row["recorded"] = all(r["recorded"] for r in recs)
                table[(case, kind, path)] = row
    return table


def print_report(args: argparse.Namespace, runs: list[dict], table: dict, exact: dict[str, Any],
                 cases: list[str], paths: list[str], has_replace: bool, where: str) -> list[dict]:
    print(f"\nRecovery after a loss: {NODES} nodes x 1 process (gloo, CPU), about {args.state_mib:g} MiB "
          f"of state per rank, run URL on {where}, {args.repeats} repeat(s), medians; times in s, "
          f"bytes in MiB" + (f"; rendezvous poll {args.rdzv_poll:g} s (SPOTRUN_RDZV_POLL_S)"
                             if getattr(args, "rdzv_poll", None) is not None else ""))
    if not has_replace and getattr(args, "replace_missing", True):
        print("replace path not available in this build (spotrun launch has no --recovery): "
              "only today's relaunch is measured")
    head = (f"{'case':5} {'loss':6} {'path':8} {'total':>7} {'capacity':>8} {'boot+wait':>9} {'start+rdzv':>10} "
            f"{'restore':>7} {'rst->step':>9} {'start..step':>11} {'gone..step':>10} {'MiB local':>9} {'MiB peer':>8} "
            f"{'MiB url':>7} {'n':>2}")
    print(head)
    print("-" * len(head))
    for case in cases:
        for kind in KINDS:
            for path in paths:
                row = table.get((case, kind, path))
                if row is None:
                    continue
                print(f"{case:5} {kind:6} {path:8} {_s(row['total']):>7} {_s(row['to_capacity']):>8} "
                      f"{_s(row['boot']):>9} {_s(row['start_rdzv']):>10} {_s(row['restore']):>7} "
                      f"{_s(row['restore_to_step']):>9} {_s(row['start_to_step']):>11} {_s(row['gone_to_step']):>10} "
                      f"{_mib(row['bytes_local']):>9} {_mib(row['bytes_peer']):>8} {_mib(row['bytes_url']):>7} "
                      f"{row['n']:>2}")
            for label, a, b in (("ratio", "replace", "relaunch"), ("warm/rel", "warm", "relaunch"),
                                ("warm/rep", "warm", "replace")):
                old, new = table.get((case, kind, b)), table.get((case, kind, a))
                if old is None or new is None:
                    continue
                # A part the baseline spends (next to) no time in has no useful ratio.
                cells = [_ratio(new[k], old[k]) if (old[k] or 0) >= 0.05 else None
                         for k in ("total", *PARTS, "start_to_step", "gone_to_step")]
                print(f"{case:5} {kind:6} {label:8} " + " ".join(
                    f"{'-' if c is None else f'{c:.2f}x':>{w}}"
                    for c, w in zip(cells, (7, 8, 9, 10, 7, 9, 11, 10), strict=True)))
    for run in runs:
        for rec in run["recoveries"]:
            if rec["t5"] is None:  # counted in n, not in the medians: say why
                print(f"{run['case']} {rec['kind']} {run['path']}: {rec['from']} -> {rec['to']} reached no "
                      f"training step (that attempt ended first; log {run['log']})")
    failed = [r for r in runs if r["rc"] != 0]
    for r in failed:
        print(f"run failed: {r['case']} {r['path']} exit {r['rc']} (log {r['log']})")

    targets: list[dict] = []

    def target(name: str, measured: str, met: bool | None) -> None:
        targets.append({"target": name, "measured": measured, "met": met})

    for case in cases:
        for kind in KINDS:
            old = table.get((case, kind, "relaunch"))
            # Judged on the path users get: warm workers are on by default, so "warm" where it
            # ran; else "replace" (the same launcher and copies, workers started cold).
            path = "warm" if (case, kind, "warm") in table else "replace"
            new = table.get((case, kind, path))
            if new is None:
                continue
            on = f"{case} {kind} ({path})"
            starts = [x for x in new["instances_started"] if x is not None]
            kept = [x for x in new["kept"] if x is not None]
            target(f"{on}: starts exactly 1 machine, keeps {NODES - 1}",
                   f"started {starts or '-'}, kept {kept or '-'}",
                   (all(x == 1 for x in starts) and all(x == NODES - 1 for x in kept)) if starts and kept else None)
            url = new["bytes_url_max"]
            target(f"{on}: 0 checkpoint bytes from the run URL in every recovery (survivors and replacement)",
                   f"{_mib(url)} MiB at most ({new['n']} recoveries)", None if url is None else url == 0)
            if old is None:
                continue
            tot_new, tot_old = _sum_bytes(new), _sum_bytes(old)
            r = _ratio(tot_new, tot_old)
            target(f"{on}: ranks read only their own share (bytes / relaunch's <= 1.0)",
                   "-" if r is None else f"{r:.2f} ({_mib(tot_new)} / {_mib(tot_old)} MiB)",
                   None if r is None else r <= 1.0 + 1e-6)
            # The loss of a noticed machine is when it is gone: its stop checkpoint (the
            # notice's "no lost work", the same step and bytes in both paths, paid inside the
            # notice's two minutes) comes before it, and issue 22's split of a recovery
            # (capacity, boot, start, restore) has no part for it. After a vanishing both are
            # the same moment.
            key = "gone_to_step" if kind == "notice" else "total"
            r = _ratio(new[key], old[key])
            since = "the noticed machine gone" if kind == "notice" else "the loss"
            target(f"{on}: {since} -> first step <= 0.5x relaunch",
                   "-" if r is None else f"{r:.2f}x ({_s(new[key])} / {_s(old[key])} s)",
                   None if r is None else r <= 0.5)
            r = _ratio(new["restore"], old["restore"])
            target(f"{on}: restore <= 0.2x a restore from the run URL",
                   "-" if r is None else f"{r:.2f}x ({_s(new['restore'])} / {_s(old['restore'])} s)",
                   None if r is None else r <= 0.2)
            if kind == "notice":
                # Not a target: shown so the stop's share is never hidden. Its floor is the
                # relaunch's own stop (its "capacity": the noticed node's checkpoint and every
                # node's exit) over the relaunch's total.
                r = _ratio(new["total"], old["total"])
                floor = _ratio(old["to_capacity"], old["total"])
                target(f"{on}: from the notice itself -> first step, stop checkpoint included (not a target; "
                       "a free recovery would still pay the stop)",
                       "-" if r is None else f"{r:.2f}x ({_s(new['total'])} / {_s(old['total'])} s; the stop "
                       f"alone {'-' if floor is None else f'{floor:.2f}x'})", None)
    for case in cases:
        ref = exact.get(case)
        got = [(r["path"], r["digest"]) for r in runs if r["case"] == case]
        if ref is None:
            target(f"{case}: same world size bit-exact against an uninterrupted run", "not checked (--no-exact)",
                   None)
            continue
        # A run can finish with no digest: the ranks gather theirs after the final commit,
        # and a node the launcher removed right then (a vanishing played as the run ended,
        # done.json already written) takes its part with it. Nothing to compare: not a miss.
        same = [d == ref for _p, d in got if d]
        missing = len(got) - len(same)
        target(f"{case}: same world size bit-exact against an uninterrupted run",
               f"{sum(same)} of {len(same)} runs match {ref[:12] if ref else '-'}"
               + (f" ({missing} finished without a digest: a node lost as the run ended)" if missing else ""),
               bool(ref) and bool(same) and all(same))
    print("\nTargets (issue 22)")
    for t in targets:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        print(f"  {met:3}  {t['target']}: {t['measured']}")
    return targets


def _sum_bytes(row: dict) -> float | None:
    vals = [row[f"bytes_{s}"] for s in ("local", "peer", "url") if row[f"bytes_{s}"] is not None]
    return sum(vals) if vals else None


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state-mib", type=float, default=256.0, help="MiB of state per rank (default 256)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default="fsdp,ddp", help="fsdp (sharded), ddp (replicated), or both")
    p.add_argument("--paths", default="relaunch,replace,warm",
                   help="comma-separated: relaunch (a whole new attempt, every rank reads the run "
                        "URL), replace (issue 22's path, warm workers off), warm (the replace path "
                        "as users get it: warm workers on by default); default all three, "
                        "interleaved. Targets are judged on warm where it ran, else replace")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--every-steps", type=int, default=2)
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds each step sleeps (a tiny state's steps are too quick for the "
                        "launcher to see a checkpoint and post a notice before the run ends)")
    p.add_argument("--interruptions", type=int, default=2,
                   help="per run: 1 = one notice; 2 = a notice and a node vanishing (default)")
    p.add_argument("--seed", type=int, default=0, help="first launcher seed (repeat r uses seed + r)")
    p.add_argument("--grace", type=float, default=120.0,
                   help="notice to SIGTERM of the node hit (launch --grace; default 120 s, as AWS "
                        "gives: the notice's checkpoint must commit SPOTRUN_STOP_MARGIN (10 s) before it)")
    p.add_argument("--s3", action="store_true", help="run URL on a moto S3 server (own process) instead of disk")
    p.add_argument("--no-exact", action="store_true", help="skip the uninterrupted reference runs")
    p.add_argument("--quick", action="store_true",
                   help="4 MiB per rank, fsdp only, one notice, one repeat, 10 steps of at least "
                        "0.4 s (a smoke run)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one launch may take")
    p.add_argument("--dir", default=None, help="where run folders go (default: a temp directory)")
    p.add_argument("--keep", action="store_true", help="keep run folders and logs")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--warm-workers", action="store_true",
                   help="add the path 'warm' to --paths when it is not there (warm is in the "
                        "default; kept for older command lines)")
    p.add_argument("--report", metavar="JSON", default=None,
                   help="print the table and the targets again from a --json file of an earlier "
                        "run (nothing is run)")
    p.add_argument("--rdzv-poll", type=float, default=None, metavar="S",
                   help="SPOTRUN_RDZV_POLL_S for every path: seconds between a waiting node's looks "
                        "at the c10d rendezvous (spotrun's default 0.1; 1 = torch's own pace), to "
                        "see what the shorter poll saves in start+rdzv")
    args = p.parse_args(argv)
    if args.quick:
        args.state_mib, args.repeats, args.steps, args.every_steps, args.interruptions = 4.0, 1, 10, 2, 1
        args.step_sleep = max(args.step_sleep, 0.4)
        if args.cases == p.get_default("cases"):
            args.cases = "fsdp"
    if args.repeats < 1 or args.interruptions not in (1, 2) or args.state_mib <= 0:
        p.error("--repeats >= 1, --interruptions 1 or 2 and --state-mib > 0, please")
    for name, allowed in (("cases", ("fsdp", "ddp")), ("paths", PATHS)):
        items = [x for x in getattr(args, name).split(",") if x]
        if not items or any(x not in allowed for x in items):
            p.error(f"--{name} {getattr(args, name)!r}: a comma-separated list of {', '.join(allowed)}")
    return args


def _where(args: argparse.Namespace, work: str | None = None) -> str:
    """Where the run URL was, for the report's first line."""
    if args.s3:
        return "a moto S3 server (own process)"
    return f"local disk ({work})" if work else "local disk"


def report(path: str) -> int:
    """The table and targets of a saved run (``--json``), judged by this version's rules."""
    with open(path) as f:
        saved = json.load(f)
    args = argparse.Namespace(**saved["config"])
    runs = saved["runs"]
    cases = args.cases.split(",")
    present = {r["path"] for r in runs}
    paths = [p for p in PATHS if p in present]
    table = summarise(runs, cases, paths)
    where = _where(args)
    args.replace_missing = not saved.get("replace_available", True)
    print_report(args, runs, table, saved.get("exact") or {}, cases, paths,
                 bool(saved.get("replace_available")), where)
    return 0 if runs and all(r["rc"] == 0 for r in runs) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args.report)
    signal.signal(signal.SIGTERM, _sigterm)
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    if args.rdzv_poll is not None:
        env["SPOTRUN_RDZV_POLL_S"] = f"{args.rdzv_poll:g}"
    cases = args.cases.split(",")
    wanted = [x for x in args.paths.split(",") if x]
    if args.warm_workers and "warm" not in wanted:
        wanted.append("warm")
    has_recovery = replace_available(env)
    paths = [p for p in wanted if p == "relaunch" or has_recovery]
    has_replace = "replace" in paths or "warm" in paths
    # Only a build without --recovery is worth a word; --paths relaunch asked for none.
    args.replace_missing = not has_recovery
    if "replace" in wanted and not has_recovery:
        print("replace path not available in this build (spotrun launch has no --recovery)", flush=True)

    work = args.dir or tempfile.mkdtemp(prefix="bench-recovery-")
    os.makedirs(work, exist_ok=True)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    local_base = tempfile.mkdtemp(prefix="spotrun-bench-", dir=shm) if has_replace else None
    moto = start_moto(env) if args.s3 else None
    where = _where(args, work)
    runs: list[dict] = []
    exact: dict[str, Any] = {}
    n = 0

    def url_for(name: str) -> str:
        return f"s3://{BUCKET}/{name}" if args.s3 else os.path.join(work, name)

    def one(case: str, path: str, interruptions: int, seed: int) -> dict:
        nonlocal n
        n += 1
        name = f"{n:02d}-{case}-{path}-{'i' if interruptions else 'u'}"
        if local_base:
            # Nothing of an earlier run's machines may help this one.
            shutil.rmtree(local_base, ignore_errors=True)
            os.makedirs(local_base, exist_ok=True)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {case}, {path}, {interruptions} interruption(s), "
              f"seed {seed}", flush=True)
        run = launch(args, env, case=case, path=path, url=url_for(name), interruptions=interruptions,
                     seed=seed, has_recovery=has_recovery, local_base=local_base,
                     log_path=os.path.join(work, name + ".log"))
        run["recoveries"] = recoveries(run["records"], run["lines"]) if interruptions else []
        print(f"[{time.strftime('%H:%M:%S')}]   exit {run['rc']} in {run['wall_s']:.0f} s; "
              + "; ".join(f"{r['kind']}: {_s(r['total'])} s" for r in run["recoveries"]), flush=True)
        return run

    try:
        if not args.no_exact:
            for case in cases:
                ref = one(case, "relaunch", 0, args.seed)
                exact[case] = ref["digest"] if ref["rc"] == 0 else None
        for r in range(args.repeats):
            for case in cases:
                order = paths if r % 2 == 0 else list(reversed(paths))
                for path in order:
                    runs.append(one(case, path, args.interruptions, args.seed + r))
    finally:
        if moto is not None:
            moto.send_signal(signal.SIGTERM)
            moto.wait(timeout=30)
        if local_base:
            shutil.rmtree(local_base, ignore_errors=True)
    table = summarise(runs, cases, paths)
    targets = print_report(args, runs, table, exact, cases, paths, has_replace, where)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items()}, "replace_available": has_replace,
                       "runs": [{k: v for k, v in run.items() if k not in ("lines", "records")} for run in runs],
                       "table": [{"case": c, "kind": k, "path": p, **row} for (c, k, p), row in table.items()],
                       "exact": exact, "targets": targets,
                       "load_average": os.getloadavg()}, f, indent=1, default=str)
    ok = bool(runs) and all(r["rc"] == 0 for r in runs)
    if not ok:
        print(f"logs kept in {work}")
    elif not args.keep and not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    elif not args.keep:
        for name in os.listdir(work):
            if re.match(r"\d\d-", name):
                target = os.path.join(work, name)
                shutil.rmtree(target, ignore_errors=True) if os.path.isdir(target) else os.remove(target)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
