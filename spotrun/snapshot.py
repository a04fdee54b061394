"""Training state <-> payload files.

A payload is one ``torch.save`` file per rank (``rank-00000.pt``), holding nested dicts of
tensors and plain values. Written through :meth:`Storage.open_write`, so its size and sha256
are known when the write ends and the commit never re-reads it. Read back with
``weights_only=True`` by default (a bucket is not a trusted code source), memory-mapped when
the file is on local disk, and verified against the manifest before anything is loaded.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import threading
from collections.abc import Mapping
from typing import Any

import torch

from .errors import CheckpointError, ConfigError, CorruptCheckpointError
from .layout import checkpoint_dir
from .manifest import FileEntry
from .storage import Storage

__all__ = [
    "StagingBuffers",
    "Verification",
    "check_plain",
    "open_payload",
    "payload_name",
    "read_payload",
    "write_payload",
]

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


class StagingBuffers:
    """Host copies of the state's tensors, allocated once and reused by every save.

    The first phase of an async save: :meth:`stage` copies every tensor of a state tree into
    these buffers (pinned host memory for CUDA tensors, copied with ``non_blocking=True``
    and one synchronisation at the end), so training may change the live tensors while a
    background thread writes the copies. Extra host memory is one copy of the state, held
    for the life of the run rather than re-allocated (and page-faulted) at every save.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def stage(self, tree: Any) -> Any:
        """A copy of ``tree`` whose tensors live in this object's buffers."""
        cuda = [False]
        staged = self._copy(tree, (), cuda)
        if cuda[0]:
            torch.cuda.synchronize()  # the non-blocking copies must land before the write
        return staged

    def _copy(self, node: Any, path: tuple[Any, ...], cuda: list[bool]) -> Any:
        if isinstance(node, torch.Tensor):
            return self._stage_tensor(node, path, cuda)
        if isinstance(node, Mapping):
            out = {k: self._copy(v, (*path, k), cuda) for k, v in node.items()}
            if isinstance(node, collections.OrderedDict):
                # Module state dicts carry per-submodule versions in ``_metadata``; keep it
                # (and the type) so async and sync saves write identical bytes.
                out = collections.OrderedDict(out)
                if hasattr(node, "_metadata"):
                    out._metadata = node._metadata  # type: ignore[attr-defined]
            return out
        if isinstance(node, list):
            return [self._copy(v, (*path, i), cuda) for i, v in enumerate(node)]
        if isinstance(node, tuple):
            return tuple(self._copy(v, (*path, i), cuda) for i, v in enumerate(node))
        return node  # ints, floats, strings, None: immutable, safe to share

    def _stage_tensor(self, t: torch.Tensor, path: tuple[Any, ...], cuda: list[bool]) -> torch.Tensor:
        t = t.detach()
        buf = self._buffers.get(path)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = t.is_cuda and torch.cuda.is_available()
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            self._buffers[path] = buf
        if t.is_cuda:
            cuda[0] = True
            buf.copy_(t, non_blocking=True)
        else:
            buf.copy_(t)
        return buf


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
    payload, verification = open_payload(storage, step, name, entry, weights_only=weights_only)
    verification.check()
    return payload


class Verification:
    """A sha256/size check running beside the load; :meth:`check` waits and raises on damage.

    hashlib releases the GIL on large buffers, so the hash really runs in parallel with
    ``torch.load`` and ``load_state_dict``: restore costs about max(hash, load), not the sum.
    """

    def __init__(self, fn: Any) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="spotrun-verify", daemon=True)
        self._thread.start()

    def _run(self, fn: Any) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = exc

    def check(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def open_payload(
    storage: Storage, step: int, name: str, entry: FileEntry, *, weights_only: bool = True
) -> tuple[dict[str, Any], Verification]:
    """Start loading one payload while its bytes are verified; returns both.

    The payload must not be trusted (or kept) until ``Verification.check()`` returned.
    Local files are memory-mapped (pages come in as ``load_state_dict`` copies them, no
    second copy in RAM); remote ones are read whole (parallel ranged GETs on S3) and loaded
    from that buffer without another copy.
    """
    rel = f"{checkpoint_dir(step)}/{name}"
    where = storage.display(rel)
    local = storage.local_path(rel)
    if local is not None:
        size = os.path.getsize(local)
        if size != entry.size:  # cheap, and torch.load would choke on a truncated file anyway
            raise CorruptCheckpointError(f"{where}: {size} bytes, manifest says {entry.size} (truncated)")
        verification = Verification(lambda: _check_digest(*storage.sha256(rel), entry, where))
        source: Any = local
        use_mmap = True
    else:
        data = storage.read_bytes(rel)
        _check_size(len(data), entry, where)
        verification = Verification(lambda: _check_digest(len(data), hashlib.sha256(data).hexdigest(), entry, where))
        source, use_mmap = _BufferReader(data), False
    try:
        payload = torch.load(source, map_location="cpu", weights_only=weights_only, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        verification.check()  # damage explains a refusal better than the refusal does
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"{where}: safe loading (weights_only=True) refused it: {first}; if you trust "
            "this storage, pass weights_only=False"
        ) from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        verification.check()
        raise CorruptCheckpointError(f"{where}: cannot be read ({exc})") from exc
    if not isinstance(payload, dict):
        verification.check()
        raise CorruptCheckpointError(f"{where}: holds a {type(payload).__name__}, not a spotrun payload")
    return payload, verification


class _BufferReader(io.RawIOBase):
    """A seekable read-only file over a buffer, without the copy ``io.BytesIO`` makes."""

    def __init__(self, buffer: bytes | bytearray) -> None:
        self._view = memoryview(buffer).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        b[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _check_size(size: int, entry: FileEntry, where: str) -> None:
    if size != entry.size:
        raise CorruptCheckpointError(f"{where}: {size} bytes, manifest says {entry.size} (truncated)")


def _check_digest(size: int, digest: str, entry: FileEntry, where: str) -> None:
    _check_size(size, entry, where)
    if digest != entry.sha256:
        raise CorruptCheckpointError(f"{where}: sha256 does not match the manifest (corrupted)")
