"""Fast steps, slow async saves (slowfile:// storage): for interrupt-while-saving tests."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for slowfs

import slowfs
import torch

import spotrun

slowfs.register()
spotrun.seed_everything(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
opt = torch.optim.Adam(model.parameters())
with spotrun.Checkpointer(model=model, optimizer=opt, every_steps=20, keep_last=10) as ckpt:
    for step in ckpt.range(100_000):
        loss = model(torch.randn(8, 256)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(0.01)
        print(f"step {step + 1}", flush=True)
