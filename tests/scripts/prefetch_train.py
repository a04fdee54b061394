"""A nanoGPT-shaped loop for check-resume: the next batch is drawn (a torch RNG draw) before
the optimizer step, so the batch a step trains on was fetched during the step before.

Default: the README-only port (the prefetched batch is not saved; a resume trains its first
step on the wrong batch). ``--fixed``: the prefetched batch goes through ``values=``.
Seeds torch only and imports NumPy, so the Python and NumPy RNGs start unseeded in every
process (and are saved) unless ``--seed-all``; ``--numpy-draw`` draws from NumPy's at every
step.
``--startup-sleep`` stands in for slow imports (torch takes seconds on a loaded machine).

    SPOTRUN_URL=runs/p python tests/scripts/prefetch_train.py --steps 40 [--fixed]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import spotrun

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=40)
p.add_argument("--every-steps", type=int, default=5)
p.add_argument("--step-sleep", type=float, default=0.02)
p.add_argument("--startup-sleep", type=float, default=0.0)
p.add_argument("--fixed", action="store_true")
p.add_argument("--numpy-draw", action="store_true")
p.add_argument("--seed-all", action="store_true", help="seed Python and NumPy too")
args = p.parse_args()
time.sleep(args.startup_sleep)

if args.seed_all:
    spotrun.seed_everything(0)
torch.manual_seed(0)
data_x = torch.randn(256, 8)
data_y = data_x @ torch.randn(8, 1)
model = torch.nn.Linear(8, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)


def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(data_x), (16,))
    return data_x[ix], data_y[ix]


def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss


values = {"noise": 0.0, **({"batch": None} if args.fixed else {})}
with spotrun.Checkpointer(model=model, optimizer=optimizer, values=values,
                          every_steps=args.every_steps) as ckpt:
    if args.fixed:
        ckpt.restore()
        if ckpt.values["batch"] is None:  # a fresh run: fetch the very first batch
            ckpt.values["batch"] = get_batch()
    else:
        x, y = get_batch()  # nanoGPT: fetch the very first batch before the loop
    for _step in ckpt.range(args.steps):
        if args.fixed:
            x, y = ckpt.values["batch"]
        loss = train_step(x, y)
        # Prefetch the next batch before the optimizer step, as nanoGPT does.
        if args.fixed:
            ckpt.values["batch"] = get_batch()
        else:
            x, y = get_batch()
        optimizer.step()
        if args.numpy_draw:
            ckpt.values["noise"] += float(np.random.rand())
        time.sleep(args.step_sleep)
