"""A training loop whose state is large enough (about 24 MB) that saves take a while:
for crash tests that kill the process in the middle of writing a checkpoint."""

from __future__ import annotations

import sys

import torch

import spotrun

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
spotrun.seed_everything(0)
model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 1024))
opt = torch.optim.SGD(model.parameters(), lr=1e-4)
with spotrun.Checkpointer(model=model, optimizer=opt, every_steps=1, keep_last=2) as ckpt:
    for step in ckpt.range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # every step changes every byte, so each save is new data
        print(f"step {step + 1}", flush=True)
