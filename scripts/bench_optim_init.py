#!/usr/bin/env python
"""A sharded restore into a fresh optimizer: its state made from DCP's index (spotrun.format.
optim_init) against torch's zero-gradient optimizer step, in the same run.

    python scripts/bench_optim_init.py [--nproc 2] [--params-mib 85] [--launches 3]
                                       [--restores 3] [--dir DIR]

One torchrun (``--nproc`` gloo ranks on CPU) trains an FSDP2 MLP (``--params-mib`` MiB of
parameters per rank; AdamW: three times that of state) one step and saves it through the
Checkpointer (run URL on local disk, ``SPOTRUN_LOCAL_DIR=off``). Then ``--launches``
torchruns of each path, interleaved (new old, then old new, ...); each rank of each builds a
fresh model and AdamW ``--restores`` times and times ``Checkpointer.restore()`` (the
slowest rank). ``old``: spotrun.format.optim_init.init_optimizer_state replaced by a no-op,
so torch's ``_init_optim_state`` makes the state as before. Also per restore: the time to
the state dict ready to load into (index read, state made, ``get_state``), and on each
launch's first restore the rank's peak RSS over its RSS at the start of the restore
(``ru_maxrss``, which only grows: later restores of a process cannot be told apart).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: argparse.Namespace, *worker: str) -> None:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", SPOTRUN_LOCAL_DIR="off")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           os.path.abspath(__file__), "--dir", args.dir, "--params-mib", str(args.params_mib),
           "--restores", str(args.restores), "--worker", *worker]
    rc = subprocess.call(cmd, env=env)
    if rc:
        raise SystemExit(f"{' '.join(worker)} on {args.nproc} ranks failed (exit {rc})")


def _build(params_mib: float, world: int) -> tuple[Any, Any]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    n = max(1, round(params_mib * world * MiB / 4 / (WIDTH * WIDTH + WIDTH)))
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    layers = []
    for _ in range(n):  # each layer sharded as it is made: no full model held at once
        layer = torch.nn.Linear(WIDTH, WIDTH)
        fully_shard(layer, mesh=mesh)
        layers.append(layer)
    model = torch.nn.Sequential(*layers)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(args: argparse.Namespace) -> None:
    import logging

    import torch
    import torch.distributed as dist

    import spotrun
    from spotrun.checkpoint import training_state
    from spotrun.format import optim_init

    logging.getLogger("spotrun").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    url = os.path.join(args.dir, "run")
    phase, mode = args.worker[0], args.worker[1] if len(args.worker) > 1 else ""

    def slowest(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0])

    def checkpointer(model: Any, optim: Any) -> Any:
        return spotrun.Checkpointer(url, model=model, optimizer=optim, every_steps=10**9,
                                    keep_last=1, watchers=[], handle_signals=False)

    if phase == "save":
        model, optim = _build(args.params_mib, world)
        model(torch.randn(4, WIDTH)).sum().backward()
        optim.step()
        optim.zero_grad()
        with checkpointer(model, optim) as ck:
            ck.steps_done = 1
            ck.save()
            ck.wait()
        dist.destroy_process_group()
        return

    if mode == "old":
        optim_init.init_optimizer_state = lambda *a, **k: []  # torch's fake step makes it
    # The restore up to the state dict it loads into: the index read, the state made, the
    # state dict built (with torch's fake step in it on the old path).
    ready: list[float] = []
    restore_started = [0.0]
    sharded_state = training_state.TrainingState.sharded_state

    def timed_state(self: Any) -> Any:
        state = sharded_state(self)
        ready.append(time.perf_counter() - restore_started[0])
        return state

    training_state.TrainingState.sharded_state = timed_state  # type: ignore[method-assign]
    out: dict[str, Any] = {"mode": mode, "restore": [], "ready": [], "peak_mib": None}
    for i in range(args.restores):
        model, optim = _build(args.params_mib, world)
        ck = checkpointer(model, optim)
        ck.__enter__()
        try:
            dist.barrier()
            rss0 = _rss()
            restore_started[0] = time.perf_counter()
            step = ck.restore()
            took = time.perf_counter() - restore_started[0]
            assert step == 1, step
            if i == 0:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                out["peak_mib"] = slowest((peak - rss0) / MiB)
            out["restore"].append(slowest(took))
            out["ready"].append(slowest(ready[-1]))
        finally:
            ck.__exit__(None, None, None)
        del model, optim
    if rank == 0:
        with open(os.path.join(args.dir, f"{mode}-{time.time_ns()}.json"), "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def _report(args: argparse.Namespace) -> None:
    runs: dict[str, list[dict[str, Any]]] = {"new": [], "old": []}
    for name in sorted(os.listdir(args.dir)):
        if name.endswith(".json"):
            with open(os.path.join(args.dir, name)) as f:
                run = json.load(f)
            runs[run["mode"]].append(run)
    med = {m: {k: statistics.median([x for r in rs for x in r[k]]) for k in ("restore", "ready")}
           for m, rs in runs.items()}
    peaks = {m: statistics.median([r["peak_mib"] for r in rs]) for m, rs in runs.items()}
    n = {m: sum(len(r["restore"]) for r in rs) for m, rs in runs.items()}
    print(f"{args.nproc} gloo ranks, FSDP2, {args.params_mib:g} MiB of parameters per rank "
          f"(AdamW), restores from local disk; medians of {n['new']} new / {n['old']} old "
          "restores (slowest rank)")
    print(f"{'':34}{'new':>9}{'old':>9}{'new/old':>9}")
    for label, key in (("restore (Checkpointer.restore)", "restore"),
                       ("to the state dict to load into", "ready")):
        new, old = med["new"][key], med["old"][key]
        print(f"{label:34}{new:8.3f}s{old:8.3f}s{new / old:9.2f}")
    print(f"{'peak RSS over the start, MiB':34}{peaks['new']:9.0f}{peaks['old']:9.0f}"
          f"{peaks['new'] / peaks['old']:9.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--params-mib", type=float, default=85.0)
    p.add_argument("--launches", type=int, default=3, help="torchruns of each path")
    p.add_argument("--restores", type=int, default=3, help="restores per torchrun")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-optim-init-") as tmp:
        args.dir = args.dir or tmp
        _torchrun(args, "save")
        for i in range(args.launches):
            for mode in (("new", "old") if i % 2 == 0 else ("old", "new")):
                _torchrun(args, "restore", mode)
        _report(args)


if __name__ == "__main__":
    main()
