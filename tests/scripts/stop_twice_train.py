"""A slow loop for second-signal tests: logs spotrun's INFO lines (so the test sees the stop
save start and commit) and, with STOP_TWICE_LINGER=<s>, lingers that long in an atexit hook,
like a slow interpreter teardown (torch, thread pools) after the with-block has exited.
Works with slowfile:// run URLs (tests/slowfs.py) for a slow stop save."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for slowfs

import slowfs
import torch

import spotrun

slowfs.register()
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
linger = float(os.environ.get("STOP_TWICE_LINGER", "0"))


def _linger() -> None:
    print("tearing down", flush=True)
    time.sleep(linger)


if linger:
    atexit.register(_linger)

model = torch.nn.Linear(4, 4)
with spotrun.Checkpointer(model=model, every_steps=1000) as ckpt:
    for i, _step in enumerate(ckpt.range(10_000)):
        if i == 0:
            print("ready", flush=True)
        time.sleep(0.05)
