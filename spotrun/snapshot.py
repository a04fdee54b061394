"""Training state <-> payload files.

A payload is one ``torch.save`` file per rank (``rank-00000.pt``), holding nested dicts of
tensors and plain values. Written through :meth:`Storage.open_write`, so its size and sha256
are known when the write ends and the commit never re-reads it. Read back with
``weights_only=True`` by default (a bucket is not a trusted code source), memory-mapped when
the file is on local disk, and verified against the manifest before anything is loaded.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Mapping
from typing import Any

import torch

from .errors import CheckpointError, ConfigError, CorruptCheckpointError
from .layout import checkpoint_dir
from .manifest import FileEntry
from .storage import Storage

__all__ = ["check_plain", "payload_name", "read_payload", "write_payload"]

_PLAIN = (type(None), bool, int, float, str, bytes, torch.Tensor)


def payload_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def check_plain(name: str, value: Any) -> None:
    """Refuse, at save time, a value that a ``weights_only`` load would refuse later.

    Failing now keeps the mistake from surfacing only at resume, when the run is stuck.
    """
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(f"{name}[{i}]", v)
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ConfigError(f"value {name!r} has a key of type {type(k).__name__}; use str or int keys")
            check_plain(f"{name}[{k!r}]", v)
        return
    raise ConfigError(
        f"value {name!r} is a {type(value).__name__}, which safe (weights_only) loading "
        "refuses; store plain numbers, strings, lists, dicts or tensors (e.g. float(x))"
    )


def write_payload(storage: Storage, step: int, rank: int, payload: Mapping[str, Any]) -> tuple[str, FileEntry]:
    """Write one rank's payload for ``step``; returns its file name and manifest entry."""
    name = payload_name(rank)
    with storage.open_write(f"{checkpoint_dir(step)}/{name}") as f:
        torch.save(dict(payload), f)
    return name, FileEntry(size=f.size, sha256=f.sha256)


def read_payload(
    storage: Storage, step: int, name: str, entry: FileEntry, *, weights_only: bool = True
) -> dict[str, Any]:
    """Load one payload file after checking it against its manifest entry.

    Raises CorruptCheckpointError when the bytes do not match, so the caller can fall back
    to an older checkpoint.
    """
    rel = f"{checkpoint_dir(step)}/{name}"
    where = storage.display(rel)
    local = storage.local_path(rel)
    if local is not None:
        _check_local_file(local, entry, where)
        source: Any = local
        mmap = True  # pages come in as load_state_dict copies them: no second copy in RAM
    else:
        data = storage.read_bytes(rel)
        _check_digest(len(data), hashlib.sha256(data).hexdigest(), entry, where)
        source, mmap = io.BytesIO(data), False
    try:
        payload = torch.load(source, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"{where}: safe loading (weights_only=True) refused it: {first}; if you trust "
            "this storage, pass weights_only=False"
        ) from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CorruptCheckpointError(f"{where}: cannot be read ({exc})") from exc
    if not isinstance(payload, dict):
        raise CorruptCheckpointError(f"{where}: holds a {type(payload).__name__}, not a spotrun payload")
    return payload


def _check_local_file(path: str, entry: FileEntry, where: str) -> None:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            size += len(chunk)
    _check_digest(size, h.hexdigest(), entry, where)


def _check_digest(size: int, digest: str, entry: FileEntry, where: str) -> None:
    if size != entry.size:
        raise CorruptCheckpointError(f"{where}: {size} bytes, manifest says {entry.size} (truncated)")
    if digest != entry.sha256:
        raise CorruptCheckpointError(f"{where}: sha256 does not match the manifest (corrupted)")
