"""A data loader that resumes mid-epoch at the next unseen batch, in the original order.

The usual ways to resume a DataLoader either restart the epoch (replaying batches the model
already trained on) or iterate and throw away the consumed batches (reading data for
nothing, minutes on a large epoch). :class:`ResumableLoader` instead derives each epoch's
order from ``(seed, epoch)`` alone, and starts its sampler at the saved offset: no batch is
read twice, none is skipped, and the global RNG is never touched, so dropout and other
random draws in the training step are not shifted by loader bookkeeping.

Under DDP it also replaces :class:`~torch.utils.data.distributed.DistributedSampler`: each
rank reads its own part of the one global order, and the saved position counts the samples
all ranks consumed together, so a run resumed on a different number of ranks carries on
with exactly the next unread samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from ..errors import ConfigError, LoaderUsageError

__all__ = ["EpochSampler", "ResumableLoader", "rank_seed"]


class EpochSampler(Sampler[int]):
    """One rank's indices of one epoch, shuffled by ``(seed, epoch)``, from position ``start``.

    The epoch's global order is a permutation of ``range(n)`` that depends on
    ``(seed, epoch)`` only. From global position ``start``, the rest of that order is dealt
    out like cards: rank ``r`` of ``world_size`` gets every ``world_size``-th sample starting
    with the ``r``-th (what :class:`~torch.utils.data.distributed.DistributedSampler` does).
    So ``world_size`` ranks taking ``batch_size`` samples each per step consume the global
    order in contiguous blocks of ``world_size * batch_size``, whatever the world size.

    The remainder (the rest of the epoch does not split evenly): with ``drop_last`` the rest
    is cut to whole steps of ``world_size * batch_size`` samples (the same batches
    DataLoader's ``drop_last`` keeps, in lockstep on every rank); without it the rest is
    padded to a multiple of ``world_size`` with the first samples of the epoch's order, as
    DistributedSampler pads. With one rank neither changes anything.
    """

    def __init__(self, n: int, *, seed: int, epoch: int, shuffle: bool, start: int,
                 rank: int = 0, world_size: int = 1, batch_size: int = 1,
                 drop_last: bool = False) -> None:
        self.n, self.seed, self.epoch, self.shuffle, self.start = n, seed, epoch, shuffle, start
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.drop_last = batch_size, drop_last

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator()
        # Large odd multiplier keeps (seed, epoch) pairs from colliding for small seeds.
        g.manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        return torch.randperm(self.n, generator=g)

    def indices(self) -> torch.Tensor:
        """This rank's share of the global order from ``start`` on, tail rule applied."""
        order = self.order()
        rest = order[self.start :]
        world = self.world_size
        if self.drop_last:
            step = world * self.batch_size
            rest = rest[: len(rest) // step * step]
        elif len(rest) % world:
            short = world - len(rest) % world
            # Wrap around as often as needed: more ranks than samples still gives each one.
            reps = -(-short // self.n)
            rest = torch.cat([rest, order.repeat(reps)[:short]])
        return rest[self.rank :: world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        rest = max(0, self.n - self.start)
        if self.drop_last:
            return rest // (self.world_size * self.batch_size) * self.batch_size
        return (rest + self.world_size - 1) // self.world_size


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for ``rank`` at ``step`` of the run seeded ``seed``: deterministic.

    For ranks that resume with no RNG state of their own (more ranks than saved the
    checkpoint): ``spotrun.seed_everything(rank_seed(seed, rank, step))`` gives each such
    rank a stream of its own, the same every time that checkpoint is resumed on that many
    ranks. A hash, not arithmetic, so nearby (seed, rank, step) give unrelated streams.
    """
    digest = hashlib.sha256(f"spotrun-rank-seed:{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


class ResumableLoader:
    """Iterate a dataset in batches, epoch after epoch, resumable at any batch.

    Use it like a DataLoader, and pass it to the :class:`~spotrun.Checkpointer` (it is
    stateful): ``for batch in loader`` yields the rest of the current epoch, then advances
    ``loader.epoch``. Extra keyword arguments go to :class:`torch.utils.data.DataLoader`
    (``num_workers``, ``pin_memory``, ``collate_fn``...).

    **Ranks.** Under DDP, give every rank the whole dataset (no ``Subset``, no
    DistributedSampler): rank ``rank`` of ``world_size`` reads its own part of the epoch's
    one global order, ``batch_size`` samples per batch, and every rank gets the same number
    of batches, so DDP's collectives line up. ``rank`` and ``world_size`` default to
    ``torch.distributed``'s when a process group is initialised (looked up when iteration
    starts), else 0 and 1; explicit values win. Every rank must take its batches in
    lockstep, one per step, as a DDP loop does.

    **The remainder.** When the rest of an epoch does not split evenly: with
    ``drop_last=True`` the samples that do not fill a whole step of ``world_size *
    batch_size`` are not read this epoch (every batch on every rank is full, DataLoader's
    ``drop_last`` carried over to the whole step); with ``drop_last=False`` (the default)
    every sample is read, and the last few ranks' shares are padded with the first samples
    of the epoch's order (at most ``world_size - 1`` of them read twice), as
    DistributedSampler pads, so the last batches may be short but no rank has one batch
    more than another. Either way the next epoch reshuffles, so a dropped sample is a
    different one each epoch. With one rank neither rule changes anything.

    **Peeking is harmless.** A batch counts as consumed once your loop comes back to the
    same iterator for the next one, or calls :meth:`mark_consumed` (the Checkpointer's
    ``step()`` does). A batch that neither happened to is given back when a new iterator
    starts: ``next(iter(loader))`` to look at a batch's shape, or a ``for`` loop left with
    ``break`` before its batch was used, leaves the next loop starting at that same batch,
    as with a DataLoader. One loader keeps one position: an iterator that a newer
    ``iter(loader)`` replaced raises if it is used again.

    **The state** is ``epoch``, ``position`` (samples of the epoch consumed by all ranks
    together, counted as batches are handed to *your* loop, not as workers prefetch them, so
    a checkpoint never counts a batch the model has not seen), ``batch_in_epoch`` (steps
    taken in this epoch) and ``seed``. It is the same on every rank, and does not depend on
    the number of ranks: a run resumed on a different ``world_size`` (or ``batch_size``)
    carries on with the next unread samples of the same global order, none read twice, none
    skipped (up to the remainder rule above). A state saved without ``position`` (by an
    older spotrun, one process) resumes at ``batch_in_epoch * batch_size``.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        **loader_kwargs: Any,
    ) -> None:
        for bad in ("sampler", "batch_sampler", "generator"):
            if bad in loader_kwargs:
                raise LoaderUsageError(f"ResumableLoader chooses its own {bad}; do not pass {bad}=")
        if not isinstance(dataset, Sized):
            raise LoaderUsageError("ResumableLoader needs a map-style dataset with __len__")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.loader_kwargs = loader_kwargs
        self._rank, self._world_size = rank, world_size
        self.epoch = 0
        self.batch_in_epoch = 0
        self.position = 0
        # (position, batch_in_epoch) before the last batch handed out, while that batch is
        # not known to be used: a new iterator gives it back (see "Peeking" above).
        self._unconfirmed: tuple[int, int] | None = None
        self._generation = 0  # of the newest iterator; older ones are stale
        if rank is not None or world_size is not None:
            _ = self.rank  # a bad explicit value fails here, not at the first batch

    @property
    def world_size(self) -> int:
        """Ranks sharing the data: the explicit value, else torch.distributed's, else 1."""
        if self._world_size is not None:
            world = self._world_size
        elif dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
        else:
            world = 1
        if world < 1:
            raise ConfigError(f"ResumableLoader world_size={world}; pass world_size >= 1")
        return world

    @property
    def rank(self) -> int:
        """This process's share of the data: the explicit value, else torch.distributed's."""
        if self._rank is not None:
            rank = self._rank
        elif dist.is_available() and dist.is_initialized():
            rank = dist.get_rank()
        else:
            rank = 0
        world = self.world_size
        if not 0 <= rank < world:
            raise ConfigError(
                f"ResumableLoader rank={rank} is outside 0..{world - 1} (world_size={world}); "
                "pass a rank below world_size"
            )
        return rank

    def _sampler(self, start: int) -> EpochSampler:
        return EpochSampler(
            len(self.dataset),
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.shuffle,
            start=start,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
        )

    def __len__(self) -> int:
        """Batches in a whole epoch (on this rank, every rank has as many)."""
        samples = len(self._sampler(0))
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        if self._unconfirmed is not None:
            # The last batch handed out was never used (a peek): serve it again.
            self.position, self.batch_in_epoch = self._unconfirmed
            self._unconfirmed = None
        self._generation += 1
        return self._epoch(self._generation)

    def mark_consumed(self) -> None:
        """Count every batch handed out so far as consumed (a training step used them).

        The :class:`~spotrun.Checkpointer` calls this at every ``step()``; call it yourself
        only when you use the loader without one and leave an iterator after using its
        last batch.
        """
        self._unconfirmed = None

    def _stale(self, generation: int) -> None:
        if generation != self._generation:
            raise LoaderUsageError(
                "this ResumableLoader iterator was replaced by a newer iter(loader): one loader "
                "keeps one position, so iterate only the newest iterator (or use a second "
                "ResumableLoader for a second stream)")

    def _epoch(self, generation: int) -> Iterator[Any]:
        sampler = self._sampler(self.position)
        rank = sampler.rank
        # One step moves every rank one batch on: the global position moves by the whole
        # step, the same on every rank whatever the size of this rank's own batch.
        step = sampler.world_size * self.batch_size
        # A private generator: without one, DataLoader draws its worker base seed from the
        # global torch RNG on every iter(), so a resumed run would shift every later draw.
        # Each rank's workers get seeds of their own; rank 0 keeps the one-process seed.
        worker_seed = self.seed * 7919 + self.epoch
        if rank:
            worker_seed = (worker_seed + rank * 1_000_000_007) % (2**63)
        generator = torch.Generator().manual_seed(worker_seed)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=self.drop_last,
            generator=generator,
            **self.loader_kwargs,
        )
        n = len(self.dataset)
        for batch in loader:
            self._stale(generation)
            self._unconfirmed = (self.position, self.batch_in_epoch)
            self.batch_in_epoch += 1
            self.position = min(n, self.position + step)
            yield batch
            self._stale(generation)
            self._unconfirmed = None  # the loop came back for more: that batch was used
        self._stale(generation)
        self._unconfirmed = None
        self.epoch += 1
        self.batch_in_epoch = 0
        self.position = 0

    def forever(self) -> Iterator[Any]:
        """Batches without end, epoch after epoch: for loops counted in steps."""
        while True:
            yield from self

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ConfigError(
                f"checkpoint's data order was made with seed {state['seed']}, this loader has "
                f"seed {self.seed}; use the same seed to resume the same run"
            )
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self._unconfirmed = None  # a batch peeked before the restore is not this position's
        # Saved before positions were global: one process, whole batches of this size.
        self.position = int(state.get("position", self.batch_in_epoch * self.batch_size))
