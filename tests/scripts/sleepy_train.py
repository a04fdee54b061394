"""A slow loop (50 ms a step by default; argv[2] overrides) for signal tests: prints 'ready' once
training is underway."""

from __future__ import annotations

import sys
import time

import torch

import spotrun

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
step_seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
model = torch.nn.Linear(4, 4)
with spotrun.Checkpointer(model=model, every_steps=1000) as ckpt:
    for i, _step in enumerate(ckpt.range(steps)):
        if i == 0:  # training is underway in this process
            print("ready", flush=True)
        time.sleep(step_seconds)
