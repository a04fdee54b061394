#!/usr/bin/env python
"""Replicated (DDP) state: rank 0 writing it all, or every rank writing a part through DCP?

    python scripts/bench_replicated.py [--nproc 4] [--size-mib 128] [--repeats 3] [--dir DIR]

Launches itself under torchrun (``--nproc`` gloo ranks on CPU). Every rank holds the same
MLP and AdamW state (what DDP keeps), about ``--size-mib`` in all. Each repeat saves it once
per path through the Checkpointer, in turn, on the same disk:

* ``rank0``: today's path for replicated models: rank 0 ``torch.save``-s the model and
  optimizer into ``rank-00000.pt``, the other ranks write only their small rank files;
* ``dcp``: ``Checkpointer(sharded=True)``: the same state through DCP, whose planner
  deduplicates replicated tensors and spreads their writing over the ranks.

Stall: the training thread's ``save()`` (slowest rank). Durable: ``save()`` + ``wait()``
until rank 0 committed. Medians over repeats after a warm-up round; ``dcp`` printed as a
ratio against ``rank0`` measured in the same run (issue 10: use DCP for replicated state
only if it is faster).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MiB = 1 << 20
WIDTH = 1024


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import spotrun

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layers_n = max(1, round(args.size_mib * MiB / 3 / 4 / (WIDTH * WIDTH + WIDTH)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers_n)])
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, WIDTH)).sum().backward()
    optim.step()

    paths = {"rank0": False, "dcp": True}
    cks = {}
    for name, sharded in paths.items():
        ck = spotrun.Checkpointer(os.path.join(args.dir, name), model=model, optimizer=optim,
                                  sharded=sharded, every_steps=10**9, keep_last=1,
                                  watchers=[], handle_signals=False)
        ck.__enter__()
        cks[name] = ck
    results: dict[str, dict[str, list[float]]] = {n: {"stall": [], "durable": []} for n in paths}
    step = 0
    for rep in range(args.repeats + 1):
        for name, ck in cks.items():
            step += 1
            dist.barrier()
            ck.steps_done = step
            t0 = time.perf_counter()
            ck.save()
            stall = time.perf_counter() - t0
            ck.wait()
            durable = time.perf_counter() - t0
            pair = torch.tensor([stall, durable], dtype=torch.float64)
            dist.all_reduce(pair, op=dist.ReduceOp.MAX)
            if rep > 0:
                results[name]["stall"].append(float(pair[0]))
                results[name]["durable"].append(durable if rank == 0 else float(pair[1]))
    for ck in cks.values():
        ck.__exit__(None, None, None)
    if rank == 0:
        med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
        print(f"replicated state: {layers_n} x Linear({WIDTH}, {WIDTH}) + AdamW moments "
              f"(~{args.size_mib:g} MiB) on {world} gloo ranks, medians of {args.repeats}")
        for n, r in med.items():
            print(f"  {n:6s} stall {r['stall'] * 1e3:8.1f} ms   durable {r['durable'] * 1e3:8.1f} ms")
        print(f"  dcp / rank0: stall {med['dcp']['stall'] / med['rank0']['stall']:.2f}x, "
              f"durable {med['dcp']['durable'] / med['rank0']['durable']:.2f}x "
              "(below 1.0: spreading the write over ranks is faster)")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--size-mib", type=float, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    p.add_argument("--port", type=int, default=29741)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    own = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="spotrun-bench-replicated-")
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(args.port),
           os.path.abspath(__file__), "--worker", "--size-mib", str(args.size_mib),
           "--repeats", str(args.repeats), "--dir", args.dir]
    try:
        sys.exit(subprocess.call(cmd, env=env))
    finally:
        if own:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
