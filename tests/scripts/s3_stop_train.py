"""A slow loop that commits one checkpoint at step 3, prints 'committed 3', then trains on
with no scheduled saves until a stop request (for the S3 stop-checkpoint tests).

``S3_STOP_WIDTH`` (default 8) sets the model's width: 1300 makes a payload of about 6.5 MiB,
two parts at ``SPOTRUN_S3_PART_MIB=5`` (a multipart upload)."""

from __future__ import annotations

import logging
import os
import time

import torch

import spotrun

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
torch.manual_seed(0)
width = int(os.environ.get("S3_STOP_WIDTH", "8"))
model = torch.nn.Linear(width, width)
with spotrun.Checkpointer(model=model, every_seconds=10_000) as ckpt:
    for step in ckpt.range(1_000_000):
        with torch.no_grad():
            model.weight.add_(0.001)
        if step + 1 == 3:
            ckpt.steps_done = 3
            ckpt.save()
            ckpt.wait()
        if step + 1 == 5:  # a step past the commit, so a stop has something new to save
            print("committed 3", flush=True)
        time.sleep(0.05)
