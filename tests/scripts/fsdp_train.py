"""FSDP2 (``fully_shard``) under torchrun (CPU, gloo), wrapped with spotrun's Checkpointer.

    python -m spotrun.distributed --nproc-per-node 2 tests/scripts/fsdp_train.py \
        --url RUN --steps 40 --every-steps 8

A sharded model (every layer and the root ``fully_shard``-ed, odd sizes so shards are
uneven), AdamW, a warmup LR schedule, dropout with per-rank RNG streams and a
:class:`spotrun.ResumableLoader` sharding one global order by rank: what an FSDP user would
write. The Checkpointer detects the DTensors and saves model and optimizer through DCP.

Each rank prints ``rank R step S epoch E idx i,j,...`` for every step and ``rank R exit CODE
at step S`` on its way out; rank 0 prints ``full-state SHA`` (sha256 of the gathered model
and optimizer state) at the end of the run and, with ``--dump DIR``, writes the gathered
state right after restore (``restored-<step>.pt``) and at a stop (``stopped-<step>.pt``), so
a test can compare what was saved with what a different world size loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: slowfs, optim_tools

import slowfs
import torch
import torch.distributed as dist
from ddp_train import make_data, say  # run as a script, its own folder is on sys.path
from optim_tools import counting_steps
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import TensorDataset

import spotrun

slowfs.register()  # slowfile:// run URLs: local disk with slow writes, for kill-mid-save tests

DIMS = [32, 45, 27, 5]


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Model and optimizer state gathered on every rank (a collective), on the CPU."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, [optimizer], options=opts)
    return {"model": model_sd, "optim": optim_sd}


def digest(state: dict) -> str:
    buf = io.BytesIO()
    torch.save(state, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="run URL (default: $SPOTRUN_URL)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every-steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples", type=int, default=240)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--dump", default=None)
    args = p.parse_args()

    # A notice that reaches one rank only: that rank alone watches a (fake) metadata server.
    endpoint = os.environ.get(f"SPOTRUN_TEST_IMDS_RANK{os.environ.get('LOCAL_RANK', '0')}")
    if endpoint:
        os.environ["SPOTRUN_NOTICE_SOURCE"] = "ec2"
        os.environ["SPOTRUN_IMDS_ENDPOINT"] = endpoint

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    say(f"rank {rank} pid {os.getpid()}")
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s rank{rank} %(name)s %(message)s")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    spotrun.seed_everything(0)  # the same initial full weights on every rank and world size
    layers = [nn.Linear(a, b) for a, b in itertools.pairwise(DIMS)]
    model = nn.Sequential(layers[0], nn.GELU(), nn.Dropout(0.2), layers[1], nn.GELU(), layers[2])
    mesh = init_device_mesh("cpu", (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    spotrun.seed_everything(1000 + rank)  # each rank its own dropout masks

    data = make_data(args.samples, DIMS[0], DIMS[-1], seed=1234)
    dataset = TensorDataset(*data.tensors, torch.arange(args.samples))
    loader = spotrun.ResumableLoader(dataset, batch_size=args.batch_size, seed=0)

    code: int | str | None = 0
    ckpt = spotrun.Checkpointer(args.url, model=model, optimizer=optimizer, scheduler=scheduler,
                                data=loader, every_steps=args.every_steps, keep_last=100)
    try:
        with ckpt:
            assert ckpt.sharded, "FSDP2 model not detected as sharded"
            # Optimizer steps the restore ran: torch's zero-gradient step that makes a fresh
            # optimizer's state would be one; spotrun makes it from the checkpoint's index.
            with counting_steps([optimizer]) as steps:
                start = ckpt.restore()
            say(f"rank {rank} restore ran {steps[0]} optimizer steps")
            if args.dump:
                state = full_state(model, optimizer)
                if rank == 0:
                    torch.save(state, os.path.join(args.dump, f"restored-{start}.pt"))
            batches = loader.forever()
            for step in ckpt.range(args.steps):
                x, y, idx = next(batches)
                model.train()
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                say(f"rank {rank} step {step + 1} epoch {loader.epoch} "
                    f"idx {','.join(map(str, idx.tolist()))}")
                if args.step_sleep:
                    time.sleep(args.step_sleep)
    except SystemExit as exc:
        code = exc.code
        if code == spotrun.EXIT_INTERRUPTED and args.dump:
            state = full_state(model, optimizer)
            if rank == 0:
                torch.save(state, os.path.join(args.dump, f"stopped-{ckpt.steps_done}.pt"))
    finally:
        if code == 0:
            state = full_state(model, optimizer)
            if rank == 0:
                say(f"full-state {digest(state)}")
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
