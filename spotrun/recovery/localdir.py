"""Where this machine keeps its copies of a run's checkpoints: the one place both the local
copy (:mod:`.local`) and the peer channel (:mod:`.peer`) learn the directory and a run's key.

``SPOTRUN_LOCAL_DIR``: unset means the default (memory, where ``/dev/shm`` exists), ``off``
(or ``0``, ``none``, ``false``) means no copies on this machine at all (and so no peer copies).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from ..config import env_str

__all__ = ["DEFAULT_LOCAL_DIR", "LOCAL_DIR_ENV", "local_dir_from_env", "room", "run_key"]

LOCAL_DIR_ENV = "SPOTRUN_LOCAL_DIR"
#: In memory where the machine has one; off (``SPOTRUN_LOCAL_DIR=off``) where memory is short.
DEFAULT_LOCAL_DIR = "/dev/shm/spotrun"


def local_dir_from_env() -> str | None:
    """The directory ``SPOTRUN_LOCAL_DIR`` asks for, or None for no copies."""
    raw = env_str(LOCAL_DIR_ENV)
    if raw is not None and raw.strip().lower() in ("off", "0", "none", "false"):
        return None
    directory = raw or DEFAULT_LOCAL_DIR
    if raw is None and not Path(directory).parent.is_dir():
        return None  # no /dev/shm (macOS): no default copy
    return directory


def run_key(run_url: str) -> str:
    """A run's folder name under the directory (its URL's hash: no separators, no secrets)."""
    return hashlib.sha256(run_url.encode()).hexdigest()[:16]


#: Free space to keep beyond a copy itself, so a copy never fills a tmpfs to the brim.
HEADROOM = 1.10
#: What a copy never takes from the device: a quarter of it (other users of /dev/shm: NCCL,
#: dataloaders), but at most this much (on a large shared disk a quarter is far more than
#: anyone needs, and would refuse a copy of a few MiB with tens of GiB free).
KEEP_FREE_SHARE = 0.25
KEEP_FREE_MAX = 8 << 30


def room(directory: str | os.PathLike[str], nbytes: int) -> tuple[bool, int, int]:
    """Whether ``nbytes`` more fit in ``directory``'s device under the room rule, and the
    device's free and total bytes (for the message that says why not)."""
    usage = shutil.disk_usage(directory)
    keep = min(int(usage.total * KEEP_FREE_SHARE), KEEP_FREE_MAX)
    return usage.free - int(nbytes * HEADROOM) >= keep, usage.free, usage.total
