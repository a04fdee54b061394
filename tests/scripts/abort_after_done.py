"""Finish a tiny run through the Checkpointer (done.json written), then abort, as gloo's
teardown sometimes does after a finished run ("terminate called without an active
exception"). ``before-done``: abort inside the Checkpointer, before the run finishes."""

from __future__ import annotations

import os
import sys

import torch

import spotrun

model = torch.nn.Linear(2, 2)
with spotrun.Checkpointer(model=model, every_steps=100) as ckpt:
    if sys.argv[1:] == ["before-done"]:
        os.abort()
    for _ in ckpt.range(3):
        pass
os.abort()
