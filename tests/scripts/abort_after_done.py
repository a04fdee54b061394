"""Finish a tiny run through the Checkpointer (done.json written), then abort, as gloo's
teardown sometimes does after a finished run ("terminate called without an active
exception"). ``before-done``: abort inside the Checkpointer, before the run finishes.
``--url URL``: the run URL as an argument (else ``$SPOTRUN_URL``)."""

from __future__ import annotations

import os
import sys

import torch

import spotrun

url = sys.argv[sys.argv.index("--url") + 1] if "--url" in sys.argv else None
model = torch.nn.Linear(2, 2)
with spotrun.Checkpointer(url, model=model, every_steps=100) as ckpt:
    if "before-done" in sys.argv:
        os.abort()
    for _ in ckpt.range(3):
        pass
os.abort()
