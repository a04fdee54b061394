"""Optimizer helpers for the tests of spotrun.format.optim_init (a fresh optimizer's state
made from a sharded checkpoint's index instead of torch's zero-gradient step)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class RowScaled(torch.optim.Optimizer):
    """SGD scaled per row of a matrix by a running mean of its squared gradients: the state
    is one value per row (``row``), a vector, for a 2-D parameter. Not shaped like its
    parameter, so spotrun must leave it to torch's step."""

    def __init__(self, params, lr: float = 1e-2) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                sq = p.grad.square().mean(dim=1)
                state["row"] = sq if "row" not in state else state["row"] * 0.9 + sq * 0.1
                p.add_(p.grad / (state["row"].sqrt() + 1e-3).unsqueeze(1), alpha=-group["lr"])


@contextlib.contextmanager
def counting_steps(optims: list[torch.optim.Optimizer]) -> Iterator[list[int]]:
    """Count each optimizer's ``step()`` calls inside the block (torch's zero-gradient step
    that makes a fresh optimizer's state is one); the list holds one count per optimizer."""
    counts = [0] * len(optims)
    # An LR scheduler wraps step() in an instance attribute of its own: put that one back.
    before = [optim.__dict__.get("step") for optim in optims]
    for i, optim in enumerate(optims):
        def counted(*a, _i=i, _step=optim.step, **kw):
            counts[_i] += 1
            return _step(*a, **kw)
        optim.step = counted
    try:
        yield counts
    finally:
        for optim, step in zip(optims, before, strict=True):
            if step is None:
                del optim.step
            else:
                optim.step = step
