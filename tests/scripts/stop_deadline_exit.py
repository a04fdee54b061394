"""A stop checkpoint that cannot commit in time (slowfile:// writes sleep), for the exit-code test.

``argv[1]``: ``checkpointer`` (spotrun.Checkpointer) or ``session`` (RunSession's bounded
payload commit, the Lightning path). ``argv[2]``: a file the registered in-flight aborter
writes, so the test sees that the missed deadline aborted open transfers before leaving.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for slowfs

import slowfs
import torch

import spotrun
from spotrun.storage import inflight

slowfs.register()
torch.set_num_threads(1)  # ten of these run side by side on a small machine
mode, marker = sys.argv[1], sys.argv[2]
inflight.register("the test's fake upload", lambda: Path(marker).write_text("aborted"))
spotrun.seed_everything(0)
model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
opt = torch.optim.Adam(model.parameters())


def train_step() -> None:
    loss = model(torch.randn(8, 64)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    time.sleep(0.01)


if mode == "checkpointer":
    with spotrun.Checkpointer(model=model, optimizer=opt, every_steps=10**9) as ckpt:
        for step in ckpt.range(100_000):
            train_step()
            print(f"step {step + 1}", flush=True)
else:
    from spotrun.integrations._session import RunSession

    session = RunSession(spotrun.config.env_str("SPOTRUN_URL") or "")
    session.start()
    session.training_started(0)
    for step in range(1, 100_000):
        train_step()
        print(f"step {step}", flush=True)
        stop, _ = session.poll(step)
        if stop:
            payload = {"format": 1, "step": step, "model": model.state_dict(),
                       "optimizer": opt.state_dict()}
            ok = session.commit_payload(step, payload, bounded=True)
            session.close("interrupted", exit_code=75 if ok else 143)
            raise SystemExit(75 if ok else 143)
