"""A slow loop for the one-writer tests: logs spotrun at INFO to stdout, prints 'ready' once
training is underway and 'step N' after each step. argv: steps, seconds per step, every_steps."""

from __future__ import annotations

import logging
import os
import sys
import time

import torch

import spotrun

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
step_seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
every = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
model = torch.nn.Linear(4, 4)
print(f"takeover: {os.environ.get('SPOTRUN_LEASE_TAKEOVER')}", flush=True)
with spotrun.Checkpointer(model=model, every_steps=every, watchers=[]) as ckpt:
    for i, step in enumerate(ckpt.range(steps)):
        if i == 0:
            print("ready", flush=True)
        time.sleep(step_seconds)
        print(f"step {step + 1}", flush=True)
print("finished", flush=True)
