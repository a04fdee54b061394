"""A realistic small training script wrapped with spotrun.

A two-layer MLP with dropout, AdamW, a warmup + cosine LR schedule and a shuffling loader
over synthetic data. Runs on a laptop CPU in seconds. Interrupt it however you like (Ctrl-C,
``kill -TERM``, ``spotrun launch --local``): run it again and it continues where it stopped,
to bit-for-bit the same final weights as an uninterrupted run.

    SPOTRUN_URL=runs/demo python examples/train.py --steps 300
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

import spotrun


def make_data(n: int, dim: int, classes: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="run URL (default: $SPOTRUN_URL, else runs/example)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--every-steps", type=int, default=50, help="checkpoint interval in steps")
    p.add_argument("--step-sleep", type=float, default=0.02,
                   help="seconds to sleep per step, standing in for a bigger model so that "
                        "interruptions have a run to land in (default 0.02; 0 for full speed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-rng", action="store_true",
                   help="do not save RNG state (demonstrates a resume that is NOT exact)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    url = args.url or os.environ.get("SPOTRUN_URL") or "runs/example"

    spotrun.seed_everything(args.seed)
    torch.use_deterministic_algorithms(True)
    dataset = make_data(4096, 64, 10, seed=1234)
    loader = spotrun.ResumableLoader(dataset, batch_size=args.batch_size, shuffle=True, seed=args.seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Dropout(0.2), nn.Linear(256, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)),
    )

    with spotrun.Checkpointer(
        url,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data=loader,
        values={"loss_ema": 0.0},
        metadata={"script": "examples/train.py", "steps": args.steps, "seed": args.seed},
        every_steps=args.every_steps,
        save_rng=not args.no_rng,
    ) as ckpt:
        batches = loader.forever()
        for step in ckpt.range(args.steps):
            x, y = next(batches)
            model.train()
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            ckpt.values["loss_ema"] = 0.95 * ckpt.values["loss_ema"] + 0.05 * loss.item()
            if args.step_sleep:
                time.sleep(args.step_sleep)
            if (step + 1) % 100 == 0:
                logging.getLogger("example").info(
                    "step %d loss %.4f (ema %.4f) lr %.2e",
                    step + 1, loss.item(), ckpt.values["loss_ema"], scheduler.get_last_lr()[0],
                )


if __name__ == "__main__":
    main()
