"""What a :class:`~spotrun.Checkpointer` saves: its named objects, per-rank objects and
plain values, and whether the model and optimizer go through DCP (sharded runs).

Names: ``model=m`` is saved as ``"model"``, ``model=[a, b]`` as ``"model.0"``, ``"model.1"``
(the same for optimizer, scheduler, scaler and data); ``objects=`` and ``per_rank=`` keep
the names they are given. Rank 0's payload holds the objects (all but model and optimizer
when sharded) and the values; every rank's payload holds its per-rank objects and RNGs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..distributed import Group
from ..errors import ConfigError
from ..format.snapshot import check_loadable, check_plain
from ..format.state import check_stateful, collect_rng_state, unwrap

__all__ = ["TrainingState"]

log = logging.getLogger(__name__)

#: A model can hold sharded state only once one of these is imported (by FSDP2, FSDP1, TP).
_SHARDING_MODULES = ("torch.distributed.tensor", "torch.distributed.fsdp",
                     "torch.distributed._shard")


def _named(kind: str, obj: Any) -> dict[str, Any]:
    """``model=m`` -> {"model": m}; ``model=[a, b]`` -> {"model.0": a, "model.1": b}."""
    if obj is None:
        return {}
    if isinstance(obj, (list, tuple)):
        return {f"{kind}.{i}": o for i, o in enumerate(obj)}
    return {kind: obj}


class TrainingState:
    """The state one Checkpointer saves and restores (see the module docstring)."""

    def __init__(
        self,
        *,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        scaler: Any,
        data: Any,
        objects: Mapping[str, Any] | None,
        per_rank: Mapping[str, Any] | None,
        values: Mapping[str, Any] | None,
        sharded: bool | None,
    ) -> None:
        self.model_names = list(_named("model", model))
        self.optimizer_names = list(_named("optimizer", optimizer))
        self._sharded_arg = sharded
        #: True when model and optimizer state go through DCP (see :meth:`decide_sharded`).
        self.sharded = False
        #: The ShardedSaver of a sharded run, once started: it keeps the state dict it built.
        self.sharded_saver: Any = None
        self.objects: dict[str, Any] = {}
        for group in (
            _named("model", model),
            _named("optimizer", optimizer),
            _named("scheduler", scheduler),
            _named("scaler", scaler),
            dict(objects or {}),
        ):
            self.objects.update(group)
        self.per_rank: dict[str, Any] = {**_named("data", data), **dict(per_rank or {})}
        clash = set(self.objects) & set(self.per_rank)
        if clash:
            raise ConfigError(f"names used twice: {sorted(clash)}; give each object one name")
        for name, obj in {**self.objects, **self.per_rank}.items():
            check_stateful(name, unwrap(obj))
        self.values: dict[str, Any] = dict(values or {})

    def decide_sharded(self) -> bool:
        """Whether model and optimizer go through DCP: ``sharded=`` when given, else
        whether the model holds DTensors / ShardedTensors. Sets :attr:`sharded`."""
        self.sharded = self._detect_sharded()
        return self.sharded

    def _detect_sharded(self) -> bool:
        if self._sharded_arg is False:
            return False
        if not self._sharded_arg and not any(m in sys.modules for m in _SHARDING_MODULES):
            # No DTensor / FSDP / ShardedTensor class was ever imported, so no model holds
            # one: skip importing DCP (about a second, paid again at every restart).
            return False
        from ..format.sharded import is_sharded

        detected = any(is_sharded(unwrap(self.objects[n])) for n in self.model_names)
        if not (detected or self._sharded_arg):
            return False
        if len(self.model_names) != 1:
            raise ConfigError(
                f"sharded checkpoints take exactly one model, got {len(self.model_names)}; "
                "wrap the models in one nn.Module (or pass sharded=False)"
            )
        log.info("sharded model: model and optimizer state go through "
                 "torch.distributed.checkpoint, every rank writing its own shards")
        return True

    def replicated(self) -> dict[str, Any]:
        """The objects saved in rank 0's payload (all but model and optimizer when sharded)."""
        if not self.sharded:
            return self.objects
        dcp_names = {*self.model_names, *self.optimizer_names}
        return {n: o for n, o in self.objects.items() if n not in dcp_names}

    def sharded_state(self) -> dict[str, Any]:
        """Model and optimizer state as DCP wants it: each rank's own shards, no gather."""
        from ..format.sharded import get_state

        model = unwrap(self.objects[self.model_names[0]])
        optimizers = [self.objects[n] for n in self.optimizer_names]
        if self.sharded_saver is not None:  # built once, reused while it fits (issue 24)
            return self.sharded_saver.state(model, optimizers)
        return get_state(model, optimizers)

    def sharded_target(self) -> tuple[Any, Sequence[Any], Callable[[], dict[str, Any]]] | None:
        """(model, optimizers, :meth:`sharded_state`) for a restore, when sharded."""
        if not self.sharded:
            return None
        return (unwrap(self.objects[self.model_names[0]]),
                [self.objects[n] for n in self.optimizer_names], self.sharded_state)

    def payload(self, group: Group, step: int, *, save_rng: bool, fmt: int) -> dict[str, Any]:
        """This rank's ``torch.save`` payload for ``step`` (format ``fmt``)."""
        payload: dict[str, Any] = {"format": fmt, "step": step}
        if group.is_main:
            payload["objects"] = {n: unwrap(o).state_dict() for n, o in self.replicated().items()}
            # Every entry is checked against what a weights_only load accepts (a walk, no
            # serialisation): state that saves but cannot load back would strand the run.
            for n, state in payload["objects"].items():
                check_loadable(f"{n}.state_dict()", state)
            for k, v in self.values.items():
                check_plain(k, v)
            payload["values"] = dict(self.values)
        payload["per_rank"] = {n: unwrap(o).state_dict() for n, o in self.per_rank.items()}
        for n, state in payload["per_rank"].items():
            check_loadable(f"{n}.state_dict()", state)
        if save_rng:
            payload["rng"] = collect_rng_state()
        return payload
