"""A DDP training script for one or several nodes, wrapped with spotrun.

Run it through torchrun's spotrun wrapper (which keeps exit code 75), or let ``spotrun launch``
start it on every node:

    # one machine, 2 processes
    SPOTRUN_URL=runs/ddp python -m spotrun.distributed --nproc-per-node 2 examples/ddp_train.py
    # 2 simulated nodes on this machine, one of them interrupted
    spotrun launch --local --nodes 2 --nproc-per-node 1 -- python examples/ddp_train.py
    # 2 EC2 instances with 8 GPUs each: see docs/launch.md, "Multi-node jobs"

NCCL on GPUs, gloo on CPU. Every rank trains on its own shard of the data with its own
dropout masks; spotrun saves each rank's RNG and data position, writes the replicated DDP
weights once, and on a notice to any node stops every rank at the same step.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Subset, TensorDataset

import spotrun


def make_data(n: int, dim: int, classes: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="run URL (default: $SPOTRUN_URL, else runs/ddp)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every-steps", type=int, default=20, help="checkpoint interval in steps")
    p.add_argument("--step-sleep", type=float, default=0.02,
                   help="seconds to sleep per step, standing in for a bigger model (0: full speed)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s rank{rank} %(name)s %(message)s")
    url = args.url or os.environ.get("SPOTRUN_URL") or "runs/ddp"

    spotrun.seed_everything(args.seed)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Dropout(0.2), nn.Linear(128, 5)).to(device)
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=3e-3, weight_decay=0.01)
    spotrun.seed_everything(args.seed * 1000 + rank + 1)  # each rank its own dropout masks

    dataset = make_data(4096, 32, 5, seed=1234)
    shard = Subset(dataset, list(range(rank, len(dataset), world)))
    loader = spotrun.ResumableLoader(shard, batch_size=32, shuffle=True, seed=args.seed + 17 * rank)

    code: int | str | None = 0
    try:
        with spotrun.Checkpointer(url, model=ddp, optimizer=optimizer, data=loader,
                                  values={"loss_ema": 0.0}, every_steps=args.every_steps,
                                  metadata={"script": "examples/ddp_train.py", "world": world}) as ckpt:
            batches = loader.forever()
            for step in ckpt.range(args.steps):
                x, y = (t.to(device) for t in next(batches))
                ddp.train()
                loss = nn.functional.cross_entropy(ddp(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ckpt.values["loss_ema"] = 0.95 * ckpt.values["loss_ema"] + 0.05 * loss.item()
                if args.step_sleep:
                    time.sleep(args.step_sleep)
                if rank == 0 and (step + 1) % 50 == 0:
                    logging.getLogger("example").info("step %d loss %.4f (ema %.4f)", step + 1,
                                                      loss.item(), ckpt.values["loss_ema"])
    except SystemExit as exc:  # 75 after a stop checkpoint, from the Checkpointer
        code = exc.code
    finally:
        dist.destroy_process_group()
    return int(code or 0)


if __name__ == "__main__":
    # Leave without interpreter finalisation: gloo's worker threads can abort the process
    # there ("terminate called without an active exception") after the run is safely done.
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
