"""Time a short wrapped training run under several notice configurations, interleaved.

    python tests/scripts/notice_overhead.py WORKDIR REPS NAME=SOURCE[@ENDPOINT] ...

For each repetition and each configuration (in turn, so a busy machine slows them alike),
sets ``SPOTRUN_NOTICE_SOURCE`` (and ``SPOTRUN_IMDS_ENDPOINT`` when given), then times
``with Checkpointer(...)`` around 20 training steps of a tiny model, from before the ``with``
to after it (watchers started and stopped, the final checkpoint committed). Prints one JSON
line: ``{"seconds": {name: [...]}, "states": {name: [watcher states]}}``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import torch
from torch import nn

import spotrun


def main() -> None:
    workdir, reps, configs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
    torch.set_num_threads(1)
    spotrun.seed_everything(0)
    model = nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    seconds: dict[str, list[float]] = {}
    states: dict[str, list[str]] = {}
    for rep in range(reps):
        for cfg in configs:
            name, _, spec = cfg.partition("=")
            source, _, endpoint = spec.partition("@")
            os.environ["SPOTRUN_NOTICE_SOURCE"] = source
            if endpoint:
                os.environ["SPOTRUN_IMDS_ENDPOINT"] = endpoint
            t0 = time.perf_counter()
            with spotrun.Checkpointer(os.path.join(workdir, f"{name}-{rep}"), model=model,
                                      optimizer=opt, every_steps=1000) as ckpt:
                for _ in ckpt.range(20):
                    loss = nn.functional.mse_loss(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                watchers = list(ckpt._interrupts._watchers)
            seconds.setdefault(name, []).append(time.perf_counter() - t0)
            states.setdefault(name, []).extend(getattr(w, "state", "?") for w in watchers)
    sys.stdout.write(json.dumps({"seconds": seconds, "states": states}) + "\n")


if __name__ == "__main__":
    main()
