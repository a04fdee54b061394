"""A stop checkpoint of ~160 MiB whose script then leaves through ``os._exit`` (as the
torch.distributed examples do): its peer copy must be sent before the stop raises."""

from __future__ import annotations

import os
import signal

import torch

import spotrun

model = torch.nn.Linear(8, 8)
model.register_buffer("big", torch.ones(40_000_000))  # 160 MiB: a send that takes a while
code = 0
try:
    with spotrun.Checkpointer(model=model, every_steps=10**9) as ckpt:
        for step in ckpt.range(100):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
except SystemExit as exc:
    code = int(exc.code or 0)
print(f"exit {code}", flush=True)
os._exit(code)  # no exit hooks
