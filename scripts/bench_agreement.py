"""Per-step cost of the rank agreement (``Group.agree``): 2 ranks, gloo, CPU.

    python scripts/bench_agreement.py [--steps 2000] [--world 2]

Every ``Checkpointer.step()`` runs one ``Group.agree()``: a MAX all-reduce of four int32
flags. This measures, on every rank, after a warm-up:

- ``agree``: ``Group.agree()`` alone, back to back;
- ``step``: a small DDP training step (forward, backward with DDP's gradient all-reduce,
  optimizer step), the baseline;
- ``step+agree``: the same step followed by ``Group.agree()``, as under the Checkpointer.

and prints rank 0's medians in microseconds, with the agreement's cost as a fraction of the
step. The real figure for a GPU job is smaller still in relative terms: its steps are far
longer than this toy's, and the flags stay on the CPU under gloo (on the GPU under NCCL).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spotrun.distributed import Group


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _worker(rank: int, world: int, port: int, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = Group()
        torch.manual_seed(0)
        model = DDP(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))

        def step() -> None:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def agree() -> None:
            group.agree(stop=False, save=False, time_due=False, busy=False)

        def both() -> None:
            step()
            agree()

        results = {}
        for name, fn in (("agree", agree), ("step", step), ("step+agree", both)):
            _timed(fn, max(50, steps // 10))  # warm-up (gloo connections, allocator)
            dist.barrier()
            results[name] = statistics.median(_timed(fn, steps)) * 1e6
        if rank == 0:
            queue.put(results)
        dist.barrier()  # nobody tears down its connections while a peer still uses them
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(args.world, port, args.steps, queue), nprocs=args.world,
                       start_method="spawn")
    r = queue.get()
    added = r["step+agree"] - r["step"]
    print(f"ranks {args.world} (gloo, CPU), {args.steps} timed calls each, medians on rank 0:")
    print(f"  Group.agree() alone        {r['agree']:9.1f} us")
    print(f"  baseline DDP step          {r['step']:9.1f} us")
    print(f"  step + Group.agree()       {r['step+agree']:9.1f} us")
    print(f"  agreement per step         {added:9.1f} us added in the loop; "
          f"alone {r['agree'] / r['step']:.1%} of the step")


if __name__ == "__main__":
    main()
