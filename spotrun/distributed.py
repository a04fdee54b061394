"""All ranks agreeing, under ``torch.distributed``, on when to save and when to stop.

A notice or a signal often reaches one rank only (the one whose node is reclaimed, or the one
the launcher signalled first). If that rank stopped alone, the others would block forever in
their next collective. Instead, every :meth:`Checkpointer.step` ends with one tiny all-reduce
of a few flags, so every rank sees the same decision at the same step. The cost is one
small collective per step, not one per tensor (see the README for the measured figure).

Without an initialised process group everything here degrades to a single process.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Group"]


class Group:
    """The process group a checkpointer runs in (world size 1 when not distributed)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self._dist.get_rank() if self._dist else 0
        self.world_size = self._dist.get_world_size() if self._dist else 1
        self._device = torch.device("cpu")
        if self._dist is not None and self._dist.get_backend() == "nccl":
            self._device = torch.device("cuda", torch.cuda.current_device())
        self._flags = torch.zeros(3, dtype=torch.int32, device=self._device)

    @property
    def distributed(self) -> bool:
        return self._dist is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree(self, *, stop: bool, save: bool, time_due: bool) -> tuple[bool, bool, bool]:
        """Each flag becomes True on every rank if it is True on any rank."""
        if self._dist is None:
            return stop, save, time_due
        self._flags[0], self._flags[1], self._flags[2] = int(stop), int(save), int(time_due)
        self._dist.all_reduce(self._flags, op=self._dist.ReduceOp.MAX)
        stop_all, save_all, time_all = (bool(v) for v in self._flags.tolist())
        return stop_all, save_all, time_all

    def barrier(self) -> None:
        if self._dist is not None:
            self._dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self._dist is None:
            return obj
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` as a list on rank 0; None elsewhere."""
        if self._dist is None:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        self._dist.gather_object(obj, out, dst=0)
        return out
