"""start() without close(): the exit hook must close the checkpointer as a with block would.

Step 3's save (about 6 MB, so its write hashes on the storage's thread pool) is still in
flight when the loop body raises; at exit the hook must commit it, record the segment as
failed, release the lease and put the default SIGTERM handler back. A plain atexit hook,
registered by this script before spotrun's, prints what it finds (it runs after spotrun's).
"""

from __future__ import annotations

import atexit
import signal
import sys

import torch

import spotrun


def report() -> None:
    handler = signal.getsignal(signal.SIGTERM)
    name = "default" if handler == signal.SIG_DFL else getattr(handler, "__name__", repr(handler))
    print(f"at exit: SIGTERM handler {name}", flush=True)


atexit.register(report)
model = torch.nn.Linear(1200, 1200)  # ~5.8 MB of weights
ckpt = spotrun.Checkpointer(model=model, every_steps=3, watchers=[]).start()
print(f"installed: {signal.getsignal(signal.SIGTERM).__name__}", flush=True)
for step in ckpt.range(10):
    with torch.no_grad():
        model.weight.add_(1.0)
    if step == 3 and sys.argv[1:] == ["raise"]:
        raise ValueError("boom in the loop body")
