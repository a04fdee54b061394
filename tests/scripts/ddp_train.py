"""A small DDP training run under torchrun (CPU, gloo), wrapped with spotrun.

    python -m torch.distributed.run --nproc-per-node 2 tests/scripts/ddp_train.py \
        --url RUN --steps 60 --every-steps 10 --pid-dir DIR

What makes it a fair test of "all ranks stop together and resume exactly":

- dropout, with each rank's RNG seeded differently after the model is built, so each rank's
  RNG state is its own and must be saved and restored per rank;
- a :class:`spotrun.ResumableLoader` per rank over that rank's shard of the data (indices
  ``rank::world``), so each rank's data position is its own too;
- DDP averages gradients, so a rank that trained on a replayed or skipped batch after a
  resume would change everyone's weights.

Per-rank notices: when ``SPOTRUN_TEST_IMDS_RANK<LOCAL_RANK>`` is set, this rank watches that
(fake) EC2 metadata endpoint and no other rank does, so a test can post a notice that only
one rank sees. Without it the environment decides, as in any run.

``--hang-at-step N``: in the launcher's first attempt only (rendezvous id ``...-sim-1``),
once step N's checkpoint committed, every rank ignores SIGTERM and SIGINT and sleeps: a
worker that sits in a collective that never fails (no Python handler runs there).

Each rank writes its pid to ``<pid-dir>/rank<RANK>.pid`` before training (so a test can
signal one rank only), prints ``rank R step S`` lines, and on its way out prints
``rank R exit CODE at step S``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
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


def say(line: str) -> None:
    # One write per line: both ranks share torchrun's stdout, and an unbuffered print()
    # writes the text and its newline separately, so another rank's line can land between.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pid-dir", default=None)
    p.add_argument("--hang-at-step", type=int, default=None)
    args = p.parse_args()
    hang_at = (args.hang_at_step if os.environ.get("TORCHELASTIC_RUN_ID", "").endswith("-sim-1")
               else None)

    local_rank = os.environ.get("LOCAL_RANK", "0")
    endpoint = os.environ.get(f"SPOTRUN_TEST_IMDS_RANK{local_rank}")
    if endpoint:
        os.environ["SPOTRUN_NOTICE_SOURCE"] = "ec2"
        os.environ["SPOTRUN_IMDS_ENDPOINT"] = endpoint

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s rank{rank} %(name)s %(message)s")
    if args.pid_dir:
        tmp = os.path.join(args.pid_dir, f".rank{rank}.pid.tmp")
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, os.path.join(args.pid_dir, f"rank{rank}.pid"))

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    spotrun.seed_everything(args.seed)  # same initial weights everywhere (DDP checks too)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Dropout(0.3), nn.Linear(64, 5))
    ddp = DDP(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=3e-3, weight_decay=0.01)
    spotrun.seed_everything(args.seed * 1000 + rank + 1)  # each rank its own dropout masks

    dataset = make_data(1000, 32, 5, seed=1234)
    shard = Subset(dataset, list(range(rank, len(dataset), world)))
    loader = spotrun.ResumableLoader(shard, batch_size=args.batch_size, shuffle=True,
                                     seed=args.seed + 17 * rank)

    code: int | str | None = 0
    ckpt = spotrun.Checkpointer(
        args.url,
        model=ddp,
        optimizer=optimizer,
        data=loader,
        values={"loss_sum": 0.0},
        metadata={"script": "ddp_train.py", "steps": args.steps},
        every_steps=args.every_steps,
        keep_last=100,  # the tests count every checkpoint a run commits
    )
    try:
        with ckpt:
            batches = loader.forever()
            for step in ckpt.range(args.steps):
                if step == hang_at:
                    ckpt.wait()  # step N's checkpoint committed: the relaunch resumes there
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    say(f"rank {rank} hangs at step {step}")
                    while True:
                        time.sleep(1)
                x, y = next(batches)
                ddp.train()
                loss = nn.functional.cross_entropy(ddp(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ckpt.values["loss_sum"] += loss.item()
                say(f"rank {rank} step {step + 1}")
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
