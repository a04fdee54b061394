"""An epoch loop with end-of-epoch work, wrapped with spotrun without re-indenting it.

Shows what a loop that is not ``ckpt.range()`` needs: ``start()``/``close()`` instead of a
``with`` block, ``restore()`` once, ``step()`` after each batch, validation and an LR
schedule on the validation loss at the end of each epoch, a "best model" file kept as an
artifact, an early stop with ``break`` followed by ``finish()``. Interrupt it (Ctrl-C,
``kill -TERM``, ``spotrun launch --local``) and run it again: it resumes bit-for-bit.

    SPOTRUN_URL=runs/epochs python examples/epoch_loop.py --epochs 4
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

import spotrun


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    y = (x @ torch.randn(32, 4, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="run URL (default: $SPOTRUN_URL, else runs/epochs)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--target-loss", type=float, default=0.0,
                   help="stop early once the validation loss is below this (0: never)")
    p.add_argument("--best", default=None, help="where the best model is written "
                   "(default: best.pt beside the run, a local path outside the run URL)")
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep per batch (gives interruptions a run to land in)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    url = args.url or os.environ.get("SPOTRUN_URL") or "runs/epochs"
    best_path = args.best or (url.rstrip("/") + "-best.pt" if "://" not in url else "best.pt")

    spotrun.seed_everything(0)
    torch.use_deterministic_algorithms(True)
    loader = spotrun.ResumableLoader(make_data(1024, 1), batch_size=32, seed=0)
    val_x, val_y = make_data(256, 2).tensors
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 4))
    # A peek to size something: harmless, the loop still starts with this batch.
    n_features = next(iter(loader))[0].shape[1]
    assert n_features == 32
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)

    ckpt = spotrun.Checkpointer(
        url, model=model, optimizer=opt, scheduler=plateau, data=loader,
        values={"best_val": float("inf")},
        artifacts=[best_path],      # written below, read back by whatever comes after
        every_steps=10,
    ).start()                       # no with block: the loop below keeps its indentation
    step = ckpt.restore()           # 0, or the step the last checkpoint holds
    while loader.epoch < args.epochs:
        model.train()
        for x, y in loader:         # the rest of the current epoch after a resume
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            ckpt.step(step)         # may checkpoint; on SIGTERM or a notice: saves, exits 75
            if args.step_sleep:
                time.sleep(args.step_sleep)
        model.eval()                # end-of-epoch work, after the epoch's last step
        with torch.no_grad():
            val = nn.functional.cross_entropy(model(val_x), val_y).item()
        plateau.step(val)
        logging.getLogger("example").info("epoch %d: step %d, val loss %.4f, lr %.3g",
                                          loader.epoch, step, val, opt.param_groups[0]["lr"])
        if val < ckpt.values["best_val"]:
            ckpt.values["best_val"] = val
            torch.save(model.state_dict(), best_path)
        if val < args.target_loss:
            break                   # early stop: finish() below still marks the run done
    ckpt.finish()                   # final checkpoint + done.json
    ckpt.close()                    # optional: an exit hook would close it too


if __name__ == "__main__":
    main()
