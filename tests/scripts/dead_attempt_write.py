"""One rank of a two-rank gloo job (started by the test, not torchrun) whose later saves write
slowly, for the dead-attempt exit test (tests/test_recovery_dead_write.py).

``argv[1]``: ``abortable`` (the slow write is an upload the process can abort: an aborter is
registered in ``spotrun.storage.inflight``, as the S3 writer registers each multipart upload,
and an aborted write fails at its next block) or ``stuck`` (a write nothing can abort).
``argv[2]``: the run folder. ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` come
from the environment.

Saves every 3 steps; once the save of step 3 is committed, every payload write call takes
``DELAY`` seconds, so the save of step 6 is still being written long after the test kills
the other rank. Each step ends in an all-reduce: the one after the kill fails, and the rank
leaves as the examples do (``os._exit(1)`` after the Checkpointer's way out). Prints
``rank R step S`` per step and ``rank R left after X s`` (from the failure to the exit).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for slowfs

import slowfs
import torch
import torch.distributed as dist

import spotrun
from spotrun.storage import inflight

DELAY = "0.5"  # seconds per payload write call once slow: the step-6 write takes well over 30 s
mode, run_dir = sys.argv[1], sys.argv[2]
aborted = threading.Event()


class Abortable(slowfs.Slowed):
    """A slowed payload write that fails once the process aborted its uploads."""

    def write(self, data):
        written = super().write(data)
        if aborted.is_set():
            raise OSError("upload aborted")
        return written


slowfs.Slowed = Abortable  # slowfile:// wraps each payload file it opens for writing in it
slowfs.register()
if mode == "abortable":
    inflight.register("the test's slow upload", aborted.set)

dist.init_process_group("gloo")
rank = dist.get_rank()
logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
opt = torch.optim.SGD(model.parameters(), lr=0.01)
failed_at = None
try:
    with spotrun.Checkpointer(f"slowfile://{run_dir}", model=model, optimizer=opt,
                              every_steps=3, keep_last=5) as ckpt:
        try:
            for step in ckpt.range(10_000):
                loss = model(torch.randn(4, 64)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                dist.all_reduce(torch.ones(1))  # fails once the other rank is gone
                if os.path.exists(os.path.join(run_dir, "000000000003", "manifest.json")):
                    os.environ["SPOTRUN_TEST_WRITE_DELAY"] = DELAY  # read at each file's open
                print(f"rank {rank} step {step + 1}", flush=True)
                time.sleep(0.05)
        except Exception:
            failed_at = time.monotonic()  # a collective failed; the Checkpointer's way out follows
            raise
except Exception as exc:  # noqa: BLE001 - the other rank vanished
    left = time.monotonic() - (failed_at or time.monotonic())
    print(f"rank {rank} left after {left:.2f} s ({type(exc).__name__})", flush=True)
    os._exit(1)  # no teardown: a process group with a dead peer can hang in it
os._exit(0)
