"""Issue 23 item 9: spotrun's own saves through the Lightning Trainer say they are full
checkpoints, so Lightning does not log "`weights_only` was not set" at each of them."""

from __future__ import annotations

import logging

import torch
from helpers import committed_steps


def test_final_save_is_committed_without_the_weights_only_notice(tmp_path, caplog):
    from lightning.pytorch import LightningModule, Trainer

    from spotrun.integrations.lightning import SpotrunCallback

    class Net(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    url = str(tmp_path / "run")
    data = torch.utils.data.TensorDataset(torch.randn(12, 4))
    spot = SpotrunCallback(url, handle_signals=False, watchers=[])
    trainer = Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, callbacks=[spot],
                      default_root_dir=str(tmp_path))
    with caplog.at_level(logging.INFO):
        trainer.fit(Net(), train_dataloaders=torch.utils.data.DataLoader(data, batch_size=4),
                    ckpt_path=spot.ckpt_path())
    assert committed_steps(url) == [3]  # spotrun's final save ran
    assert not [r for r in caplog.records if "weights_only" in r.getMessage()]
