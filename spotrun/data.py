"""A data loader that resumes mid-epoch at the next unseen batch, in the original order.

The usual ways to resume a DataLoader either restart the epoch (replaying batches the model
already trained on) or iterate and throw away the consumed batches (reading data for
nothing, minutes on a large epoch). :class:`ResumableLoader` instead derives each epoch's
order from ``(seed, epoch)`` alone, and starts its sampler at the saved offset: no batch is
read twice, none is skipped, and the global RNG is never touched, so dropout and other
random draws in the training step are not shifted by loader bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["EpochSampler", "ResumableLoader"]


class EpochSampler(Sampler[int]):
    """Indices of one epoch, shuffled by ``(seed, epoch)``, starting at ``start``."""

    def __init__(self, n: int, *, seed: int, epoch: int, shuffle: bool, start: int) -> None:
        self.n, self.seed, self.epoch, self.shuffle, self.start = n, seed, epoch, shuffle, start

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator()
        # Large odd multiplier keeps (seed, epoch) pairs from colliding for small seeds.
        g.manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :].tolist())

    def __len__(self) -> int:
        return max(0, self.n - self.start)


class ResumableLoader:
    """Iterate a dataset in batches, epoch after epoch, resumable at any batch.

    Use it like a DataLoader, and pass it to the :class:`~spotrun.Checkpointer` (it is
    stateful): ``for batch in loader`` yields the rest of the current epoch, then advances
    ``loader.epoch``. Extra keyword arguments go to :class:`torch.utils.data.DataLoader`
    (``num_workers``, ``pin_memory``, ``collate_fn``...).

    The state is ``(epoch, batches consumed in this epoch)``, counted as batches are handed
    to *your* loop, not as workers prefetch them, so a checkpoint never counts a batch the
    model has not seen.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        **loader_kwargs: Any,
    ) -> None:
        for bad in ("sampler", "batch_sampler", "generator"):
            if bad in loader_kwargs:
                raise TypeError(f"ResumableLoader chooses its own {bad}; do not pass {bad}=")
        if not isinstance(dataset, Sized):
            raise TypeError("ResumableLoader needs a map-style dataset with __len__")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.loader_kwargs = loader_kwargs
        self.epoch = 0
        self.batch_in_epoch = 0

    def __len__(self) -> int:
        """Batches in a whole epoch."""
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        sampler = EpochSampler(
            len(self.dataset),
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.shuffle,
            start=self.batch_in_epoch * self.batch_size,
        )
        # A private generator: without one, DataLoader draws its worker base seed from the
        # global torch RNG on every iter(), so a resumed run would shift every later draw.
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=self.drop_last,
            generator=generator,
            **self.loader_kwargs,
        )
        for batch in loader:
            self.batch_in_epoch += 1
            yield batch
        self.epoch += 1
        self.batch_in_epoch = 0

    def forever(self) -> Iterator[Any]:
        """Batches without end, epoch after epoch: for loops counted in steps."""
        while True:
            yield from self

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"checkpoint's data order was made with seed {state['seed']}, this loader has "
                f"seed {self.seed}; use the same seed to resume the same run"
            )
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
