"""A small deterministic run for the local-copy tests: ``TOTAL [STOP_AT]``. At STOP_AT it sends
itself SIGTERM (the Checkpointer commits a stop checkpoint and exits 75); at the end it prints
``final <sha256 of the weights>``. Logs at INFO to stdout."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys

import torch

import spotrun

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")
total = int(sys.argv[1])
stop_at = int(sys.argv[2]) if len(sys.argv) > 2 else -1
spotrun.seed_everything(0)
model = torch.nn.Linear(64, 64)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
with spotrun.Checkpointer(model=model, optimizer=opt, every_steps=5) as ckpt:
    for step in ckpt.range(total):
        x = torch.randn(8, 64)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
print("final", digest.hexdigest(), flush=True)
