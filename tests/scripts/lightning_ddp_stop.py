"""Lightning DDP (2 CPU ranks under torchrun) whose stop checkpoint cannot commit in time.

slowfile:// writes sleep (``SPOTRUN_TEST_WRITE_DELAY``), so rank 0's bounded stop save misses
``SPOTRUN_STOP_TIMEOUT`` and leaves with 143 while rank 1 waits in Lightning's own
save barrier. Each rank prints ``step N`` as it trains and ``rank R exit C`` as it leaves.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for slowfs

import slowfs
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from spotrun.integrations.lightning import SpotrunCallback

slowfs.register()
torch.set_num_threads(1)
RANK = int(os.environ.get("RANK", "0"))


class Net(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())


class _Tick(Callback):
    def on_train_batch_end(self, trainer, *args) -> None:
        print(f"rank {RANK} step {trainer.global_step}", flush=True)
        time.sleep(0.05)


def _said_exit() -> None:
    print(f"rank {RANK} exit", flush=True)


atexit.register(_said_exit)
data = torch.utils.data.TensorDataset(torch.randn(100_000, 64))
loader = torch.utils.data.DataLoader(data, batch_size=8)
trainer = Trainer(max_steps=100_000, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                  callbacks=[SpotrunCallback(), _Tick()])
try:
    trainer.fit(Net(), train_dataloaders=loader)
except SystemExit as exc:
    print(f"rank {RANK} exit code {exc.code}", flush=True)
    raise
