#!/usr/bin/env python
"""Sharded-save benchmark: spotrun.sharded against torch.distributed.checkpoint.async_save.

    python scripts/bench_sharded.py [--nproc 4] [--size-mib 128] [--repeats 3] [--dir DIR]

Launches itself under torchrun (``--nproc`` gloo ranks on CPU). State: an MLP under FSDP2
(``fully_shard`` per layer, then the root) plus AdamW's two moments, about ``--size-mib`` in
all, sharded over the ranks. Every repeat saves the same state once per path, on the same
local disk, in turn:

* ``Checkpointer``: what a user's loop pays: ``Checkpointer.save()`` (``get_state_dict``,
  staging, RNG and rank files, lease check) then ``wait()`` until rank 0 has committed;
* ``spotrun``: ``ShardedSaver.stage`` (reused host buffers) in the training thread, then
  ``write_async`` (DCP over spotrun's Storage, every file hashed as it is written) and the
  manifest commit by rank 0;
* ``dcp``: ``dcp.async_save`` with DCP's ``FileSystemWriter`` (its stager copies the state
  each time) on its own gloo group (the default group would collide with training's
  collectives);
* ``dcp+hash``: the same with DCP's ``FsspecWriter``, then rank 0 hashes every file and
  commits a manifest: the "use DCP's fsspec writer and hash afterwards" alternative.

Stall: how long the training thread is blocked by the save call. Durable: from the save
call until the checkpoint is complete and committed (every rank's files and ``.metadata``;
for spotrun and dcp+hash the manifest too), as seen on rank 0. Medians over repeats,
printed as ratios against ``dcp`` (issue 10's targets: stall <= 1.0x, durable <= 1.2x).
"""

from __future__ import annotations

import argparse
import hashlib
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


def _launch(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(args.port),
           os.path.abspath(__file__), "--worker", "--size-mib", str(args.size_mib),
           "--repeats", str(args.repeats), "--dir", args.dir]
    return subprocess.call(cmd, env=env)


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import spotrun
    from spotrun.commit import commit
    from spotrun.manifest import FileEntry, Manifest
    from spotrun.sharded import ShardedSaver, get_state
    from spotrun.storage import Storage

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # weights + exp_avg + exp_avg_sq = 3 copies of the parameters, 4 bytes each.
    layers_n = max(1, round(args.size_mib * MiB / 3 / 4 / (WIDTH * WIDTH + WIDTH)))
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
    state = get_state(model, optim)
    local = sum(t.to_local().numel() * t.element_size()
                for t in _tensors(state) if hasattr(t, "to_local"))
    total = torch.tensor([local])
    dist.all_reduce(total)

    root = os.path.join(args.dir, "bench")
    storage = Storage(root)
    saver = ShardedSaver(storage)
    dcp_group = dist.new_group(backend="gloo")  # made once, like the saver's
    modes = ("Checkpointer", "spotrun", "dcp", "dcp+hash")
    results: dict[str, dict[str, list[float]]] = {m: {"stall": [], "durable": []} for m in modes}
    step = 0
    ck = spotrun.Checkpointer(os.path.join(args.dir, "ckrun"), model=model, optimizer=optim,
                              every_steps=10**9, keep_last=1, watchers=[], handle_signals=False)
    ck.__enter__()

    def run_checkpointer(step: int) -> tuple[float, float]:
        ck.steps_done = step
        t0 = time.perf_counter()
        ck.save()
        stall = time.perf_counter() - t0
        ck.wait()
        return stall, time.perf_counter() - t0

    def run_spotrun(step: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        staged = saver.stage(state)
        fut = saver.write_async(step, staged)
        stall = time.perf_counter() - t0
        files = fut.result()
        if rank == 0:
            commit(storage, Manifest(step=step, files=dict(files), world_size=world))
        return stall, time.perf_counter() - t0

    def run_dcp(step: int, writer_cls: type, hash_after: bool) -> tuple[float, float]:
        folder = os.path.join(root, f"dcp-{step:06d}")
        writer = writer_cls(folder)
        t0 = time.perf_counter()
        fut = dcp.async_save(state, storage_writer=writer, process_group=dcp_group)
        stall = time.perf_counter() - t0
        fut.result()
        if hash_after and rank == 0:
            files = {}
            for name in sorted(os.listdir(folder)):
                size, digest = _sha256(os.path.join(folder, name))
                files[name] = FileEntry(size, digest)
            Storage(folder).write_bytes("manifest.json", Manifest(step=step, files=files,
                                                                   world_size=world).to_json())
        return stall, time.perf_counter() - t0

    # Round 0 is a warm-up (first-use allocations, thread pools, page cache), not counted.
    for rep in range(args.repeats + 1):
        for mode in modes:
            step += 1
            dist.barrier()
            if mode == "Checkpointer":
                stall, durable = run_checkpointer(step)
            elif mode == "spotrun":
                stall, durable = run_spotrun(step)
            elif mode == "dcp":
                stall, durable = run_dcp(step, FileSystemWriter, False)
            else:
                stall, durable = run_dcp(step, FsspecWriter, True)
            # Rank 0's durable is the one that counts (it commits); stall: the slowest rank.
            pair = torch.tensor([stall, durable], dtype=torch.float64)
            dist.all_reduce(pair, op=dist.ReduceOp.MAX)
            if rep > 0:
                results[mode]["stall"].append(float(pair[0]))
                results[mode]["durable"].append(durable if rank == 0 else float(pair[1]))
            dist.barrier()
            if rank == 0:
                shutil.rmtree(root, ignore_errors=True)  # same disk state for every save
            dist.barrier()
    saver.close()
    ck.__exit__(None, None, None)
    if rank == 0:
        med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in results.items()}
        print(f"state: {total.item() / MiB:.1f} MiB sharded over {world} gloo ranks "
              f"({layers_n} x Linear({WIDTH}, {WIDTH}) + AdamW moments), "
              f"medians of {args.repeats}, disk {args.dir}")
        for m, r in med.items():
            print(f"  {m:12s} stall {r['stall'] * 1e3:8.1f} ms   durable {r['durable'] * 1e3:8.1f} ms")
        base = med["dcp"]
        for m in ("Checkpointer", "spotrun", "dcp+hash"):
            print(f"  {m:12s} / dcp: stall {med[m]['stall'] / base['stall']:.2f}x (target <= 1.0), "
                  f"durable {med[m]['durable'] / base['durable']:.2f}x (target <= 1.2)")
    dist.destroy_process_group()


def _tensors(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "element_size"):
        yield obj


def _sha256(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--size-mib", type=float, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    p.add_argument("--port", type=int, default=29731)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    own = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="spotrun-bench-sharded-")
    try:
        sys.exit(_launch(args))
    finally:
        if own:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
