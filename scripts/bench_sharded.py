#!/usr/bin/env python
"""Sharded checkpoints on N ranks against PyTorch DCP, both called the way users call them.

    python scripts/bench_sharded.py [--nproc 4] [--sizes 120,384] [--repeats 5] [--s3]
                                    [--stall-saves 3] [--quick] [--dir DIR]
                                    [--local-copy DIR] [--profile DIR]

Launches itself under torchrun twice: ``--nproc`` gloo ranks on CPU (save, restore on the
same world size), then ``--nproc // 2`` ranks (restore N -> N/2). State: an MLP under FSDP2
(``fully_shard`` per layer, then the root) plus AdamW's two moments, sharded over the ranks,
one model per ``--sizes`` entry (MiB of state in all, every rank's shards together).

What each figure times (every figure: the slowest rank, median over interleaved repeats):

* training thread CPU time (``time.thread_time``, slowest rank) of the stall and of the
  floor: the work itself, which a busy host's waits for a core do not blur;
* copy floor: a plain ``copy_`` of this rank's local shards into buffers allocated once,
  timed right before each spotrun save (``--stall-saves`` saves per repeat, each with its
  own floor; rank 0's deletion of the previous checkpoint is waited for first, as a
  training loop's steps would);
* spotrun stall: ``Checkpointer.save()`` returning (what the training loop is blocked for);
  the first save is reported on its own line (warm-up: buffers and the plan are built);
* spotrun durable: ``save()`` + ``wait()`` returning (every rank's files, DCP's index and
  spotrun's manifest committed);
* DCP stall: ``get_state_dict(model, optim)`` + ``dcp.async_save(...)`` returning;
* DCP durable: the same + ``future.result()`` + an fsync of ``.metadata`` and the folder
  (DCP's writer already fsyncs each rank's file);
* spotrun restore: ``Checkpointer.restore()`` (verifies every file it reads against the
  manifest, loads into the model and optimizer);
* DCP restore: ``get_state_dict`` + ``dcp.load`` + ``set_state_dict``;
* restore N -> N/2: the same on half the ranks, from the checkpoints the N-rank run left.

DCP uses the default (gloo) group: the training loop here runs no collective while a save
is in flight, so that is safe, and it is what ``dcp.async_save(sd, checkpoint_id=...)`` does.
With ``--s3``, a moto server runs in its own process; spotrun writes ``s3://`` through its
own backend, DCP through ``FsspecWriter``/``FsspecReader`` (s3fs) to the same server.
Ratios are spotrun / DCP, both measured in the same run. spotrun runs without its node-local
copy (``SPOTRUN_LOCAL_DIR=off``: the run URL alone, like DCP) unless ``--local-copy DIR``
gives it one; ``--profile DIR`` writes a cProfile of every spotrun restore, per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MiB = 1 << 20
WIDTH = 1024
BUCKET = "bench-sharded"


# -- the launcher ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_moto(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    code = ("import time; from moto.server import ThreadedMotoServer; "
            f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False); "
            "s.start(); print('ready', flush=True); time.sleep(10**6)")
    # Its access log (on stderr) is dropped; stdout says "ready" and nothing more.
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit("the moto server did not start")
    url = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    return proc, url


def _torchrun(args: argparse.Namespace, nproc: int, phase: str, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           os.path.abspath(__file__), "--worker", phase, "--sizes", args.sizes,
           "--repeats", str(args.repeats), "--stall-saves", str(args.stall_saves),
           "--dir", args.dir]
    if args.s3:
        cmd.append("--s3")
    if args.profile:
        cmd += ["--profile", args.profile]
    rc = subprocess.call(cmd, env=env)
    if rc:
        raise SystemExit(f"the {phase} phase on {nproc} ranks failed (exit {rc})")


def _launch(args: argparse.Namespace) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    # spotrun reads and writes the run URL only, as DCP does, unless --local-copy asks for
    # the node-local copy too (what a user gets by default: every save also teed there,
    # every restore reading it).
    env["SPOTRUN_LOCAL_DIR"] = args.local_copy or "off"
    moto = None
    if args.s3:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"
                     }.items():
            env[k] = v
            os.environ[k] = v
        moto, env["AWS_ENDPOINT_URL"] = _start_moto(env)
    try:
        _torchrun(args, args.nproc, "save", env)
        _torchrun(args, max(1, args.nproc // 2), "reshard", env)
    finally:
        if moto is not None:
            moto.send_signal(signal.SIGTERM)
            moto.wait(timeout=30)
    with open(os.path.join(args.dir, "save.json")) as f:
        save = json.load(f)
    with open(os.path.join(args.dir, "reshard.json")) as f:
        reshard = json.load(f)
    _report(args, save, reshard)


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _spread(xs: list[float], scale: float = 1e3, fmt: str = ".1f") -> str:
    """The samples' range and quartiles, ``[min | p25-p75 | max]``."""
    if len(xs) < 2:
        return ""
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return (f"[{min(xs) * scale:{fmt}} | {q[0] * scale:{fmt}}-{q[2] * scale:{fmt}} | "
            f"{max(xs) * scale:{fmt}}]")


def _report(args: argparse.Namespace, save: dict, reshard: dict) -> None:
    where = "s3 (moto server, own process)" if args.s3 else f"local disk {args.dir}"
    if args.local_copy:
        where += f", spotrun's node-local copy in {args.local_copy}"
    print(f"{save['world']} gloo ranks (restore N->M on {reshard['world']}), {where}, "
          f"medians of {args.repeats} interleaved repeats ({args.repeats * args.stall_saves} "
          "spotrun stalls and floors), slowest rank; [min | p25-p75 | max] of the samples")
    for size, r in save["sizes"].items():
        rr = reshard["sizes"][size]
        m = {k: _med(v) for k, v in {**r, **rr}.items() if isinstance(v, list)}
        print(f"\nstate {r['total_mib']:.0f} MiB in all ({r['local_mib']:.1f} MiB of shards on "
              f"the largest rank, {r['layers']} x Linear({WIDTH}, {WIDTH}) + AdamW)")
        print(f"  copy floor (per rank)      {m['floor'] * 1e3:8.1f} ms   {_spread(r['floor'])}")
        print(f"  first save stall           spotrun {r['first_stall_spotrun'] * 1e3:8.1f} ms"
              f"   dcp {r['first_stall_dcp'] * 1e3:8.1f} ms")
        rows = [("stall", "stall_spotrun", "stall_dcp", "<= 0.5"),
                ("durable", "durable_spotrun", "durable_dcp", "<= 0.8"),
                ("restore same size", "restore_spotrun", "restore_dcp", "<= 0.5"),
                (f"restore {save['world']} -> {reshard['world']}", "reshard_spotrun",
                 "reshard_dcp", "<= 1.0")]
        for label, a, b, target in rows:
            print(f"  {label:26s} spotrun {m[a] * 1e3:8.1f} ms   dcp {m[b] * 1e3:8.1f} ms   "
                  f"spotrun / dcp {m[a] / m[b]:.2f}x (target {target})")
            spread_a, spread_b = _spread(rr.get(a, r.get(a, []))), _spread(rr.get(b, r.get(b, [])))
            if spread_a or spread_b:
                print(f"  {'':26s} spotrun {spread_a}   dcp {spread_b}")
        pairs = [a / b for a, b in zip(r["stall_spotrun"], r["floor"], strict=True)]
        print(f"  steady stall / copy floor  {m['stall_spotrun'] / m['floor']:.2f}x of the medians, "
              f"{_med(pairs):.2f}x median of each save's own {_spread(pairs, 1, '.2f')} "
              "(target <= 1.5)")
        if r.get("stall_cpu"):
            cpu = [a / b for a, b in zip(r["stall_cpu"], r["floor_cpu"], strict=True)]
            print(f"  training thread CPU time   stall {m['stall_cpu'] * 1e3:.1f} ms, floor "
                  f"{m['floor_cpu'] * 1e3:.1f} ms: {_med(cpu):.2f}x median of each save's own "
                  f"{_spread(cpu, 1, '.2f')} (what the thread did, without waiting for a core)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"save": save, "reshard": reshard, "s3": args.s3}, f, indent=1)


# -- the workers -----------------------------------------------------------------------


def _build(size_mib: float, world: int) -> tuple[Any, Any, int]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # weights + exp_avg + exp_avg_sq = 3 copies of the parameters, 4 bytes each.
    layers_n = max(1, round(size_mib * MiB / 3 / 4 / (WIDTH * WIDTH + WIDTH)))
    torch.manual_seed(0)
    layers = [torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers_n)]
    model = torch.nn.Sequential(*layers)
    mesh = init_device_mesh("cpu", (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, WIDTH)).sum().backward()
    optim.step()
    optim.zero_grad()
    return model, optim, layers_n


def _local_tensors(model: Any, optim: Any) -> list[Any]:
    from torch.distributed.tensor import DTensor

    out = []
    for t in [*model.parameters(), *(v for s in optim.state.values() for v in s.values())]:
        if hasattr(t, "numel"):
            out.append(t.to_local() if isinstance(t, DTensor) else t)
    return out


class _Places:
    """Where each path writes: local folders or s3:// prefixes (DCP through fsspec)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.s3 = args.s3
        self.dir = args.dir

    def spotrun(self, size: str) -> str:
        if self.s3:
            return f"s3://{BUCKET}/spotrun-{size}"
        return os.path.join(self.dir, f"spotrun-{size}")

    def dcp(self, size: str, step: int) -> str:
        if self.s3:
            return f"s3://{BUCKET}/dcp-{size}/{step:06d}"
        return os.path.join(self.dir, f"dcp-{size}", f"{step:06d}")

    def dcp_writer(self, path: str) -> Any:
        if self.s3:
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

            return FsspecWriter(path, **_fsspec_options())
        from torch.distributed.checkpoint import FileSystemWriter

        return FileSystemWriter(path)

    def dcp_reader(self, path: str) -> Any:
        if self.s3:
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

            return FsspecReader(path, **_fsspec_options())
        from torch.distributed.checkpoint import FileSystemReader

        return FileSystemReader(path)

    def remove_dcp(self, path: str) -> None:
        if self.s3:
            import s3fs

            fs = s3fs.S3FileSystem(**_fsspec_options())
            if fs.exists(path):
                fs.rm(path, recursive=True)
        else:
            shutil.rmtree(path, ignore_errors=True)

    def fsync_dcp(self, path: str) -> None:
        if self.s3:
            return  # an S3 PUT is durable when it returns
        fd = os.open(os.path.join(path, ".metadata"), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsspec_options() -> dict[str, Any]:
    return {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]},
            "skip_instance_cache": True}


def _profiler(args: argparse.Namespace) -> Any:
    """A running cProfile when ``--profile DIR`` asks for one (restores only), else None."""
    if not args.profile:
        return None
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    return prof


def _worker(args: argparse.Namespace) -> None:
    import logging

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import spotrun

    logging.getLogger("spotrun").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    places = _Places(args)
    phase = args.worker

    def slowest(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0])

    def checkpointer(url: str, model: Any, optim: Any) -> Any:
        return spotrun.Checkpointer(url, model=model, optimizer=optim, every_steps=10**9,
                                    keep_last=1, watchers=[], handle_signals=False)

    out: dict[str, Any] = {"world": world, "sizes": {}}
    for size_s in args.sizes.split(","):
        size = float(size_s)
        model, optim, layers_n = _build(size, world)
        local = _local_tensors(model, optim)
        local_bytes = sum(t.numel() * t.element_size() for t in local)
        largest = slowest(local_bytes)
        total = torch.tensor([local_bytes], dtype=torch.float64)
        dist.all_reduce(total)
        r: dict[str, Any] = {"layers": layers_n, "total_mib": float(total[0]) / MiB,
                             "local_mib": largest / MiB}
        out["sizes"][size_s] = r
        url = places.spotrun(size_s)

        def dcp_save(step: int) -> tuple[float, float]:
            path = places.dcp(size_s, step)
            t0 = time.perf_counter()
            msd, osd = get_state_dict(model, optim)
            fut = dcp.async_save({"model": msd, "optim": osd},
                                 storage_writer=places.dcp_writer(path))
            stall = time.perf_counter() - t0
            fut.result()
            if rank == 0:
                places.fsync_dcp(path)
            return stall, time.perf_counter() - t0

        def dcp_restore(path: str) -> float:
            t0 = time.perf_counter()
            msd, osd = get_state_dict(model, optim)
            state = {"model": msd, "optim": osd}
            dcp.load(state, storage_reader=places.dcp_reader(path))
            set_state_dict(model, optim, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
            return time.perf_counter() - t0

        def spot_restore() -> float:
            # restore() is once per Checkpointer (idempotent): a fresh one per repeat, as a
            # restarted run has; entering it (lease, saver group) is outside the timing.
            ck = checkpointer(url, model, optim)
            ck.__enter__()
            try:
                dist.barrier()
                prof = _profiler(args)
                t0 = time.perf_counter()
                ck.restore()
                took = time.perf_counter() - t0
                if prof is not None:
                    prof.disable()
                    prof.dump_stats(os.path.join(
                        args.profile, f"restore-{phase}-{size_s}-rank{rank}-{time.time_ns()}.prof"))
                return took
            finally:
                ck.__exit__(None, None, None)

        if phase == "save":
            # The copy floor: this rank's shards into buffers allocated once, measured right
            # before each spotrun save (on a shared machine the load moves within a run; a
            # floor timed once at the start compared a stall with another minute's copy).
            bufs = [torch.empty_like(t) for t in local]

            def floor_copy() -> tuple[float, float]:
                dist.barrier()
                c0, t0 = time.thread_time(), time.perf_counter()
                for b, t in zip(bufs, local, strict=True):
                    b.copy_(t)
                took, cpu = time.perf_counter() - t0, time.thread_time() - c0
                return slowest(took), slowest(cpu)

            floor_copy()  # warm-up: the buffers' first touch
            r["floor"], r["floor_cpu"], r["stall_cpu"] = [], [], []
            for k in ("stall_spotrun", "durable_spotrun", "stall_dcp", "durable_dcp",
                      "restore_spotrun", "restore_dcp"):
                r[k] = []
            if rank == 0 and not args.s3:
                shutil.rmtree(url, ignore_errors=True)
            dist.barrier()
            ck = checkpointer(url, model, optim)
            ck.__enter__()
            step = 0
            last_dcp = ""

            def spot_save() -> tuple[float, float]:
                c0, t0 = time.thread_time(), time.perf_counter()
                ck.save()
                stall, cpu = time.perf_counter() - t0, time.thread_time() - c0
                ck.wait()
                durable = time.perf_counter() - t0
                if step_cpu is not None:
                    step_cpu.append(slowest(cpu))
                return stall, durable

            step_cpu: list[float] | None = None

            for rep in range(args.repeats + 1):
                order = ("spotrun", "dcp") if rep % 2 == 0 else ("dcp", "spotrun")
                for mode in order:
                    # spotrun's turn is --stall-saves saves, each beside its own floor (the
                    # stall is a few ms at 120 MiB: one core taken from one of 4 ranks for
                    # a moment decides a single sample); DCP's turn one save. Durable is
                    # the first of each turn's saves, so both paths have as many.
                    for k in range(args.stall_saves if mode == "spotrun" and rep else 1):
                        step += 1
                        dist.barrier()
                        if mode == "spotrun":
                            # Retention of the previous commit (rank 0 deleting the old
                            # folder) is done in a training loop by the next save; here it
                            # would overlap the floor and the stall of back-to-back saves.
                            ck._saver.wait_retention(60)
                            dist.barrier()
                            floor, floor_cpu = floor_copy()
                            if rep > 0:
                                r["floor"].append(floor)
                                r["floor_cpu"].append(floor_cpu)
                            dist.barrier()
                            ck.steps_done = step
                            step_cpu = r["stall_cpu"] if rep > 0 else None
                            stall, durable = spot_save()
                        else:
                            stall, durable = dcp_save(step)
                        stall, durable = slowest(stall), slowest(durable)
                        if rep == 0:
                            r[f"first_stall_{mode}"] = stall
                            r[f"first_durable_{mode}"] = durable
                        else:
                            r[f"stall_{mode}"].append(stall)
                            if k == 0:
                                r[f"durable_{mode}"].append(durable)
                        dist.barrier()
                    if mode == "dcp":
                        if rank == 0 and last_dcp:
                            places.remove_dcp(last_dcp)  # keep one DCP checkpoint, as keep_last=1
                        last_dcp = places.dcp(size_s, step)
            ck.__exit__(None, None, None)
            del bufs
            # Restore on the same world size, from the last checkpoint of each.
            for rep in range(args.repeats + 1):
                order = ("spotrun", "dcp") if rep % 2 == 0 else ("dcp", "spotrun")
                for mode in order:
                    dist.barrier()
                    t = spot_restore() if mode == "spotrun" else dcp_restore(last_dcp)
                    t = slowest(t)
                    if rep > 0:
                        r[f"restore_{mode}"].append(t)
            r["last_dcp"] = last_dcp
        else:
            with open(os.path.join(args.dir, "save.json")) as f:
                last_dcp = json.load(f)["sizes"][size_s]["last_dcp"]
            r["reshard_spotrun"], r["reshard_dcp"] = [], []
            for rep in range(args.repeats + 1):
                order = ("spotrun", "dcp") if rep % 2 == 0 else ("dcp", "spotrun")
                for mode in order:
                    dist.barrier()
                    t = spot_restore() if mode == "spotrun" else dcp_restore(last_dcp)
                    t = slowest(t)
                    if rep > 0:
                        r[f"reshard_{mode}"].append(t)
        model = optim = local = None  # free this size before the next
    if rank == 0:
        with open(os.path.join(args.dir, f"{phase}.json"), "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--sizes", default="120,384", help="MiB of state in all, comma-separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--stall-saves", type=int, default=3,
                   help="spotrun saves per interleaved repeat for the stall and the copy "
                        "floor (each save beside its own floor); durable takes the first")
    p.add_argument("--s3", action="store_true", help="write to a moto S3 server")
    p.add_argument("--quick", action="store_true",
                   help="2 ranks, 4 MiB, 1 repeat: checks the benchmark runs (for the tests)")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write every measurement here")
    p.add_argument("--local-copy", default=None, metavar="DIR",
                   help="give spotrun a node-local copy in DIR (e.g. /dev/shm/spotrun-bench); "
                        "default: none, both sides use the run URL alone")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="cProfile every spotrun restore, one .prof per rank and restore in DIR "
                        "(the timings then include the profiler's overhead)")
    p.add_argument("--worker", choices=("save", "reshard"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.quick:
        args.nproc, args.sizes, args.repeats, args.stall_saves = 2, "4", 1, 2
    own = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="spotrun-bench-sharded-")
    try:
        _launch(args)
    finally:
        if own:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
