"""An Accelerate loop under spotrun: a small MLP with dropout, AdamW and warmup, on CPU.

    SPOTRUN_URL=runs/accelerate python examples/accelerate_train.py   # or s3://bucket/prefix
    spotrun launch --local --interruptions 3 -- python examples/accelerate_train.py
    spotrun check-resume -- python examples/accelerate_train.py

The spotrun lines: ``SpotrunAccelerate(accelerator, every_steps=...)`` and ``spot.range(...)``.
The spotrun.ResumableLoader, registered for checkpointing, makes the data position exact.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from accelerate import Accelerator

import spotrun
from spotrun.integrations.accelerate import SpotrunAccelerate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-steps", type=int, default=20)
    p.add_argument("--step-sleep", type=float, default=0.0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)

    spotrun.seed_everything(0)
    accelerator = Accelerator(cpu=True)
    g = torch.Generator().manual_seed(1234)
    data = torch.utils.data.TensorDataset(torch.randn(200, 16, generator=g), torch.randint(0, 4, (200,), generator=g))
    loader = spotrun.ResumableLoader(data, batch_size=16, shuffle=True, seed=0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    model, opt, sched = accelerator.prepare(model, opt, sched)
    accelerator.register_for_checkpointing(loader)

    spot = SpotrunAccelerate(accelerator, every_steps=a.save_steps)  # run URL: $SPOTRUN_URL
    batches = loader.forever()
    for _ in spot.range(a.steps):
        x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        time.sleep(a.step_sleep)


if __name__ == "__main__":
    main()
