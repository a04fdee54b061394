"""DDP under torchrun (CPU, gloo) with ResumableLoader's own rank sharding, wrapped with spotrun.

    python -m spotrun.distributed --nproc-per-node 2 tests/scripts/ddp_loader_train.py \
        --url RUN --steps 60 --every-steps 10

The setup a DDP user would write with spotrun instead of DistributedSampler: every rank
builds a :class:`spotrun.ResumableLoader` over the WHOLE dataset, with the same seed and no
rank arguments (it takes rank and world size from the process group), and it hands each rank
its own part of one global order. Its state is global, so the same checkpoint also resumes on
a different number of ranks.

Dropout with per-rank RNG streams and DDP's gradient averaging make a replayed or skipped
batch on any rank visible in everyone's weights. Each rank prints, for every step, the epoch
and the dataset indices it trained on (``rank R step S epoch E idx i,j,...``) so a test can
check which samples each rank read; on its way out, ``rank R exit CODE at step S``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch
import torch.distributed as dist
from ddp_train import make_data, say  # run as a script, its own folder is on sys.path
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import TensorDataset

import spotrun


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s rank{rank} %(name)s %(message)s")

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    spotrun.seed_everything(args.seed)  # same initial weights everywhere (DDP checks too)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Dropout(0.3), nn.Linear(64, 5))
    ddp = DDP(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=3e-3, weight_decay=0.01)
    spotrun.seed_everything(args.seed * 1000 + rank + 1)  # each rank its own dropout masks

    data = make_data(args.samples, 32, 5, seed=1234)
    dataset = TensorDataset(*data.tensors, torch.arange(args.samples))
    loader = spotrun.ResumableLoader(dataset, batch_size=args.batch_size, seed=args.seed)
    assert (loader.rank, loader.world_size) == (rank, world), (loader.rank, loader.world_size)

    code: int | str | None = 0
    ckpt = spotrun.Checkpointer(
        args.url,
        model=ddp,
        optimizer=optimizer,
        data=loader,
        values={"loss_sum": 0.0},
        metadata={"script": "ddp_loader_train.py", "steps": args.steps},
        every_steps=args.every_steps,
        keep_last=100,
    )
    try:
        with ckpt:
            batches = loader.forever()
            for step in ckpt.range(args.steps):
                x, y, idx = next(batches)
                ddp.train()
                loss = nn.functional.cross_entropy(ddp(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ckpt.values["loss_sum"] += loss.item()
                say(f"rank {rank} step {step + 1} epoch {loader.epoch} "
                    f"idx {','.join(map(str, idx.tolist()))}")
                if args.step_sleep:
                    time.sleep(args.step_sleep)
    except SystemExit as exc:
        code = exc.code
    finally:
        say(f"rank {rank} exit {code} at step {ckpt.steps_done}")
        dist.destroy_process_group()
    return int(code or 0)


if __name__ == "__main__":
    # Leave without interpreter finalization: torch's gloo worker threads can SIGABRT there
    # ("terminate called without an active exception", ~1 run in 5 with plain torchrun, after
    # destroy_process_group) and turn a finished run into a failed one. The tests assert on
    # what this script did, not on torch's teardown.
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
