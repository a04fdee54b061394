"""A Lightning run under spotrun: a small MLP with dropout, AdamW and warmup, on CPU.

    SPOTRUN_URL=runs/lightning python examples/lightning_train.py     # or s3://bucket/prefix
    spotrun launch --local --interruptions 3 -- python examples/lightning_train.py
    spotrun check-resume -- python examples/lightning_train.py

The spotrun lines: ``SpotrunCallback()`` in ``callbacks`` and ``ckpt_path=spot.ckpt_path()``.
A :class:`spotrun.ResumableLoader` as the train loader makes the data position exact
(Lightning saves stateful loaders); the callback saves and restores every RNG.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import spotrun
from spotrun.integrations.lightning import SpotrunCallback


class Net(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


class _Slow(Callback):
    """Stretches each step (tests and demos need time to interrupt a tiny model)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.seconds)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-steps", type=int, default=20)
    p.add_argument("--step-sleep", type=float, default=0.0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    spotrun.seed_everything(0)
    g = torch.Generator().manual_seed(1234)
    data = torch.utils.data.TensorDataset(torch.randn(200, 16, generator=g), torch.randint(0, 4, (200,), generator=g))
    loader = spotrun.ResumableLoader(data, batch_size=16, shuffle=True, seed=0)
    model = Net()

    spot = SpotrunCallback()  # run URL: $SPOTRUN_URL
    # ModelCheckpoint keeps the schedule; its dirpath only names checkpoints (spotrun's
    # CheckpointIO writes them under the run URL) and is saved in its state: keep it fixed.
    callbacks = [spot, ModelCheckpoint(every_n_train_steps=a.save_steps, save_top_k=-1,
                                       dirpath="lightning_checkpoints")]
    if a.step_sleep:
        callbacks.append(_Slow(a.step_sleep))
    trainer = Trainer(max_steps=a.steps, accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(model, train_dataloaders=loader, ckpt_path=spot.ckpt_path())


if __name__ == "__main__":
    main()
