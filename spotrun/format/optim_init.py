"""A fresh optimizer's state for a sharded restore, sized from the checkpoint's DCP index.

Why: before a sharded (DCP) restore can load the optimizer's state, that state must exist
with this world size's shapes and placements. ``torch.distributed.checkpoint.state_dict``'s
``get_state_dict`` makes it for an optimizer that has none with ``_init_optim_state``: a
zero gradient for every trainable parameter, the learning rate set to 0, a full
``optimizer.step()``, then the gradients dropped. For AdamW that is a parameter-sized
allocation of gradients, both moments zero-filled, the step's own temporaries and about
eight passes over memory, all thrown away by the load that follows. Measured with
``scripts/bench_optim_init.py`` (2 CPU ranks, FSDP2, 85 MiB of parameters per rank, local
disk): the state to load into took 0.39-0.45 s with that step and 0.016 s without it, the
whole ``Checkpointer.restore()`` 0.48-0.63 s against 0.16-0.18 s, and a rank's peak RSS
above its start ~100 MiB less (the gradients and the step's temporaries). On a GPU that is
a memory spike at the moment a restart is least able to afford one. The fake step also
runs the optimizer's step hooks once, which this does not.

:func:`init_optimizer_state` makes the same state directly: for each trainable parameter,
the tensors the optimizer's first step would create, uninitialised (``empty_like`` of the
parameter: for a DTensor, this world size's sharding, into which DCP's load reshards)
and scalars where the optimizer keeps them (Adam's ``step``). Only the keys the checkpoint
holds with the parameter's global shape (or a scalar's) are made, so the load that follows
overwrites every element; ``set_state_dict`` then loads the state as it would after the
fake step (bit-exact: same keys, dtypes, devices and placements).

Limits (anything else keeps torch's fake step; the reason is logged at debug):

* optimizers whose first step was checked here: ``torch.optim.Adam``, ``AdamW`` (amsgrad,
  fused and capturable included) and ``SGD`` (with momentum; without it there is no state
  to make), exactly those classes, not subclasses, and not ``differentiable=True``;
* a trainable parameter whose state the checkpoint lacks, holds with another shape or as a
  non-tensor, or that the model does not name: the fake step then makes state that the
  load reports as missing, as before;
* only an optimizer with no state and no gradients (what ``_init_optim_state`` acts on);
  FSDP1 models (flat parameters, another naming) are left alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import _get_fqns
from torch.optim.optimizer import _get_scalar_dtype

__all__ = ["init_optimizer_state"]

log = logging.getLogger(__name__)

#: Where :func:`spotrun.format.sharded.get_state`'s optimizer state sits in DCP's index:
#: ``optim.state.<parameter FQN>.<state key>`` (DCP flattens nested keys with dots).
STATE_PREFIX = "optim.state."

# A per-parameter state value: a tensor like the parameter, or Adam's scalar step.
_LIKE, _STEP = "like", "step"


def _adam(group: Mapping[str, Any]) -> dict[str, str]:
    # torch.optim.Adam._init_group, in its order (the state dict keeps it).
    keys = {"step": _STEP, "exp_avg": _LIKE, "exp_avg_sq": _LIKE}
    if group["amsgrad"]:
        keys["max_exp_avg_sq"] = _LIKE
    return keys


def _sgd(group: Mapping[str, Any]) -> dict[str, str]:
    # torch.optim.SGD.step: the buffer is a clone of the first gradient, only with momentum.
    return {"momentum_buffer": _LIKE} if group["momentum"] != 0 else {}


#: Per optimizer class: the state its first step creates for a parameter with a gradient.
_CHECKED: dict[type, Callable[[Mapping[str, Any]], dict[str, str]]] = {
    torch.optim.Adam: _adam,
    torch.optim.AdamW: _adam,
    torch.optim.SGD: _sgd,
}


class _Misfit(Exception):
    """Why one optimizer keeps torch's fake step."""


def init_optimizer_state(
    model: torch.nn.Module,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
    metadata: Metadata,
) -> list[torch.optim.Optimizer]:
    """Give each stateless optimizer of ``model`` its state from the checkpoint's index
    ``metadata`` (:func:`~spotrun.format.sharded.read_metadata`) instead of torch's fake
    step (see the module docstring). Call it on a restore only, before building the state
    dict to load into; it runs no collective. Returns the optimizers given state; the
    others are left for the fake step, unchanged."""
    opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    fresh = [o for o in opts if not o.state and not _has_grads(o)]
    if not fresh:
        return []
    if _has_fsdp1(model):
        log.debug("sharded restore: FSDP1 model, the optimizer state is made by a step")
        return []
    names = _param_names(model)
    saved = metadata.state_dict_metadata
    done = []
    for optim in fresh:
        try:
            plan = _plan(optim, names, saved)
        except _Misfit as why:
            log.debug("sharded restore: %s state made by torch's zero-gradient step: %s",
                      type(optim).__name__, why)
            continue
        for param, group, keys in plan:
            optim.state[param] = {key: _make(param, group, kind) for key, kind in keys.items()}
        done.append(optim)
        log.debug("sharded restore: %s state of %d parameters made from the checkpoint's "
                  "index", type(optim).__name__, len(plan))
    return done


def _has_grads(optim: torch.optim.Optimizer) -> bool:
    # _init_optim_state leaves an optimizer whose parameters have gradients alone.
    return any(p.grad is not None for g in optim.param_groups for p in g["params"])


def _has_fsdp1(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # pragma: no cover - torch without FSDP
        return False
    return any(isinstance(m, FSDP1) for m in model.modules())


def _param_names(model: torch.nn.Module) -> dict[torch.Tensor, str]:
    """parameter -> the FQN ``get_state_dict`` keys its optimizer state by (its mapping:
    ``named_parameters`` through ``_get_fqns``, which drops DDP's ``module.``, compile's
    ``_orig_mod.`` and activation checkpointing's prefixes; a tied parameter once)."""
    names: dict[torch.Tensor, str] = {}
    for key, param in model.named_parameters():
        fqns = _get_fqns(model, key)
        if len(fqns) == 1:
            names[param] = next(iter(fqns))
    return names


def _plan(optim: torch.optim.Optimizer, names: Mapping[torch.Tensor, str],
          saved: Mapping[str, Any]) -> list[tuple[torch.Tensor, Mapping[str, Any], dict[str, str]]]:
    """(parameter, its group, state keys and kinds) for every parameter the fake step would
    give state; raises _Misfit when any of it cannot be made from ``saved``."""
    keys_of = _CHECKED.get(type(optim))
    if keys_of is None:
        raise _Misfit(f"{type(optim).__name__}'s state is not one spotrun has checked")
    plan = []
    for group in optim.param_groups:
        if group.get("differentiable"):
            raise _Misfit("differentiable=True")
        keys = keys_of(group)
        for param in group["params"]:
            if not keys or not param.requires_grad:
                continue  # no state after the fake step (a frozen parameter gets no grad)
            name = names.get(param)
            if name is None:
                raise _Misfit("a parameter the model does not name")
            for key, kind in keys.items():
                want = () if kind == _STEP else tuple(param.shape)
                meta = saved.get(f"{STATE_PREFIX}{name}.{key}")
                if not isinstance(meta, TensorStorageMetadata):
                    raise _Misfit(f"{name}.{key} is not a tensor in the checkpoint")
                if tuple(meta.size) != want:
                    raise _Misfit(f"{name}.{key} has shape {tuple(meta.size)}, not {want}")
                if sum(math.prod(c.sizes) for c in meta.chunks) != math.prod(want):
                    # The load would leave part of the uninitialised tensor as it is.
                    raise _Misfit(f"{name}.{key}'s saved chunks do not cover it")
            plan.append((param, group, keys))
    if not plan:
        raise _Misfit("no parameter has state to make")
    return plan


def _make(param: torch.Tensor, group: Mapping[str, Any], kind: str) -> torch.Tensor:
    """One state value as the optimizer's first step creates it, left uninitialised where
    the load overwrites it whole."""
    if kind == _LIKE:
        return torch.empty_like(param, memory_format=torch.preserve_format)
    # Adam's step: on the parameter's device when capturable or fused, else on the CPU.
    fused = group.get("fused")
    if group.get("capturable") or fused:
        return torch.zeros((), dtype=_get_scalar_dtype(is_fused=fused), device=param.device)
    return torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
