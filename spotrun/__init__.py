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

from .checkpointer import Checkpointer
from .commit import CheckpointInfo, find_latest_valid, list_checkpoints, verify_checkpoint
from .data import ResumableLoader
from .errors import (
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
from .instance import InstanceInfo
from .state import seed_everything
from .layout import EXIT_FAILED, EXIT_FINISHED, EXIT_INTERRUPTED
from .storage import Storage, open_storage

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
