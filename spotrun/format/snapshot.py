"""Training state <-> payload files.

A payload is one ``torch.save`` file per rank (``rank-00000.pt``), holding nested dicts of
tensors and plain values. Written through :meth:`Storage.open_write`, so its size and chunk
checksums are known when the write ends and the commit never re-reads it. Read back with
``weights_only=True`` by default (a bucket is not a trusted code source), verified against
the manifest on every core *before* anything is loaded, then memory-mapped when the file is
on local disk, so ``load_state_dict`` copies straight from the file's pages into the live
tensors (no intermediate copy of the state).
"""

from __future__ import annotations

import collections
import io
import pickle
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import (
    CheckpointError,
    CorruptCheckpointError,
    UnloadableStateError,
)
from ..records.layout import checkpoint_dir
from ..storage import Storage, translate_errors
from . import checksum
from .manifest import FileEntry

__all__ = [
    "BufferReader",
    "StagingBuffers",
    "Verification",
    "check_loadable",
    "check_plain",
    "open_payload",
    "payload_name",
    "read_payload",
    "write_payload",
]

def payload_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


# What ``torch.load(weights_only=True)`` rebuilds without extra allow-listing. Exact types,
# not isinstance: a subclass (np.float64 is a float, a namedtuple a tuple, defaultdict a
# dict) is pickled by reference to its own class, which that load refuses.
_LEAVES = frozenset({
    type(None), bool, int, float, complex, str, bytes, bytearray,
    torch.Tensor, torch.nn.Parameter, torch.dtype, torch.device, torch.layout, torch.qscheme,
    torch.Size, torch.storage.UntypedStorage, torch.storage.TypedStorage,
})
_MAPPINGS = frozenset({dict, collections.OrderedDict, collections.Counter})
_SEQUENCES = frozenset({list, tuple, set})
# values= holds plain values only (no dtype/device/storage objects, str or int keys).
_PLAIN_LEAVES = frozenset({type(None), bool, int, float, str, bytes, torch.Tensor, torch.nn.Parameter})


class _Refused(Exception):
    """Unwinds the state walk from a refused value, collecting its key path on the way."""

    def __init__(self, value: Any, why: str = "") -> None:
        self.value, self.why = value, why
        self.path: list[str] = []


def _user_allowed(t: type) -> bool:
    """Whether the user allow-listed ``t`` (``torch.serialization.add_safe_globals``)."""
    for entry in torch.serialization.get_safe_globals():
        if (entry[0] if isinstance(entry, tuple) else entry) is t:
            return True
    return False


def _walk(node: Any, leaves: frozenset[type], plain: bool) -> None:
    t = type(node)
    if t in leaves:
        return
    if t in _MAPPINGS and (not plain or t is not collections.Counter):
        for k, v in node.items():
            try:
                if plain and type(k) not in (str, int):
                    raise _Refused(k, f"has a key of type {type(k).__name__}; use str or int keys")
                _walk(k, leaves, plain)
                _walk(v, leaves, plain)
            except _Refused as r:
                r.path.append(f"[{k!r}]")
                raise
        # Module state dicts carry per-submodule versions as the attribute ``_metadata``.
        extra = getattr(node, "__dict__", None)
        if extra:
            _walk(extra, leaves, plain)
        return
    if t in _SEQUENCES and (not plain or t is not set):
        # Long lists of numbers (index permutations, histories): one C-speed pass.
        if not set(map(type, node)).difference(leaves):
            return
        for i, v in enumerate(node):
            try:
                _walk(v, leaves, plain)
            except _Refused as r:
                r.path.append(f"[{i}]" if t is not set else "{...}")
                raise
        return
    if not plain and _user_allowed(t):
        return  # the user vouched for it; its contents are theirs to vouch for too
    raise _Refused(node)


def _type_name(value: Any) -> str:
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _refusal_fix(value: Any) -> str:
    mod = type(value).__module__.split(".")[0]
    if mod == "numpy":
        return ("convert it in state_dict(): torch.from_numpy(a) for an array, float(x)/int(x) "
                "for a scalar, and for np.random.get_state() save its parts as a tensor and ints")
    if isinstance(value, torch.Tensor):
        return ("save a plain tensor (t.as_subclass(torch.Tensor)) or allow the class with "
                "torch.serialization.add_safe_globals")
    return ("store tensors, numbers, strings, lists, tuples or dicts instead (e.g. a tensor, "
            "a list or a dict of its fields), or allow the class with "
            "torch.serialization.add_safe_globals if you trust it")


def check_loadable(name: str, state: Any) -> None:
    """Refuse, at save time, state that ``torch.load(weights_only=True)`` would refuse.

    A walk over the state tree (no serialisation, tensors are not touched), accepting what
    that load accepts: tensors and parameters, None/bool/int/float/complex/str/bytes,
    dict/OrderedDict/Counter/list/tuple/set, ``torch.Size``/``dtype``/``device`` and types
    allowed with ``torch.serialization.add_safe_globals``. Saving anything else succeeds,
    and then every resume fails; raises :class:`~spotrun.errors.UnloadableStateError`
    naming the key path instead.
    """
    try:
        _walk(state, _LEAVES, plain=False)
    except _Refused as r:
        where = name + "".join(reversed(r.path))
        raise UnloadableStateError(
            f"{where} is a {_type_name(r.value)}, which safe (weights_only) loading refuses, "
            f"so every resume would fail; {_refusal_fix(r.value)}"
        ) from None


def check_plain(name: str, value: Any) -> None:
    """Refuse, at save time, a value that a ``weights_only`` load would refuse later.

    Failing now keeps the mistake from surfacing only at resume, when the run is stuck.
    """
    try:
        _walk(value, _PLAIN_LEAVES, plain=True)
    except _Refused as r:
        where = name + "".join(reversed(r.path))
        if r.why:
            raise UnloadableStateError(f"value {where!r} {r.why}") from None
        raise UnloadableStateError(
            f"value {where!r} is a {_type_name(r.value)}, which safe (weights_only) loading "
            "refuses; store plain numbers, strings, lists, dicts or tensors (e.g. float(x))"
        ) from None


# Values a staged state shares with the live one: immutable, nothing to copy.
_PLAIN = frozenset({int, float, bool, str, bytes, type(None)})


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
            if all(type(v) in _PLAIN for v in node):
                return node  # immutable through and through (Python's RNG state: 625 ints)
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
    return name, f.entry


def read_payload(
    storage: Storage, step: int, name: str, entry: FileEntry, *, weights_only: bool = True
) -> dict[str, Any]:
    """Load one payload file after checking it against its manifest entry.

    Raises CorruptCheckpointError when the bytes do not match, so the caller can fall back
    to an older checkpoint.
    """
    payload, _ = open_payload(storage, step, name, entry, weights_only=weights_only)
    return payload


class Verification:
    """The outcome of checking a payload against its manifest entry.

    :func:`open_payload` verifies every byte before it loads anything (CRC32C chunks on
    every core, memory speed), so this is always settled: :meth:`check` and :meth:`settle`
    return at once. Kept so callers need not know whether verification ran first or
    alongside the load.
    """

    def check(self) -> None:
        """Raise if the payload was damaged (it never is once returned: see above)."""

    def settle(self) -> None:
        """Like :meth:`check`; for callers whose load failed for another reason."""


def open_payload(
    storage: Storage, step: int, name: str, entry: FileEntry, *, weights_only: bool = True
) -> tuple[dict[str, Any], Verification]:
    """Verify one payload against its manifest entry, then load it; returns both.

    Nothing is loaded from a file that fails verification (CorruptCheckpointError), so a
    damaged checkpoint never reaches the live objects. Local files are checked through one
    memory map and then loaded memory-mapped (the tensors are views of the file's pages,
    which ``load_state_dict`` copies straight into the live tensors: no second copy in
    RAM); remote ones are read whole (parallel ranged GETs on S3), checked, and loaded
    from that buffer.
    """
    rel = f"{checkpoint_dir(step)}/{name}"
    where = storage.display(rel)
    local = storage.local_path(rel)
    if local is not None:
        with translate_errors(where, "reading"):
            found = checksum.problem_in_file(local, entry)
        source: Any = local
        use_mmap = True
    else:
        data = storage.read_bytes(rel)
        found = checksum.problem(data, entry)
        source, use_mmap = BufferReader(data), False
    if found:
        raise CorruptCheckpointError(f"{where}: {found}")
    try:
        # An OSError here (permission, EIO) is a failed read, not a damaged file: it
        # becomes a StorageError, which a restore never mistakes for damage.
        with translate_errors(where, "reading"):
            payload = torch.load(source, map_location="cpu", weights_only=weights_only, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"{where}: safe loading (weights_only=True) refused it: {first}; if you trust "
            "this storage, pass weights_only=False"
        ) from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        # Verified bytes that do not load: written by a broken writer, still damage.
        raise CorruptCheckpointError(f"{where}: cannot be read ({exc})") from exc
    if not isinstance(payload, dict):
        raise CorruptCheckpointError(f"{where}: holds a {type(payload).__name__}, not a spotrun payload")
    saved_step = payload.get("step", step)
    if type(saved_step) is not int or saved_step != step:
        raise CorruptCheckpointError(
            f"{where}: payload holds step {saved_step!r} but its folder is step {step} "
            "(copied from another checkpoint?)"
        )
    return payload, Verification()


class BufferReader(io.RawIOBase):
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
