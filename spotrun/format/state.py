"""What a checkpoint holds: stateful objects, random-number generators, plain values.

A resumed run is only the *same* run if everything that influences the next step comes back:
weights and optimizer moments, but also the LR schedule, the loss scaler, the data position
and every RNG (dropout masks, shuffles). This module collects and re-applies all of it.
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import ConfigError, IncompatibleCheckpointError

__all__ = [
    "Stateful",
    "collect_rng_state",
    "load_object_state",
    "restore_rng_state",
    "seed_everything",
    "unwrap",
]


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()``/``load_state_dict()``: modules, optimizers, LR
    schedulers, ``GradScaler``, samplers, your own classes."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


def unwrap(obj: Any) -> Any:
    """The object whose state is saved: a DDP/DataParallel model's inner module, a
    ``torch.compile`` model's original module, so checkpoints load with or without wrappers."""
    while True:
        if isinstance(obj, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            obj = obj.module
        elif isinstance(obj, torch.nn.Module) and hasattr(obj, "_orig_mod"):
            obj = obj._orig_mod
        else:
            return obj


def check_stateful(name: str, obj: Any) -> None:
    if not isinstance(obj, Stateful):
        raise ConfigError(
            f"{name!r} ({type(obj).__name__}) has no state_dict()/load_state_dict(); pass it "
            "in values= if it is a plain value, or give it those two methods"
        )


def _shape_problems(name: str, expected: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    problems = []
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(map(repr, missing[:5]))}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"not in the model: {', '.join(map(repr, unexpected[:5]))}"
                        + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    for key, want in expected.items():
        got = saved.get(key)
        if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and got.shape != want.shape:
            problems.append(
                f"{name}.{key}: checkpoint has shape {tuple(got.shape)}, "
                f"model expects {tuple(want.shape)}"
            )
    return problems


def load_object_state(name: str, obj: Any, saved: Any) -> None:
    """Load ``saved`` into ``obj``, turning a mismatch into one clear error naming the key."""
    target = unwrap(obj)
    if isinstance(target, torch.nn.Module):
        problems = _shape_problems(name, target.state_dict(), saved)
        if problems:
            raise IncompatibleCheckpointError(
                f"checkpoint does not fit {name!r}: {'; '.join(problems)}; load it into the "
                "model it was saved from, or start a new run URL"
            )
    try:
        target.load_state_dict(saved)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IncompatibleCheckpointError(
            f"checkpoint does not fit {name!r} ({type(target).__name__}): {first}"
        ) from exc


# -- random number generators ------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy (when installed), torch and every CUDA device.

    Two runs are only comparable if every generator they draw from starts the same way;
    an unseeded one starts from OS entropy in each process.
    """
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)



def collect_rng_state() -> dict[str, Any]:
    """Every global RNG this process may draw from, in a form ``weights_only`` loads accept."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np = sys.modules.get("numpy")  # only if the user's code imported it
    if np is not None:
        st = np.random.get_state(legacy=False)
        state["numpy"] = {
            "bit_generator": st["bit_generator"],
            # ndarrays are not on the weights_only allow-list; a tensor is.
            "key": torch.from_numpy(st["state"]["key"].astype("int64")),
            "pos": int(st["state"]["pos"]),
            "has_gauss": int(st["has_gauss"]),
            "gauss": float(st["gauss"]),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        st = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": st["bit_generator"],
                "state": {"key": st["key"].numpy().astype("uint32"), "pos": st["pos"]},
                "has_gauss": st["has_gauss"],
                "gauss": st["gauss"],
            }
        )
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) != torch.cuda.device_count():
            # Per-device streams cannot be mapped onto a different GPU count meaningfully.
            logging.getLogger(__name__).warning(
                "checkpoint has CUDA RNG state for %d devices, this machine has %d; "
                "restoring the first %d (dropout on the rest will differ from the original run)",
                len(saved), torch.cuda.device_count(), min(len(saved), torch.cuda.device_count()),
            )
        for i, s in enumerate(saved[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device=i)
