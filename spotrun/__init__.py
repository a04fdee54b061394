"""spotrun: PyTorch training that survives spot interruptions, and a bill that says what spot saved.

The public API::

    from spotrun import Checkpointer, ResumableLoader

    with Checkpointer(model=model, optimizer=opt, scheduler=sched, data=loader,
                      every_steps=100) as ckpt:
        batches = loader.forever()
        for step in ckpt.range(total_steps):
            train_step(next(batches))
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from ._lazy import lazy_names

# Importing spotrun must stay cheap: the CLI's --help, the fake metadata server and the
# launcher do not need torch. Names load from their modules on first use.
_EXPORTS = {
    "Checkpointer": ".checkpoint",
    "CheckpointInfo": ".format.commit",
    "find_latest_valid": ".format.commit",
    "list_checkpoints": ".format.commit",
    "verify_checkpoint": ".format.commit",
    "ResumableLoader": ".checkpoint.data",
    "InstanceInfo": ".records.instance",
    "EXIT_FAILED": ".records.layout",
    "EXIT_FINISHED": ".records.layout",
    "EXIT_INTERRUPTED": ".records.layout",
    "seed_everything": ".format.state",
    "Storage": ".storage",
    "open_storage": ".storage",
}

from .errors import (  # noqa: E402 - errors are light and needed everywhere
    CapacityError,
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    CostError,
    CredentialsError,
    IncompatibleCheckpointError,
    LaunchError,
    NoCheckpointError,
    NoticeError,
    PriceUnavailableError,
    SaveError,
    SpotrunError,
    StorageError,
    StorageNotFoundError,
    StorageURLError,
    UnsupportedFormatError,
)

if TYPE_CHECKING:
    from .checkpoint import Checkpointer
    from .checkpoint.data import ResumableLoader
    from .format.commit import CheckpointInfo, find_latest_valid, list_checkpoints, verify_checkpoint
    from .format.state import seed_everything
    from .records.instance import InstanceInfo
    from .records.layout import EXIT_FAILED, EXIT_FINISHED, EXIT_INTERRUPTED
    from .storage import Storage, open_storage


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, globals())


__all__ = [
    "EXIT_FAILED",
    "EXIT_FINISHED",
    "EXIT_INTERRUPTED",
    "CapacityError",
    "CheckpointError",
    "CheckpointInfo",
    "Checkpointer",
    "ConfigError",
    "CorruptCheckpointError",
    "CostError",
    "CredentialsError",
    "IncompatibleCheckpointError",
    "InstanceInfo",
    "LaunchError",
    "NoCheckpointError",
    "NoticeError",
    "PriceUnavailableError",
    "ResumableLoader",
    "SaveError",
    "SpotrunError",
    "Storage",
    "StorageError",
    "StorageNotFoundError",
    "StorageURLError",
    "UnsupportedFormatError",
    "__version__",
    "find_latest_valid",
    "list_checkpoints",
    "open_storage",
    "seed_everything",
    "verify_checkpoint",
]
